"""Tests for repvideo_jax.checkpoint_io (torch is only used as the reference)."""

import argparse
import json
import os
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from repvideo_jax import checkpoint_io as cio

TORCH_DTYPES = [
  torch.float64,
  torch.float32,
  torch.float16,
  torch.bfloat16,
  torch.int64,
  torch.int32,
  torch.int16,
  torch.int8,
  torch.uint8,
  torch.bool,
]


def _np(t: torch.Tensor) -> np.ndarray:
  """Reference numpy value of a torch tensor (bf16 via float32)."""
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.detach().numpy()


def _assert_same(a: np.ndarray, t: torch.Tensor) -> None:
  ref = _np(t)
  assert a.dtype == ref.dtype and a.shape == ref.shape
  np.testing.assert_array_equal(
    a.astype(np.float64) if a.dtype == ml_dtypes.bfloat16 else a,
    ref.astype(np.float64) if ref.dtype == ml_dtypes.bfloat16 else ref,
  )


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(seed)
  out = {}
  for i, dt in enumerate(TORCH_DTYPES):
    x = torch.randn(3, 4, generator=g) * 50
    out[f"t.{i}.{str(dt).split('.')[-1]}"] = x > 0 if dt == torch.bool else x.to(dt)
  out["scalar"] = torch.tensor(1.5)
  out["empty"] = torch.zeros(0, 5)
  return out


# ----------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("mmap", [True, False])
def test_read_safetensors_all_dtypes(tmp_path, mmap):
  tensors = _tensors()
  torch_save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
  out = cio.read_safetensors(tmp_path / "a.safetensors", mmap=mmap)
  assert set(out) == set(tensors)
  for k, t in tensors.items():
    _assert_same(out[k], t)


def test_read_safetensors_written_by_numpy_lib(tmp_path):
  arrs = {"a": np.arange(7, dtype=np.int16), "b": np.ones((2, 2), np.float64)}
  np_save_file(arrs, tmp_path / "n.safetensors")
  out = cio.read_safetensors(tmp_path / "n.safetensors")
  for k in arrs:
    np.testing.assert_array_equal(out[k], arrs[k])
    assert out[k].dtype == arrs[k].dtype


def test_write_safetensors_read_by_reference(tmp_path):
  tensors = _tensors(1)
  arrays = {k: _np(t) for k, t in tensors.items()}
  arrays["noncontig"] = np.arange(12, dtype=np.float32).reshape(3, 4).T
  cio.write_safetensors(tmp_path / "w.safetensors", arrays, metadata={"k": "v"})
  assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
  with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
    assert f.metadata() == {"k": "v"}
    assert set(f.keys()) == set(arrays)
    for k, t in tensors.items():
      got = f.get_tensor(k)
      assert got.dtype == t.dtype
      assert torch.equal(got, t)
    np.testing.assert_array_equal(f.get_tensor("noncontig").numpy(), arrays["noncontig"])
  back = cio.read_safetensors(tmp_path / "w.safetensors")
  for k in arrays:
    np.testing.assert_array_equal(back[k], arrays[k])


def test_write_safetensors_rejects_bad_input(tmp_path):
  with pytest.raises(TypeError, match="supported dtypes"):
    cio.write_safetensors(tmp_path / "x.safetensors", {"a": np.zeros(2, np.complex64)})
  with pytest.raises(TypeError, match="dict\\[str, str\\]"):
    cio.write_safetensors(tmp_path / "x.safetensors", {"a": np.zeros(2)}, metadata={"a": 1})
  assert not list(tmp_path.iterdir())


def test_read_safetensors_corrupt(tmp_path):
  torch_save_file({"a": torch.ones(100)}, tmp_path / "a.safetensors")
  data = (tmp_path / "a.safetensors").read_bytes()
  (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
  with pytest.raises(ValueError, match="trunc.safetensors.*(corrupt|truncated)"):
    cio.read_safetensors(tmp_path / "trunc.safetensors")
  (tmp_path / "head.safetensors").write_bytes(data[:20])
  with pytest.raises(ValueError, match="head.safetensors"):
    cio.read_safetensors(tmp_path / "head.safetensors")
  (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
  with pytest.raises(ValueError, match="tiny.safetensors"):
    cio.read_safetensors(tmp_path / "tiny.safetensors")


def _write_sharded(folder, stem="diffusion_pytorch_model"):
  t1 = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}
  t2 = {"b.weight": torch.randn(2, 4).to(torch.bfloat16)}
  names = [f"{stem}-0000{i}-of-00002.safetensors" for i in (1, 2)]
  torch_save_file(t1, folder / names[0])
  torch_save_file(t2, folder / names[1])
  weight_map = {**{k: names[0] for k in t1}, **{k: names[1] for k in t2}}
  (folder / f"{stem}.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
  )
  return {**t1, **t2}, names


def test_read_sharded_folder(tmp_path):
  ref, _ = _write_sharded(tmp_path)
  torch_save_file({"x": torch.ones(2).half()}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
  out = cio.read_safetensors_folder(tmp_path)  # the index wins over the single-file variant
  assert set(out) == set(ref)
  for k, t in ref.items():
    _assert_same(out[k], t)
  out = cio.read_safetensors_folder(tmp_path, prefix_hint="diffusion_pytorch_model.fp16")
  assert list(out) == ["x"] and out["x"].dtype == np.float16


def test_folder_missing_shard(tmp_path):
  _, names = _write_sharded(tmp_path)
  (tmp_path / names[1]).unlink()
  with pytest.raises(FileNotFoundError, match="missing.*00002-of-00002"):
    cio.read_safetensors_folder(tmp_path)


def test_folder_single_multiple_and_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="no weight files.*none"):
    cio.read_safetensors_folder(tmp_path)
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"config\.json.*\.bin"):
    cio.read_safetensors_folder(tmp_path)
  torch_save_file({"x": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
  np.testing.assert_array_equal(cio.read_safetensors_folder(tmp_path)["x"], np.ones(2, np.float32))
  torch_save_file({"x": torch.ones(2).half()}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
  with pytest.raises(ValueError, match="prefix_hint"):
    cio.read_safetensors_folder(tmp_path)
  out = cio.read_safetensors_folder(tmp_path, prefix_hint="diffusion_pytorch_model")
  assert out["x"].dtype == np.float32
  out = cio.read_safetensors_folder(tmp_path, prefix_hint="diffusion_pytorch_model.fp16")
  assert out["x"].dtype == np.float16


def test_folder_bin_fallback(tmp_path):
  lin = torch.nn.Linear(3, 2)
  torch.save(lin.state_dict(), tmp_path / "pytorch_model.bin")
  torch.save(argparse.Namespace(lr=1.0), tmp_path / "training_args.bin")  # must be ignored
  out = cio.read_safetensors_folder(tmp_path)
  assert set(out) == {"weight", "bias"}
  _assert_same(out["weight"], lin.weight)


# ----------------------------------------------------------------------------- torch pickle
class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f"echo pwned > {self.target}",)


def test_read_torch_pickle_matches_torch(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {
    "weights": OrderedDict(
      fp32=torch.randn(3, 5),
      fp16=torch.randn(2, 3).half(),
      bf16=torch.randn(4, 2).bfloat16(),
      i64=torch.arange(-5, 5),
      flag=torch.tensor([True, False, True]),
    ),
    "transposed": base.t(),
    "slice": base[1:3, 2:5],
    "row": base[2],
    "param": torch.nn.Parameter(torch.randn(3, 3)),
    "scalar": torch.tensor(7, dtype=torch.int32),
    "args": argparse.Namespace(lr=0.1, name="run", layers=[1, 2]),
    "step": 42,
    "nested": [1.5, ("a", None), {"b": b"bytes"}],
    "device": torch.device("cpu"),
    "dtype": torch.bfloat16,
  }
  torch.save(obj, tmp_path / "x.pt")
  out = cio.read_torch_pickle(tmp_path / "x.pt")
  for k, t in obj["weights"].items():
    _assert_same(out["weights"][k], t)
  assert isinstance(out["weights"], OrderedDict) and list(out["weights"]) == list(obj["weights"])
  for k in ("transposed", "slice", "row", "param", "scalar"):
    _assert_same(out[k], obj[k])
    assert out[k].flags.c_contiguous
  assert out["step"] == 42 and out["nested"] == [1.5, ("a", None), {"b": b"bytes"}]
  assert out["args"].lr == 0.1 and out["args"].name == "run" and out["args"].layers == [1, 2]
  assert out["dtype"] == np.dtype(ml_dtypes.bfloat16)
  assert "torch.device" in repr(out["device"])


def test_read_torch_pickle_never_executes_code(tmp_path):
  marker = tmp_path / "pwned.txt"
  torch.save({"w": torch.ones(2), "evil": _Evil(marker)}, tmp_path / "evil.pt")
  out = cio.read_torch_pickle(tmp_path / "evil.pt")
  assert not marker.exists()
  assert "system" in repr(out["evil"]) and "echo pwned" in repr(out["evil"])
  np.testing.assert_array_equal(out["w"], np.ones(2, np.float32))


class _EvilEval:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return eval, (f"open({str(self.target)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_hand_made_malicious_pickles_are_inert(tmp_path, protocol):
  import pickle
  import zipfile

  marker = tmp_path / "pwned.txt"
  payload = pickle.dumps({"e": _Evil(marker), "g": _EvilEval(marker), "l": [1, 2]}, protocol=protocol)
  with zipfile.ZipFile(tmp_path / "m.pt", "w") as zf:
    zf.writestr("archive/data.pkl", payload)
  out = cio.read_torch_pickle(tmp_path / "m.pt")
  assert not marker.exists() and out["l"] == [1, 2]
  assert "system" in repr(out["e"]) and "eval" in repr(out["g"])


def test_read_torch_pickle_errors(tmp_path):
  torch.save({"w": torch.ones(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match="old.pt.*legacy"):
    cio.read_torch_pickle(tmp_path / "old.pt")
  (tmp_path / "legacy.pt").write_bytes(b"\x80\x02not a zip file")
  with pytest.raises(ValueError, match="legacy.pt.*re-save"):
    cio.read_torch_pickle(tmp_path / "legacy.pt")
  torch.save({"w": torch.ones(1000)}, tmp_path / "ok.pt")
  data = (tmp_path / "ok.pt").read_bytes()
  (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="trunc.pt"):
    cio.read_torch_pickle(tmp_path / "trunc.pt")
  with pytest.raises(FileNotFoundError):
    cio.read_torch_pickle(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- SAT layouts
def _sat_module():
  return {
    "model.diffusion_model.w": torch.randn(4, 4).bfloat16(),
    "model.diffusion_model.b": torch.randn(4),
    "first_stage_model.x": torch.arange(3),
  }


def _check_sat(out, module):
  assert set(out) == set(module)
  for k, t in module.items():
    _assert_same(out[k], t)


def test_sat_layouts(tmp_path):
  module = _sat_module()
  it = tmp_path / "ckpt" / "1000"
  it.mkdir(parents=True)
  torch.save(
    {"module": module, "args": argparse.Namespace(mp_size=1), "iteration": 1000},
    it / "mp_rank_00_model_states.pt",
  )
  (tmp_path / "ckpt" / "latest").write_text("1000\n")
  _check_sat(cio.load_sat_checkpoint(tmp_path / "ckpt"), module)  # (a)
  _check_sat(cio.load_sat_checkpoint(it), module)  # (b)
  _check_sat(cio.load_sat_checkpoint(it / "mp_rank_00_model_states.pt"), module)  # (c)


@pytest.mark.parametrize("key", ["model", "state_dict", None])
def test_sat_unwrap_other_keys(tmp_path, key):
  module = _sat_module()
  torch.save(module if key is None else {key: module, "epoch": 3}, tmp_path / "w.pt")
  _check_sat(cio.load_sat_checkpoint(tmp_path / "w.pt"), module)


def test_sat_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no 'latest'"):
    cio.load_sat_checkpoint(tmp_path / "empty")
  (tmp_path / "empty" / "latest").write_text("500")
  with pytest.raises(FileNotFoundError, match="500.*does not exist"):
    cio.load_sat_checkpoint(tmp_path / "empty")
  (tmp_path / "empty" / "500").mkdir()
  with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states.pt"):
    cio.load_sat_checkpoint(tmp_path / "empty")
  mp = tmp_path / "mp"
  mp.mkdir()
  for r in (0, 1):
    torch.save({"module": _sat_module()}, mp / f"mp_rank_0{r}_model_states.pt")
  with pytest.raises(NotImplementedError, match="model-parallel"):
    cio.load_sat_checkpoint(mp)
  torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "noweights.pt")
  with pytest.raises(ValueError, match="could not find the weights"):
    cio.load_sat_checkpoint(tmp_path / "noweights.pt")


# ----------------------------------------------------------------------------- orbax params
def _params():
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  return {
    "blocks": {
      "0": {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
      },
      "attn.qkv": {"kernel": jnp.asarray(rng.standard_normal((2, 6)), jnp.bfloat16)},
    },
    "step": np.arange(3, dtype=np.int32),
  }


def test_orbax_round_trip(tmp_path):
  import jax

  params = _params()
  meta = {"source": "sat", "config": {"layers": 2, "dims": [1, 2]}}
  cio.save_params(tmp_path / "ck", params, metadata=meta)
  back, meta2 = cio.load_params(tmp_path / "ck")
  assert meta2 == meta
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.astype(np.float32), np.asarray(b).astype(np.float32))

  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ),
    params,
  )
  restored, _ = cio.load_params(tmp_path / "ck", target=target)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    assert isinstance(a, jax.Array) and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

  with pytest.raises(FileExistsError, match="overwrite=True"):
    cio.save_params(tmp_path / "ck", params)
  cio.save_params(tmp_path / "ck", {"x": np.ones(2, np.float32)}, overwrite=True)
  back, meta3 = cio.load_params(tmp_path / "ck")
  assert meta3 == {} and list(back) == ["x"]


def test_orbax_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cio.load_params(tmp_path / "nope")
  cio.save_params(tmp_path / "ck", {"x": np.ones(2, np.float32)})
  (tmp_path / "ck" / "metadata.json").unlink()  # simulate an interrupted save
  with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
    cio.load_params(tmp_path / "ck")
  with pytest.raises(TypeError, match="str keys"):
    cio.save_params(tmp_path / "bad", {1: np.ones(2)})
