"""Text -> video with the tiny pipeline: DDIM path vs diffusers' CogVideoXPipeline, determinism, checks.

Tolerance: frames in [0, 1], float32, max abs <= 2e-4 after 3 guided steps and the VAE decode
(the transformer alone agrees to 2e-5; errors grow through the sampler and decoder).
"""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline
from reference_models import tiny_cogvideox_folder

from repvideo_jax import pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root, refs = tiny_cogvideox_folder(tmp_path_factory.mktemp("cog"), seed=1)
  return pipeline.load_pipeline(root), refs


@pytest.mark.parametrize("rope", [False, True], ids=["sincos", "rope"])
def test_ddim_pipeline_matches_diffusers(tmp_path, rope):
  root, refs = tiny_cogvideox_folder(tmp_path / "cog", seed=2, use_rotary_positional_embeddings=rope)
  pipe = pipeline.load_pipeline(root)
  ref_pipe = CogVideoXPipeline(
    tokenizer=refs["tokenizer"],
    text_encoder=refs["text_encoder"],
    vae=refs["vae"],
    transformer=refs["transformer"],
    scheduler=refs["scheduler"],
  )
  prompts = ["a red circle moving left", "blue ocean waves at night"]
  latents = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
  ref = ref_pipe(
    prompt=prompts,
    negative_prompt="",
    num_frames=9,
    height=64,
    width=64,
    num_inference_steps=3,
    guidance_scale=6.0,
    use_dynamic_cfg=False,
    latents=latents.clone(),
    max_sequence_length=8,
    output_type="np",
  ).frames
  settings = pipeline.GenerationSettings(
    num_frames=9,
    height=64,
    width=64,
    steps=3,
    guidance=6.0,
    cfg_schedule="constant",
    sampler="ddim",
    negative_prompt="",
  )
  ours = pipeline.generate(
    pipe, prompts, settings, noise=latents.permute(0, 1, 3, 4, 2).numpy(), output="float"
  )
  assert ours.shape == ref.shape == (2, 9, 64, 64, 3)
  assert ref.std() > 0.01
  np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_released_sampler_is_deterministic_per_seed(tiny):
  pipe, _ = tiny
  s = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=4, seed=3)
  a = pipeline.generate(pipe, ["a cat"], s)
  b = pipeline.generate(pipe, ["a cat"], s)
  c = pipeline.generate(pipe, ["a cat"], pipeline.GenerationSettings(**{**s.__dict__, "seed": 4}))
  assert a.dtype == np.uint8 and a.shape == (1, 9, 64, 64, 3)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).max() > 0
  assert np.isfinite(a).all() and a.std() > 0


def test_prompt_noise_does_not_depend_on_batch_neighbours(tiny):
  pipe, _ = tiny
  s = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=2, sampler="ddim", seed=5)
  both = pipeline.generate(pipe, ["a cat", "a dog"], s, output="float")
  alone = pipeline.generate(pipe, ["a cat"], s, output="float")
  np.testing.assert_allclose(both[0], alone[0], atol=1e-5)


def test_progress_callback_counts_every_step(tiny):
  pipe, _ = tiny
  seen = []
  s = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=5, seed=0)
  pipeline.generate(pipe, ["a cat"], s, progress=seen.append)
  assert sorted(seen) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("num_frames", 10, "4k\\+1"),
    ("height", 60, "multiples of 16"),
    ("width", 0, "multiples of 16"),
    ("num_frames", 17, "positional table"),
    ("num_frames", 13, "4 latent frames.*use 8k\\+1 frames, e.g. 9 or 17"),
    ("steps", 0, "steps must be"),
    ("guidance", 0.5, "guidance"),
    ("sampler", "euler", "sampler must be"),
    ("cfg_schedule", "wild", "cfg_schedule"),
  ],
)
def test_bad_settings_raise_clear_errors(tiny, field, value, match):
  pipe, _ = tiny
  s = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=2)
  with pytest.raises(ValueError, match=match):
    pipeline.GenerationSettings(**{**s.__dict__, field: value}).validate(
      pipe.transformer_config, pipe.vae_config
    )
