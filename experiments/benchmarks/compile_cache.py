"""What the persistent compilation cache saves: the same `seqlab train` run cold, then warm.

Run:  python experiments/benchmarks/compile_cache.py            (about a minute on a 2-core CPU)
      python experiments/benchmarks/compile_cache.py --layers 2 --steps 3   (a smoke run)
      python experiments/benchmarks/compile_cache.py --off      (adds a run without a cache)

`seqlab train` on experiments/configs/tiny.py (gpt-tiny deepened to `--layers` blocks, which
are unrolled, so compile time grows with them; `--steps` steps, one evaluation and one
checkpoint at the end) runs in a fresh process twice, each time in a fresh work directory,
with SEQLAB_COMPILATION_CACHE pointing at one fresh directory: the first (cold) run compiles
every program and writes the cache, the second (warm) run reads them back. `--off` first adds a
run with the cache off, the price of writing the cache being cold minus off.

Reports per run the wall time of the whole command (interpreter start, imports, data pipeline,
compiles, steps, evaluation, checkpoint), the seconds JAX spent compiling or loading programs
(summed over programs: the initialiser and the train step compile at once in two threads, so
the sum can exceed their share of the wall time), the number of programs and of cache hits,
then the warm / cold ratios and the cache's size. Both runs share the machine with whatever
else runs on it: compare the ratio, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "experiments" / "configs" / "tiny.py"

# Runs `seqlab train` (its `main`, as the `seqlab` command does) and reports, on stderr, the
# programs JAX compiled or loaded, from JAX's own monitoring events.
CHILD = """
import json, sys
from jax import monitoring
totals = {"compile_s": 0.0, "programs": 0, "cache_hits": 0}

def on_duration(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    totals["compile_s"] += duration
    totals["programs"] += 1

def on_event(event, **kwargs):
  if event == "/jax/compilation_cache/cache_hits":
    totals["cache_hits"] += 1

monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(on_event)
from seqlab import cli
status = cli.main(sys.argv[1:])
print("COMPILE_TOTALS " + json.dumps(totals), file=sys.stderr)
sys.exit(status)
"""


def train_once(workdir: str, cache: str, *, layers: int, steps: int) -> dict:
  """One `seqlab train` in a fresh process: wall seconds and its compile totals."""
  env = dict(os.environ)
  # The benchmark measures seqlab's own cache settings: JAX's variables would override them.
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAX_COMPILATION_CACHE_MAX_SIZE"):
    env.pop(name, None)
  env["SEQLAB_COMPILATION_CACHE"] = cache
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  args = ["train", "--config", str(TINY_CONFIG), "--workdir", workdir,
          f"--config.model.overrides.num_layers={layers}", f"--config.train.steps={steps}",
          "--config.optimizer.warmup_steps=1", f"--config.train.eval_every={steps}",
          "--config.train.eval_batches=1", "--config.train.checkpoint_every=0",
          "--config.train.log_every=1", "--config.train.progress=False"]
  started = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  wall = time.perf_counter() - started
  if proc.returncode != 0:
    raise RuntimeError(f"seqlab train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  totals = [line for line in proc.stderr.splitlines() if line.startswith("COMPILE_TOTALS ")]
  return {"wall_s": wall, **json.loads(totals[-1].split(" ", 1)[1]),
          "loss": json.loads(proc.stdout.strip().splitlines()[-1]).get("loss")}


def cache_size(cache: str) -> tuple[int, int]:
  """(entries, bytes) of a JAX compilation cache directory."""
  entries = [p for p in pathlib.Path(cache).glob("*-cache") if p.is_file()]
  return len(entries), sum(p.stat().st_size for p in entries)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=6, help="gpt-tiny's num_layers")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--off", action="store_true", help="first, a run without a cache")
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix="seqlab_compile_cache_")
  cache = os.path.join(scratch, "cache")
  try:
    runs = []
    if args.off:
      runs.append(("off", train_once(os.path.join(scratch, "off"), "off", layers=args.layers,
                                     steps=args.steps)))
    for name in ("cold", "warm"):
      runs.append((name, train_once(os.path.join(scratch, name), cache, layers=args.layers,
                                    steps=args.steps)))
    entries, size = cache_size(cache)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(f"seqlab train, {TINY_CONFIG.relative_to(ROOT)}: gpt-tiny with {args.layers} layers, "
        f"{args.steps} steps, one evaluation, one checkpoint; {os.cpu_count()} CPUs")
  print(f"{'run':<6}{'wall s':>9}{'compile s':>11}{'programs':>10}{'cache hits':>12}"
        f"{'final loss':>12}")
  for name, r in runs:
    print(f"{name:<6}{r['wall_s']:>9.2f}{r['compile_s']:>11.2f}{r['programs']:>10d}"
          f"{r['cache_hits']:>12d}{r['loss']:>12.4f}")
  cold, warm = dict(runs)["cold"], dict(runs)["warm"]
  print(f"warm / cold: wall {warm['wall_s'] / cold['wall_s']:.2f}, compile "
        f"{warm['compile_s'] / cold['compile_s']:.3f}; saved {cold['wall_s'] - warm['wall_s']:.1f}"
        f" s of wall time. Cache: {entries} entries, {size / 2**20:.1f} MiB.")


if __name__ == "__main__":
  main()
