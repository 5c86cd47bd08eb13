"""LoRA (repvideo_jax/lora.py and the transformer's scan hook): parity with diffusers + peft, files, grads.

diffusers is the reference: a tiny random CogVideoX transformer gets a peft LoRA (to_q, to_k, to_v,
to_out.0; random nonzero B; lora_alpha != r), saved with ``CogVideoXPipeline.save_lora_weights`` and
loaded back with ``load_lora_weights`` + ``set_adapters`` (unmerged) or ``fuse_lora`` (merged).
Tolerance: float32, max |ours - diffusers| / max |diffusers| <= 1e-5.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import state_dict_numpy
from reference_models import diffusers_forward, tiny_diffusers_transformer, to_channels_last

from repvideo_jax import checkpoint_io
from repvideo_jax import lora as L
from repvideo_jax import transformer as T
from repvideo_jax import transformer_weights as W
from repvideo_jax.weights_common import CheckpointKeyError

RTOL = 1e-5
RANK, ALPHA = 4, 12.0  # alpha != rank: the scaling alpha / rank = 3 matters
SEED = 11
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _rel(out, ref) -> float:
  return float(np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def _pipeline(model):
  from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

  return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)


def _save_peft_lora(folder, *, metadata: bool, seed: int = 0):
  """A peft LoRA on the tiny model, B random so it matters, saved the diffusers way."""
  from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict

  model = tiny_diffusers_transformer(seed=SEED)
  model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # (module fixtures run outside conftest's no_grad)
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  meta = model.peft_config["default"].to_dict() if metadata else None
  CogVideoXPipeline.save_lora_weights(
    folder, transformer_lora_layers=get_peft_model_state_dict(model), transformer_lora_adapter_metadata=meta
  )
  return folder / L.PEFT_WEIGHTS


def _diffusers_out(lora_file, scale, *, fuse: bool, inputs):
  pipe = _pipeline(tiny_diffusers_transformer(seed=SEED))
  pipe.load_lora_weights(str(lora_file), adapter_name="x")
  if fuse:
    pipe.fuse_lora(lora_scale=scale)
  else:
    pipe.set_adapters(["x"], [scale])
  return to_channels_last(diffusers_forward(pipe.transformer, *inputs))


@pytest.fixture(scope="module")
def base():
  """(model, our config, our params, torch inputs, jitted unmerged apply)."""
  model = tiny_diffusers_transformer(seed=SEED)
  cfg = W.config_from_diffusers(dict(model.config))
  params = W.from_diffusers(state_dict_numpy(model), cfg)
  g = torch.Generator().manual_seed(0)
  c = model.config
  lat = torch.randn(2, 3, c.in_channels, c.sample_height, c.sample_width, generator=g)
  text = torch.randn(2, c.max_text_seq_length, c.text_embed_dim, generator=g)
  inputs = (lat, torch.tensor([17, 640]), text)
  return model, cfg, params, inputs, jax.jit(T.make_apply(cfg))


def _ours(base, params, lora=None):
  _, _, _, (lat, ts, text), fn = base
  return np.asarray(fn(params, to_channels_last(lat), ts.numpy(), text.numpy(), lora=lora))


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
  return _save_peft_lora(tmp_path_factory.mktemp("peft"), metadata=True)


REPORT = {}  # case -> max relative error, printed at the end (pytest -s)


@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("fuse", [False, True], ids=["diffusers-unmerged", "diffusers-fused"])
def test_matches_diffusers(base, peft_file, scale, fuse):
  _, cfg, params, inputs, _ = base
  loaded = L.load(peft_file, cfg)
  assert loaded.format == "peft" and loaded.config == L.LoraConfig(
    RANK, ALPHA, ("to_q", "to_k", "to_v", "to_out")
  )
  ref = _diffusers_out(peft_file, scale, fuse=fuse, inputs=inputs)
  plain = _ours(base, params)
  assert _rel(plain, ref) > 1e-2  # the LoRA changes the output a lot
  unmerged = _ours(base, params, [(loaded.lora, scale)])
  merged = _ours(base, L.merge(params, loaded.lora, scale))
  for ours, out in (("unmerged", unmerged), ("merged", merged)):
    REPORT[
      f"peft alpha={ALPHA} rank={RANK} scale={scale} diffusers-{'fused' if fuse else 'unmerged'} vs ours-{ours}"
    ] = _rel(out, ref)
    assert _rel(out, ref) <= RTOL, ours


def test_no_metadata_means_alpha_equals_rank(base, tmp_path):
  """diffusers' CogVideoX loader passes no network alphas: a file without lora_adapter_metadata has
  alpha = rank (scaling 1). We match that."""
  _, cfg, params, inputs, _ = base
  path = _save_peft_lora(tmp_path, metadata=False, seed=1)
  loaded = L.load(path, cfg)
  assert loaded.config.lora_alpha == RANK
  ref = _diffusers_out(path, 1.0, fuse=False, inputs=inputs)
  REPORT["peft without metadata (alpha = rank), scale 1.0, ours-unmerged"] = err = _rel(
    _ours(base, params, [(loaded.lora, 1.0)]), ref
  )
  assert err <= RTOL


def test_our_export_loads_in_diffusers(base, peft_file, tmp_path):
  _, cfg, params, inputs, _ = base
  loaded = L.load(peft_file, cfg)
  ours_dir = L.save(tmp_path / "ours", loaded.lora, loaded.config, base=L.base_description(cfg))
  again = L.load(ours_dir, cfg)
  exported = L.save(tmp_path / "export", again.lora, again.config, fmt="peft")
  assert exported.name == L.PEFT_WEIGHTS
  state = checkpoint_io.read_safetensors(exported)
  assert all(k.startswith("transformer.transformer_blocks.") for k in state)
  ref = _diffusers_out(exported, 0.5, fuse=False, inputs=inputs)
  REPORT["our export (to_peft) loaded in diffusers, scale 0.5, ours-unmerged"] = err = _rel(
    _ours(base, params, [(again.lora, 0.5)]), ref
  )
  assert err <= RTOL
  # and the export reads back to the same tree (bitwise: transposes only)
  back = L.load(exported, cfg)
  assert back.config == loaded.config
  for name, ab in loaded.lora["blocks"].items():
    for k in "ab":
      np.testing.assert_array_equal(back.lora["blocks"][name][k], ab[k])


def test_our_format_round_trips_exactly(base, tmp_path):
  _, cfg, _, _, _ = base
  lcfg = L.LoraConfig(rank=3, alpha=5.5, targets=("to_v", "ff_in", "norm2_mod"), dropout=0.1)
  lora = L.init(cfg, lcfg, 3)
  lora["blocks"] = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(1), a.shape), lora["blocks"])
  L.save(tmp_path / "a", lora, lcfg, base=L.base_description(cfg))
  loaded = L.load(tmp_path / "a", cfg)
  assert loaded.format == "ours" and loaded.config == lcfg
  assert loaded.base["transformer"]["num_layers"] == cfg.num_layers
  manifest = json.loads((tmp_path / "a" / L.MANIFEST).read_text())
  assert manifest["format"] == L.FORMAT and manifest["lora"]["alpha"] == 5.5
  assert jax.tree.structure(loaded.lora) == jax.tree.structure(jax.tree.map(np.asarray, lora))
  for x, y in zip(jax.tree.leaves(loaded.lora), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(x, np.asarray(y))
  with pytest.raises(FileExistsError):
    L.save(tmp_path / "a", lora, lcfg)


def test_unmappable_keys_are_one_clear_error(peft_file, base):
  _, cfg, _, _, _ = base
  state = dict(checkpoint_io.read_safetensors(peft_file))
  state["transformer.proj_out.lora_A.weight"] = np.zeros((RANK, 32), np.float32)
  state["transformer.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"] = np.zeros(32, np.float32)
  state["transformer.transformer_blocks.7.attn1.to_q.lora_A.weight"] = np.zeros((RANK, 32), np.float32)
  del state["transformer.transformer_blocks.1.attn1.to_k.lora_B.weight"]
  with pytest.raises(CheckpointKeyError) as e:
    L.from_peft(state, cfg)
  msg = str(e.value)
  for key in (
    "transformer.proj_out.lora_A.weight",
    "lora_magnitude_vector",
    "transformer_blocks.7.attn1.to_q",
    "transformer.transformer_blocks.1.attn1.to_k.lora_B.weight",
    "DoRA",
    "num_layers=2",
  ):
    assert key in msg, key


def test_lora_for_another_model_is_refused(base, tmp_path):
  _, cfg, _, _, _ = base
  deeper = L.init(T.TransformerConfig(**{**cfg.__dict__, "num_layers": 3}), L.LoraConfig(rank=2))
  with pytest.raises(ValueError, match="3 layers.*num_layers=2"):
    L.check(deeper, cfg)
  wider = T.TransformerConfig(**{**cfg.__dict__, "num_heads": 4})
  L.save(tmp_path / "w", L.init(wider, L.LoraConfig(rank=2)), L.LoraConfig(rank=2))
  with pytest.raises(ValueError, match=r"to_q adapts a \(64, 64\) kernel.*\(32, 32\)"):
    L.load(tmp_path / "w", cfg)
  with pytest.raises(ValueError, match="targets"):
    L.LoraConfig(targets=("to_qq",))
  with pytest.raises(ValueError, match="rank"):
    L.LoraConfig(rank=0)


def test_none_and_zero_b_are_the_base_model(base):
  _, cfg, params, _, _ = base
  plain = _ours(base, params)
  np.testing.assert_array_equal(_ours(base, params, None), plain)
  lora = L.init(cfg, L.LoraConfig(rank=4, alpha=7.0, targets=T.LORA_TARGETS), 0)  # B = 0 at init
  assert float(jnp.abs(lora["blocks"]["to_q"]["a"]).max()) > 0
  np.testing.assert_array_equal(_ours(base, params, [(lora, 1.0)]), plain)
  np.testing.assert_array_equal(_ours(base, L.merge(params, lora, 1.0)), plain)


@pytest.mark.parametrize("scan_layers,remat", [(True, "full"), (False, "none")], ids=["scan-remat", "loop"])
def test_grad_unmerged_matches_grad_through_merge(scan_layers, remat):
  """Cache on, all eight targets, two LoRAs: d loss / d factors through the scan hook == through merge."""
  cfg = T.TransformerConfig(
    num_layers=3,
    num_heads=2,
    head_dim=16,
    in_channels=4,
    out_channels=4,
    text_embed_dim=8,
    text_length=4,
    time_embed_dim=16,
    sample_frames=3,
    sample_height=4,
    sample_width=4,
    cache_window=2,
    zero_init_modulation=False,
    scan_layers=scan_layers,
    remat=remat,
  )
  params = T.init(cfg, 1)
  loras = []
  for i, (rank, targets) in enumerate([(2, T.LORA_TARGETS), (3, ("to_v", "ff_out"))]):
    lora = L.init(cfg, L.LoraConfig(rank=rank, alpha=rank + 1.5, targets=targets), i)
    lora["blocks"] = jax.tree.map(
      lambda a, i=i: 0.2 * jax.random.normal(jax.random.key(i), a.shape), lora["blocks"]
    )
    loras.append(lora)
  lat = jax.random.normal(jax.random.key(5), (2, 2, 4, 4, 4))
  text = jax.random.normal(jax.random.key(6), (2, 4, 8))
  ts = jnp.array([3, 800])
  target = jax.random.normal(jax.random.key(7), lat.shape)

  def unmerged(loras):
    out = T.apply(params, lat, ts, text, config=cfg, lora=[(loras[0], 0.5), (loras[1], 1.0)])
    return jnp.mean((out - target) ** 2)

  def merged(loras):
    p = L.merge(L.merge(params, loras[0], 0.5), loras[1], 1.0)
    return jnp.mean((T.apply(p, lat, ts, text, config=cfg) - target) ** 2)

  (lu, gu), (lm, gm) = (
    jax.jit(jax.value_and_grad(unmerged))(loras),
    jax.jit(jax.value_and_grad(merged))(loras),
  )
  np.testing.assert_allclose(lu, lm, rtol=1e-6)
  worst = max(_rel(a, b) for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gm)) if np.abs(b).max() > 0)
  REPORT[f"grad unmerged vs merged ({'scan, remat' if scan_layers else 'loop'})"] = worst
  assert worst <= 1e-5
  assert all(float(g[0]["alpha"]) == 0 and float(g[1]["alpha"]) == 0 for g in (gu, gm))  # alpha is a constant


def test_sample_py_and_convert_use_a_lora(tmp_path):
  """The user path on the bundled demo model: a LoRA converted to diffusers' format and back by
  ``convert lora`` is the same tree; ``sample.py --lora`` unmerged and ``--lora-merge`` write the same
  video bytes, which differ from the base model's; the sidecar records the LoRA and its scale."""
  import pathlib
  import subprocess
  import sys

  from repvideo_jax.demo import demo_model_dir

  root = pathlib.Path(__file__).resolve().parent.parent
  cfg, _ = W.load(demo_model_dir() / "transformer")
  lcfg = L.LoraConfig(rank=2, alpha=4.0)
  tree = L.init(cfg, lcfg, 0)
  rng = np.random.default_rng(0)
  for ab in tree["blocks"].values():  # a nonzero B, so the LoRA changes the video
    ab["b"] = jnp.asarray(0.5 * rng.standard_normal(ab["b"].shape), jnp.float32)
  L.save(tmp_path / "mine", tree, lcfg)

  def run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

  run(
    "-m",
    "repvideo_jax.convert",
    "lora",
    "--src",
    tmp_path / "mine",
    "--dst",
    tmp_path / "peft",
    "--to",
    "peft",
  )
  run(
    "-m",
    "repvideo_jax.convert",
    "lora",
    "--src",
    tmp_path / "peft",
    "--dst",
    tmp_path / "back",
    "--to",
    "ours",
  )
  back = L.load(tmp_path / "back").lora
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, tree))
  common = ["--prompt", "a red circle moving left on a black background", "--steps", "2", "--seed", "3"]
  run(root / "sample.py", *common, "--out", tmp_path / "base")
  run(root / "sample.py", *common, "--lora", f"{tmp_path / 'peft'}:0.5", "--out", tmp_path / "unmerged")
  run(
    root / "sample.py",
    *common,
    "--lora",
    f"{tmp_path / 'peft'}:0.5",
    "--lora-merge",
    "--out",
    tmp_path / "merged",
  )
  (video,) = sorted((tmp_path / "unmerged").glob("*.mp4"))
  (merged,) = sorted((tmp_path / "merged").glob("*.mp4"))
  (base_video,) = sorted((tmp_path / "base").glob("*.mp4"))
  shas = [json.loads(v.with_suffix(".json").read_text())["frames_sha256"] for v in (video, merged)]
  assert shas[0] == shas[1]  # the same frames ...
  assert video.read_bytes() == merged.read_bytes()  # ... and the same file (tests/test_host_memory.py)
  assert video.read_bytes() != base_video.read_bytes()
  sidecar = json.loads(video.with_suffix(".json").read_text())
  assert [(pathlib.Path(e["path"]).name, e["scale"]) for e in sidecar["loras"]] == [("peft", 0.5)]
