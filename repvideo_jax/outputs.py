"""Checks of output paths given on a command line, run before any model is loaded or work is done."""

from __future__ import annotations

import os
import pathlib


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
