"""Torch-free checkpoint reading/writing as raw numpy arrays.

Supported inputs: ``.safetensors`` files and Hugging Face / diffusers model
folders (single or sharded), ``torch.save`` zip checkpoints (read by a safe,
restricted unpickler that never executes code from the file) and SAT /
deepspeed ``mp_rank_00_model_states.pt`` layouts.  Our own converted format is
an orbax pytree checkpoint plus a ``metadata.json``.  Names and layouts of the
tensors are *not* changed here.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from repvideo_jax.outputs import atomic_write, staged_dir

PathLike = str | os.PathLike

_ST_DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
_ST_NAMES = {dt: name for name, dt in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors
def read_safetensors(path: PathLike, *, mmap: bool = True) -> dict[str, np.ndarray]:
  """Reads one ``.safetensors`` file into ``{name: array}`` without torch.

  With ``mmap=True`` (default) the arrays are read-only views of a memory map
  of the file (data is only paged in when used; ``np.array(x)`` makes a
  writable copy).  With ``mmap=False`` the whole file is read into memory.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"safetensors file {path} does not exist.")
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw_len = f.read(8)
    n = struct.unpack("<Q", raw_len)[0] if len(raw_len) == 8 else size
    if n + 8 > size:
      raise ValueError(
        f"{path}: corrupt or truncated safetensors file (bad header length); re-download or re-export it."
      )
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      header = None
    if not isinstance(header, dict):
      raise ValueError(f"{path}: corrupt safetensors header; re-download or re-export the file.")
    if mmap:
      data = np.memmap(path, np.uint8, "r")
    else:
      data = np.zeros(size, np.uint8)
      f.seek(0)
      f.readinto(memoryview(data))
  header.pop("__metadata__", None)
  base, out = 8 + n, {}
  for name, info in header.items():
    try:
      dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(
        f"{path}: tensor {name!r} has an unsupported dtype or malformed header "
        f"entry {info!r}; supported dtypes: {sorted(_ST_DTYPES)}."
      ) from e
    if end - begin != int(np.prod(shape)) * dtype.itemsize or not 0 <= begin <= end or base + end > size:
      raise ValueError(
        f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end} (file "
        f"size {size}); the file is corrupt or truncated, re-download it."
      )
    out[name] = data[base + begin : base + end].view(np.ndarray).view(dtype).reshape(shape)
  return out


def write_safetensors(
  path: PathLike, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
  """Writes ``tensors`` (name -> array-like) to a ``.safetensors`` file atomically."""
  arrays, header = {}, {}
  if metadata is not None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise TypeError(
        "safetensors metadata must be a dict[str, str]; convert values with str() or json.dumps()."
      )
    header["__metadata__"] = dict(metadata)
  if not all(isinstance(k, str) for k in tensors):
    raise TypeError("safetensors tensor names must be str; convert the keys first.")
  offset = 0
  for name in sorted(tensors):
    arr = np.asarray(tensors[name], order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    tag = _ST_NAMES.get(arr.dtype)
    if tag is None:
      raise TypeError(
        f"cannot write tensor {name!r} with dtype {arr.dtype}: supported dtypes are "
        f"{sorted(_ST_DTYPES)}; cast it first (e.g. arr.astype(np.float32))."
      )
    arrays[name] = arr.reshape(-1).view(np.uint8)
    header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
  atomic_write(path, [struct.pack("<Q", len(blob)), blob, *(a.data for a in arrays.values())])


# ----------------------------------------------------------------------------- model folders
_SHARD_RE = re.compile(r"-\d+-of-\d+\.(safetensors|bin)$")


def find_weight_files(folder: PathLike, prefix_hint: str | None = None) -> tuple[str, list[Path]]:
  """Picks the weight files of a HF/diffusers model folder.

  Returns ``(kind, files)`` with kind ``"safetensors"`` or ``"torch"``.  Preference order:
  safetensors index, single safetensors, ``.bin`` index, single ``.bin``.  ``prefix_hint``
  (e.g. ``"diffusion_pytorch_model"``) restricts the candidates to that file stem
  (an exact stem wins over other names starting with it, like ``*.fp16.safetensors``).
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(
      f"{folder} is not a directory; pass a model folder (or use "
      "read_safetensors / read_torch_pickle for a single file)."
    )
  names = sorted(p.name for p in folder.iterdir() if p.is_file())
  for suffix, kind in (
    (".safetensors.index.json", "safetensors"),
    (".safetensors", "safetensors"),
    (".bin.index.json", "torch"),
    (".bin", "torch"),
  ):
    cands = [
      n
      for n in names
      if n.endswith(suffix)
      and not _SHARD_RE.search(n)  # shards: via index
      and (kind == "safetensors" or "model" in n)
    ]  # skip training_args.bin & co.
    if prefix_hint is not None:
      exact = [n for n in cands if n[: -len(suffix)] == prefix_hint]
      cands = exact or [n for n in cands if n.startswith(prefix_hint)]
    if len(cands) > 1:
      raise ValueError(
        f"{folder}: several candidate weight files {cands} and no way to choose; "
        "pass prefix_hint=<file stem> to pick one."
      )
    if cands and suffix.endswith(".index.json"):
      index_path = folder / cands[0]
      try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a valid index file (needs a 'weight_map').") from e
      shards = sorted(set(weight_map.values()))
      missing = [s for s in shards if not (folder / s).is_file()]
      if missing:
        raise FileNotFoundError(
          f"{index_path} lists shard files that are missing: {missing}; download the complete model folder."
        )
      return kind, [folder / s for s in shards]
    if cands:
      return kind, [folder / cands[0]]
  raise FileNotFoundError(
    f"{folder}: no weight files found (files present: {names or 'none'}); expected *.safetensors "
    "(optionally sharded with *.safetensors.index.json) or pytorch_model.bin / "
    "diffusion_pytorch_model.bin" + (f" matching prefix_hint={prefix_hint!r}." if prefix_hint else ".")
  )


def read_safetensors_folder(folder: PathLike, prefix_hint: str | None = None) -> dict[str, np.ndarray]:
  """Reads all weights of a HF/diffusers model folder into one flat ``{name: array}`` dict.

  Falls back to ``pytorch_model.bin``-style files (read torch-free with
  :func:`read_torch_pickle`) when no safetensors file is present.
  """
  kind, files = find_weight_files(folder, prefix_hint)
  out: dict[str, np.ndarray] = {}
  for f in files:
    part = read_safetensors(f) if kind == "safetensors" else _state_dict_of(read_torch_pickle(f), f)
    dup = out.keys() & part.keys()
    if dup:
      raise ValueError(
        f"{f}: tensors {sorted(dup)[:5]} also appear in another shard; the folder is "
        "inconsistent, re-download it."
      )
    out.update(part)
  return out


# ----------------------------------------------------------------------------- torch pickles
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
  "float32": np.float32,
  "float": np.float32,
  "float64": np.float64,
  "double": np.float64,
  "float16": np.float16,
  "half": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "long": np.int64,
  "int32": np.int32,
  "int": np.int32,
  "int16": np.int16,
  "short": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "bool": np.bool_,
}


class _StorageType:
  def __init__(self, dtype: Any):
    self.dtype = np.dtype(dtype)


class _Stub:
  """Inert stand-in for an untrusted class: records constructor args and state, runs nothing."""

  _origin = "?"

  def __new__(cls, *args: Any, **kwargs: Any):
    self = object.__new__(cls)
    self.__dict__.update(_args=args, _kwargs=kwargs, _state=None, _items={}, _list=[])
    return self

  def __init__(self, *args: Any, **kwargs: Any):
    pass

  def __setstate__(self, state: Any) -> None:
    self._state = state
    if isinstance(state, dict):  # e.g. argparse.Namespace -> attributes stay accessible
      self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str) and k[:1] != "_"})

  def __setitem__(self, key: Any, value: Any) -> None:
    self._items[key] = value

  def append(self, value: Any) -> None:
    self._list.append(value)

  def __repr__(self) -> str:
    return f"<stub {self._origin} args={self._args!r}>"


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> np.ndarray:
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError(f"tensor rebuilt from a non-storage object {storage!r}")
  size, stride = tuple(size), tuple(stride)
  if any(s < 0 for s in stride) or len(size) != len(stride) or offset < 0:
    raise ValueError(f"invalid tensor layout offset={offset} size={size} stride={stride}")
  if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise ValueError(
      f"tensor view offset={offset} size={size} stride={stride} exceeds its "
      f"storage of {storage.size} elements; the checkpoint is corrupt"
    )
  if not all(size):
    return np.zeros(size, storage.dtype)
  if int(np.prod(size, dtype=object)) > storage.size:  # e.g. stride 0: a few bytes claiming gigabytes
    raise ValueError(
      f"tensor of size {size} (stride {stride}) has more elements than its storage of "
      f"{storage.size}; refusing to expand it: the checkpoint is corrupt or crafted"
    )
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], size, [s * storage.itemsize for s in stride], writeable=False
  )
  return np.array(view, order="C")


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_unused):
  return _rebuild_tensor(storage.view(np.dtype(dtype)), offset, size, stride)


def _rebuild_from_type_v2(func, new_type, args, state):
  if func is _rebuild_tensor or func is _rebuild_tensor_v3:
    return func(*args)
  return _stub_class("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)


def _codecs_encode(text: str, encoding: str = "latin1") -> bytes:
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
  return text.encode(encoding)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
  ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
  ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("_codecs", "encode"): _codecs_encode,
  **{
    ("builtins", n): getattr(builtins, n)
    for n in (
      "set",
      "frozenset",
      "list",
      "dict",
      "tuple",
      "int",
      "float",
      "complex",
      "bool",
      "str",
      "bytes",
      "slice",
    )
  },
  **{
    (m, n): getattr(np._core.multiarray, n)
    for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    for n in ("_reconstruct", "scalar")
  },
  ("numpy", "ndarray"): np.ndarray,
  ("numpy", "dtype"): np.dtype,
  **{("torch", n): _StorageType(dt) for n, dt in _STORAGE_DTYPES.items()},
  ("torch.storage", "UntypedStorage"): _StorageType(np.uint8),
  **{("torch", n): np.dtype(dt) for n, dt in _TORCH_DTYPES.items()},
}
_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _STUBS:
    _STUBS[key] = type(name, (_Stub,), {"__module__": module, "_origin": f"{module}.{name}"})
  return _STUBS[key]


class _SafeUnpickler(pickle.Unpickler):
  def __init__(self, file, zf: zipfile.ZipFile, archive: str, path: Path, raw: np.memmap):
    super().__init__(file, encoding="utf-8")
    self.zf, self.archive, self.path, self.raw, self.storages = zf, archive, path, raw, {}

  def find_class(self, module: str, name: str) -> Any:
    obj = _SAFE_GLOBALS.get((module, name), None)
    return _stub_class(module, name) if obj is None else obj

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (
      isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
    ):
      raise pickle.UnpicklingError(f"{self.path}: unsupported persistent id {pid!r}")
    _, stype, key, _location, numel = pid
    if key not in self.storages:
      info = self.zf.getinfo(f"{self.archive}/data/{key}")
      if info.compress_type == zipfile.ZIP_STORED:  # memory-map the record, no copy
        head = bytes(self.raw[info.header_offset : info.header_offset + 30])
        if head[:4] != b"PK\x03\x04":
          raise ValueError(f"{self.path}: bad zip record header for storage {key}")
        start = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))
        buf = self.raw[start : start + info.file_size].view(np.ndarray)
      else:
        buf = np.frombuffer(self.zf.read(info), np.uint8)
      if buf.size < numel * stype.dtype.itemsize or buf.size % stype.dtype.itemsize:
        raise ValueError(
          f"{self.path}: storage {key} is truncated ({buf.size} bytes for {numel} x {stype.dtype})"
        )
      self.storages[key] = buf.view(stype.dtype)
    return self.storages[key]


def read_torch_pickle(path: PathLike) -> Any:
  """Loads a ``torch.save`` (zip format, torch>=1.6) file without torch, safely.

  Tensors and ``nn.Parameter`` become contiguous numpy arrays (bf16 via
  ml_dtypes); dicts/lists/builtins are rebuilt; any other class (argparse
  Namespace, torch.device, deepspeed objects, ...) becomes an inert stub that
  records its args/state.  No code from the file is ever executed.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"torch checkpoint {path} does not exist.")
  if not zipfile.is_zipfile(path):
    raise ValueError(
      f"{path}: not a zip-format torch checkpoint (legacy torch<1.6 format, TorchScript "
      "or not a torch file); re-save it with a recent torch: "
      "torch.save(torch.load(p), p, _use_new_zipfile_serialization=True)."
    )
  try:
    with zipfile.ZipFile(path) as zf:
      pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pkls) != 1:
        raise ValueError(f"{path}: expected exactly one '<archive>/data.pkl' record, found {pkls}.")
      archive = pkls[0].split("/")[0]
      order = f"{archive}/byteorder"
      if order in zf.namelist() and zf.read(order).strip() != b"little":
        raise ValueError(f"{path}: big-endian torch checkpoints are not supported.")
      raw = np.memmap(path, np.uint8, "r")
      with zf.open(pkls[0]) as f:
        return _SafeUnpickler(f, zf, archive, path, raw).load()
  except (
    zipfile.BadZipFile,
    KeyError,
    EOFError,
    pickle.UnpicklingError,
    TypeError,
    struct.error,
    AttributeError,
    IndexError,
    RecursionError,
    MemoryError,
    UnicodeDecodeError,
    OverflowError,
  ) as e:
    raise ValueError(f"{path}: corrupt or unsupported torch checkpoint ({type(e).__name__}: {e}).") from e


def _flatten(tree: Mapping, prefix: str = "", depth: int = 0) -> dict[str, Any]:
  if depth > 32:  # state dicts nest a few levels; a deeper tree is malformed (or crafted)
    raise ValueError(f"nested more than 32 dicts deep at {prefix[:200]!r}: not a state dict")
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}.", depth + 1))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _state_dict_of(obj: Any, path: PathLike) -> dict[str, np.ndarray]:
  """Unwraps ``module`` / ``model`` / ``state_dict`` (in that order) and flattens to name -> array."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}.")
  for key in ("module", "model", "state_dict"):
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  flat = _flatten(obj)
  bad = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
  if bad or not flat:
    raise ValueError(
      f"{path}: could not find the weights (no 'module'/'model'/'state_dict' dict of "
      f"tensors; non-tensor entries: {bad[:8]})."
    )
  return flat


def load_sat_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
  """Loads a SAT / deepspeed checkpoint into a flat ``{name: array}`` dict.

  ``path`` may be a folder with a ``latest`` file naming the iteration folder,
  the iteration folder itself (holding ``mp_rank_00_model_states.pt``), or the
  ``.pt`` file.  Model-parallel checkpoints (``mp_rank_01`` ...) are not supported.
  """
  path = Path(path)
  if path.is_dir():
    if (path / "latest").is_file():
      it = (path / "latest").read_text().strip()
      if not (path / it).is_dir():
        raise FileNotFoundError(
          f"{path / 'latest'} names iteration {it!r} but folder {path / it} "
          "does not exist; fix 'latest' or pass the iteration folder."
        )
      path = path / it
    elif not (path / "mp_rank_00_model_states.pt").exists():
      raise FileNotFoundError(
        f"{path}: no 'latest' file and no mp_rank_00_model_states.pt (found "
        f"{sorted(p.name for p in path.iterdir())}); pass the SAT checkpoint "
        "folder, its <iteration> folder or the .pt file."
      )
    path = path / "mp_rank_00_model_states.pt"
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found; the SAT iteration folder is incomplete.")
  elif not path.is_file():
    raise FileNotFoundError(f"{path} does not exist.")
  if (path.parent / "mp_rank_01_model_states.pt").exists():
    raise NotImplementedError(
      f"{path.parent} holds a model-parallel checkpoint (mp_rank_01 present), "
      "which is not supported; merge it to a single rank (mp_size=1) first."
    )
  try:
    return _state_dict_of(read_torch_pickle(path), path)
  except ValueError as e:
    raise ValueError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


# ----------------------------------------------------------------------------- own format (orbax)
def _check_keys(params: Any) -> None:

  for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    if any(not (isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)) for k in kp):
      raise TypeError(
        "params must be nested dicts with str keys; got the path "
        f"{jax.tree_util.keystr(kp)}; convert lists/int keys to str-keyed dicts."
      )


def save_params(
  directory: PathLike, params: Any, *, metadata: dict | None = None, overwrite: bool = False
) -> None:
  """Saves a pytree of arrays to ``directory/params`` (orbax) + ``directory/metadata.json``.

  ``metadata.json`` is written last and atomically, so it marks a complete
  checkpoint.  Blocks until the (async) orbax save has finished.
  """

  directory = Path(directory).absolute()
  _check_keys(params)
  json.dumps(metadata or {})  # fail early if the metadata is not JSON-able
  replacing = (directory / "params").exists() or (directory / "metadata.json").exists()
  if replacing and not overwrite:
    raise FileExistsError(
      f"{directory} already holds a checkpoint; replace it with --overwrite "
      "(overwrite=True in Python) or write to a new folder"
    )
  # A replacement is written beside the old checkpoint and swapped in once complete: a failed or
  # interrupted save never costs the checkpoint that was there. A new checkpoint is written in place
  # (the folder may hold other files); it is complete once metadata.json, written last, exists.
  if replacing:
    with staged_dir(directory) as target:
      _write_checkpoint(target, params, metadata)
  else:
    directory.mkdir(parents=True, exist_ok=True)
    _write_checkpoint(directory, params, metadata)


def _write_checkpoint(target: Path, params: Any, metadata: dict | None) -> None:
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target / "params", params)
    ckptr.wait_until_finished()
  # A SHA-256 per file, checked on load: flipped bytes must not load silently.
  meta = json.dumps(
    {**(metadata or {}), "checksums": file_digests(target / "params")}, indent=2, sort_keys=True
  ).encode()
  atomic_write(target / "metadata.json", meta)


def file_digests(folder: Path) -> dict[str, str]:
  """{path relative to ``folder``.parent: SHA-256} of every file below ``folder``, read in 8 MiB
  blocks (streaming: the memory of one block)."""
  folder = Path(folder)
  out = {}
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      while block := f.read(8 << 20):
        digest.update(block)
    out[path.relative_to(folder.parent).as_posix()] = digest.hexdigest()
  return out


def verify_checksums(directory: Path, metadata: dict) -> None:
  """Raises ValueError naming the first file whose bytes differ from the SHA-256 recorded at save
  time (folders written before checksums were recorded are not checked)."""
  expected = metadata.get("checksums")
  if not expected:
    return
  actual = file_digests(Path(directory) / "params")
  for name, digest in sorted(expected.items()):
    if actual.get(name) != digest:
      state = (
        "is missing (metadata.json lists it)"
        if name not in actual
        else "does not match its checksum in metadata.json"
      )
      raise ValueError(
        f"{Path(directory) / name} {state}: the converted weights "
        "are corrupt or were modified; convert them again (or skip the check with "
        "--no-verify / verify=False)"
      )


@contextlib.contextmanager
def _quiet_orbax():
  """Holds back orbax's absl warnings while reading a folder: a damaged folder gets our one error
  (raised below) instead of orbax's 'Failed to get item metadata' lines before it."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def load_params(directory: PathLike, *, target: Any = None, verify: bool = True) -> tuple[Any, dict]:
  """Loads ``(params, metadata)`` written by :func:`save_params`.

  Without ``target`` every leaf is restored as a numpy array (use
  ``jax.device_put`` afterwards).  With ``target`` (pytree of
  ``jax.ShapeDtypeStruct`` or arrays, optionally with shardings) the leaves are
  restored into that structure, dtype and sharding.
  """

  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(
      f"checkpoint directory {directory} does not exist; check the path or create it with save_params()."
    )
  if not (directory / "params").is_dir() or not (directory / "metadata.json").is_file():
    raise FileNotFoundError(
      f"{directory} is not a complete checkpoint (params/ or metadata.json "
      "missing, e.g. an interrupted save); re-run save_params()."
    )
  try:
    metadata = json.loads((directory / "metadata.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
      f"{directory}/metadata.json is not valid JSON ({e}); convert the weights again"
    ) from None
  if not isinstance(metadata, dict):
    raise ValueError(f"{directory}/metadata.json must be a JSON object; convert the weights again")
  if verify:
    verify_checksums(directory, metadata)
  metadata = {k: v for k, v in metadata.items() if k != "checksums"}  # the caller's metadata, as saved
  try:
    with _quiet_orbax():
      if target is None:
        with ocp.PyTreeCheckpointer() as ckptr:
          tree = ckptr.metadata(directory / "params").item_metadata.tree
          args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
          params = ckptr.restore(directory / "params", args=ocp.args.PyTreeRestore(restore_args=args))
        return params, metadata
      target = jax.tree.map(
        lambda x: (
          x
          if isinstance(x, jax.ShapeDtypeStruct)
          else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        ),
        target,
      )
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory / "params", target), metadata
  except (AttributeError, KeyError, OSError, TypeError) as e:  # orbax on a damaged params/ folder
    raise ValueError(
      f"{directory}/params cannot be read ({type(e).__name__}: {str(e)[:200]}): the "
      "checkpoint is damaged or incomplete; convert the weights again"
    ) from None
