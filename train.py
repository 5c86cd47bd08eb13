"""Train or fine-tune the RepVideo transformer (loss: v-MSE with stratified timesteps; docs/sampling.md).

    python train.py --config train-tiny-cpu [section.key=value ...] [--resume]
    python train.py --config train-repvideo-2b run.init_from=models/cogvideox-2b data.records=data/train

The same command runs on CPU, one GPU or a multi-host pod: the mesh, batch and sharding come from
the config. Multi-host: on TPU pods and SLURM `jax.distributed` initialises itself; elsewhere pass
--coordinator HOST:PORT --num-processes N --process-id I to every process. Only process 0 logs.
Checkpoints go to <run.output_dir>/checkpoints (async, keep-last-K); --resume continues exactly from
the last complete one, including the data order; a folder holding an earlier run is refused without
--resume (or --overwrite, which moves it aside), and one run at a time holds a folder's lock.
SIGTERM saves a checkpoint and exits with status 143 ("stopped", not "done"); a run that ends on
non-finite (skipped) steps exits with 3; bad configuration or arguments exit with 2.
--compile-only compiles the train step for the devices at hand (e.g. on the pod, before a run) and
prints per-device memory and whether it fits, running nothing: exit 0 fits, 1 does not. To check a
TPU topology from any machine, see `python -m repvideo_jax.aot train`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", required=True, help="preset name in configs/ or a YAML file")
  parser.add_argument(
    "overrides",
    nargs="*",
    metavar="section.key=value",
    help="config overrides, e.g. run.steps=100 optim.lr=1e-4 mesh.fsdp=8",
  )
  parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="run.output_dir holds an earlier run: move it aside (to <dir>.old-<time>) and start fresh",
  )
  parser.add_argument("--init-from", help="shortcut for run.init_from=DIR (a converted model folder)")
  parser.add_argument("--output-dir", help="shortcut for run.output_dir=DIR")
  parser.add_argument(
    "--compile-only",
    action="store_true",
    help="compile the train step for these devices, print memory and fit, run nothing",
  )
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process without a scheduler)")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # Imported after parsing: jax and the trainer take ~4 s to import (measured); --help need not wait.
  from repvideo_jax.training import trainer  # noqa: PLC0415

  overrides = list(args.overrides)
  if args.init_from:
    overrides.append(f"run.init_from={args.init_from}")
  if args.output_dir:
    overrides.append(f"run.output_dir={args.output_dir}")
  try:
    trainer.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = trainer.load_config(args.config, overrides)
    if args.compile_only:
      return _compile_only(cfg)
    result = trainer.train(cfg, resume=args.resume, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:  # non-finite steps: too many in a row, or the run ended on them
    print(f"error: {e}", file=sys.stderr)
    return 3
  if result["stopped"] == "sigterm":  # saved and stopped early: not a finished run
    print(
      f"stopped by SIGTERM at step {result['final_step']} of {cfg.run.steps}, checkpoint saved; "
      "continue with --resume",
      file=sys.stderr,
    )
    return 143
  print(
    f"done: step {result['final_step']}"
    f"{' (max_wall_seconds reached; continue with --resume)' if result['stopped'] else ''}",
    file=sys.stderr,
  )
  return 0


def _compile_only(cfg) -> int:
  import jax  # noqa: PLC0415 (imported late, see main)

  from repvideo_jax import aot  # noqa: PLC0415

  devices = jax.devices()
  where = f"{len(devices)} {devices[0].device_kind} device(s)"
  report = aot.compile_train_config(cfg, devices, where, name="train")
  if jax.process_index() == 0:
    print("\n".join(report.lines()))
  return 0 if report.fits else 1


if __name__ == "__main__":
  from repvideo_jax import host_memory  # noqa: PLC0415

  host_memory.setup_cli()  # before JAX starts: see repvideo_jax/host_memory.py
  sys.exit(main())
