"""Shared by the experiment scripts: training on the engine, progress lines, CSV, command line.

`attention_variants.py`, `vision.py` and `objective_cells.py` import it as a sibling module
(each puts its own folder on `sys.path`). `train` runs one training on `seqlab.trainer` in its
own work directory, so a killed experiment resumes there and a finished training is read
back, not redone.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from seqlab import config as config_lib
from seqlab import compile_cache, host_memory, loop, trainer
from seqlab import train as train_lib

# Fields of a training's recorded config that may change when it resumes. Unlike `seqlab
# train`, an experiment's steps are fixed: a longer schedule would change every step's
# learning rate, and the results row would no longer be the config's.
RESUMABLE = ("train.checkpoint_every", "mesh")

_START = time.perf_counter()


def log(message: str) -> None:
  """Prints `message` with the process's wall and CPU seconds so far (CPU: all threads)."""
  print(f"[{time.perf_counter() - _START:7.1f}s wall, {time.process_time():7.1f}s cpu] "
        f"{message}", flush=True)


def process_rows(batch_size: int) -> dict[str, int]:
  """This process's share of a global batch: the input pipeline's `batch_size`, `shard_index`
  and `shard_count` (ValueError unless the processes split `batch_size` evenly)."""
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {count} processes")
  return {"batch_size": batch_size // count, "shard_index": jax.process_index(),
          "shard_count": count}


def host_params(params):
  """Parameters as host NumPy arrays: this process's copy (FSDP shards are gathered first)."""

  def fetch(x):
    if not x.is_fully_replicated:
      x = jax.jit(lambda y: y, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
    return np.asarray(x.addressable_data(0))

  return jax.tree_util.tree_map(fetch, params)


# What a shell reports for a job that SIGTERM ended (128 + 15): a scheduler requeues it, and
# the same command resumes from the checkpoint the engine saved.
PREEMPTED_EXIT = 143


def stop_if_preempted(result: trainer.Result, label: str = "") -> trainer.Result:
  """`result`, unless its training was preempted (SIGTERM): then the experiment stops with
  exit status `PREEMPTED_EXIT` instead of reading out a half-trained model."""
  if result.status == "preempted":
    print(f"preempted{' (' + label + ')' if label else ''} at step {result.step}: its checkpoint "
          "is saved; rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT)
  return result


def train(model_cfg, optimizer: train_lib.OptimizerConfig, key, batches: Iterator[dict],
          config: ml_collections.ConfigDict, *, steps: int, workdir: str, inputs: dict,
          params=None, evaluate=None, label: str = "") -> trainer.Result:
  """Trains `model_cfg` for `steps` steps on `seqlab.trainer` in `workdir` (resuming there).

  Starts from `params` when given, else from an init with `key`. The mesh and strategy come
  from `config.mesh`, the checkpoint interval from `config.train.checkpoint_every` (0: at the
  end only), a progress line from `config.train.progress`. Every step's loss is logged
  (`Result.final_loss`, `Result.history`). A preempted training stops the experiment
  (`stop_if_preempted`). `evaluate(state) -> metrics`, when given, every
  `config.train.eval_every` steps (0 or absent: at the end), logged as `eval/<name>`;
  `config.train.profile_steps` "a,b" traces steps a through b into `workdir/profile`. The
  work directory records the model, optimizer,
  `steps` and `inputs` (seed and data settings): a rerun that changes any of them is refused
  (ValueError) instead of resumed.
  """
  every = int(config.train.get("checkpoint_every", 0))
  recorded = {"model": {"type": type(model_cfg).__name__, **dataclasses.asdict(model_cfg)},
              "optimizer": dataclasses.asdict(optimizer), "inputs": inputs,
              "train": {"steps": steps, "checkpoint_every": every}, "mesh": config.mesh.to_dict()}
  options = trainer.Options(steps=steps, strategy=config.mesh.strategy, log_every=1,
                            checkpoint_every=every, label=label,
                            eval_every=int(config.train.get("eval_every", 0)),
                            progress=bool(config.train.get("progress", False)),
                            profile_steps=config.train.get("profile_steps", "") or "")
  init_args = (key,) if params is None else (params, key)
  return stop_if_preempted(trainer.run(
      dataclasses.replace(loop.model_job(model_cfg, optimizer, params is not None),
                          init_args=init_args),
      batches, loop.make_mesh(config), options, workdir=workdir, config=recorded,
      resumable=RESUMABLE, evaluate=evaluate), label)


def load_finished(path: str, fingerprint: str) -> dict | None:
  """A finished unit's saved row (`save_finished`), or None if there is none; ValueError if it
  was computed under another config (its fingerprint differs)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if saved.get("fingerprint") != fingerprint:
    raise ValueError(f"{path} was computed with a different config (fingerprint "
                     f"{saved.get('fingerprint')} != {fingerprint}); choose another "
                     "--config.output.run_name or delete the old results")
  return saved["row"]


def save_finished(path: str, fingerprint: str, row: dict) -> None:
  """Writes `row` with the config's fingerprint atomically: a killed run never leaves a
  half-written file (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"fingerprint": fingerprint, "row": row}, f, indent=1)
  os.replace(path + ".tmp", path)


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str) -> None:
  """`rows` under the header `columns`; floats with 6 significant digits."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_results_md(out_dir: str, lines: Sequence[str], *, total_time_s: float,
                     cpu_time_s: float) -> None:
  """`lines` and a line with the run's wall and CPU time as `out_dir/results.md`."""
  footer = [f"Time: {total_time_s:.0f} s wall, {cpu_time_s:.0f} s CPU (all threads) on "
            f"{os.cpu_count()} cores.", ""]
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write("\n".join([*lines, *footer]))


def grid_command_line(description: str, *, default_config: str, default_workdir: str,
                      argv: Sequence[str] | None = None, scratch: bool = False):
  """`--config file.py[:arg] --workdir DIR [--scratch DIR] [--config.a.b=value ...]` ->
  (config, run dir `<workdir>/<config.output.run_name>`, the command's config spec, scratch).

  The grid experiments' command line (compare_objectives, adaptation); anything but
  `--config.` overrides is an error. It also keeps freed host memory (`seqlab.host_memory`),
  turns on the persistent compilation cache (`seqlab.compile_cache`) and joins the processes
  of a multi-host run (`seqlab.loop.join_processes`).
  """
  host_memory.keep_freed_host_memory()  # before JAX starts: seqlab/host_memory.py
  compile_cache.enable()  # before the first compile: seqlab/compile_cache.py
  parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
  parser.add_argument("--config", default=default_config, help="config file[:arg]")
  parser.add_argument("--workdir", default=default_workdir,
                      help="results go to <workdir>/<output.run_name>/")
  if scratch:
    parser.add_argument("--scratch", default=None,
                        help="the trainings' checkpoints (default: the system temp directory)")
  args, overrides = parser.parse_known_args(argv)
  for item in overrides:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r} (overrides look like --config.a.b=value)")
  config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  loop.join_processes(config)
  return (config, os.path.join(args.workdir, str(config.output.run_name)),
          " ".join([args.config, *overrides]), getattr(args, "scratch", None))


def exit_on_bad_input(main, name: str) -> int:
  """Runs `main()`; a bad config or input (ValueError) exits 2 with one line, no traceback."""
  try:
    main()
  except ValueError as e:
    print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


def parse_command_line(description: str, argv: Sequence[str] | None = None
                       ) -> tuple[ml_collections.ConfigDict, str]:
  """`--config file.py[:arg] --workdir DIR [--config.a.b=value ...]` -> (config, out dir).

  The out dir is `<workdir>/<config.run>`; anything but `--config.` overrides is an error.
  Called first, before JAX starts, it also keeps freed host memory (`seqlab.host_memory`) and
  turns on the persistent compilation cache (`seqlab.compile_cache`).
  """
  host_memory.keep_freed_host_memory()
  compile_cache.enable()
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--config", required=True, help="config file, optionally file.py:arg")
  parser.add_argument("--workdir", required=True, help="outputs go to <workdir>/<config.run>")
  args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  bad = [o for o in overrides if not o.startswith(("--config.", "config."))]
  if bad:
    parser.error(f"unrecognised arguments {bad}")
  config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  return config, os.path.join(args.workdir, str(config.run))
