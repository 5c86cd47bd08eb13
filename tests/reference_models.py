"""Reference implementations used by the tests (PyTorch, built on diffusers' own modules).

``repvideo_reference_forward`` is an independent implementation of the RepVideo loop exactly in
the list-of-cached-tensors form of the release (not the running-sum form our model uses; docs/model.md),
reusing the diffusers CogVideoX blocks for everything that is stock CogVideoX.
"""

import types

import numpy as np
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

TINY = dict(
  num_layers=2,
  num_attention_heads=2,
  attention_head_dim=16,
  in_channels=4,
  out_channels=4,
  text_embed_dim=32,
  time_embed_dim=16,
  sample_frames=9,
  sample_height=8,
  sample_width=8,
  patch_size=2,
  max_text_seq_length=8,
  use_rotary_positional_embeddings=False,
  temporal_compression_ratio=4,
)


def tiny_diffusers_transformer(seed=0, **overrides):
  from conftest import randomize_

  torch.manual_seed(seed)
  model = CogVideoXTransformer3DModel(**{**TINY, **overrides})
  return randomize_(model, seed)


def rotary_embeddings(model, frames, height, width):
  """The CogVideoX pipeline's own rotary table for latents (frames, height, width)."""
  fake_pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
  return CogVideoXPipeline._prepare_rotary_positional_embeddings(
    fake_pipe, height * 8, width * 8, frames, torch.device("cpu")
  )


def diffusers_forward(model, latents_tchw, timesteps, text):
  """diffusers forward; latents (B, T, C, H, W) torch."""
  rope = None
  if model.config.use_rotary_positional_embeddings:
    _, t, _, h, w = latents_tchw.shape
    rope = rotary_embeddings(model, t, h, w)
  return model(latents_tchw, text, timesteps, image_rotary_emb=rope, return_dict=False)[0]


def repvideo_reference_forward(model, latents_tchw, timesteps, text, gates, window=6, record=None):
  """RepVideo forward, the released loop: list cache of block outputs, reset when i % window == 0.

  ``record``: a list that receives every block's output ([text | video] tokens), in layer order.
  """
  cfg = model.config
  b, t, c, h, w = latents_tchw.shape
  rope = rotary_embeddings(model, t, h, w) if cfg.use_rotary_positional_embeddings else None
  emb = model.time_embedding(model.time_proj(timesteps).to(latents_tchw.dtype))
  seq = model.patch_embed(text, latents_tchw)  # [text | video] + positions
  text_len = text.shape[1]
  hstate = seq
  cache = [seq]
  for i, block in enumerate(model.transformer_blocks):
    m = cache[0] if len(cache) == 1 else torch.stack(cache).mean(0)
    x = gates[i] * m + (1 - gates[i]) * hstate
    video, txt = block(x[:, text_len:], x[:, :text_len], emb, rope)
    hstate = torch.cat([txt, video], dim=1)
    if record is not None:
      record.append(hstate)
    cache = [hstate] if i % window == 0 else cache + [hstate]
  video = model.norm_final(hstate[:, text_len:])
  video = model.norm_out(video, temb=emb)
  video = model.proj_out(video)
  p = cfg.patch_size
  out = video.reshape(b, t, h // p, w // p, -1, p, p)
  return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


def to_channels_last(x_tchw: torch.Tensor) -> np.ndarray:
  return x_tchw.permute(0, 1, 3, 4, 2).numpy()


def sat_state_dict(model, gates=None) -> dict[str, torch.Tensor]:
  """Writes a diffusers CogVideoX model's weights under the official SAT key names (docs/checkpoints.md).

  This is the inverse of the SAT -> diffusers converter ('Transformer keys' in docs/checkpoints.md), written
  independently of our loader: fused q|k|v, 12-way adaLN chunks in SAT order, pos table included.
  """
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  out = {}
  ren = {
    "patch_embed.proj": "mixins.patch_embed.proj",
    "patch_embed.text_proj": "mixins.patch_embed.text_proj",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "norm_final": "transformer.final_layernorm",
    "norm_out.norm": "mixins.final_layer.norm_final",
    "norm_out.linear": "mixins.final_layer.adaLN_modulation.1",
    "proj_out": "mixins.final_layer.linear",
  }
  for src, dst in ren.items():
    for wb in ("weight", "bias"):
      out[f"{dst}.{wb}"] = sd[f"{src}.{wb}"]
  for i in range(model.config.num_layers):
    pre, lay = f"transformer_blocks.{i}", f"transformer.layers.{i}"
    for wb in ("weight", "bias"):
      out[f"{lay}.input_layernorm.{wb}"] = sd[f"{pre}.norm1.norm.{wb}"]
      out[f"{lay}.post_attention_layernorm.{wb}"] = sd[f"{pre}.norm2.norm.{wb}"]
      out[f"{lay}.attention.query_key_value.{wb}"] = torch.cat(
        [sd[f"{pre}.attn1.to_{n}.{wb}"] for n in "qkv"], 0
      )
      out[f"{lay}.attention.dense.{wb}"] = sd[f"{pre}.attn1.to_out.0.{wb}"]
      out[f"{lay}.mlp.dense_h_to_4h.{wb}"] = sd[f"{pre}.ff.net.0.proj.{wb}"]
      out[f"{lay}.mlp.dense_4h_to_h.{wb}"] = sd[f"{pre}.ff.net.2.{wb}"]
      out[f"mixins.adaln_layer.query_layernorm_list.{i}.{wb}"] = sd[f"{pre}.attn1.norm_q.{wb}"]
      out[f"mixins.adaln_layer.key_layernorm_list.{i}.{wb}"] = sd[f"{pre}.attn1.norm_k.{wb}"]
      n1 = sd[f"{pre}.norm1.linear.{wb}"].chunk(6, 0)  # shift, scale, gate, t_shift, t_scale, t_gate
      n2 = sd[f"{pre}.norm2.linear.{wb}"].chunk(6, 0)
      # SAT order: msa(shift, scale, gate), mlp(shift, scale, gate), then the same for text.
      out[f"mixins.adaln_layer.adaLN_modulations.{i}.1.{wb}"] = torch.cat(
        [n1[0], n1[1], n1[2], n2[0], n2[1], n2[2], n1[3], n1[4], n1[5], n2[3], n2[4], n2[5]], 0
      )
  if gates is not None:
    out["transformer.learnable_gating"] = torch.as_tensor(gates, dtype=torch.float32)
  if "patch_embed.pos_embedding" in model.patch_embed.state_dict(keep_vars=True) or hasattr(
    model.patch_embed, "pos_embedding"
  ):
    out["mixins.pos_embed.pos_embedding"] = model.patch_embed.pos_embedding.clone()
  return {"model.diffusion_model." + k: v for k, v in out.items()}


TINY_VAE = dict(
  block_out_channels=(16, 32, 32, 32),
  latent_channels=4,
  layers_per_block=1,
  norm_num_groups=8,
  temporal_compression_ratio=4,
  sample_height=32,
  sample_width=32,
)
TINY_T5 = dict(
  vocab_size=128,
  d_model=32,
  d_kv=8,
  d_ff=64,
  num_layers=2,
  num_heads=4,
  feed_forward_proj="gated-gelu",
  dropout_rate=0.0,
)
_WORDS = (
  "a the red blue green cat dog panda guitar playing forest bamboo ocean waves beach sunset city "
  "night rain car street walking running flying bird sky clouds mountain river snow fire moving "
  "left right circle square triangle bouncing growing black background"
).split()


def tiny_t5_tokenizer(folder):
  """A T5 tokenizer from a sentencepiece model trained here (no hub): pad 0, eos 1, unk 2, no bos."""
  import io
  import pathlib
  import random

  import sentencepiece as spm
  from transformers import T5Tokenizer

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = random.Random(0)
  lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines),
    model_writer=buf,
    vocab_size=100,
    hard_vocab_limit=False,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    minloglevel=2,
  )
  (folder / "spiece.model").write_bytes(buf.getvalue())
  tok = T5Tokenizer.from_pretrained(folder, extra_ids=0)
  tok.save_pretrained(folder)  # records extra_ids=0 so a plain from_pretrained works later
  return tok


def tiny_cogvideox_folder(root, seed=0, **transformer_overrides):
  """A diffusers-layout CogVideoX folder with tiny random weights and a local tokenizer.

  Returns (root, dict of the torch reference modules). Video 9 frames at 64x64 -> latents 3x8x8.
  """
  import pathlib

  from conftest import randomize_
  from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler
  from transformers import T5Config, T5EncoderModel

  root = pathlib.Path(root)
  transformer = tiny_diffusers_transformer(seed=seed, **transformer_overrides)
  transformer.save_pretrained(root / "transformer")
  torch.manual_seed(seed)
  vae = AutoencoderKLCogVideoX(**TINY_VAE).eval()
  randomize_(vae, seed, scale=0.1)
  vae.save_pretrained(root / "vae")
  t5 = randomize_(T5EncoderModel(T5Config(**TINY_T5)), seed)
  t5.save_pretrained(root / "text_encoder")
  tok = tiny_t5_tokenizer(root / "tokenizer")
  scheduler = CogVideoXDDIMScheduler(
    snr_shift_scale=3.0,
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=True,
  )
  scheduler.save_pretrained(root / "scheduler")
  return root, {
    "transformer": transformer,
    "vae": vae,
    "text_encoder": t5,
    "tokenizer": tok,
    "scheduler": scheduler,
  }
