"""The demo's shape tuning: the paired square/partner continuation of the transformer
(``demo.pair_tuning``), the decoder fitted to the transformer's samples (``demo.sample_fitting``),
the path fit both rest on (``domain.fit_render``) and the loop's moving average.
"""

import dataclasses
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_demo_training

from repvideo_jax import schedule, video_io
from repvideo_jax import transformer as T
from repvideo_jax import vae as V
from repvideo_jax.demo import domain as D
from repvideo_jax.demo import loop, pair_tuning, sample_fitting

TRAIN, HELD = D.split_specs(0, 0.2)


def _iou(a, b):
  a, b = D._foreground(a), D._foreground(b)
  return (a & b).sum() / (a | b).sum()


# ------------------------------------------------------------------------------------------------
# domain.fit_render


@pytest.mark.parametrize("per_frame", [True, False])
def test_fit_render_recovers_every_render(per_frame):
  # Renders are linear in time, so both fits give them back (to a pixel of a square's side).
  for i, spec in enumerate(D.all_specs()):
    clip = D.render(spec, num_frames=17, seed=i)
    fitted = D.fit_render(clip, spec, per_frame=per_frame)
    assert (
      D.detect(fitted) == D.detect(clip) == {"shape": spec.shape, "color": spec.color, "motion": spec.motion}
    )
    assert _iou(fitted, clip) > 0.85, spec
    colours = {tuple(p) for p in fitted.reshape(-1, 3)}
    assert colours == {(0, 0, 0), D.PALETTE[spec.color]}


def test_fit_render_draws_the_spec_on_the_clip_path():
  # A blurred, darkened circle with a square's spec: a clean square of the same area and path.
  spec = D.Spec("circle", "green", "moving right")
  clip = D.render(spec, num_frames=17, seed=4).astype(np.float64)
  blurred = (
    clip + np.roll(clip, 1, 2) + np.roll(clip, -1, 2) + np.roll(clip, 1, 1) + np.roll(clip, -1, 1)
  ) / 5
  blurred = (blurred * 0.8).astype(np.uint8)
  square = D.fit_render(blurred, D.Spec("square", "green", "moving right"))
  assert D.detect(square) == {"shape": "square", "color": "green", "motion": "moving right"}
  for a, b in zip(D._foreground(blurred), D._foreground(square)):
    assert abs(int(a.sum()) - int(b.sum())) < 0.15 * a.sum()
    ya, xa = np.nonzero(a)
    yb, xb = np.nonzero(b)
    assert abs(xa.mean() - xb.mean()) < 1 and abs(ya.mean() - yb.mean()) < 1


def test_fit_render_per_frame_or_line_and_empty_frames():
  spec = D.Spec("square", "white", "moving left")
  clip = D.render(spec, num_frames=17, seed=2)
  jittered = clip.copy()
  jittered[8] = np.roll(clip[8], 6, axis=1)  # one frame out of line
  centre = lambda f: np.nonzero(D._foreground(f[None])[0])[1].mean()  # noqa: E731
  own = D.fit_render(jittered, spec, per_frame=True)
  line = D.fit_render(jittered, spec, per_frame=False)
  assert abs(centre(own[8]) - centre(jittered[8])) < 0.6  # keeps the frame's own centre
  assert abs(centre(line[8]) - centre(clip[8])) < 1.5  # the line through the others
  # Blank frames take the line; fewer than half the frames with a shape: no fit.
  blank = clip.copy()
  blank[5] = 0
  filled = D.fit_render(blank, spec)
  assert D._foreground(filled[5:6]).sum() > 0.8 * D._foreground(clip[5:6]).sum()
  mostly_blank = clip.copy()
  mostly_blank[:10] = 0
  assert D.fit_render(mostly_blank, spec) is None
  assert D.fit_render(np.zeros_like(clip), spec) is None


# ------------------------------------------------------------------------------------------------
# pair_tuning


@pytest.mark.parametrize("partner", ["circle", "triangle"])
def test_pairs_share_their_path_and_only_train_captions(partner):
  combos = pair_tuning.paired_combinations(TRAIN, partner)
  train = {D.caption(s) for s in TRAIN}
  assert combos and all(D.caption(D.Spec(s, c, m)) in train for c, m in combos for s in ("square", partner))
  missing = [(c, m) for c in D.COLORS for m in D.MOTIONS if (c, m) not in combos]
  held = {(s.color, s.motion) for s in HELD if s.shape in ("square", partner)}
  assert set(missing) == held  # exactly those with a held-out square or partner are left out
  kw = dict(num_frames=9, height=64, width=64, partner=partner)
  squares, others, captions = pair_tuning.draw_pairs(combos[:3], 2, seed=1, **kw)
  assert squares.shape == others.shape == (6, 9, 64, 64, 3) and len(captions) == 6
  for sq, ot, (cap_s, cap_o) in zip(squares, others, captions):
    s, o = D.parse_caption(cap_s), D.parse_caption(cap_o)
    assert (s.shape, o.shape) == ("square", partner) and (s.color, s.motion) == (o.color, o.motion)
    assert D.detect(sq) == {"shape": "square", "color": s.color, "motion": s.motion}
    assert D.detect(ot) == {"shape": partner, "color": o.color, "motion": o.motion}
    fs, fo = D._foreground(sq), D._foreground(ot)
    assert not (fo & ~fs).any() and (fs & ~fo).any()  # the partner inscribed in the square, every frame
  again = pair_tuning.draw_pairs(combos[:3], 2, seed=1, **kw)[0]
  other = pair_tuning.draw_pairs(combos[:3], 2, seed=2, **kw)[0]
  assert np.array_equal(again, squares) and not np.array_equal(other, squares)


def _pair_batch(P=3, R=2, seed=0):
  rng = np.random.default_rng(seed)
  shape = (P, 2, 4, 4, 3)
  return {
    "square": jnp.asarray(rng.normal(size=shape), jnp.float32),
    "other": jnp.asarray(rng.normal(size=shape), jnp.float32),
    "square_text": jnp.asarray(rng.normal(size=(P, 5, 6)), jnp.float32),
    "other_text": jnp.asarray(rng.normal(size=(P, 5, 6)), jnp.float32),
    "latents": jnp.asarray(rng.normal(size=(R,) + shape[1:]), jnp.float32),
    "text": jnp.asarray(rng.normal(size=(R, 5, 6)), jnp.float32),
  }


def _toy_apply(params, x_t, t, text):
  # Depends on the input, the timestep and the text, as the transformer does.
  return (
    params["w"] * x_t
    + params["b"] * jnp.mean(text, axis=(1, 2))[:, None, None, None, None]
    + 1e-3 * t[:, None, None, None, None]
  )


def test_pair_loss_against_a_direct_computation():
  batch, table = _pair_batch(), jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)
  params = {"w": jnp.float32(0.3), "b": jnp.float32(0.7)}
  seen = {}

  def spy(p, x_t, t, text):
    seen.update(x_t=np.asarray(x_t), t=np.asarray(t), text=np.asarray(text))
    return _toy_apply(p, x_t, t, text)

  key = jax.random.key(3)
  kw = dict(table=table, pair_weight=2.0, mix=1.0, mix_min_t=0, ucg_rate=0.0)
  loss, m = pair_tuning.pair_loss(params, spy, batch, key, **kw)
  x_t, t, text = seen["x_t"], seen["t"], seen["text"]
  P = 3
  # Members of a pair share their timestep; with mix 1 every pair starts from one blend, and the
  # noise is shared too, so both members get the very same input.
  np.testing.assert_array_equal(t[:P], t[P : 2 * P])
  np.testing.assert_allclose(x_t[:P], x_t[P : 2 * P], rtol=0, atol=1e-6)
  zs, zc, zr = (np.asarray(batch[k], np.float64) for k in ("square", "other", "latents"))
  a = np.asarray(table, np.float64)[t].reshape(-1, 1, 1, 1, 1)
  s = np.sqrt(1 - a * a)
  x0 = np.concatenate([zs, zc, zr])
  v = (a * x_t - x0) / s  # the v target of each clip's own latent from its input
  pred = np.asarray(_toy_apply(params, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(text)), np.float64)
  err = pred - v
  mse = np.mean(err**2)
  pair = np.mean((err[:P] - err[P : 2 * P]) ** 2)
  np.testing.assert_allclose(float(m["mse"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(m["pair"]), pair, rtol=1e-5)
  np.testing.assert_allclose(float(loss), mse + 2.0 * pair, rtol=1e-5)
  np.testing.assert_array_equal(
    text, np.concatenate([batch["square_text"], batch["other_text"], batch["text"]])
  )
  # Identical inputs and a model that ignores the text: the pair term is exactly that of the two
  # targets, ((zs - zc) / s)^2.
  blind = {"w": jnp.float32(0.3), "b": jnp.float32(0.0)}
  _, m0 = pair_tuning.pair_loss(blind, _toy_apply, batch, key, **kw)
  np.testing.assert_allclose(float(m0["pair"]), np.mean(((zs - zc) / s[:P]) ** 2), rtol=1e-4)


def test_pair_loss_without_mix_noises_each_latent_and_drops_captions_together():
  batch, table = _pair_batch(P=64, R=0), jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)
  seen = {}

  def spy(p, x_t, t, text):
    seen.update(x_t=np.asarray(x_t), t=np.asarray(t), text=np.asarray(text))
    return jnp.zeros_like(x_t)

  kw = dict(table=table, pair_weight=1.0, mix=0.0, mix_min_t=0, ucg_rate=0.5)
  pair_tuning.pair_loss({}, spy, batch, jax.random.key(0), **kw)
  P, t = 64, seen["t"]
  a = np.asarray(table)[t].reshape(-1, 1, 1, 1, 1)
  s = np.sqrt(1 - a * a)
  eps_s = (seen["x_t"][:P] - a[:P] * np.asarray(batch["square"])) / s[:P]
  eps_c = (seen["x_t"][P:] - a[P:] * np.asarray(batch["other"])) / s[P:]
  np.testing.assert_allclose(eps_s, eps_c, atol=2e-3)  # one noise draw, each its own latent
  dropped_s = np.all(seen["text"][:P] == 0, axis=(1, 2))
  dropped_c = np.all(seen["text"][P:] == 0, axis=(1, 2))
  np.testing.assert_array_equal(dropped_s, dropped_c)
  assert 10 < dropped_s.sum() < 54  # about half at ucg_rate 0.5
  # A blend only at timesteps from mix_min_t on.
  kw.update(mix=1.0, mix_min_t=500, ucg_rate=0.0)
  pair_tuning.pair_loss({}, spy, batch, jax.random.key(1), **kw)
  same = np.all(np.isclose(seen["x_t"][:P], seen["x_t"][P:], atol=1e-6), axis=(1, 2, 3, 4))
  np.testing.assert_array_equal(same, seen["t"][:P] >= 500)


def test_pair_loss_blends_each_pair_with_one_weight():
  # Far-apart latents (+c and -c everywhere) make the blend weight readable off the input:
  # x_t / a ~ w c - (1 - w) c, the noise adding at most s / (a c).
  c, P = 1e6, 32
  batch = _pair_batch(P=P, R=0)
  batch["square"] = jnp.full_like(batch["square"], c)
  batch["other"] = jnp.full_like(batch["other"], -c)
  table = jnp.asarray(schedule.sqrt_alpha_table(), jnp.float32)
  seen = {}

  def spy(p, x_t, t, text):
    seen.update(x_t=np.asarray(x_t, np.float64), t=np.asarray(t))
    return jnp.zeros_like(x_t)

  pair_tuning.pair_loss(
    {}, spy, batch, jax.random.key(5), table=table, pair_weight=1.0, mix=1.0, mix_min_t=0, ucg_rate=0.0
  )
  a = np.asarray(table, np.float64)[seen["t"][:P]].reshape(-1, 1, 1, 1, 1)
  w = (seen["x_t"][:P] / a / c + 1) / 2
  spread = w.max(axis=(1, 2, 3, 4)) - w.min(axis=(1, 2, 3, 4))
  assert spread.max() < 0.01  # one weight per pair
  w = w.mean(axis=(1, 2, 3, 4))
  assert w.min() > -0.01 and w.max() < 1.01 and w.std() > 0.15  # uniform in [0, 1]


def test_pair_tune_config_checks_its_phases():
  assert pair_tuning.PairTuneConfig(mix=(0.5, 0.75), mix_min_t=(200, 50)).phases == 2
  assert pair_tuning.PairTuneConfig().phases == 0 and sample_fitting.DecoderFitConfig().rounds == ()
  # The recipe runs both stages (two phases, four rounds), and one override changes only its key.
  from repvideo_jax.demo import build

  def configs(recipe):  # the stages' own conversion of their recipe sections
    b = build.Build(recipe, pathlib.Path("unused"))
    return build._transformer_tuning(b), build._decoder_fitting(b)

  tune, fit = configs(build.load_recipe("demo"))
  assert tune.phases == 2 and fit.rounds == (600, 600, 600, 600)
  assert [fit.for_round(r) for r in range(4)] == [(False, 1), (True, 1), (False, 3), (False, 8)]
  tune, fit = configs(
    build.load_recipe("demo", ["transformer_tuning.pairs=4", "decoder_fitting.samples=360"])
  )
  assert (tune.phases, tune.pairs, fit.samples, len(fit.rounds)) == (2, 4, 360, 4)
  # A per-round list must match the rounds.
  with pytest.raises(ValueError, match="per_frame takes one value for every round or one per round"):
    configs(build.load_recipe("demo", ["decoder_fitting.rounds=[600]"]))
  with pytest.raises(ValueError, match="one value per phase"):
    pair_tuning.PairTuneConfig(mix=(0.5,), mix_min_t=(200, 50))
  with pytest.raises(ValueError, match="partners must be circle and/or triangle"):
    pair_tuning.PairTuneConfig(partners=("square",))
  with pytest.raises(ValueError, match=r"mix must be in \[0, 1\]"):
    pair_tuning.PairTuneConfig(mix=(1.5,), mix_min_t=(0,))


class _FakeEncoders:
  """Stands in for data.prepare.Encoders at the tiny transformer's sizes: a video's latent is its
  frames 0, 4, 8 pooled 8x8 (colour channels plus their mean), a caption's embedding a fixed random
  array of its crc32."""

  def encode_video(self, x):
    x = np.asarray(x, np.float32)[:, ::4]  # (n, 3, 32, 32, 3)
    pooled = x.reshape(*x.shape[:2], 4, 8, 4, 8, 3).mean(axis=(3, 5))
    return np.concatenate([pooled, pooled.mean(-1, keepdims=True)], axis=-1)

  def encode_text(self, captions):
    return np.stack([np.random.default_rng(zlib.crc32(c.encode())).normal(size=(4, 8)) for c in captions])


class _Records:
  """A records folder of 10 random examples that raises KeyboardInterrupt at read number ``crash_at``."""

  reads, crash_at = 0, None

  def __init__(self, path):
    pass

  def __len__(self):
    return 10

  def __getitem__(self, i):
    _Records.reads += 1
    if _Records.reads == _Records.crash_at:
      raise KeyboardInterrupt("killed")
    rng = np.random.default_rng(i)
    return {"latents": rng.normal(size=(3, 4, 4, 4)), "text_emb": rng.normal(size=(4, 8))}


def test_tuning_killed_inside_a_phase_resumes_to_the_same_weights(tmp_path, monkeypatch):
  """The tuning stage's loop, killed in its second phase, resumes there from the last checkpoint
  (the first phase is read back, not re-run) and ends bit-equal to an uninterrupted run."""
  cfg = T.TransformerConfig(
    num_layers=2,
    num_heads=2,
    head_dim=8,
    in_channels=4,
    out_channels=4,
    text_embed_dim=8,
    text_length=4,
    time_embed_dim=16,
    sample_frames=3,
    sample_height=4,
    sample_width=4,
    cache_window=2,
  )
  params = jax.tree.map(np.asarray, T.init(cfg, 0))
  tc = pair_tuning.PairTuneConfig(
    mix=(0.5, 0.75),
    mix_min_t=(200, 50),
    steps=4,
    warmup_steps=1,
    pairs=2,
    records_batch=2,
    paths=1,
    save_every=2,
  )
  monkeypatch.setattr(pair_tuning.records, "ExampleSource", _Records)

  def tune(folder):
    return pair_tuning.tune(
      params,
      T.make_apply(cfg),
      _FakeEncoders(),
      "unused",
      TRAIN,
      tc,
      tmp_path / folder,
      num_frames=9,
      height=32,
      width=32,
      progress=False,
    )[0]

  whole = tune("whole")
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(whole)))
  # 2 reads a step: the first phase's 4 steps are reads 1-8, the second's third step starts at read 13.
  _Records.reads, _Records.crash_at = 0, 13
  with pytest.raises(KeyboardInterrupt):
    tune("killed")
  _Records.reads, _Records.crash_at = 0, None
  resumed = tune("killed")
  assert _Records.reads == 4  # only the second phase's steps 3 and 4
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# loop: the moving average


def test_loop_moving_average_and_exact_resume(tmp_path):
  target = jnp.arange(4.0)

  def loss_fn(p, batch, key):
    return jnp.sum((p["x"] - target * batch) ** 2), {}

  cfg = loop.LoopConfig(steps=12, lr=0.1, warmup_steps=1, log_every=1, save_every=5, ema_decay=0.8)

  def run(folder, ema_decay=0.8, **kw):
    config = dataclasses.replace(cfg, ema_decay=ema_decay)
    batches = lambda s: jnp.float32(1 + s % 3)  # noqa: E731
    return loop.train(loss_fn, {"x": jnp.zeros(4)}, batches, config, tmp_path / folder, progress=False, **kw)[
      0
    ]

  ema, raw = run("a"), run("raw", ema_decay=None)
  # The same run step by step: the average of the params after each step, from the initial ones.
  traj = [run("steps", ema_decay=None, stop_at=n)["x"] for n in range(1, 13)]
  expect = np.zeros(4)
  for p in traj:
    expect = 0.8 * expect + 0.2 * p
  np.testing.assert_allclose(ema["x"], expect, rtol=1e-5)
  np.testing.assert_allclose(raw["x"], traj[-1], rtol=1e-6)
  assert not np.allclose(ema["x"], raw["x"])
  run("b", stop_at=7)
  np.testing.assert_array_equal(run("b")["x"], ema["x"])
  with pytest.raises(ValueError, match="ema_decay"):
    run("c", ema_decay=1.0)


# ------------------------------------------------------------------------------------------------
# sample_fitting

VAE = test_demo_training.VAE  # a tiny VAE at 32 x 32


def test_sampling_killed_between_batches_resumes_with_the_same_samples(tmp_path, monkeypatch):
  """The stage's sampling saves each batch: killed in its third batch, it resumes there and returns
  what an uninterrupted sampling returns (sample i depends on the seed and i, not on the batches)."""
  calls = []

  def encode(pipe, prompts, settings):
    return np.array([len(p) for p in prompts], np.float32), None

  def sample(pipe, text, unc, settings, *, noise, mesh, progress, first_index):
    calls.append(first_index)
    if first_index == crash_at[0]:
      raise KeyboardInterrupt("killed")
    index = np.arange(first_index, first_index + len(text), dtype=np.float32)
    return np.broadcast_to((text + 1000 * index)[:, None, None, None, None], (len(text), 2, 2, 2, 1))

  monkeypatch.setattr(sample_fitting.pipeline, "encode_for_sampling", encode)
  monkeypatch.setattr(sample_fitting.pipeline, "_sample", sample)
  specs = sample_fitting.caption_cycle(TRAIN, 10)
  crash_at = [None]
  whole = sample_fitting.sample_latents(None, specs, None, batch=3, progress=False)
  assert calls == [0, 3, 6, 9] and whole[:, 0, 0, 0, 0].tolist() == [
    len(D.caption(s)) + 1000 * i for i, s in enumerate(specs)
  ]
  calls.clear()
  crash_at[0] = 6
  with pytest.raises(KeyboardInterrupt):
    sample_fitting.sample_latents(None, specs, None, batch=3, progress=False, parts_dir=tmp_path / "parts")
  calls.clear()
  crash_at[0] = None
  resumed = sample_fitting.sample_latents(
    None, specs, None, batch=3, progress=False, parts_dir=tmp_path / "parts"
  )
  assert calls == [6, 9]
  np.testing.assert_array_equal(resumed, whole)


def test_fitted_targets_pair_each_decoded_sample_with_its_clean_shape():
  specs = sample_fitting.caption_cycle(TRAIN, 5)
  assert specs == TRAIN[:5] and sample_fitting.caption_cycle(TRAIN, len(TRAIN) + 2)[-2:] == TRAIN[:2]
  clips = np.stack([D.render(s, num_frames=9, seed=i) for i, s in enumerate(specs)])
  # Stand-in "decoded" clips: the renders blurred and shifted 2 px, one of them blank.
  decoded = ((clips.astype(np.float64) + np.roll(clips, 1, 2) + np.roll(clips, -1, 3)) / 3).astype(np.uint8)
  decoded = np.roll(decoded, 2, axis=3)
  decoded[3] = 0
  keep, targets = sample_fitting.fitted_targets(
    lambda z: decoded[np.asarray(z)], np.arange(5), specs, per_frame=True
  )
  assert list(keep) == [0, 1, 2, 4]
  for k, target in zip(keep, targets):
    spec = specs[k]
    assert D.detect(target) == {"shape": spec.shape, "color": spec.color, "motion": spec.motion}
    assert _iou(target, np.roll(clips[k], 2, axis=2)) > 0.8  # on the decoded clip's path
  with pytest.raises(RuntimeError, match="no decoded sample shows a shape"):
    sample_fitting.fitted_targets(
      lambda z: np.zeros((len(z), 9, 64, 64, 3), np.uint8), np.arange(3), specs, per_frame=True
    )


def test_decoder_fitting_draws_squares_by_their_weight():
  specs = sample_fitting.caption_cycle(TRAIN, 60)
  squares = np.array([s.shape == "square" for s in specs])
  for weight in (1.0, 3.0):
    draws = [sample_fitting.draw_batch(np.random.default_rng(i), specs, 4, weight) for i in range(2000)]
    assert all(len(set(d)) == 4 for d in draws)
    share = squares[np.concatenate(draws)].mean()
    # Drawn one at a time, a square's chance is w s / (w s + 1 - s) for the squares' share s; four
    # distinct draws per batch pull that a little towards s.
    s = squares.mean()
    alone = weight * s / (weight * s + 1 - s)
    assert min(s, alone) - 0.02 < share < max(s, alone) + 0.02, (weight, share, s, alone)
    if weight == 1.0:
      assert abs(share - s) < 0.02
    else:
      assert share > s + 0.2
  with pytest.raises(ValueError, match="square_weight must be > 0"):
    sample_fitting.DecoderFitConfig(square_weight=0)
  with pytest.raises(ValueError, match="square_weight must be > 0"):
    sample_fitting.DecoderFitConfig(rounds=(5, 5), square_weight=(1.0, -2.0))


def test_decoder_fitting_settings_per_round_from_the_recipe():
  from repvideo_jax import config as config_lib

  def parse(**section):
    return config_lib.from_dict(sample_fitting.DecoderFitConfig, section, "decoder_fitting")

  one = parse(rounds=[5, 5, 5], per_frame=False, square_weight=3)
  assert [one.for_round(r) for r in range(3)] == [(False, 3.0)] * 3
  each = parse(rounds=[5, 5, 5], per_frame=[True, True, False], square_weight=[1, 1, 3])
  assert each.per_frame == (True, True, False) and each.square_weight == (1.0, 1.0, 3.0)
  assert [each.for_round(r) for r in range(3)] == [(True, 1.0), (True, 1.0), (False, 3.0)]
  with pytest.raises(
    ValueError, match="per_frame takes one value for every round or one per round; got 2 values for 3"
  ):
    parse(rounds=[5, 5, 5], per_frame=[True, False])
  with pytest.raises(ValueError, match="decoder_fitting.square_weight: expected float, got 'x'"):
    parse(rounds=[5], square_weight=["x"])
  with pytest.raises(ValueError, match="decoder_fitting.per_frame: expected bool, got 'no'"):
    parse(rounds=[5], per_frame="no")


def _fitting_inputs():
  """(VAE params, latents of 4 train-caption clips, their specs, real_clips) for a tiny fitting."""
  params = V.init(VAE, 0)
  specs = sample_fitting.caption_cycle(TRAIN, 4)
  clips = np.stack([D.render(s, num_frames=9, height=32, width=32, seed=i) for i, s in enumerate(specs)])
  enc = jax.jit(lambda p, x: V.encode(p, x, config=VAE))
  latents = np.asarray(enc(params, jnp.asarray(video_io.from_uint8(clips))))

  def real(step):
    rng = np.random.default_rng(step)
    return np.stack([D.render(TRAIN[rng.integers(len(TRAIN))], num_frames=9, height=32, width=32, seed=step)])

  return params, latents, specs, real


def test_decoder_fitting_uses_each_rounds_own_settings(tmp_path, monkeypatch):
  params, latents, specs, real = _fitting_inputs()
  seen = []
  fit, draw = sample_fitting.fitted_targets, sample_fitting.draw_batch

  def fitting(*args, per_frame):
    seen.append(("fit", per_frame))
    return fit(*args, per_frame=per_frame)

  def drawing(rng, specs, size, square_weight):
    seen.append(("draw", square_weight))
    return draw(rng, specs, size, square_weight)

  monkeypatch.setattr(sample_fitting, "fitted_targets", fitting)
  monkeypatch.setattr(sample_fitting, "draw_batch", drawing)
  cfg = sample_fitting.DecoderFitConfig(
    samples=4, rounds=(2, 1), per_frame=(False, True), square_weight=(1.0, 3.0), batch_size=2, real_batch=1
  )
  sample_fitting.fit_decoder(params, VAE, latents, specs, real, cfg, tmp_path, progress=False)
  assert seen == [("fit", False), ("draw", 1.0), ("draw", 1.0), ("fit", True), ("draw", 3.0)]


def test_decoder_fitting_trains_the_decoder_alone_towards_clean_shapes(tmp_path):
  params, latents, specs, real = _fitting_inputs()
  cfg = sample_fitting.DecoderFitConfig(
    samples=4,
    rounds=(6, 4),
    batch_size=2,
    real_batch=1,
    lr=3e-3,
    warmup_steps=2,
    log_every=1,
    crisp_weight=1.0,
  )
  fitted, logs = sample_fitting.fit_decoder(params, VAE, latents, specs, real, cfg, tmp_path, progress=False)
  assert [len(r) for r in logs] == [6, 4]
  losses = [r["loss"] for r in logs[0] + logs[1]]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  assert all(r["fit"] > 0 and r["real"] > 0 for r in logs[0])
  for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(fitted["encoder"])):
    np.testing.assert_array_equal(a, b)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(fitted["decoder"]))
  )
  again, _ = sample_fitting.fit_decoder(params, VAE, latents, specs, real, cfg, tmp_path, progress=False)
  for a, b in zip(jax.tree.leaves(fitted), jax.tree.leaves(again)):  # a finished run is read back
    np.testing.assert_array_equal(a, b)

  # A run that crashes in the middle of its second round (checkpoints every 2 steps) resumes there:
  # it ends where the uninterrupted run ended, and re-runs only the steps after the last checkpoint.
  seen = []

  def crashing(step):
    seen.append(step)
    if step == 100_000 + 3:
      raise KeyboardInterrupt("killed")
    return real(step)

  crash_cfg = dataclasses.replace(cfg, save_every=2)
  with pytest.raises(KeyboardInterrupt):
    sample_fitting.fit_decoder(
      params, VAE, latents, specs, crashing, crash_cfg, tmp_path / "crash", progress=False
    )
  seen.clear()

  def logged(step):
    seen.append(step)
    return real(step)

  resumed, _ = sample_fitting.fit_decoder(
    params, VAE, latents, specs, logged, crash_cfg, tmp_path / "crash", progress=False
  )
  assert seen == [100_002, 100_003]
  for a, b in zip(jax.tree.leaves(fitted), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="decoder_fitting: need samples >= batch_size"):
    sample_fitting.DecoderFitConfig(samples=2, batch_size=4)
