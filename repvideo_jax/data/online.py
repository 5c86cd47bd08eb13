"""Online mode for small runs: batches encoded on the fly from a captions file and videos, no records.

    it = OnlineIterator("captions.csv", "videos/", "models/repvideo-2b", batch_size=2, seed=0)
    batch = next(it)   # {"latents": (B, t, h, w, C) float32, "text": (B, L, D) float32}

Each step decodes the clips (``video_io.load_clip``, in background threads, a few entries ahead),
encodes them with the VAE and the captions with T5 in this process, exactly as ``prepare`` does, so
a clip gives the same latents here as in a prepared dataset with the same settings.

Order: epoch e visits this process's entries in the permutation
``np.random.default_rng([seed, e]).permutation(n)`` (file order with ``shuffle=False``); batches run
across epoch boundaries; ``num_epochs=None`` repeats forever, a finite run drops the last partial
batch. ``shard_index`` / ``shard_count`` keep entries ``shard_index::shard_count``.
Bad videos are skipped (logged once, listed in ``.bad``) and never decoded again; if a whole epoch
yields no readable video the iterator raises ``ValueError``.
With ``sample_posterior=True`` the latents are a posterior sample keyed by (seed, entry index, epoch):
a new draw every epoch (``prepare`` stores one fixed draw per entry).
``get_state()`` / ``set_state()`` save and restore the position (JSON bytes), like the grain pipeline.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from repvideo_jax.data import prepare as PR

log = logging.getLogger(__name__)
STATE_VERSION = 1


class OnlineIterator:
  """Iterator of training batches encoded on the fly (see the module docstring)."""

  def __init__(
    self,
    captions,
    videos,
    model,
    *,
    batch_size: int,
    seed: int = 0,
    frames: int = 49,
    height: int = 480,
    width: int = 720,
    fps: float = 8.0,
    sample_posterior: bool = False,
    num_epochs: int | None = None,
    shuffle: bool = True,
    chunking: str = "whole",
    dtype: str = "float32",
    shard_index: int = 0,
    shard_count: int = 1,
    decode_threads: int = 2,
  ):
    """``model``: a model folder, or ``prepare.Encoders`` already loaded."""
    self.config = PR.PrepareConfig(
      frames=frames,
      height=height,
      width=width,
      fps=fps,
      batch_size=batch_size,
      sample_posterior=sample_posterior,
      seed=seed,
      chunking=chunking,
      dtype=dtype,
    )
    self.config.validate()
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    self.videos = pathlib.Path(videos)
    if not self.videos.is_dir():
      raise FileNotFoundError(f"videos folder {self.videos} does not exist")
    self.entries = PR.read_captions(captions)[shard_index::shard_count]
    if not self.entries:
      raise ValueError(
        f"shard {shard_index} of {shard_count} holds none of the {len(PR.read_captions(captions))} entries"
      )
    self.encoders = model if isinstance(model, PR.Encoders) else PR.load_encoders(model, dtype=dtype)
    self.num_epochs, self.shuffle, self.decode_threads = num_epochs, shuffle, decode_threads
    self.settings = {
      "num_entries": len(self.entries),
      "batch_size": batch_size,
      "seed": seed,
      "shuffle": shuffle,
      "shard_index": shard_index,
      "shard_count": shard_count,
    }
    self.bad: dict[int, dict[str, Any]] = {}  # entry index -> {path, kind, reason}
    self._position = (0, 0)  # (epoch, position in the epoch's order) of the next entry
    self._stream = None

  def order(self, epoch: int) -> np.ndarray:
    """Positions into ``self.entries`` in the order epoch ``epoch`` visits them."""
    n = len(self.entries)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.config.seed, epoch]).permutation(n)

  def _entries(self, start: tuple[int, int]) -> Iterator[tuple[PR.Entry, int, int]]:
    """(entry, epoch, position) from ``start`` on, leaving out the entries known to be bad."""
    epoch, pos = start
    while self.num_epochs is None or epoch < self.num_epochs:
      order, found = self.order(epoch), False
      for p in range(pos, len(order)):
        entry = self.entries[order[p]]
        if entry.index not in self.bad:
          found = True
          yield entry, epoch, p
      if not found and pos == 0:
        raise self._no_video_error()
      epoch, pos = epoch + 1, 0

  def _no_video_error(self) -> ValueError:
    kinds = sorted({b["kind"] for b in self.bad.values()})
    return ValueError(
      f"none of the {len(self.entries)} videos is readable ({', '.join(kinds)}; see .bad for the reasons)"
    )

  def _items(self, start: tuple[int, int]):
    """Yields (entry, clip, epoch, position) of the readable entries; records the bad ones."""
    tags = []  # (epoch, position) of the entries handed to the decoder, in order

    def tagged():
      for entry, epoch, p in self._entries(start):
        tags.append((epoch, p))
        yield entry

    good = 0
    clips = PR.iter_clips(tagged(), self.videos, self.config, threads=self.decode_threads)
    try:
      for entry, clip, error in clips:
        epoch, p = tags.pop(0)
        if error is not None:
          if entry.index not in self.bad:
            kind, reason = error
            self.bad[entry.index] = {"path": entry.path, "kind": kind, "reason": reason}
            log.warning("skipping #%d %s: %s", entry.index, entry.path, reason)
          continue
        good += 1
        yield entry, clip, epoch, p
    finally:
      clips.close()
    if good == 0 and start == (0, 0):
      raise self._no_video_error()

  def __iter__(self) -> OnlineIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._stream is None:
      self._stream = self._items(self._position)
    items = []
    for item in self._stream:
      items.append(item)
      if len(items) == self.config.batch_size:
        break
    if len(items) < self.config.batch_size:  # end of a finite run: drop the remainder
      self._stream = iter(())
      raise StopIteration
    keys = None
    if self.config.sample_posterior:
      keys = PR.noise_keys(
        self.config.seed, [e.index for e, *_ in items], [epoch for _, _, epoch, _ in items]
      )
    latents, text = self.encoders.encode_batch(
      [clip for _, clip, _, _ in items],
      [e.caption for e, *_ in items],
      batch_size=self.config.batch_size,
      chunking=self.config.chunking,
      noise_keys=keys,
    )
    _, _, epoch, p = items[-1]
    self._position = (epoch, p + 1)
    return {"latents": latents, "text": text}

  def get_state(self) -> bytes:
    return json.dumps(
      {"version": STATE_VERSION, "settings": self.settings, "position": list(self._position)}
    ).encode()

  def set_state(self, state: bytes | str) -> None:
    state = json.loads(state.decode() if isinstance(state, bytes) else state)
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"online iterator state version {state.get('version')} != {STATE_VERSION}")
    if state["settings"] != self.settings:
      raise ValueError(
        f"the saved state belongs to another online iterator: {state['settings']} vs {self.settings}"
      )
    self.close()
    self._position = tuple(state["position"])

  def close(self) -> None:
    """Stops the decoding threads; iterating again resumes from the current position."""
    if self._stream is not None and hasattr(self._stream, "close"):
      self._stream.close()
    self._stream = None
