"""TPU lowering checked with the real TPU compiler (libtpu, deviceless): no Pallas interpreter here.

The tiny model's train step with splash attention compiles for v5p:2x2x2 (8 chips) in each layout,
and the sharded sampling stages (one video's CFG pair over 2 chips, its sequence over 2) for v5e:2x2.
Each compiled program must contain the Mosaic splash kernels (``tpu_custom_call``) -- proof that the
kernel itself was lowered for the chip -- and fit the chip's HBM as the compiler reports it.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from repvideo_jax import aot

TINY_SPLASH = ["transformer.attention_backend=splash", "transformer.num_heads=4", "run.global_batch=8"]
LAYOUTS = {
  "data": dict(data=8),
  "fsdp": dict(data=1, fsdp=8),
  "fsdp_tensor": dict(data=1, fsdp=4, tensor=2),
  "data_context": dict(data=4, context=2),
  "fsdp_context": dict(data=1, fsdp=4, context=2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tiny_train_step_with_splash_compiles_for_v5p_2x2x2(layout, tpu_devices):
  overrides = TINY_SPLASH + [f"mesh.{k}={v}" for k, v in LAYOUTS[layout].items()]
  report = aot.compile_train("train-tiny-cpu", overrides, topology="v5p:2x2x2")
  assert report.chips == 8 and report.mesh["fsdp"] == LAYOUTS[layout].get("fsdp", 1)
  assert report.mosaic_kernels > 0, "splash did not lower to a Mosaic kernel"
  assert report.fits and 0 < report.total_bytes < report.hbm_bytes
  assert report.hbm_bytes == pytest.approx(95.74 * 2**30, rel=1e-3)  # v5p, as the compiler says
  assert report.total_bytes == (
    report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes + report.code_bytes
  )
  assert report.alias_bytes > 0  # the train state is donated


def test_sharded_sampling_stages_compile_for_v5e_2x2(tpu_devices):
  """Tiny T5, transformer (splash) and VAE; batch 1: the CFG pair over data=2, the sequence over
  context=2 (37 video+text tokens are not divisible by 2: padded and masked)."""
  spec = aot.SamplingPreset(
    model_config="tiny",
    topology="v5e:2x2",
    batch=1,
    frames=9,
    height=64,
    width=64,
    transformer={
      "attention_backend": "splash",
      "sample_height": 8,
      "sample_width": 8,
      "text_length": 8,
      "text_embed_dim": 32,
      "num_heads": 2,
    },
    text_encoder={"vocab_size": 128, "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2},
    vae={
      "block_out_channels": (16, 32, 32, 32),
      "latent_channels": 4,
      "layers_per_block": 1,
      "norm_num_groups": 8,
    },
  )
  reports = aot.compile_sample(spec)
  assert [r.name.split(": ")[1].split(" ")[0] for r in reports] == ["T5", "denoising", "VAE"]
  denoise = reports[1]
  assert denoise.mesh == {"data": 2, "fsdp": 1, "tensor": 1, "context": 2}
  assert denoise.mosaic_kernels > 0
  assert all(r.fits for r in reports)
  assert all(r.hbm_bytes == pytest.approx(15.75 * 2**30, rel=1e-3) for r in reports)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "repvideo_jax.aot", *args], capture_output=True, text=True, timeout=600
  )


def test_aot_cli_reports_fit_and_writes_json(tmp_path):
  out = tmp_path / "report.json"
  proc = _cli(
    "train",
    "--config",
    "train-tiny-cpu",
    "--topology",
    "v5p:2x2x1",
    "--json",
    str(out),
    "transformer.attention_backend=splash",
    "run.global_batch=4",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "fits, headroom" in proc.stdout and "40% MFU" in proc.stdout
  (row,) = json.loads(out.read_text())
  assert row["fits"] and row["chips"] == 4 and row["mosaic_kernels"] > 0
  assert row["step_s_at_mfu_40"] == pytest.approx(row["model_flops"] / (4 * 459e12 * 0.4))


def test_aot_cli_exits_1_when_it_does_not_fit():
  """A tiny model with a 16 GiB text projection cannot fit one 15.75 GiB v5e chip."""
  proc = _cli(
    "train",
    "--config",
    "train-tiny-cpu",
    "--topology",
    "v5e:1x1",
    "transformer.text_embed_dim=134217728",
    "run.global_batch=1",
    "mesh.data=1",
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "DOES NOT FIT" in proc.stdout


def test_aot_cli_bad_topology_lists_the_valid_forms():
  proc = _cli("train", "--config", "train-tiny-cpu", "--topology", "v5p-64")
  assert proc.returncode == 2
  assert "unknown TPU topology 'v5p-64'" in proc.stderr and "v5p:4x4x2" in proc.stderr
  assert "Traceback" not in proc.stderr


ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_train_py_compile_only_runs_nothing(tmp_path):
  run = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "train.py"),
      "--config",
      "train-tiny-cpu",
      "--compile-only",
      f"run.output_dir={run}",
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "fits, headroom" in proc.stdout and "cpu" in proc.stdout.lower()
  assert not run.exists()  # compiled, nothing executed or written


def test_every_tpu_preset_lays_out_on_its_topology(tpu_devices):
  """Cheap structural check of every shipped TPU preset (the full compile of each, minutes apiece for
  the 2B, is benchmarks/aot_tpu.py): it names a valid topology, its mesh uses exactly that many chips,
  the heads split over tensor x context, and the batch over data x fsdp."""
  from repvideo_jax import pipeline, sharding
  from repvideo_jax.attention import check_head_split
  from repvideo_jax.training import trainer

  train = sorted((ROOT / "configs").glob("train-tpu-*.yaml"))
  sample = sorted((ROOT / "configs").glob("sample-*.yaml"))
  assert len(train) >= 4 and len(sample) >= 8
  for path in train:
    cfg = trainer.load_config(path.stem)
    mesh = sharding.build_mesh(cfg.mesh, tpu_devices(cfg.mesh.topology))
    check_head_split(cfg.transformer.num_heads, mesh.shape["tensor"], mesh.shape["context"])
    assert cfg.run.global_batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0, path.name
    assert cfg.transformer.attention_backend in ("splash", "auto"), path.name
  for path in sample:
    p = pipeline.load_sampling_preset(path.stem)
    devices = tpu_devices(p.topology)
    mesh = sharding.make_mesh(
      devices=devices, **(p.mesh or pipeline.default_sample_mesh(len(devices), p.batch))
    )
    check_head_split(30, mesh.shape["tensor"], mesh.shape["context"])


def test_multi_slice_mesh_keeps_each_slice_together():
  """``mesh.dcn_data``: two v5p:2x2x1 slices (abstract, libtpu) -> data = 2 slices x 2 in a slice; the
  fsdp groups stay inside one slice, so only data-parallel traffic crosses DCN."""
  import os

  from jax.experimental import topologies

  from repvideo_jax import sharding

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", num_slices=2).devices
  mesh = sharding.build_mesh(sharding.MeshConfig(data=-1, fsdp=2, dcn_data=2), devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "context": 1}
  slices = [{d.slice_index for d in row.flat} for row in mesh.devices]
  assert slices == [{0}, {0}, {1}, {1}], slices
  with pytest.raises(ValueError, match="do not split into dcn_data=3"):
    sharding.build_mesh(sharding.MeshConfig(dcn_data=3), devices)
