"""train.py end to end: layouts agree, resume is exact (also after SIGKILL mid-save), multi-process.

Tolerances: float32 on CPU. Same-layout resume is bit-exact. Different device layouts change only the
summation order of reductions: losses agree to 1e-5 relative, params after the steps to 2e-5 abs.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from train_helpers import FixedBatches, tiny_config

from repvideo_jax.training import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_resume_is_exact(tmp_path):
  straight = trainer.train(tiny_config(tmp_path / "a"), data_iterator=FixedBatches())
  trainer.train(tiny_config(tmp_path / "b", steps=3, save_every=3), data_iterator=FixedBatches())
  resumed = trainer.train(
    tiny_config(tmp_path / "b", save_every=3), data_iterator=FixedBatches(), resume=True
  )
  assert [l for _, l in straight["losses"][3:]] == [l for _, l in resumed["losses"]]
  a, b = _flat(jax.device_get(straight["state"]["params"])), _flat(jax.device_get(resumed["state"]["params"]))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert (tmp_path / "a" / "run" / "config.resolved.json").exists()
  assert list((tmp_path / "a" / "run" / "tensorboard").glob("events.out.tfevents.*"))


LAYOUT_SCRIPT = textwrap.dedent("""
    import os, sys, json, pathlib
    if sys.argv[2] != "single":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[3])
    import dataclasses, jax, numpy as np
    from repvideo_jax import sharding
    from repvideo_jax.training import trainer
    from train_helpers import FixedBatches, tiny_config
    out = pathlib.Path(sys.argv[1])
    cfg = tiny_config(out, steps=3, save_every=100)
    mesh = json.loads(sys.argv[2]) if sys.argv[2] != "single" else {"data": 1}
    cfg = dataclasses.replace(cfg, mesh=sharding.MeshConfig(**mesh),
                              run=dataclasses.replace(cfg.run, global_batch=8))
    r = trainer.train(cfg, data_iterator=FixedBatches(batch=8))
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(r["state"]["params"]))[0]}
    np.savez(out / "params.npz", **flat)
    (out / "losses.json").write_text(json.dumps(r["losses"]))
""")


def _run_layout(tmp_path, name, mesh):
  out = tmp_path / name
  out.mkdir()
  proc = subprocess.run(
    [sys.executable, "-c", LAYOUT_SCRIPT, str(out), mesh, str(ROOT / "tests")],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((out / "losses.json").read_text()), dict(np.load(out / "params.npz"))


@pytest.mark.slow
def test_device_layouts_match_one_device(tmp_path):
  ref_losses, ref_params = _run_layout(tmp_path, "single", "single")
  layouts = {
    "data": {"data": 8},
    "fsdp": {"data": 1, "fsdp": 8},
    "fsdp_tensor": {"data": 1, "fsdp": 4, "tensor": 2},
    "data_context": {"data": 4, "context": 2},
  }
  for name, mesh in layouts.items():
    losses, params = _run_layout(tmp_path, name, json.dumps(mesh))
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in ref_losses], rtol=1e-5, err_msg=name)
    for k in ref_params:
      np.testing.assert_allclose(params[k], ref_params[k], atol=2e-5, err_msg=f"{name} {k}")


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, signal
    sys.path.insert(0, sys.argv[2])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import pathlib
    from repvideo_jax.training import trainer, checkpoints
    from train_helpers import FixedBatches, tiny_config
    original = checkpoints.Checkpointer.save
    def save_then_die(self, step, *a, **k):
        started = original(self, step, *a, **k)
        if started and step == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)   # async save still in flight
        return started
    checkpoints.Checkpointer.save = save_then_die
    trainer.train(tiny_config(pathlib.Path(sys.argv[1]), save_every=2), data_iterator=FixedBatches())
""")


def test_sigkill_during_async_save_then_resume(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "k"), str(ROOT / "tests"), "4"],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  ckpts = tmp_path / "k" / "run" / "checkpoints"
  assert ckpts.exists()
  resumed = trainer.train(
    tiny_config(tmp_path / "k", save_every=2), data_iterator=FixedBatches(), resume=True
  )
  first = resumed["losses"][0][0]
  assert first in (3, 5)  # resumed after step 2 or 4: whichever checkpoint was complete
  straight = trainer.train(tiny_config(tmp_path / "s"), data_iterator=FixedBatches())
  a, b = _flat(jax.device_get(straight["state"]["params"])), _flat(jax.device_get(resumed["state"]["params"]))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_checkpoint(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "REPVIDEO_NO_AUTO_DISTRIBUTED": "1"}
  overrides = [
    "transformer.num_layers=2",
    "data.synthetic=true",
    "data.frames=5",
    "data.height=64",
    "data.width=64",
    "run.steps=3",
    "run.save_every=2",
    "run.log_every=1",
    f"run.output_dir={tmp_path / 'mp'}",
    "run.global_batch=4",
  ]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        "train-tiny-cpu",
        *overrides,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "step 3/3" in outs[0][0] and "step 3/3" not in outs[1][0]  # only process 0 logs
  assert "2 process(es)" in outs[0][1]
  steps = sorted(int(p.name) for p in (tmp_path / "mp" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 3


def test_bad_config_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown key"):
    trainer.load_config("train-tiny-cpu", ["run.stepz=3"])
  with pytest.raises(ValueError, match="no training data"):
    trainer.make_data_iterator(trainer.load_config("train-tiny-cpu"))
  proc = subprocess.run(
    [sys.executable, str(ROOT / "train.py"), "--config", "train-tiny-cpu", "optim.schedule=wavy"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2 and "optim.schedule" in proc.stderr and "Traceback" not in proc.stderr


def test_export_a_run_as_a_transformer_folder(tmp_path):
  """export_transformer writes the run's last params (its EMA by default when kept) in the format
  transformer_weights.load reads; it restores on one device whatever the run's layout."""
  import dataclasses

  from repvideo_jax import transformer_weights

  cfg = tiny_config(tmp_path, steps=4, save_every=2)
  cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, ema_decay=0.5))
  result = trainer.train(cfg, data_iterator=FixedBatches())
  state = jax.device_get(result["state"])
  run = tmp_path / "run"
  for use_ema, key, dst in ((None, "ema", "default"), (False, "params", "raw")):
    tcfg = trainer.export_transformer(run, tmp_path / dst, use_ema=use_ema)
    assert tcfg == cfg.transformer
    loaded_cfg, loaded = transformer_weights.load(tmp_path / dst)
    assert loaded_cfg == cfg.transformer
    expected = _flat(state[key])
    for k, v in _flat(loaded).items():
      np.testing.assert_array_equal(v, expected[k], err_msg=k)
  assert not np.array_equal(_flat(state["ema"])["['gates']"], _flat(state["params"])["['gates']"])
  meta = json.loads((tmp_path / "default" / "metadata.json").read_text())
  assert "step 4 (EMA)" in meta["source"]
  trainer.export_transformer(run, tmp_path / "s2", step=2)  # an earlier checkpoint
  _, earlier = transformer_weights.load(tmp_path / "s2")
  assert not np.array_equal(_flat(earlier)["['gates']"], _flat(state["ema"])["['gates']"])
  from repvideo_jax import convert  # the same through the CLI

  assert convert.main(["run", "--src", str(run), "--dst", str(tmp_path / "cli"), "--no-ema"]) == 0
  _, via_cli = transformer_weights.load(tmp_path / "cli")
  for k, v in _flat(via_cli).items():
    np.testing.assert_array_equal(v, _flat(state["params"])[k], err_msg=k)
  assert convert.main(["run", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "z")]) == 2
  with pytest.raises(FileNotFoundError, match="not a train.py run folder"):
    trainer.export_transformer(tmp_path / "nothing", tmp_path / "x")
  cfg_no_ema = tiny_config(tmp_path / "plain", steps=1)
  trainer.train(cfg_no_ema, data_iterator=FixedBatches())
  with pytest.raises(ValueError, match="kept no EMA"):
    trainer.export_transformer(tmp_path / "plain" / "run", tmp_path / "y", use_ema=True)
