"""Compile time and XLA temporary memory of the train step against depth: unrolled vs scanned.

Run:  python experiments/benchmarks/compile_memory.py            (~12 minutes on a 2-core CPU;
                                                                  most of it the unrolled
                                                                  48-layer compile)
      python experiments/benchmarks/compile_memory.py --quick    (depths 2 and 4: a smoke run)
      python experiments/benchmarks/compile_memory.py --max-unrolled 24   (skips the unrolled
                                                                  48-layer compile)

One narrow GPT (d_model 128, 4 heads of 32, d_ff 512, vocabulary 512, rotary positions,
length 256, batch 8, float32) at 2, 12, 24 and 48 layers. For each depth the engine's train
step (`seqlab.trainer.train_step`, as `seqlab train` jits it, one device) is lowered and
compiled with the blocks unrolled and under `scan_layers`; at one depth (24) also with
`remat="full"` and `"dots"`. Printed per variant: compile seconds (`.compile()` wall time) and
the temporary buffer XLA plans (`compiled.memory_analysis().temp_size_in_bytes`); then step
time, scanned vs unrolled, at 12 layers (median of interleaved rounds), and the ratios the
scale issue sets as targets on this CPU:

  scanned compile(48) / compile(2)            <= 3
  scanned step time / unrolled step time      <= 1.1
  remat "full" temp memory / "none" at 24     <= 1/3

The persistent compilation cache is not turned on here (each compile is a cold one).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from seqlab import loop, models, parallel, trainer
from seqlab import train as train_lib

LENGTH, BATCH, VOCAB = 256, 8, 512


def model_config(num_layers: int, *, scan_layers: bool, remat: str = "none"):
  return models.get_preset(
      "gpt-tiny", vocab_size=VOCAB, d_model=128, num_heads=4, num_kv_heads=4, head_dim=32,
      d_ff=512, num_layers=num_layers, max_length=LENGTH, position_embedding="rope",
      dropout_rate=0.0, scan_layers=scan_layers, remat=remat)


def batch() -> dict:
  tokens = np.random.RandomState(0).randint(1, VOCAB, (BATCH, LENGTH + 1)).astype(np.int32)
  return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": np.ones((BATCH, LENGTH), np.float32)}


def compiled_step(cfg):
  """(the compiled train step, its initial state, compile seconds, XLA temp bytes)."""
  optimizer = train_lib.OptimizerConfig(name="adamw", learning_rate=1e-3, total_steps=100)
  job = dataclasses.replace(loop.model_job(cfg, optimizer), init_args=(jax.random.key(0),))
  mesh = parallel.make_mesh(1, 1)
  options = trainer.Options(steps=100, strategy="fsdp")
  sharding = trainer.state_sharding(job, mesh, options)
  state = jax.jit(job.init, out_shardings=sharding)(*job.init_args)
  step = trainer.train_step(job, mesh, options)
  lowered = step.lower(jax.eval_shape(lambda: state), jax.eval_shape(batch))
  start = time.perf_counter()
  program = lowered.compile()
  seconds = time.perf_counter() - start
  return program, state, seconds, program.memory_analysis().temp_size_in_bytes


def step_seconds(programs: dict, rounds: int, steps: int) -> dict[str, float]:
  """Median seconds per step of each (program, state), in interleaved rounds."""
  data = jax.device_put(batch())
  times = {name: [] for name in programs}
  states = {name: state for name, (_, state) in programs.items()}
  for name, (program, _) in programs.items():  # warm up
    states[name], metrics = program(states[name], data)
    jax.block_until_ready(metrics)
  for _ in range(rounds):
    for name, (program, _) in programs.items():
      start = time.perf_counter()
      for _ in range(steps):
        states[name], metrics = program(states[name], data)
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / steps)
  return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="depths 2 and 4 only")
  parser.add_argument("--depths", default="", help="comma-separated depths (default 2,12,24,48)")
  parser.add_argument("--max-unrolled", type=int, default=0,
                      help="compile unrolled stacks only up to this depth (0: every depth)")
  args = parser.parse_args()
  depths = ([2, 4] if args.quick else
            [int(d) for d in args.depths.split(",")] if args.depths else [2, 12, 24, 48])
  remat_depth = depths[-1] if args.quick else (24 if 24 in depths else depths[-1])
  step_depth = depths[-1] if args.quick else (12 if 12 in depths else depths[-1])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; d_model 128, length {LENGTH}, "
        f"batch {BATCH}", flush=True)
  print(f"{'layers':>6} {'layout':>9} {'remat':>5} {'compile s':>10} {'temp MiB':>9}",
        flush=True)
  results, keep = {}, {}
  for depth in depths:
    variants = [(True, "none")]
    if not args.max_unrolled or depth <= args.max_unrolled:
      variants.insert(0, (False, "none"))
    if depth == remat_depth:
      variants += [(True, "full"), (True, "dots"), (False, "full")]
    for scan_layers, remat in variants:
      program, state, seconds, temp = compiled_step(
          model_config(depth, scan_layers=scan_layers, remat=remat))
      results[(depth, scan_layers, remat)] = (seconds, temp)
      layout = "scanned" if scan_layers else "unrolled"
      print(f"{depth:>6} {layout:>9} {remat:>5} {seconds:>10.2f} {temp / 2**20:>9.1f}",
            flush=True)
      if depth == step_depth and remat == "none":
        keep[layout] = (program, state)
  times = step_seconds(keep, rounds=5, steps=3 if args.quick else 5)
  print(f"\nstep time at {step_depth} layers: unrolled {1e3 * times['unrolled']:.1f} ms, "
        f"scanned {1e3 * times['scanned']:.1f} ms")
  first, last = depths[0], depths[-1]
  scanned_ratio = results[(last, True, "none")][0] / results[(first, True, "none")][0]
  deepest = max(d for d in depths if (d, False, "none") in results)
  unrolled_ratio = results[(deepest, False, "none")][0] / results[(first, False, "none")][0]
  memory_ratio = (results[(remat_depth, True, "full")][1]
                  / results[(remat_depth, True, "none")][1])
  print(f"compile({last}) / compile({first}) scanned: {scanned_ratio:.2f} (target <= 3); "
        f"unrolled compile({deepest}) / compile({first}): {unrolled_ratio:.2f}")
  print(f"scanned / unrolled step time at {step_depth} layers: "
        f"{times['scanned'] / times['unrolled']:.3f} (target <= 1.1)")
  print(f"remat full / none temp memory at {remat_depth} layers (scanned): {memory_ratio:.3f} "
        f"(target <= 0.333); dots / none: "
        f"{results[(remat_depth, True, 'dots')][1] / results[(remat_depth, True, 'none')][1]:.3f}; "
        f"unrolled full / none: "
        f"{results[(remat_depth, False, 'full')][1] / results[(remat_depth, False, 'none')][1]:.3f}")


if __name__ == "__main__":
  main()
