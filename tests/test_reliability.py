"""Nothing lost, nothing silent: each case here failed before its fix (data loss, a silently wrong
result, or a traceback where one clear line belongs)."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from reference_models import tiny_cogvideox_folder
from train_helpers import FixedBatches, tiny_config

from repvideo_jax import checkpoint_io, convert, pipeline, video_io
from repvideo_jax.training import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZE = ["--frames", "9", "--height", "64", "--width", "64"]  # the tiny model's positional table


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  src, _ = tiny_cogvideox_folder(tmp_path_factory.mktemp("cog"), seed=5)
  return src


@pytest.fixture(scope="module")
def model_dir(source, tmp_path_factory):
  dst = tmp_path_factory.mktemp("conv") / "tiny"
  assert convert.main(["pipeline", "--src", str(source), "--dst", str(dst), "--feature-cache"]) == 0
  return dst


def _tree_bytes(folder: pathlib.Path) -> dict:
  return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- data loss ------------------------------------------------------------------------------------


def test_convert_overwrite_with_a_bad_source_keeps_the_good_destination(source, model_dir, tmp_path):
  dst = tmp_path / "model"
  shutil.copytree(model_dir, dst)
  before = _tree_bytes(dst)
  bad = tmp_path / "bad"
  shutil.copytree(source, bad)
  weights = next((bad / "vae").glob("*.safetensors"))
  weights.write_bytes(weights.read_bytes()[:200])  # truncated: fails mid-conversion (after the transformer)
  code = convert.main(["pipeline", "--src", str(bad), "--dst", str(dst), "--overwrite"])
  assert code == 2
  assert _tree_bytes(dst) == before
  assert not (tmp_path / "model.partial").exists()
  pipeline.load_pipeline(dst)  # still complete and loadable


def test_save_params_overwrite_that_fails_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  checkpoint_io.save_params(tmp_path / "ck", {"x": np.ones(3, np.float32)}, metadata={"v": 1})

  def broken(self, *a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", broken)
  with pytest.raises(OSError, match="disk full"):
    checkpoint_io.save_params(tmp_path / "ck", {"x": np.zeros(3, np.float32)}, overwrite=True)
  params, meta = checkpoint_io.load_params(tmp_path / "ck")
  np.testing.assert_array_equal(params["x"], np.ones(3, np.float32))
  assert meta["v"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_train_refuses_a_folder_with_an_earlier_run_and_overwrite_moves_it_aside(tmp_path):
  cfg = tiny_config(tmp_path, steps=2, save_every=2)
  trainer.train(cfg, data_iterator=FixedBatches())
  run = pathlib.Path(cfg.run.output_dir)
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  with pytest.raises(FileExistsError, match="already holds a training run .* --resume .* --overwrite"):
    trainer.train(cfg, data_iterator=FixedBatches())
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # untouched
  trainer.train(cfg, overwrite=True, data_iterator=FixedBatches())
  (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before
  resumed = trainer.train(cfg, resume=True, data_iterator=FixedBatches())  # --resume is always allowed
  assert resumed["final_step"] == 2


def test_one_training_run_per_folder(tmp_path):
  with trainer.claim_run_folder(tmp_path / "run", resume=False):
    with pytest.raises(FileExistsError, match=r"in use by another training run \(train.py pid"):
      with trainer.claim_run_folder(tmp_path / "run", resume=True):
        pass
  with trainer.claim_run_folder(tmp_path / "run", resume=True):  # released on exit: no stale lock
    pass


def test_sample_py_never_overwrites_earlier_videos(model_dir, tmp_path):
  out = tmp_path / "out"
  args = ["--model", model_dir, "--prompt", "a cat", "--steps", 2, "--out", out, "--no-progress", *SIZE]
  assert _run(ROOT / "sample.py", *args).returncode == 0
  first = (out / "0000_a_cat.mp4").read_bytes()
  proc = _run(ROOT / "sample.py", *args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(p.name for p in out.glob("*.mp4")) == ["0000_a_cat.mp4", "0001_a_cat.mp4"]
  assert (out / "0000_a_cat.mp4").read_bytes() == first
  assert (out / "0001_a_cat.mp4").read_bytes() == first  # same seed, same video: only the number moved
  assert json.loads((out / "0001_a_cat.json").read_text())["index"] == 0
  assert _run(ROOT / "sample.py", *args, "--overwrite").returncode == 0
  assert len(list(out.glob("*.mp4"))) == 2


# -- silent wrong results ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--guidance", "inf"], "--guidance must be a finite number >= 1"),
    (["--guidance", "nan"], "--guidance must be a finite number >= 1"),
    (["--seed", str(2**32)], r"--seed must be in \[0, 2\^32 - 1\]"),
    (["--seed", "10" * 20], r"--seed must be in \[0, 2\^32 - 1\]"),
    (["--fps", "nan"], "--fps must be a finite number > 0"),
    (["--steps", "0"], "--steps must be >= 1"),
  ],
)
def test_sample_py_refuses_non_finite_or_out_of_range_settings(flags, message, tmp_path):
  out = tmp_path / "never"
  proc = _run(
    ROOT / "sample.py", "--model", tmp_path / "no-model-needed", "--prompt", "x", "--out", out, *flags
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert re.search(message, proc.stderr), proc.stderr


def test_generation_settings_refuse_nan_and_aliasing_seeds():
  with pytest.raises(ValueError, match="finite"):
    pipeline.GenerationSettings(9, 64, 64, guidance=float("nan")).validate(*_tiny_configs())
  with pytest.raises(ValueError, match="seed must be an integer"):
    pipeline.GenerationSettings(9, 64, 64, seed=2**32).validate(*_tiny_configs())


def _tiny_configs():
  from repvideo_jax.config import load_section
  from repvideo_jax.transformer import TransformerConfig
  from repvideo_jax.vae import VAEConfig

  return load_section(TransformerConfig, "transformer", "tiny"), VAEConfig()


def test_train_py_refuses_a_nan_learning_rate(tmp_path):
  proc = _run(ROOT / "train.py", "--config", "train-tiny-cpu", "optim.lr=.nan", f"run.output_dir={tmp_path}")
  assert proc.returncode == 2 and "optim.lr must be a finite number, got nan" in proc.stderr


def test_flipped_bytes_in_converted_weights_are_caught(model_dir, tmp_path):
  dst = tmp_path / "m"
  shutil.copytree(model_dir, dst)
  meta = json.loads((dst / "vae" / "metadata.json").read_text())
  name = max(meta["checksums"], key=lambda n: (dst / "vae" / n).stat().st_size)  # the largest data file
  f = dst / "vae" / name
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x40
  f.write_bytes(bytes(data))
  with pytest.raises(
    ValueError, match=f"{name} does not match its checksum in metadata.json: .* --no-verify"
  ):
    pipeline.load_pipeline(dst)
  proc = _run(ROOT / "sample.py", "--model", dst, "--prompt", "x", "--steps", 1, "--out", tmp_path / "o")
  assert proc.returncode == 2 and "does not match its checksum" in proc.stderr
  pipeline.load_pipeline(dst, verify=False)  # the explicit escape hatch


def test_a_damaged_orbax_folder_is_one_clear_error(tmp_path):
  """The missing-manifest case: with checksums (every converted folder now) the missing file is
  named; an older folder without checksums still gets one error instead of orbax's tracebacks."""
  from repvideo_jax import transformer_weights
  from repvideo_jax.demo import demo_model_dir

  for name, keep_checksums in (("new", True), ("old", False)):
    folder = tmp_path / name
    shutil.copytree(demo_model_dir() / "transformer", folder)
    (folder / "params" / "manifest.ocdbt").unlink()
    if not keep_checksums:
      meta = json.loads((folder / "metadata.json").read_text())
      del meta["checksums"]
      (folder / "metadata.json").write_text(json.dumps(meta))
    match = "manifest.ocdbt is missing" if keep_checksums else "params cannot be read"
    with pytest.raises(ValueError, match=match):
      transformer_weights.load(folder)


def test_a_damaged_training_checkpoint_is_one_clear_error_naming_the_way_back(tmp_path):
  """Resuming from a step whose OCDBT manifest is gone: one error naming the step and the earlier
  step to fall back to (not tensorstore's error inside 'Event loop is closed' tracebacks); moving
  the damaged step out as told resumes from the earlier one."""
  cfg = tiny_config(tmp_path, steps=2, save_every=1, keep=2)
  trainer.train(cfg, data_iterator=FixedBatches())
  ckpts = pathlib.Path(cfg.run.output_dir) / "checkpoints"
  (ckpts / "2" / "state" / "manifest.ocdbt").unlink()
  with pytest.raises(
    ValueError, match=r"step 2 .*/manifest.ocdbt missing.*move .*/2 out of .* resume from step 1"
  ):
    trainer.train(cfg, resume=True, data_iterator=FixedBatches())
  shutil.move(ckpts / "2", tmp_path / "damaged-2")
  resumed = trainer.train(
    dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=3)),
    resume=True,
    data_iterator=FixedBatches(),
  )
  assert resumed["final_step"] == 3


def test_conversion_warns_about_nan_weights(source, tmp_path):
  from diffusers import AutoencoderKLCogVideoX

  vae = AutoencoderKLCogVideoX.from_pretrained(source / "vae")
  with torch.no_grad():
    vae.decoder.conv_out.conv.weight[0, 0, 0, 0, 0] = float("nan")
  vae.save_pretrained(tmp_path / "vae")
  proc = _run("-m", "repvideo_jax.convert", "vae", "--src", tmp_path / "vae", "--dst", tmp_path / "out")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "WARNING: 1 tensor(s) hold NaN or inf values: decoder.conv_out" in proc.stderr, proc.stderr[-2000:]


def test_training_that_ends_on_non_finite_steps_fails(tmp_path):
  class NaNBatches(FixedBatches):
    def __next__(self):
      batch = super().__next__()
      batch["latents"][:] = np.nan
      return batch

  cfg = tiny_config(tmp_path, steps=2)
  cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_nonfinite_in_a_row=None))
  with pytest.raises(RuntimeError, match="training ended on 2 non-finite step"):
    trainer.train(cfg, data_iterator=NaNBatches())


def test_sigterm_stop_is_not_a_finished_run(tmp_path):
  proc = subprocess.Popen(
    [
      sys.executable,
      str(ROOT / "train.py"),
      "--config",
      "train-tiny-cpu",
      "data.synthetic=true",
      "run.steps=100000",
      "run.log_every=1",
      "run.save_every=1000",
      "run.global_batch=2",
      f"run.output_dir={tmp_path / 'run'}",
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  for line in proc.stdout:
    if line.startswith("step 2/") or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  assert "stopped by SIGTERM at step" in err and "--resume" in err
  assert any((tmp_path / "run" / "checkpoints").iterdir())


# -- clear errors and resources ------------------------------------------------------------------


def test_output_paths_are_checked_before_any_work(model_dir, tmp_path):
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  cases = [
    (ROOT / "sample.py", ["--model", model_dir, "--prompt", "x", "--out", a_file], "is a file, not a folder"),
    (ROOT / "sample.py", ["--model", model_dir, "--prompt", "x", "--out", a_file / "sub"], "is a file"),
    ("-m", ["repvideo_jax.evaluate", "--out", tmp_path], "is a folder; pass a file path"),
    ("-m", ["repvideo_jax.analysis", "--prompt", "x", "--out", a_file], "is a file, not a folder"),
    (
      "-m",
      [
        "repvideo_jax.data.prepare",
        "--videos",
        tmp_path,
        "--captions",
        a_file,
        "--model",
        model_dir,
        "--out",
        a_file,
      ],
      "is a file, not a folder",
    ),
  ]
  for first, rest, message in cases:
    t0 = time.time()
    proc = _run(first, *rest)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (
      rest,
      proc.stderr,
    )
    assert time.time() - t0 < 60  # refused before loading a model or generating anything


def test_pipeline_json_of_the_wrong_shape(model_dir, tmp_path):
  dst = tmp_path / "m"
  shutil.copytree(model_dir, dst)
  for text in ("[1, 2]", '{"defaults": [1]}', "{not json"):
    (dst / "pipeline.json").write_text(text)
    with pytest.raises(ValueError, match="pipeline.json"):
      pipeline.load_pipeline(dst)
  (dst / "pipeline.json").write_text('{"defaults": {"steps": "many"}}')
  with pytest.raises(ValueError, match="steps: expected int"):
    pipeline.settings_for(pipeline.load_pipeline(dst))


def test_stride_zero_tensor_is_refused_without_allocating(tmp_path):
  path = tmp_path / "bomb.pt"
  torch.save({"w": torch.zeros(1).expand(1 << 15, 1 << 15)}, path)  # 1 float claiming 4 GiB
  assert path.stat().st_size < 4096
  with pytest.raises(ValueError, match="more elements than its storage"):
    checkpoint_io.read_torch_pickle(path)


def test_malformed_pickles_are_one_clear_error(tmp_path):
  import pickle
  import zipfile

  build = b"\x80\x02}q\x00}q\x01b."  # BUILD with a dict as the state of a dict
  path = tmp_path / "build.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", build)
  with pytest.raises(ValueError, match="corrupt or unsupported torch checkpoint"):
    checkpoint_io.read_torch_pickle(path)
  deep = {}
  node = deep
  for _ in range(3000):  # deeper than Python's recursion limit
    node["x"] = {}
    node = node["x"]
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(20000)
  try:
    payload = pickle.dumps(deep, protocol=2)
  finally:
    sys.setrecursionlimit(limit)
  path = tmp_path / "deep.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
  with pytest.raises(ValueError, match="deep.pt: nested more than 32 dicts deep"):
    checkpoint_io.load_sat_checkpoint(path)


def test_written_files_get_normal_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    video_io.write_mp4(tmp_path / "v.mp4", np.zeros((3, 16, 16, 3), np.uint8), fps=8)
    checkpoint_io.write_safetensors(tmp_path / "w.safetensors", {"x": np.ones(2, np.float32)})
  finally:
    os.umask(old)
  for name in ("v.mp4", "w.safetensors"):
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_ctrl_c_during_sampling_keeps_finished_videos(model_dir, tmp_path):
  out = tmp_path / "out"
  prompts = [arg for p in "abcdefgh" for arg in ("--prompt", p)]  # 8 videos: far from done at the signal
  proc = subprocess.Popen(
    [
      sys.executable,
      str(ROOT / "sample.py"),
      "--model",
      str(model_dir),
      *prompts,
      "--steps",
      "20",
      "--out",
      str(out),
      "--no-progress",
      *SIZE,
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    # A run started in the background (CI under `cmd &`) inherits SIGINT ignored, and Python then
    # installs no Ctrl-C handler: give the child the default disposition, as a terminal would.
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  deadline = time.time() + 300
  while not (out / "0000_a.json").exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130 and "interrupted: kept the" in err and "0000_a.mp4" in err, err[-2000:]
  assert "Traceback" not in err
  assert len(list(out.glob("*.mp4"))) < 8
  for mp4 in out.glob("*.mp4"):
    assert video_io.probe(mp4).frames > 0
