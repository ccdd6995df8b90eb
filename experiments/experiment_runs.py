"""Shared by the experiment scripts: the training loop, progress lines, CSV output, command line.

`attention_variants.py` and `vision.py` import it as a sibling module (each puts its own
folder on `sys.path`).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seqlab import config as config_lib
from seqlab import host_memory
from seqlab import parallel
from seqlab import train as train_lib

_START = time.perf_counter()


def log(message: str) -> None:
  """Prints `message` with the process's wall and CPU seconds so far (CPU: all threads)."""
  print(f"[{time.perf_counter() - _START:7.1f}s wall, {time.process_time():7.1f}s cpu] "
        f"{message}", flush=True)


def initial_state(model, tx, params, seed: int, init: Callable[[], Any]):
  """A `TrainState` of `params`, or of `init()` when `params` is None; rng from `seed`.

  Given parameters are copied: the step donates its state, and the caller keeps its own.
  """
  params = init() if params is None else jax.tree_util.tree_map(jnp.array, params)
  return train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                     rng=jax.random.fold_in(jax.random.key(seed), 1))


def train_loop(state, step_fn: Callable, batches: Iterator[dict], mesh, *, steps: int,
               log_every: int = 0, label: str = "", label_width: int = 16) -> dict[str, Any]:
  """Runs `steps` steps; returns {"params", "final_loss" (mean of the last 10%), "time_s"}.

  Every `log_every` steps (and at the last) prints the loss and stops on a non-finite one.
  """
  losses = []
  start = time.perf_counter()
  for step in range(1, steps + 1):
    state, step_metrics = step_fn(state, parallel.global_batch(next(batches), mesh))
    losses.append(step_metrics["loss"])
    if log_every and (step % log_every == 0 or step == steps):
      loss = float(losses[-1])
      if not math.isfinite(loss):
        raise FloatingPointError(f"{label}: loss {loss} at step {step}")
      print(f"  {label:>{label_width}s} step {step:5d}/{steps}  loss {loss:.4f}  "
            f"{time.perf_counter() - start:7.1f}s", flush=True)
  losses = [float(x) for x in jax.device_get(losses)]
  tail = losses[-max(1, len(losses) // 10):]
  return {"params": jax.device_get(state.params), "final_loss": float(np.mean(tail)),
          "time_s": time.perf_counter() - start}


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


def parse_command_line(description: str, argv: Sequence[str] | None = None
                       ) -> tuple[ml_collections.ConfigDict, str]:
  """`--config file.py[:arg] --workdir DIR [--config.a.b=value ...]` -> (config, out dir).

  The out dir is `<workdir>/<config.run>`; anything but `--config.` overrides is an error.
  Called first, before JAX starts, it also keeps freed host memory (`seqlab.host_memory`).
  """
  host_memory.keep_freed_host_memory()
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--config", required=True, help="config file, optionally file.py:arg")
  parser.add_argument("--workdir", required=True, help="outputs go to <workdir>/<config.run>")
  args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  bad = [o for o in overrides if not o.startswith(("--config.", "config."))]
  if bad:
    parser.error(f"unrecognised arguments {bad}")
  config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  return config, os.path.join(args.workdir, str(config.run))
