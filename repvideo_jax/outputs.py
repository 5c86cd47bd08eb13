"""Writing outputs so that nothing is lost: path checks run before any work, atomic file and folder
replacement.

Every file the package writes goes through :func:`atomic_path` (or :func:`atomic_write` on top of it):
the data goes to a hidden temporary file beside the target (created with the umask's permissions,
like any ordinary file), is flushed to disk, and only then is renamed over the target. A reader therefore sees
the old file or the new one, never half of one; a killed writer leaves at most a ``.<name>.*.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterable, Iterator


def check_output(path, flag: str, *, folder: bool) -> pathlib.Path:
  """Raises ValueError naming ``flag`` unless ``path`` can take the output: a folder (created here if
  missing) or a file whose folder is writable and which is not itself a folder."""
  path = pathlib.Path(path)
  target = path if folder else path.parent
  if folder and path.exists() and not path.is_dir():
    raise ValueError(f"{flag} {path} is a file, not a folder; pass a folder")
  if not folder and path.is_dir():
    raise ValueError(f"{flag} {path} is a folder; pass a file path (e.g. {path / 'result.json'})")
  for parent in [target, *target.parents]:
    if parent.exists():
      if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
      break
  try:
    target.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{flag} {path}: cannot create {target} ({e.strerror}); pass a writable place") from None
  if not os.access(target, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {path}: {target} is not writable; pass a writable place")
  return path


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[pathlib.Path]:
  """Yields a temporary path beside ``path`` (ending in ``suffix``, for writers that choose a format by
  the file name); once the block ends without an error the file there is synced and renamed over
  ``path``. The temporary file is created by whoever writes it with a plain open, so it gets the
  umask's permissions (no mkstemp, whose 0600 would carry over; no process-wide umask juggling). On an error (or Ctrl-C) the temporary file is removed and
  ``path`` is untouched. The parent folder is created if missing."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def atomic_write(path, data: bytes | str | Iterable[bytes]) -> None:
  """Writes ``data`` (bytes, text as UTF-8, or an iterable of byte chunks) to ``path`` atomically."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    if isinstance(data, str):
      data = data.encode("utf-8")
    for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
      f.write(chunk)


@contextlib.contextmanager
def staged_dir(dst) -> Iterator[pathlib.Path]:
  """Yields an empty staging folder beside ``dst`` (``.<name>.partial-<pid>``) to build a new version
  in; when the block ends without an error it replaces ``dst`` (:func:`replace_dir`), on an error it
  is removed and ``dst`` is untouched. A folder appears at ``dst`` only when complete."""
  dst = pathlib.Path(dst)
  tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  replace_dir(tmp, dst)


def replace_dir(new, dst) -> None:
  """Puts the complete folder ``new`` at ``dst``, replacing what was there, so that at every moment one
  complete version exists: the old folder is moved aside, the new one moved in, and only then the old
  one deleted. (A crash in between leaves the old one at ``<dst>.old-<pid>``.)"""
  new, dst = pathlib.Path(new), pathlib.Path(dst)
  old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
  if dst.exists():
    os.replace(dst, old)
  os.replace(new, dst)
  if old.exists():
    shutil.rmtree(old, ignore_errors=True)
