"""Training checkpoints: orbax ``CheckpointManager`` with async saves, keep-last-K and atomic steps.

A checkpoint step holds three items:
  ``state``  the train state pytree (params, optimizer state, EMA, step, RNG key), sharded arrays;
  ``data``   the input pipeline's iterator state (JSON), so a resumed run sees the same batches;
  ``meta``   the resolved config and bookkeeping (JSON).
orbax writes each step into a temporary directory and renames it when every item is complete, so a
run killed at any moment (even mid-save) leaves only complete steps visible; leftover temporary
directories are removed when the manager starts (``cleanup_tmp_directories``).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper: ``save(step, state, data_state, meta)``, ``restore(abstract_state)``, ``wait()``."""

  def __init__(
    self, directory: str | pathlib.Path, *, save_every: int = 1000, keep: int = 3, async_save: bool = True
  ):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, save_every),
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data", "meta")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is due under ``save_every`` (cheap; check it before gathering data state)."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save if ``step`` is due (or ``force``); returns whether it started."""
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
      ),
      force=force,
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any, dict]:
    """Restores (state, data_state, meta) of ``step`` (default latest) into ``abstract_state``'s
    structure, dtypes and shardings (a pytree of jax.ShapeDtypeStruct with ``sharding``)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    self._check_complete(step)
    try:
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore(),
        ),
      )
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
      raise self._damaged(step, f"{type(e).__name__}: {str(e)[:200]}") from None
    return out["state"], out["data"], out["meta"]

  def _check_complete(self, step: int) -> None:
    """Names a missing file before orbax reads the step: reading an OCDBT folder without its manifest
    gives a tensorstore error wrapped in a screen of asyncio tracebacks ('Event loop is closed')."""
    folder = self.directory / str(step)
    needed = [folder / "state" / "_METADATA", folder / "data" / "metadata", folder / "meta" / "metadata"]
    shards = sorted((folder / "state").glob("ocdbt.process_*"))
    if shards:
      needed += [folder / "state" / "manifest.ocdbt"] + [d / "manifest.ocdbt" for d in shards]
    missing = [str(p.relative_to(self.directory)) for p in needed if not p.exists()]
    if missing:
      raise self._damaged(step, f"{', '.join(missing[:3])} missing")

  def _damaged(self, step: int, why: str) -> ValueError:
    earlier = [s for s in self.all_steps() if s < step]
    fallback = (
      f"move {self.directory / str(step)} out of {self.directory} to resume from step {earlier[-1]}"
      if earlier
      else "start the run again with --overwrite"
    )
    return ValueError(
      f"training checkpoint step {step} in {self.directory} cannot be read ({why}): it "
      f"is damaged or incomplete; {fallback}"
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """jax.ShapeDtypeStruct (with sharding) for every array leaf, to restore into the same layout."""

  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(one, tree)
