"""sample.py end to end on a tiny converted model, bad arguments, and 8-device sharded sampling."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from reference_models import tiny_cogvideox_folder

from repvideo_jax import convert, video_io

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  src, _ = tiny_cogvideox_folder(tmp_path_factory.mktemp("cog"), seed=4)
  dst = tmp_path_factory.mktemp("conv") / "tiny"
  assert convert.main(["pipeline", "--src", str(src), "--dst", str(dst), "--feature-cache"]) == 0
  return dst


def _sample(*args):
  return subprocess.run(
    [sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True, timeout=600
  )


def test_sample_py_end_to_end_and_reproducible(model_dir, tmp_path):
  common = [
    "--model",
    model_dir,
    "--prompt",
    "a red circle moving left",
    "--prompt",
    "ocean waves",
    "--frames",
    9,
    "--height",
    64,
    "--width",
    64,
    "--steps",
    3,
    "--seed",
    7,
    "--batch-size",
    2,
    "--no-progress",
  ]
  runs = []
  for name in ("a", "b"):
    proc = _sample(*common, "--out", tmp_path / name)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "s/step" in proc.stderr
    runs.append(sorted((tmp_path / name).glob("*.mp4")))
  assert [p.name for p in runs[0]] == ["0000_a_red_circle_moving_left.mp4", "0001_ocean_waves.mp4"]
  for mp4 in runs[0]:
    info = video_io.probe(mp4)
    assert (info.frames, info.width, info.height, info.fps) == (9, 64, 64, 8)
    meta = json.loads(mp4.with_suffix(".json").read_text())
    assert meta["settings"]["seed"] == 7 and meta["settings"]["steps"] == 3
    assert meta["settings"]["sampler"] == "dpmpp2m" and meta["settings"]["cfg_schedule"] == "released"
    assert meta["transformer"]["feature_cache"] is True
    assert {"sampling_s", "vae_decode_s", "text_encode_s", "seconds_per_step", "load_s"} <= set(
      meta["timings"]
    )
    frames, _ = video_io.read_video(mp4)
    assert frames.std() > 0
  for a, b in zip(*runs):  # same seed -> identical frames, and identical files
    sha = [json.loads(p.with_suffix(".json").read_text())["frames_sha256"] for p in (a, b)]
    assert sha[0] == sha[1], "sampling is not deterministic"
    np.testing.assert_array_equal(video_io.read_video(a)[0], video_io.read_video(b)[0])
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
  "extra,match",
  [
    (["--frames", 10], "4k\\+1"),
    (["--height", 72], "multiples of 16"),
    (["--steps", 0], "steps"),
    (["--guidance", 0.5], "guidance"),
    (["--prompts-file", "/no/such/file"], "does not exist"),
    (["--vae-tile", "240"], "HEIGHTxWIDTH"),
    (["--vae-tile-overlap", "0.7"], "fractions in \\[0, 0.5\\)"),
  ],
)
def test_bad_arguments_exit_cleanly(model_dir, tmp_path, extra, match):
  proc = _sample(
    "--model",
    model_dir,
    "--prompt",
    "x",
    "--out",
    tmp_path,
    "--frames",
    9,
    "--height",
    64,
    "--width",
    64,
    *extra,
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "error:" in proc.stderr and __import__("re").search(match, proc.stderr)


def test_memory_flags_offload_tiling_and_int8(model_dir, tmp_path):
  """--offload text encodes both prompts first, so only the first batch copies anything and the text
  encoder leaves once; the frames equal the default run's. --low-memory swaps the models every batch
  and decodes in tiles; --quantize all stores int8 layer kernels (different, close frames)."""
  common = ["--model", model_dir, "--prompt", "a red circle", "--prompt", "ocean waves", "--frames", 9]
  common += ["--height", 64, "--width", 64, "--steps", 2, "--no-progress", "--batch-size", 1]
  runs = {}
  for name, extra in (
    ("default", []),
    ("text", ["--offload", "text"]),
    ("low", ["--low-memory", "--vae-tile", "32x32", "--vae-tile-overlap", "0.25", "--quantize", "all"]),
  ):
    proc = _sample(*common, "--out", tmp_path / name, *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs[name] = [json.loads(p.read_text()) for p in sorted((tmp_path / name).glob("*.json"))]
  for meta in runs["default"]:  # CPU: the host's RAM holds everything, so auto keeps all resident
    assert meta["memory_settings"]["offload"] == "none" and meta["memory_settings"]["vae_tiling"] == "off"
  first, second = (m["timings"]["memory"] for m in runs["text"])
  moved = lambda m, d: sorted(c["component"] for c in m["copies"] if c["direction"] == d)
  assert moved(first, "in") == ["text_encoder", "transformer", "vae"] and moved(first, "out") == [
    "text_encoder"
  ]
  assert second["copies"] == [] and second["copied_in_gib"] == 0
  for a, b in zip(runs["default"], runs["text"], strict=True):
    assert a["frames_sha256"] == b["frames_sha256"]
  low = runs["low"][1]
  assert low["memory_settings"]["offload"] == "stage" and low["memory_settings"]["vae_tiling"] == "on"
  assert low["memory_settings"]["quantize"] == ["text_encoder", "transformer"]
  assert low["memory_settings"]["vae_tile"]["tile_sample_height"] == 32
  assert moved(low["timings"]["memory"], "in") == ["transformer", "vae"]  # T5 was done before batch 1
  assert all(a["frames_sha256"] != b["frames_sha256"] for a, b in zip(runs["default"], runs["low"]))


def test_missing_model_and_no_prompt(tmp_path):
  proc = _sample("--model", tmp_path / "nope", "--prompt", "x")
  assert proc.returncode == 2 and "no model folder" in proc.stderr and "Traceback" not in proc.stderr
  proc = _sample("--model", tmp_path)
  assert proc.returncode == 2 and "no prompts" in proc.stderr


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from repvideo_jax import pipeline, sharding
    pipe = pipeline.load_pipeline(sys.argv[1])
    prompts = [f"{c} {a}" for c in ("red", "blue") for a in ("cat", "dog", "bird", "car")]
    s = pipeline.GenerationSettings(num_frames=9, height=64, width=64, steps=3, seed=11)
    mesh = sharding.make_mesh(data=8)
    sharded = pipeline.generate(pipe, prompts, s, mesh=mesh, output="float")
    single = pipeline.generate(pipe, prompts, s, output="float")
    err = float(np.abs(sharded - single).max())
    # frames in [0, 1]; 1e-4 is 40x below one uint8 level (sharding changes reduction order only)
    assert jax.device_count() == 8 and err < 1e-4, err
    # One video on 4 devices: its CFG pair over data=2, its sequence over context=2 (attention's
    # all-to-all; 8 text + 16 video tokens per frame).
    mesh = sharding.make_mesh(data=2, context=2, devices=jax.devices()[:4])
    one = pipeline.generate(pipe, prompts[:1], s, mesh=mesh, output="float")
    err1 = float(np.abs(one - single[:1]).max())
    assert err1 < 1e-4, err1
    print("ok", err, err1)
""")


def test_eight_prompts_in_one_sharded_call_equal_single_device(model_dir):
  proc = subprocess.run(
    [sys.executable, "-c", SHARDED, str(model_dir)], capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("ok")


def test_model_folder_defaults_and_flag_overrides(model_dir, tmp_path):
  """Unset flags take the folder's pipeline.json defaults (as the bundled demo model's 17x64x64);
  explicit flags win; an unknown default key is a clear error."""
  import shutil

  folder = tmp_path / "model"
  shutil.copytree(model_dir, folder)
  manifest = json.loads((folder / "pipeline.json").read_text())
  manifest["defaults"] = {
    "num_frames": 9,
    "height": 64,
    "width": 64,
    "steps": 2,
    "fps": 4,
    "guidance": 3.0,
    "cfg_schedule": "constant",
  }
  (folder / "pipeline.json").write_text(json.dumps(manifest))
  proc = _sample("--model", folder, "--prompt", "a cat", "--out", tmp_path / "a", "--no-progress")
  assert proc.returncode == 0, proc.stderr[-2000:]
  mp4 = tmp_path / "a" / "0000_a_cat.mp4"
  info = video_io.probe(mp4)
  assert (info.frames, info.width, info.height, info.fps) == (9, 64, 64, 4)
  meta = json.loads(mp4.with_suffix(".json").read_text())
  assert (meta["settings"]["steps"], meta["settings"]["guidance"], meta["settings"]["cfg_schedule"]) == (
    2,
    3.0,
    "constant",
  )
  proc = _sample(
    "--model",
    folder,
    "--prompt",
    "a cat",
    "--out",
    tmp_path / "b",
    "--no-progress",
    "--steps",
    3,
    "--fps",
    8,
    "--frames",
    1,
    "--cfg-schedule",
    "released",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  mp4 = tmp_path / "b" / "0000_a_cat.mp4"
  info = video_io.probe(mp4)
  assert (info.frames, info.fps) == (1, 8)
  meta = json.loads(mp4.with_suffix(".json").read_text())
  assert (meta["settings"]["steps"], meta["settings"]["cfg_schedule"]) == (3, "released")
  manifest["defaults"]["frame_count"] = 9
  (folder / "pipeline.json").write_text(json.dumps(manifest))
  proc = _sample("--model", folder, "--prompt", "a cat", "--out", tmp_path / "c")
  assert proc.returncode == 2 and "unknown generation default(s) ['frame_count']" in proc.stderr


def test_sampling_preset_and_mesh_flags(model_dir, tmp_path):
  """--preset fills batch size, sizes, dtypes and VAE tiling (streamed decode) unless flags are given;
  the sidecar records it. A malformed --mesh is one clear line, exit 2."""
  preset = tmp_path / "my-preset.yaml"
  preset.write_text(
    "sample:\n  batch: 2\n  frames: 9\n  height: 64\n  width: 64\n"
    "  transformer: {dtype: float32}\n  vae_tiling: true\n"
  )
  out = tmp_path / "out"
  proc = _sample(
    "--model",
    model_dir,
    "--preset",
    preset,
    "--prompt",
    "a cat",
    "--prompt",
    "a dog",
    "--steps",
    2,
    "--out",
    out,
    "--no-progress",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  side = json.loads((out / "0001_a_dog.json").read_text())
  assert side["batch_size"] == 2 and side["batch_prompts"] == ["a cat", "a dog"]
  assert side["settings"]["num_frames"] == 9 and side["preset"] == str(preset)
  assert video_io.probe(out / "0001_a_dog.mp4").frames == 9
  proc = _sample("--model", model_dir, "--prompt", "a cat", "--mesh", "data=2,rows=2", "--out", out)
  assert proc.returncode == 2 and "--mesh 'data=2,rows=2': use axis=size pairs" in proc.stderr
  bad = tmp_path / "bad.yaml"
  bad.write_text("sample:\n  batches: 2\n")
  proc = _sample("--model", model_dir, "--preset", bad, "--prompt", "a cat", "--out", out)
  assert proc.returncode == 2 and "unknown key(s) ['batches']" in proc.stderr
