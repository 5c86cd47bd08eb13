"""Precompute a training dataset: videos + captions -> VAE latents + T5 embeddings in ArrayRecord shards.

    python -m repvideo_jax.data.prepare --videos DIR --captions FILE --model DIR --out DIR \\
        [--frames 49 --height 480 --width 720 --fps 8 --batch-size 4 --shard-size 256 --sample-posterior]

Captions: CSV with a header holding (at least) the columns ``path,caption``, or JSONL with one
``{"path": ..., "caption": ...}`` object per line (chosen by the extension .csv / .jsonl / .json,
else by the first character). Paths are relative to ``--videos`` (absolute paths are kept). One
entry is one example: a video listed twice with two captions gives two examples. Entries are
numbered 0, 1, ... in file order (the ``index`` stored with each example).

Per entry: ``video_io.load_clip`` takes ``--frames`` frames at ``--fps`` from the start of the
video, resized to cover ``--height`` x ``--width`` and center-cropped, in [-1, 1]; the VAE encodes
them (``--chunking whole``, the SAT engine's way, or ``framewise``) and the result is scaled by the
VAE's scaling factor, i.e. exactly ``vae.encode``; T5 encodes the caption as
``Pipeline.encode_prompts`` does (no mask, padded to the transformer's text length).
Latents: the posterior mean by default; ``--sample-posterior`` stores mean + std * eps instead, with
eps ~ N(0, I) drawn from ``jax.random.fold_in(jax.random.key(--seed), index)``: fixed per entry,
whatever the batching or resuming. Storage dtypes: see ``records.py`` (latents float32, text
float16 by default).

Only the VAE, the T5 encoder and the tokenizer are loaded (plus the transformer's config.json for
the text length), not the transformer weights.

Shards and resuming: entry i belongs to shard ``i // --shard-size``, so the shard count is known
up front (``records-00000-of-000NN.array_record``) and a shard holds up to ``--shard-size``
examples (fewer when videos are skipped). Each shard is written to a temporary file and renamed
when complete, and then ``progress.json`` (also written atomically) records it. A re-run with the
same inputs and settings skips the shards already recorded and does the rest, so a killed run
resumes where it stopped and ends with the same dataset as an uninterrupted one. A re-run with
different inputs or settings into the same ``--out`` is refused (``--overwrite`` starts over).

Bad entries (missing file, not a video, corrupt, too short for the clip, non-finite encodings) are
skipped, never fatal: they are counted and listed with the reason in ``report.json`` and the summary.

Output folder: ``dataset.json`` (see ``records.py``; written last, so its presence means the
dataset is complete), the shards, ``progress.json`` and ``report.json``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from repvideo_jax import pipeline, video_io
from repvideo_jax import text_encoder as TE
from repvideo_jax import vae as V
from repvideo_jax.data import records
from repvideo_jax.outputs import check_output

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"
REPORT_FILE = "report.json"
CHUNKINGS = ("whole", "framewise")
COMPUTE_DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------------
# Captions.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of the captions file: ``path`` as written there, relative to the videos folder."""

  index: int
  path: str
  caption: str


def read_captions(path) -> list[Entry]:
  """Reads a CSV (header with path,caption) or JSONL ({"path", "caption"} per line) captions file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"captions file {path} does not exist")
  text = path.read_text(encoding="utf-8-sig")
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json") or (suffix != ".csv" and text.lstrip().startswith("{")):
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      rows.append((lineno, row))
  else:
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "path" not in fields or "caption" not in fields:
      raise ValueError(
        f"{path}: the CSV header must name the columns 'path' and 'caption', got {reader.fieldnames}"
      )
    reader.fieldnames = fields
    rows = [
      (reader.line_num, row)
      for row in reader
      if any((v or "").strip() for v in row.values() if isinstance(v, str))
    ]
  entries = []
  for lineno, row in rows:
    p, caption = row.get("path"), row.get("caption")
    if not isinstance(p, str) or not p.strip():
      raise ValueError(f"{path}:{lineno}: missing or empty 'path'")
    if not isinstance(caption, str):
      raise ValueError(f"{path}:{lineno}: missing 'caption' (a string)")
    entries.append(Entry(len(entries), p.strip(), caption.strip()))
  if not entries:
    raise ValueError(f"{path} lists no videos")
  return entries


# ----------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Preprocessing settings. ``batch_size`` does not change the result (up to float rounding)."""

  frames: int = 49
  height: int = 480
  width: int = 720
  fps: float = 8.0
  batch_size: int = 4
  shard_size: int = 256
  sample_posterior: bool = False
  seed: int = 0
  chunking: str = "whole"  # VAE encoder time chunking: whole (SAT) | framewise (diffusers)
  dtype: str = "float32"  # VAE / T5 compute and parameter dtype
  latent_dtype: str = "float32"  # storage
  text_dtype: str = "float16"  # storage

  def validate(self) -> None:
    if self.frames < 1 or (self.frames - 1) % 4:
      raise ValueError(f"--frames must be 4k+1 (1, 5, 9, ..., 49), got {self.frames}")
    for name in ("height", "width"):
      value = getattr(self, name)
      if value < 16 or value % 16:
        raise ValueError(f"--{name} must be a positive multiple of 16, got {value}")
    if not self.fps > 0:
      raise ValueError(f"--fps must be positive, got {self.fps}")
    if self.batch_size < 1:
      raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
    if self.shard_size < 1:
      raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
    if self.chunking not in CHUNKINGS:
      raise ValueError(f"--chunking must be one of {CHUNKINGS}, got {self.chunking!r}")
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"--dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
    for name in ("latent_dtype", "text_dtype"):
      if getattr(self, name) not in records.STORAGE_DTYPES:
        raise ValueError(
          f"--{name.replace('_', '-')} must be one of {records.STORAGE_DTYPES}, got {getattr(self, name)!r}"
        )

  def identity(self) -> dict[str, Any]:
    """The settings that determine the dataset (everything but the batch size)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}


# ----------------------------------------------------------------------------------------------
# Encoders.


@dataclasses.dataclass
class Encoders:
  """The VAE and the T5 text encoder of a model folder (not the transformer)."""

  vae_config: Any
  vae_params: dict[str, Any]
  text_config: Any
  text_params: dict[str, Any]
  tokenizer: Any
  text_length: int
  path: pathlib.Path | None = None

  @classmethod
  def from_pipeline(cls, pipe) -> Encoders:
    return cls(
      pipe.vae_config,
      pipe.vae_params,
      pipe.text_encoder_config,
      pipe.text_encoder_params,
      pipe.tokenizer,
      pipe.transformer_config.text_length,
      pipe.path,
    )

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    return (*self.vae_config.latent_size(frames, height, width), self.vae_config.latent_channels)

  def text_shape(self) -> tuple[int, int]:
    return (self.text_length, self.text_config.d_model)

  def encode_text(self, captions: Sequence[str]) -> np.ndarray:
    """Captions -> (B, L, D) float32, as ``Pipeline.encode_prompts``."""
    out = TE.encode_prompts(
      self.text_params, self.text_config, self.tokenizer, list(captions), max_length=self.text_length
    )
    return np.asarray(out, np.float32)

  def encode_video(self, video: np.ndarray, *, chunking: str = "whole", noise_keys=None) -> np.ndarray:
    """(B, T, H, W, 3) in [-1, 1] -> scaled latents (B, t, h, w, C) float32.

    The posterior mean (``vae.encode(sample=False)``), or with ``noise_keys`` ((B,) JAX keys) a
    posterior sample mean + std * N(0, I) with one key per video.
    """
    post = V.encode_posterior(self.vae_params, video, config=self.vae_config, chunking=chunking)
    if noise_keys is None:
      z = post.mean
    else:
      z = _posterior_sample(post.mean, post.logvar, noise_keys)
    return np.asarray(z * self.vae_config.scaling_factor, np.float32)

  def encode_batch(
    self,
    clips: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    batch_size: int,
    chunking: str = "whole",
    noise_keys=None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Clips and captions -> (latents, text) float32, padded to ``batch_size`` (one compiled shape)."""
    n = len(clips)
    if not 0 < n <= batch_size or len(captions) != n:
      raise ValueError(f"need 1..{batch_size} clips with one caption each, got {n} / {len(captions)}")
    pad = batch_size - n
    video = np.stack(list(clips) + [clips[-1]] * pad)
    if noise_keys is not None:
      noise_keys = jnp.concatenate([noise_keys] + [noise_keys[-1:]] * pad)
    latents = self.encode_video(video, chunking=chunking, noise_keys=noise_keys)[:n]
    text = self.encode_text(list(captions) + [captions[-1]] * pad)[:n]
    return latents, text


def _posterior_sample(mean, logvar, keys):
  """mean + std * N(0, I), one key per video: ``Posterior.sample`` with a key per batch row."""
  return _jitted_sample()(mean, logvar, keys)


@functools.cache
def _jitted_sample():

  def one(m, lv, key):
    return m + jnp.exp(0.5 * lv) * jax.random.normal(key, m.shape, m.dtype)

  return jax.jit(jax.vmap(one))


def noise_keys(seed: int, indices: Sequence[int], epochs: Sequence[int] | None = None):
  """One JAX key per entry: fold_in(key(seed), index), then fold_in(., epoch) if epochs are given."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
  if epochs is not None:
    keys = jax.vmap(jax.random.fold_in)(keys, jnp.asarray(epochs, jnp.uint32))
  return keys


def load_encoders(model_dir, *, dtype: str = "float32") -> Encoders:
  """Loads the VAE, T5 encoder and tokenizer of a model folder (``load_pipeline`` without the
  transformer's weights)."""
  overrides = {"dtype": dtype, "param_dtype": dtype}
  return Encoders.from_pipeline(
    pipeline.load_pipeline(
      model_dir, text_encoder_overrides=overrides, vae_overrides=overrides, load_transformer=False
    )
  )


# ----------------------------------------------------------------------------------------------
# Reading clips (in background threads, in order).


def classify_error(message: str) -> str:
  """A short kind for a ``VideoError`` message: missing | too_short | unreadable."""
  if "not found" in message:
    return "missing"
  if "too short:" in message:
    return "too_short"
  return "unreadable"


def load_entry(entry: Entry, videos_dir, config: PrepareConfig):
  """-> (clip, None) or (None, (kind, reason)); never raises for a bad file."""
  path = os.path.join(videos_dir, entry.path)
  try:
    clip = video_io.load_clip(
      path, num_frames=config.frames, height=config.height, width=config.width, fps=config.fps
    )
    return clip, None
  except video_io.VideoError as e:
    return None, (classify_error(str(e)), str(e))
  except Exception as e:  # anything else the decoder or the resizer throws: skip, do not crash
    return None, ("unreadable", f"{type(e).__name__}: {e}")


def iter_clips(
  entries: Iterable[Entry],
  videos_dir,
  config: PrepareConfig,
  *,
  threads: int = 2,
  lookahead: int | None = None,
) -> Iterator[tuple[Entry, np.ndarray | None, Any]]:
  """Yields (entry, clip, None) or (entry, None, (kind, reason)) in order, decoding ahead in threads."""
  lookahead = lookahead or max(config.batch_size, threads)
  entries = iter(entries)
  pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="load_clip")
  pending = collections.deque()

  def submit() -> None:
    entry = next(entries, None)
    if entry is not None:
      pending.append((entry, pool.submit(load_entry, entry, videos_dir, config)))

  try:
    for _ in range(lookahead):
      submit()
    while pending:
      entry, future = pending.popleft()
      submit()
      clip, error = future.result()
      yield entry, clip, error
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# The job.


def _fingerprint(inputs: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _inputs(videos: pathlib.Path, model, entries: list[Entry], config: PrepareConfig) -> dict:
  digest = hashlib.sha256(json.dumps([(e.path, e.caption) for e in entries]).encode()).hexdigest()
  return {
    "videos": str(videos.resolve()),
    "model": str(pathlib.Path(model).resolve()),
    "captions_sha256": digest,
    "num_entries": len(entries),
    "settings": config.identity(),
  }


def _output_files(out: pathlib.Path) -> list[pathlib.Path]:
  names = (records.METADATA_FILE, PROGRESS_FILE, REPORT_FILE)
  return sorted(
    p
    for p in out.iterdir()
    if p.name in names or (p.name.startswith("records-") and p.name.endswith(".array_record"))
  )


def _start(out: pathlib.Path, inputs: dict, fingerprint: str, overwrite: bool) -> dict:
  """Loads the progress of an earlier run with the same inputs, or starts a fresh one."""
  out.mkdir(parents=True, exist_ok=True)
  for pattern in (
    ".records-*.tmp",
    f".{PROGRESS_FILE}.*.tmp",
    f".{REPORT_FILE}.*.tmp",
    f".{records.METADATA_FILE}.*.tmp",
  ):
    for tmp in out.glob(pattern):  # left by a killed write
      tmp.unlink()
  progress_path = out / PROGRESS_FILE
  fresh = {"fingerprint": fingerprint, "inputs": inputs, "shards": {}, "spec": None}
  if progress_path.exists() and not overwrite:
    progress = json.loads(progress_path.read_text())
    if progress.get("fingerprint") == fingerprint:
      return progress
    old = progress.get("inputs", {})
    changed = sorted(k for k in inputs if old.get(k) != inputs[k])
    changed += sorted(
      f"settings.{k}" for k in inputs["settings"] if old.get("settings", {}).get(k) != inputs["settings"][k]
    )
    raise ValueError(
      f"{out} holds a prepare run with other inputs or settings (changed: "
      f"{', '.join(c for c in changed if c != 'settings') or 'unknown'}); "
      f"pass --overwrite to start over, or use another --out"
    )
  existing = _output_files(out)
  if existing and not overwrite:
    raise ValueError(
      f"{out} already holds a dataset not written by this job "
      f"({existing[0].name}, ...); pass --overwrite or use another --out"
    )
  for p in existing:
    p.unlink()
  records.atomic_write_json(progress_path, fresh)
  return fresh


def _summarize_bad(bad: list[dict]) -> str:
  kinds = collections.Counter(b["kind"] for b in bad)
  return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"


def prepare(
  videos,
  captions,
  model,
  out,
  config: PrepareConfig = PrepareConfig(),
  *,
  overwrite: bool = False,
  progress: bool = True,
  decode_threads: int = 2,
  encoders: Encoders | None = None,
  verbose: bool = True,
) -> dict[str, Any]:
  """Runs (or resumes) the job; returns the report (also written to ``out/report.json``).

  ``encoders``: already loaded encoders to use instead of loading ``model`` (which is then only
  recorded).
  """
  config.validate()
  videos, out = pathlib.Path(videos), pathlib.Path(out)
  if not videos.is_dir():
    raise FileNotFoundError(f"--videos {videos} is not a folder")
  entries = read_captions(captions)
  inputs = _inputs(videos, model, entries, config)
  fingerprint = _fingerprint(inputs)
  state = _start(out, inputs, fingerprint, overwrite)
  num_shards = math.ceil(len(entries) / config.shard_size)
  done = {int(k) for k, s in state["shards"].items() if (out / s["file"]).is_file()}
  pending = [k for k in range(num_shards) if k not in done]
  resumed = len(done)
  t0 = time.perf_counter()
  skipped_before = sum(len(state["shards"][str(k)]["bad"]) for k in done)
  skipped_total = skipped_before
  bar = tqdm(
    total=len(entries),
    initial=sum(len(entries[k * config.shard_size : (k + 1) * config.shard_size]) for k in done),
    unit="video",
    desc="prepare",
    disable=not progress,
    dynamic_ncols=True,
  )
  try:
    if pending:
      enc = encoders or load_encoders(model, dtype=config.dtype)
      tcr = enc.vae_config.temporal_compression_ratio
      if (config.frames - 1) % tcr:
        raise ValueError(f"--frames {config.frames} must be {tcr}k+1 for this VAE")
      spec = {
        "latents": {
          "shape": list(enc.latent_shape(config.frames, config.height, config.width)),
          "dtype": config.latent_dtype,
        },
        "text_emb": {"shape": list(enc.text_shape()), "dtype": config.text_dtype},
      }
      if state.get("spec") not in (None, spec):
        raise ValueError(f"the model gives shapes {spec}, the earlier run stored {state['spec']}")
      state["spec"] = spec
      todo = [e for k in pending for e in entries[k * config.shard_size : (k + 1) * config.shard_size]]
      clips = iter_clips(todo, videos, config, threads=decode_threads)
      try:
        for k in pending:
          shard_entries = entries[k * config.shard_size : (k + 1) * config.shard_size]
          encoded, bad = _encode_shard(enc, shard_entries, clips, config, bar)
          skipped_total += len(bad)
          bar.set_postfix(skipped=skipped_total, refresh=False)
          name = records.shard_name(k, num_shards)
          count = records.write_shard(out / name, encoded)
          state["shards"][str(k)] = {
            "file": name,
            "num_examples": count,
            "bad": bad,
            "entries": [shard_entries[0].index, shard_entries[-1].index + 1],
          }
          records.atomic_write_json(out / PROGRESS_FILE, state)
      finally:
        clips.close()
  finally:
    bar.close()
  shards = [state["shards"][str(k)] for k in range(num_shards)]
  bad = [b for s in shards for b in s["bad"]]
  metadata = {
    **state["spec"],
    "shards": [{"file": s["file"], "num_examples": s["num_examples"]} for s in shards],
    "fingerprint": fingerprint,
    "num_frames": config.frames,
    "fps": config.fps,
    "height": config.height,
    "width": config.width,
    "latents_are": "scaled: vae posterior "
    + ("sample" if config.sample_posterior else "mean")
    + " * scaling_factor",
    "model": inputs["model"],
    "videos": inputs["videos"],
    "captions": str(pathlib.Path(captions).resolve()),
    "settings": config.identity(),
    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  meta = records.write_metadata(out, metadata)
  seconds = time.perf_counter() - t0
  report = {
    "complete": True,
    "num_entries": len(entries),
    "num_examples": meta["num_examples"],
    "num_skipped": len(bad),
    "skipped_by_kind": dict(collections.Counter(b["kind"] for b in bad)),
    "skipped": bad,
    "num_shards": num_shards,
    "shards_resumed": resumed,
    "seconds_this_run": round(seconds, 3),
    "fingerprint": fingerprint,
  }
  records.atomic_write_json(out / REPORT_FILE, report)
  if verbose:
    print(
      f"prepared {report['num_examples']} examples from {len(entries)} entries into "
      f"{num_shards} shard(s) in {out}"
    )
    print(
      f"skipped {len(bad)} ({_summarize_bad(bad)}); {resumed} shard(s) were already done"
      f"{f' with {skipped_before} skipped' if resumed else ''}; {seconds:.1f}s this run"
    )
    for b in bad[:20]:
      print(f"  skipped #{b['index']} {b['path']}: {b['reason']}")
    if len(bad) > 20:
      print(f"  ... and {len(bad) - 20} more, see {out / REPORT_FILE}")
  return report


def _encode_shard(enc: Encoders, shard_entries: list[Entry], clips, config: PrepareConfig, bar):
  """Encodes one shard's entries; returns (serialized examples in entry order, bad entries)."""
  encoded, bad, buffer = [], [], []

  def skip(entry, kind, reason):
    bad.append({"index": entry.index, "path": entry.path, "kind": kind, "reason": reason})

  def flush():
    items = list(buffer)
    buffer.clear()
    keys = None
    if config.sample_posterior:
      keys = noise_keys(config.seed, [e.index for e, _ in items])
    latents, text = enc.encode_batch(
      [c for _, c in items],
      [e.caption for e, _ in items],
      batch_size=config.batch_size,
      chunking=config.chunking,
      noise_keys=keys,
    )
    for (entry, _), lat, emb in zip(items, latents, text):
      example = {
        "latents": lat,
        "text_emb": emb,
        "caption": entry.caption,
        "source": entry.path,
        "index": entry.index,
        "num_frames": config.frames,
        "fps": config.fps,
        "height": config.height,
        "width": config.width,
      }
      try:
        encoded.append(
          records.encode_example(example, latent_dtype=config.latent_dtype, text_dtype=config.text_dtype)
        )
      except ValueError as e:  # non-finite encodings or overflow of the storage dtype
        skip(entry, "bad_encoding", str(e))
    bar.update(len(items))

  for entry in shard_entries:
    got, clip, error = next(clips)
    assert got is entry, (got, entry)
    if error is not None:
      skip(entry, *error)
      bar.update(1)
      continue
    buffer.append((entry, clip))
    if len(buffer) == config.batch_size:
      flush()
  if buffer:
    flush()
  bad.sort(key=lambda b: b["index"])
  return encoded, bad


# ----------------------------------------------------------------------------------------------
# CLI.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m repvideo_jax.data.prepare",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--videos", required=True, help="folder the caption paths are relative to")
  p.add_argument("--captions", required=True, help="CSV (path,caption) or JSONL captions file")
  p.add_argument("--model", required=True, help="model folder (converted pipeline or diffusers layout)")
  p.add_argument("--out", required=True, help="output dataset folder")
  p.add_argument("--frames", type=int, default=49, help="frames per clip, 4k+1 (default 49)")
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=720)
  p.add_argument("--fps", type=float, default=8.0, help="frame rate clips are sampled at (default 8)")
  p.add_argument("--batch-size", type=int, default=4, help="clips encoded together (default 4)")
  p.add_argument("--shard-size", type=int, default=256, help="entries per shard (default 256)")
  p.add_argument(
    "--sample-posterior",
    action="store_true",
    help="store a posterior sample (seeded per entry) instead of the posterior mean",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of --sample-posterior (default 0)")
  p.add_argument(
    "--chunking",
    choices=CHUNKINGS,
    default="whole",
    help="VAE encoder time chunking (default whole, as the SAT engine)",
  )
  p.add_argument(
    "--dtype", choices=COMPUTE_DTYPES, default="float32", help="VAE / T5 compute dtype (default float32)"
  )
  p.add_argument("--latent-dtype", choices=records.STORAGE_DTYPES, default="float32")
  p.add_argument("--text-dtype", choices=records.STORAGE_DTYPES, default="float16")
  p.add_argument("--decode-threads", type=int, default=2, help="threads decoding videos ahead")
  p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  args = parse_args(argv)
  config = PrepareConfig(
    frames=args.frames,
    height=args.height,
    width=args.width,
    fps=args.fps,
    batch_size=args.batch_size,
    shard_size=args.shard_size,
    sample_posterior=args.sample_posterior,
    seed=args.seed,
    chunking=args.chunking,
    dtype=args.dtype,
    latent_dtype=args.latent_dtype,
    text_dtype=args.text_dtype,
  )
  try:
    check_output(args.out, "--out", folder=True)
    prepare(
      args.videos,
      args.captions,
      args.model,
      args.out,
      config,
      overwrite=args.overwrite,
      progress=not args.no_progress,
      decode_threads=args.decode_threads,
    )
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(
      "interrupted: the shards already complete are kept; re-run the same command to resume", file=sys.stderr
    )
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
