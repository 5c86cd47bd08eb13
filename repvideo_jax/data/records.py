"""The on-disk format of a precomputed latent dataset, and its grain data source.

A dataset is a folder:
  dataset.json                               metadata (``read_metadata``): format, version, counts,
                                             shapes and storage dtypes, preprocessing settings, model
  records-00000-of-000NN.array_record ...    ArrayRecord shards (group_size 1, zstd), one record
                                             per example; a shard may hold 0 examples (then it is
                                             listed in dataset.json but not read)
Written by ``python -m repvideo_jax.data.prepare`` (which also leaves ``progress.json`` and
``report.json``) or, for data already in memory, by ``write_shards``.

One record is one example serialized as an uncompressed ``.npz`` (``np.savez``; read back with
``allow_pickle=False``, so a record can never execute code):
  latents   (t, h, w, C)  scaled VAE latents (z * scaling_factor, what the transformer is trained
                          on), stored as float32 (default), bfloat16 or float16
  text_emb  (L, D)        T5 embeddings as ``Pipeline.encode_prompts`` returns them, stored as
                          float16 (default), bfloat16 or float32
  meta      0-d str       JSON: caption, source (video path as given in the captions file), index
                          (line in the captions file), num_frames, fps, height, width, dtypes
bfloat16 has no numpy dtype of its own: it is stored as its uint16 bit pattern and viewed back as
``ml_dtypes.bfloat16`` on reading. The text default is float16: the T5 output is RMS-normalized
(``|x| <= max|norm weight| * sqrt(D)``, far below float16's 65504) and float16 keeps 3 more
mantissa bits than bfloat16 at half the size of float32; a value that would overflow raises
instead of being stored as inf. Latents default to float32 so that stored and freshly encoded
latents agree exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from repvideo_jax.outputs import atomic_path, atomic_write

FORMAT = "repvideo-latents"
VERSION = 1
METADATA_FILE = "dataset.json"
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
ARRAY_FIELDS = ("latents", "text_emb")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: what grain's random access wants

_NUMPY_DTYPES = {
  "float32": np.dtype(np.float32),
  "float16": np.dtype(np.float16),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def shard_name(index: int, count: int) -> str:
  """``records-00003-of-00010.array_record``."""
  return f"records-{index:05d}-of-{count:05d}.array_record"


# ----------------------------------------------------------------------------------------------
# One example <-> bytes.


def _to_storage(name: str, x, dtype: str) -> np.ndarray:
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage dtype for {name} must be one of {STORAGE_DTYPES}, got {dtype!r}")
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating) and x.dtype != _NUMPY_DTYPES["bfloat16"]:
    raise ValueError(f"{name} must be a floating point array, got {x.dtype}")
  if not np.all(np.isfinite(x.astype(np.float32))):
    raise ValueError(f"{name} holds non-finite values (nan or inf)")
  with np.errstate(over="ignore"):
    y = x.astype(_NUMPY_DTYPES[dtype])
  if not np.all(np.isfinite(y.astype(np.float32))):
    raise ValueError(
      f"{name} overflows {dtype} (max |x| = {float(np.max(np.abs(x))):.4g}): store it as float32 or bfloat16"
    )
  return y.view(np.uint16) if dtype == "bfloat16" else y


def encode_example(
  example: Mapping[str, Any], *, latent_dtype: str = "float32", text_dtype: str = "float16"
) -> bytes:
  """Example dict -> record bytes.

  ``example``: ``latents`` (t, h, w, C) and ``text_emb`` (L, D) arrays, ``caption`` and ``source``
  strings, and any other JSON-able fields (num_frames, fps, height, width, index, ...), which are
  stored in ``meta`` and returned as they are by ``read_example``.
  """
  missing = [k for k in (*ARRAY_FIELDS, "caption", "source") if k not in example]
  if missing:
    raise ValueError(f"example is missing {missing} (has {sorted(example)})")
  latents = np.asarray(example["latents"])
  text = np.asarray(example["text_emb"])
  if latents.ndim != 4:
    raise ValueError(f"latents must be (t, h, w, C), got shape {latents.shape}")
  if text.ndim != 2:
    raise ValueError(f"text_emb must be (L, D), got shape {text.shape}")
  meta = {k: v for k, v in example.items() if k not in ARRAY_FIELDS}
  meta["dtypes"] = {"latents": latent_dtype, "text_emb": text_dtype}
  buf = io.BytesIO()
  np.savez(
    buf,
    latents=_to_storage("latents", latents, latent_dtype),
    text_emb=_to_storage("text_emb", text, text_dtype),
    meta=np.array(json.dumps(meta, ensure_ascii=False)),
  )
  return buf.getvalue()


# CPython 3.11 keeps the AST constructor's recursion counter per interpreter, not per thread, so
# concurrent ast.literal_eval calls (numpy parses every .npy header with it) can fail with a spurious
# "SystemError: AST constructor recursion depth mismatch" (cpython gh-106905; seen here after ~20k
# records read by grain's prefetch threads). Records are decoded one at a time: a few microseconds.
_NPZ_LOCK = threading.Lock()


def read_example(data: bytes) -> dict[str, Any]:
  """Record bytes -> example dict: arrays in their storage dtype, the other fields as written."""
  with _NPZ_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
    meta = json.loads(str(z["meta"][()]))
    out = {}
    for name in ARRAY_FIELDS:
      x = z[name]
      if meta["dtypes"][name] == "bfloat16":
        x = x.view(ml_dtypes.bfloat16)
      out[name] = x
  out.update(meta)
  return out


# ----------------------------------------------------------------------------------------------
# Files.


def atomic_write_json(path, obj) -> None:
  """Writes ``obj`` as indented UTF-8 JSON to ``path`` atomically."""
  atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_shard(path, records: Iterable[bytes]) -> int:
  """Writes serialized examples as one ArrayRecord file, atomically (tmp file + rename).

  Returns the number of records. ``path`` never holds a partial shard: a killed writer leaves only
  a ``.<name>.*.tmp`` file behind, which the next ``write_shard`` into the folder does not mind.
  """
  count = 0
  with atomic_path(path) as tmp:
    writer = ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
    try:
      for record in records:
        writer.write(record)
        count += 1
    finally:
      writer.close()
  return count


def read_shard(path) -> list[bytes]:
  """All records of one ArrayRecord file, in order."""
  reader = ArrayRecordReader(os.fspath(path))
  try:
    return list(reader.read_all()) if reader.num_records() else []
  finally:
    reader.close()


def spec_of(example: Mapping[str, Any], *, latent_dtype: str, text_dtype: str) -> dict[str, Any]:
  """The ``latents`` / ``text_emb`` entries of ``dataset.json`` for an example."""
  return {
    "latents": {"shape": list(np.shape(example["latents"])), "dtype": latent_dtype},
    "text_emb": {"shape": list(np.shape(example["text_emb"])), "dtype": text_dtype},
  }


def write_metadata(data_dir, metadata: Mapping[str, Any]) -> dict[str, Any]:
  """Writes ``dataset.json`` atomically, adding format, version and num_examples."""
  meta = {"format": FORMAT, "version": VERSION, **metadata}
  meta["num_examples"] = sum(s["num_examples"] for s in meta["shards"])
  atomic_write_json(pathlib.Path(data_dir) / METADATA_FILE, meta)
  return meta


def read_metadata(data_dir) -> dict[str, Any]:
  """Reads and checks ``dataset.json``."""
  path = pathlib.Path(data_dir) / METADATA_FILE
  if not path.is_file():
    hint = (
      " (an unfinished `prepare` run: re-run it to finish)"
      if (pathlib.Path(data_dir) / "progress.json").exists()
      else ""
    )
    raise FileNotFoundError(f"no {METADATA_FILE} in {data_dir}: not a prepared dataset{hint}")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} dataset (format={meta.get('format')!r})")
  if meta.get("version") != VERSION:
    raise ValueError(f"{path} has format version {meta.get('version')}, this code reads {VERSION}")
  return meta


def write_shards(
  out_dir,
  examples: Sequence[Mapping[str, Any]],
  *,
  shard_size: int = 256,
  latent_dtype: str = "float32",
  text_dtype: str = "float16",
  metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes a whole dataset from examples in memory: shards of ``shard_size`` + ``dataset.json``.

  Every example must have the same latents and text shapes. ``metadata`` adds fields to
  ``dataset.json``. Returns the metadata written.
  """
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  if not examples:
    raise ValueError("no examples to write")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  spec = spec_of(examples[0], latent_dtype=latent_dtype, text_dtype=text_dtype)
  count = -(-len(examples) // shard_size)
  digest = hashlib.sha256()
  shards = []
  for k in range(count):
    records = []
    for example in examples[k * shard_size : (k + 1) * shard_size]:
      if spec_of(example, latent_dtype=latent_dtype, text_dtype=text_dtype) != spec:
        raise ValueError(
          f"example {example.get('source')!r} has shapes "
          f"{np.shape(example['latents'])} / {np.shape(example['text_emb'])}, the "
          f"first one {spec['latents']['shape']} / {spec['text_emb']['shape']}"
        )
      records.append(encode_example(example, latent_dtype=latent_dtype, text_dtype=text_dtype))
      digest.update(hashlib.sha256(records[-1]).digest())
    name = shard_name(k, count)
    shards.append({"file": name, "num_examples": write_shard(out_dir / name, records)})
  meta = {
    **spec,
    **(metadata or {}),
    "shards": shards,
    "fingerprint": digest.hexdigest()[:16],
    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  return write_metadata(out_dir, meta)


# ----------------------------------------------------------------------------------------------
# grain data source.


class ExampleSource:
  """grain ``RandomAccessDataSource`` over a prepared dataset: ``source[i]`` -> example dict.

  Examples are numbered shard by shard in file order. Picklable (grain worker processes get a copy;
  files are opened lazily in each process). ``repr`` names the dataset by its fingerprint and size,
  not by its path, so a saved iterator state stays valid if the folder is moved.
  """

  def __init__(self, data_dir):
    self.data_dir = pathlib.Path(data_dir).absolute()
    self.metadata = read_metadata(self.data_dir)
    files = [self.data_dir / s["file"] for s in self.metadata["shards"] if s["num_examples"] > 0]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(
        f"{self.data_dir}: shard file(s) listed in {METADATA_FILE} are missing: {missing}"
      )
    if not files:
      raise ValueError(f"{self.data_dir} holds no examples")
    self._source = grain.sources.ArrayRecordDataSource([os.fspath(f) for f in files])
    if len(self._source) != self.metadata["num_examples"]:
      raise ValueError(
        f"{self.data_dir}: the shards hold {len(self._source)} records but "
        f"{METADATA_FILE} says {self.metadata['num_examples']}"
      )

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict[str, Any]:
    return read_example(self._source[index])

  def __repr__(self) -> str:
    return f"ExampleSource(fingerprint={self.metadata.get('fingerprint')}, num_examples={len(self)})"
