"""The training input pipeline over a prepared dataset (grain ``DataLoader``), with checkpointable state.

    it = make_train_iterator("data/train", global_batch=32, seed=0)   # per process: 32 / process_count
    batch = next(it)            # {"latents": (B, t, h, w, C) float32, "text": (B, L, D) float32}
    state = it.get_state()      # bytes (JSON); save it with the model checkpoint
    it = make_train_iterator("data/train", global_batch=32, seed=0)
    it.set_state(state)         # continues with exactly the batches the first iterator would have given

What one process reads (grain ``IndexSampler`` + ``DataLoader``):
  * sharding: the examples are split into ``shard_count`` contiguous, equal blocks (the remainder
    of ``num_examples / shard_count`` is dropped) and process ``shard_index`` reads only its block,
    so in every epoch the processes see disjoint examples and take the same number of steps;
  * shuffling: the block is shuffled with ``seed``, differently in every epoch (seed combined with
    the epoch number); the same seed gives the same order;
  * repeat: ``num_epochs=None`` repeats forever, otherwise the iterator ends after that many epochs;
  * batching: consecutive examples form per-process batches of ``global_batch / shard_count`` with
    ``drop_remainder`` (batches run across epoch boundaries; only the end of a finite run drops).
    With ``num_workers = N > 0`` examples are dealt round-robin to N worker processes, each builds
    whole batches, and batches are taken from the workers in turn: for N > 1 a different order
    from ``num_workers`` 0 or 1 but just as deterministic; a state saved with N workers needs N
    workers to restore.

Worker processes are spawned: the source (``records.ExampleSource``) and the transform
(``ToTrainBatch``) are module-level, picklable objects, and the absl flags grain reads are marked
parsed before workers start (outside an absl app they would raise ``UnparsedFlagAccessError``).

Checkpointing: ``get_state()`` / ``set_state()`` wrap grain's ``DataLoaderIterator`` state (the next
position of each worker) with the pipeline settings, which are checked on restore. The iterator also
works with orbax: ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)`` (it has the
``get_state``/``set_state``/``start_prefetch`` methods grain's handler calls).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from repvideo_jax.data import records

STATE_VERSION = 1


class ToTrainBatch(grain.transforms.Map):
  """Example dict -> the model's inputs {"latents": (t, h, w, C), "text": (L, D)}, both float32."""

  def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
      "latents": np.asarray(example["latents"], np.float32),
      "text": np.asarray(example["text_emb"], np.float32),
    }


def mark_absl_flags_parsed() -> None:
  """grain reads absl flags; outside an absl app they must be marked parsed before workers start."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Iterator of training batches with ``get_state`` / ``set_state`` (see the module docstring)."""

  def __init__(self, loader, settings: dict[str, Any], source: records.ExampleSource):
    self._loader = loader
    self._iterator = iter(loader)
    self.settings = settings
    self.source = source

  @property
  def metadata(self) -> dict[str, Any]:
    """The dataset's ``dataset.json``."""
    return self.source.metadata

  @property
  def batches_per_epoch(self) -> int:
    """Per-process batches in one pass over this process's examples (rounded down)."""
    return self.settings["examples_per_shard"] // self.settings["per_process_batch"]

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      raise ValueError("the iterator was closed")
    return next(self._iterator)

  def get_state(self) -> bytes:
    """The position in the stream, as JSON bytes (includes the settings it belongs to)."""
    if self._iterator is None:
      raise ValueError("the iterator was closed")
    loader_state = json.loads(self._iterator.get_state().decode())
    return json.dumps(
      {"version": STATE_VERSION, "settings": self.settings, "loader": loader_state}, indent=2
    ).encode()

  def set_state(self, state: bytes | str) -> None:
    """Moves to a position saved by ``get_state`` of an iterator with the same settings."""
    if isinstance(state, bytes):
      state = state.decode()
    state = json.loads(state)
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"iterator state version {state.get('version')} != {STATE_VERSION}")
    saved = state["settings"]
    diff = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
    if diff:
      raise ValueError(
        "the saved iterator state belongs to a different pipeline; (saved, now): "
        + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in sorted(diff.items()))
      )
    self._iterator.set_state(json.dumps(state["loader"]).encode())

  def start_prefetch(self) -> None:
    self._iterator.start_prefetch()

  def close(self) -> None:
    """Stops the read threads and worker processes; the iterator cannot be used afterwards."""
    if self._iterator is None:
      return
    inner = getattr(self._iterator, "_iterator", None)  # DataLoaderIterator has no close() itself
    if inner is not None and hasattr(inner, "close"):
      inner.close()
    self._iterator = None

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_train_iterator(
  data_dir,
  *,
  global_batch: int,
  seed: int,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_workers: int = 0,
  prefetch: int | None = None,
  num_epochs: int | None = None,
  shuffle: bool = True,
  read_threads: int | None = None,
  worker_buffer_size: int = 2,
) -> TrainIterator:
  """Training batches from a prepared dataset folder (see the module docstring).

  shard_index / shard_count: this process's data shard; default ``jax.process_index()`` /
    ``jax.process_count()`` (read at call time, so after ``jax.distributed.initialize``).
  global_batch: examples per step over all processes; must divide by ``shard_count``.
  seed: shuffle seed, 0 <= seed < 2**32.
  num_workers: grain worker processes (0: read and batch in this process).
  prefetch: examples read ahead by background threads in each process (default 2 batches; 0 off).
  read_threads: threads doing that reading (default min(4, prefetch)).
  worker_buffer_size: finished batches each worker keeps ready.
  """
  if shard_index is None or shard_count is None:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
  if global_batch < 1 or global_batch % shard_count:
    raise ValueError(
      f"global_batch={global_batch} must be a positive multiple of the number of processes ({shard_count})"
    )
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  per_process = global_batch // shard_count
  source = records.ExampleSource(data_dir)
  per_shard = len(source) // shard_count
  if per_shard < per_process:
    raise ValueError(
      f"{data_dir} has {len(source)} examples: {per_shard} per process, fewer than "
      f"one batch of {per_process} (global_batch {global_batch} over {shard_count} "
      f"processes)"
    )
  prefetch = 2 * per_process if prefetch is None else int(prefetch)
  threads = min(4, prefetch) if read_threads is None else int(read_threads)
  shard_options = grain.sharding.ShardOptions(
    shard_index=int(shard_index), shard_count=int(shard_count), drop_remainder=True
  )
  sampler = grain.samplers.IndexSampler(
    num_records=len(source),
    shard_options=shard_options,
    shuffle=shuffle,
    num_epochs=num_epochs,
    seed=int(seed),
  )
  if num_workers > 0:
    mark_absl_flags_parsed()
  loader = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[ToTrainBatch(), grain.transforms.Batch(batch_size=per_process, drop_remainder=True)],
    worker_count=num_workers,
    worker_buffer_size=worker_buffer_size,
    shard_options=shard_options,
    read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch),
  )
  settings = {
    "dataset": source.metadata.get("fingerprint"),
    "num_examples": len(source),
    "global_batch": global_batch,
    "per_process_batch": per_process,
    "seed": int(seed),
    "shard_index": int(shard_index),
    "shard_count": int(shard_count),
    "examples_per_shard": per_shard,
    "num_epochs": num_epochs,
    "shuffle": shuffle,
    "num_workers": num_workers,
  }
  return TrainIterator(loader, settings, source)
