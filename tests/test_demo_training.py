"""The demo's small trainers: the tokenizer, T5 denoising pretraining and VAE training.

Each trainer must lower its loss in a few steps, and a run stopped and restarted must end with
exactly the params of an uninterrupted run (the loop checkpoints and its batches are a function of
the step).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from repvideo_jax import text_encoder as TE
from repvideo_jax import vae as V
from repvideo_jax.demo import domain as D
from repvideo_jax.demo import text_training, vae_training

CAPTIONS = sorted({D.caption(s) for s in D.all_specs()})
T5 = TE.T5Config(
  vocab_size=48,
  d_model=32,
  d_kv=8,
  num_heads=4,
  d_ff=64,
  num_layers=2,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=16,
  max_length=16,
)
VAE = V.VAEConfig(
  block_out_channels=(8, 16, 16, 16),
  latent_channels=4,
  layers_per_block=1,
  norm_num_groups=8,
  scaling_factor=1.0,
  sample_height=32,
  sample_width=32,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return text_training.train_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok"), vocab_size=48)


def test_tokenizer_has_t5_specials_and_round_trips(tokenizer):
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
  assert len(tokenizer) == 3 + 19  # the specials and one piece per caption word
  ids, mask = TE.tokenize(tokenizer, CAPTIONS[:5], 16)
  assert (mask.sum(1) == np.array([len(c.split()) + 1 for c in CAPTIONS[:5]])).all()
  for caption, row, m in zip(CAPTIONS[:5], ids, mask):
    real = row[m > 0]
    assert real[-1] == 1 and (row[m == 0] == 0).all()  # EOS, then padding
    assert tokenizer.decode(real[:-1]) == caption
  # Every caption word is known: no <unk>; an unseen word is <unk>.
  all_ids, all_mask = TE.tokenize(tokenizer, CAPTIONS, 16)
  assert not (all_ids[all_mask > 0] == 2).any()
  assert tokenizer("a purple circle")["input_ids"][1] == 2
  assert tokenizer("A RED Circle")["input_ids"] == tokenizer("a red circle")["input_ids"]  # case-folded


def test_corrupt_replaces_only_real_tokens_at_the_rate():
  ids = jnp.tile(jnp.array([[5, 6, 7, 8, 1, 0, 0, 0]], jnp.int32), (4000, 1))
  out = np.asarray(text_training.corrupt(jax.random.key(0), ids, 0.3, 40))
  changed = out != np.asarray(ids)
  assert not changed[:, 5:].any()  # padding untouched
  # A replacement can draw the original id (1 in 37 ordinary ids): rate 0.3 * 36/37 of real tokens.
  assert changed[:, :5].mean() == pytest.approx(0.3 * 36 / 37, abs=0.01)
  assert out.min() >= 0 and out[changed].min() >= text_training.FIRST_ORDINARY_ID and out.max() < 40


def test_text_pretraining_lowers_the_loss_and_resumes_exactly(tokenizer, tmp_path):
  cfg = TE.T5Config(**{**T5.__dict__, "vocab_size": len(tokenizer)})
  tc = text_training.TextTrainConfig(
    steps=40, batch_size=16, lr=3e-3, warmup_steps=5, log_every=1, save_every=20
  )
  params, rows = text_training.pretrain_encoder(
    cfg, tokenizer, CAPTIONS, tc, tmp_path / "a", max_length=16, progress=False
  )
  losses = [r["loss"] for r in rows]
  # 30% of the tokens are corrupted and a corrupted slot can only be guessed from the template, so
  # the loss has a floor well above 0: ask for a clear fall, and most tokens right.
  assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
  assert rows[-1]["accuracy"] > 0.7, rows[-1]
  # Preempted at step 25 (a checkpoint at 20 and one at 25), then the same call again: the params
  # of one uninterrupted run.
  text_training.pretrain_encoder(
    cfg, tokenizer, CAPTIONS, tc, tmp_path / "b", max_length=16, progress=False, stop_at=25
  )
  resumed, resumed_rows = text_training.pretrain_encoder(
    cfg, tokenizer, CAPTIONS, tc, tmp_path / "b", max_length=16, progress=False
  )
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # The log is the whole history, both starts: the same losses as the uninterrupted run's.
  assert [r["step"] for r in resumed_rows] == list(range(1, 41))
  assert [r["loss"] for r in resumed_rows] == losses
  # A call on a finished run trains nothing and still returns the params and the history.
  again, again_rows = text_training.pretrain_encoder(
    cfg, tokenizer, CAPTIONS, tc, tmp_path / "b", max_length=16, progress=False
  )
  assert again_rows == resumed_rows
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_text_pretraining_refuses_a_too_small_vocabulary(tokenizer, tmp_path):
  cfg = TE.T5Config(**{**T5.__dict__, "vocab_size": 10})
  with pytest.raises(ValueError, match="raise vocab_size to at least"):
    text_training.pretrain_encoder(
      cfg,
      tokenizer,
      CAPTIONS,
      text_training.TextTrainConfig(steps=1),
      tmp_path,
      max_length=16,
      progress=False,
    )


def _clips(step, n=2, frames=9):
  rng = np.random.default_rng(step)
  specs = D.all_specs()
  return np.stack(
    [
      D.render(
        specs[rng.integers(len(specs))], num_frames=frames, height=32, width=32, seed=int(rng.integers(1000))
      )
      for _ in range(n)
    ]
  )


def _images(step):
  return _clips(step, n=4)[:, :1]


def test_vae_training_lowers_the_loss_and_resumes_exactly(tmp_path):
  tc = vae_training.VAETrainConfig(
    steps=24,
    batch_size=2,
    frames=9,
    image_steps=12,
    image_batch_size=4,
    lr=3e-3,
    warmup_steps=2,
    log_every=1,
    save_every=10,
  )
  params, rows = vae_training.train(VAE, tc, _clips, tmp_path / "a", images=_images, progress=False)
  image_losses = [r["loss"] for r in rows if r["step"] <= 12]
  assert np.mean(image_losses[-3:]) < 0.5 * np.mean(image_losses[:3]), image_losses
  assert all(np.isfinite(r["loss"]) for r in rows)
  vae_training.train(VAE, tc, _clips, tmp_path / "b", images=_images, progress=False, stop_at=15)
  resumed, _ = vae_training.train(VAE, tc, _clips, tmp_path / "b", images=_images, progress=False)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_vae_loss_terms_and_latent_scale():
  params = V.init(VAE, 1)
  video = _clips(3)
  x = jnp.asarray(video, jnp.float32) / 127.5 - 1.0
  key = jax.random.key(2)
  loss, terms = vae_training.loss_terms(params, x, key, config=VAE, kl_weight=0.5)
  # Independently: the same posterior sample through the decoder, and the Gaussian KL formula.
  post = V.encode_posterior(params, x, config=VAE)
  mean, logvar = np.asarray(post.mean, np.float64), np.asarray(post.logvar, np.float64)
  z = post.sample(key)
  recon = np.asarray(V.decode(params, z, config=VAE, chunking="released"), np.float64)
  err = recon - np.asarray(x, np.float64)
  kl = 0.5 * np.mean(mean**2 + np.exp(logvar) - 1 - logvar)
  assert float(terms["l1"]) == pytest.approx(np.abs(err).mean(), rel=1e-5)
  assert float(terms["mse"]) == pytest.approx((err**2).mean(), rel=1e-5)
  assert float(terms["kl"]) == pytest.approx(kl, rel=1e-5)
  assert float(loss) == pytest.approx(np.abs(err).mean() + (err**2).mean() + 0.5 * kl, rel=1e-5)
  scale = vae_training.latent_scale(params, VAE, video, batch_size=1)
  assert scale == pytest.approx(1.0 / mean.std(), rel=1e-5)
  # The edge and gradient terms, in numpy: the 5 x 5 max - min of the brightest channel, padded with
  # the edge-neutral -inf/+inf of "SAME" windows, and plain finite differences along H and W.
  weighted, t2 = vae_training.loss_terms(
    params, x, key, config=VAE, kl_weight=0.5, edge_weight=2.0, gradient_weight=3.0
  )
  target = np.asarray(x, np.float64)
  lum = target.max(axis=-1)
  pad_hi = np.pad(lum, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-np.inf)
  pad_lo = np.pad(lum, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=np.inf)
  h, w = lum.shape[2:]
  hi = np.max([pad_hi[:, :, i : i + h, j : j + w] for i in range(5) for j in range(5)], axis=0)
  lo = np.min([pad_lo[:, :, i : i + h, j : j + w] for i in range(5) for j in range(5)], axis=0)
  band = (hi - lo > 0.5)[..., None]
  assert 0 < band.mean() < 0.9  # the test clip has edges, and not only edges
  edge = (band * np.abs(err)).sum() / (3 * band.sum() + 1)
  grad = sum(np.abs(np.diff(recon, axis=a) - np.diff(target, axis=a)).mean() for a in (2, 3))
  assert float(t2["edge"]) == pytest.approx(edge, rel=1e-4)
  assert float(t2["gradient"]) == pytest.approx(grad, rel=1e-4)
  assert float(weighted) == pytest.approx(float(loss) + 2.0 * edge + 3.0 * grad, rel=1e-5)
  # The silhouette hinge, in numpy: the brightest channel at least 0.2 on the target's shape pixels
  # and at most -0.7 elsewhere, each side averaged over its own pixels.
  with_sil, t3 = vae_training.loss_terms(params, x, key, config=VAE, kl_weight=0.5, silhouette_weight=4.0)
  bright, inside = recon.max(axis=-1), lum > 0
  assert 0 < inside.mean() < 0.5
  miss_in = np.maximum(0.2 - bright, 0)[inside].sum() / (inside.sum() + 1)
  miss_out = np.maximum(bright + 0.7, 0)[~inside].sum() / ((~inside).sum() + 1)
  assert miss_in > 0 and miss_out > 0  # an untrained decoder misses on both sides
  assert float(t3["silhouette"]) == pytest.approx(miss_in + miss_out, rel=1e-4)
  assert float(with_sil) == pytest.approx(float(loss) + 4.0 * (miss_in + miss_out), rel=1e-5)
  # The crisp-edge hinge, in numpy: margins 0.9 / -0.9, averaged over the edge band only.
  with_crisp, t4 = vae_training.loss_terms(params, x, key, config=VAE, kl_weight=0.5, crisp_weight=5.0)
  band2 = band[..., 0]
  crisp_miss = np.where(inside, np.maximum(0.9 - bright, 0), np.maximum(bright + 0.9, 0))
  crisp = (band2 * crisp_miss).sum() / (band2.sum() + 1)
  assert crisp > 0 and (crisp_miss * ~band2).sum() > 0  # misses off the band do not count
  assert float(t4["crisp"]) == pytest.approx(crisp, rel=1e-4)
  assert float(with_crisp) == pytest.approx(float(loss) + 5.0 * crisp, rel=1e-5)
  # A reconstruction equal to the (saturated) target pays nothing; one pixel of halo next to the
  # outline costs the crisp hinge several times what it costs the silhouette (background average).
  assert float(vae_training.silhouette(x, x)) == 0.0 and float(vae_training.crisp_edges(x, x)) == 0.0
  halo = np.asarray(x).copy()
  outline = band2 & ~inside  # background pixels within 2 px of the outline
  halo[outline] = 0.0  # mid-grey
  halo = jnp.asarray(halo)
  assert float(vae_training.crisp_edges(halo, x)) > 3 * float(vae_training.silhouette(halo, x)) > 0


def test_vae_training_rejects_bad_settings(tmp_path):
  for frames in (6, 5):  # not 4k+1; 4k+1 but an even latent count
    with pytest.raises(ValueError, match="must be 8k\\+1"):
      vae_training.train(VAE, vae_training.VAETrainConfig(frames=frames), _clips, tmp_path, progress=False)
  with pytest.raises(ValueError, match="needs an images"):
    vae_training.train(VAE, vae_training.VAETrainConfig(image_steps=3), _clips, tmp_path, progress=False)
  for field, value in (
    ("silhouette_weight", -1.0),
    ("edge_weight", float("nan")),
    ("kl_weight", float("inf")),
  ):
    with pytest.raises(ValueError, match=f"vae_training.{field} must be a finite number >= 0"):
      vae_training.VAETrainConfig(**{field: value})
  with pytest.raises(ValueError, match="vae_tuning.crisp_weight must be a finite number >= 0"):
    vae_training.VAETuneConfig(crisp_weight=-0.5)


def test_standardize_latents_rewrites_the_latent_space_exactly():
  params = V.init(VAE, 1)
  cfg = dataclasses.replace(VAE, scaling_factor=0.7)
  video = jnp.asarray(_clips(4), jnp.float32) / 127.5 - 1.0
  rng = np.random.default_rng(0)
  std = rng.uniform(0.3, 2.0, VAE.latent_channels)
  mean = rng.normal(size=VAE.latent_channels)
  before = jax.tree.map(np.array, params)
  new, new_cfg = vae_training.standardize_latents(params, cfg, mean, std)
  assert new_cfg.scaling_factor == 1.0
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)  # the input params are not modified
  # The encoder now gives (mean - m) / s, and log-variances lowered by 2 log s.
  old_post = V.encode_posterior(params, video, config=VAE)
  new_post = V.encode_posterior(new, video, config=VAE)
  np.testing.assert_allclose(new_post.mean, (np.asarray(old_post.mean) - mean) / std, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_post.logvar, np.asarray(old_post.logvar) - 2 * np.log(std), atol=1e-4)
  # With no offsets the decoder's rewrite is exact everywhere (zero padding stays zero): decoding z'
  # with the new weights is decoding s * z' with the old.
  scaled, _ = vae_training.standardize_latents(params, cfg, np.zeros_like(mean), std)
  z = jax.random.normal(jax.random.key(3), old_post.mean.shape)
  np.testing.assert_allclose(
    V.decode(scaled, z, config=VAE), V.decode(params, z * std, config=VAE), atol=2e-5
  )
  # latent_statistics: per-channel mean and std of the posterior means, and after standardizing
  # with them, 0 and 1.
  m, s = vae_training.latent_statistics(params, VAE, _clips(4), batch_size=1)
  flat = np.asarray(old_post.mean).reshape(-1, VAE.latent_channels)
  np.testing.assert_allclose(m, flat.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(s, flat.std(0), rtol=1e-4)
  m2, s2 = vae_training.latent_statistics(
    vae_training.standardize_latents(params, VAE, m, s)[0], VAE, _clips(4)
  )
  np.testing.assert_allclose(m2, 0, atol=1e-4)
  np.testing.assert_allclose(s2, 1, rtol=1e-4)
  with pytest.raises(ValueError, match="positive stds"):
    vae_training.standardize_latents(params, VAE, mean, -std)
  with pytest.raises(ValueError, match="channel means"):
    vae_training.standardize_latents(params, VAE, mean[:2], std)


def test_decoder_tuning_trains_the_decoder_alone_and_resumes_exactly(tmp_path):
  params = V.init(VAE, 1)
  tc = vae_training.VAETuneConfig(
    steps=16, batch_size=2, frames=9, lr=3e-3, warmup_steps=2, log_every=1, save_every=5, latent_noise=0.5
  )
  tuned, rows = vae_training.tune_decoder(params, VAE, tc, _clips, tmp_path / "a", progress=False)
  losses = [r["loss"] for r in rows]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(tuned["encoder"])):
    np.testing.assert_array_equal(a, b)  # the encoder is frozen: latents encoded before stay valid
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(tuned["decoder"]))
  )
  vae_training.tune_decoder(params, VAE, tc, _clips, tmp_path / "b", progress=False, stop_at=7)
  resumed, _ = vae_training.tune_decoder(params, VAE, tc, _clips, tmp_path / "b", progress=False)
  for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # The noise reaches the decoder: the loss changes with it, and not at all without it.
  x = jnp.asarray(_clips(3), jnp.float32) / 127.5 - 1.0
  key = jax.random.key(2)
  plain, _ = vae_training.loss_terms(params, x, key, config=VAE, kl_weight=0.0)
  zero, _ = vae_training.loss_terms(params, x, key, config=VAE, kl_weight=0.0, latent_noise=0.0)
  noisy, _ = vae_training.loss_terms(params, x, key, config=VAE, kl_weight=0.0, latent_noise=2.0)
  assert float(plain) == float(zero) and float(noisy) != float(plain)


def test_joint_tuning_trains_encoder_and_decoder_on_relative_noise_and_resumes_exactly(tmp_path):
  params = V.init(VAE, 1)
  tc = vae_training.VAETuneConfig(
    joint_steps=16, steps=3, batch_size=2, frames=9, lr=3e-3, warmup_steps=2, log_every=1, save_every=5
  )
  tuned, rows = vae_training.tune_vae(params, VAE, tc, _clips, tmp_path / "a", kl_weight=1e-4, progress=False)
  assert [r["step"] for r in rows] == list(range(1, 17))  # joint_steps, not the decoder's steps
  losses = [r["loss"] for r in rows]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  for part in ("encoder", "decoder"):  # both trained
    assert any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(tuned[part]))
    ), part
  vae_training.tune_vae(params, VAE, tc, _clips, tmp_path / "b", kl_weight=1e-4, progress=False, stop_at=7)
  resumed, _ = vae_training.tune_vae(params, VAE, tc, _clips, tmp_path / "b", kl_weight=1e-4, progress=False)
  for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # Relative noise scales with the latents: a VAE whose latents are 4x larger (the same weights read
  # with scaling_factor 4) gets the same loss, where noise of a fixed size weighs 4x less on it.
  x = jnp.asarray(_clips(3), jnp.float32) / 127.5 - 1.0
  key = jax.random.key(2)
  big = dataclasses.replace(VAE, scaling_factor=4.0 * VAE.scaling_factor)

  def loss(config, **noise):
    return float(vae_training.loss_terms(params, x, key, config=config, kl_weight=0.0, **noise)[0])

  np.testing.assert_allclose(loss(big, relative_noise=2.0), loss(VAE, relative_noise=2.0), rtol=1e-5)
  assert loss(VAE, relative_noise=2.0) != loss(VAE)
  assert abs(loss(big, latent_noise=2.0) - loss(VAE, latent_noise=2.0)) > 1e-3
  with pytest.raises(ValueError, match="vae_tuning.joint_noise must be a finite number >= 0"):
    vae_training.VAETuneConfig(joint_noise=-1.0)
  with pytest.raises(ValueError, match="vae_tuning.joint_steps must be >= 0"):
    vae_training.VAETuneConfig(joint_steps=-1)
  with pytest.raises(ValueError, match="vae_tuning.latent_noise must be a finite number >= 0"):
    vae_training.VAETuneConfig(latent_noise=-0.1)
