"""One command that checks seqlab on a GPU or TPU and writes what it found to a folder.

Run:  python experiments/benchmarks/accelerator_check.py --out DIR
          (on a GPU / TPU: under 8 minutes; on a CPU it runs a tiny smoke version, ~1 minute)

Three parts, each written to DIR as it finishes (results.json, and summary.md for a reader):

1. Attention paths: `dot_product_attention` in bfloat16, forward + gradients, causal, for
   every implementation the backend offers (XLA always; cuDNN on an NVIDIA GPU; Pallas: splash
   on TPU, Triton on GPU, interpret mode on a CPU) against the float32 reference
   (`reference_attention`): max abs error of output and gradients, and milliseconds per
   forward + backward (median of 5) with the ratio to XLA.
2. Training: a gpt2-medium-sized decoder (d_model 1024, 24 layers, 16 heads, length 1024) with
   `scan_layers=True`, `remat="dots"`, bfloat16 compute, on the engine's train step over every
   device (data parallel); tokens/s and MFU against the device's peak (`seqlab.monitor`).
3. One `compare_objectives:gpu` cell (causal decoder, full LM, one seed) for a few hundred
   steps with trimmed readouts, through the experiment script itself.

A part that fails records its error and the next part runs. The CPU version shrinks every
shape (and uses `compare_objectives:smoke`) so the test suite can run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import attention, flops, loop, models, monitor, parallel, trainer
from seqlab import train as train_lib

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = os.path.dirname(HERE)


def _platform() -> str:
  return jax.devices()[0].platform


def _median_ms(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def attention_paths(small: bool) -> dict:
  """Every implementation the backend offers against the float32 reference."""
  batch, length, heads, head_dim = (1, 128, 2, 64) if small else (4, 2048, 16, 64)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32)
                for key in keys)

  def grads(implementation, dtype):
    def loss(q, k, v):
      out = (attention.reference_attention(q, k, v, mask=attention_mask)
             if implementation == "reference" else
             attention.dot_product_attention(q, k, v, is_causal=True,
                                             implementation=implementation))
      return jnp.sum(out.astype(jnp.float32) * g)
    attention_mask = np.tril(np.ones((length, length), bool))[None, None]
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    args = tuple(x.astype(dtype) for x in (q, k, v))
    return fn, args

  ref_fn, ref_args = grads("reference", jnp.float32)
  ref_value, ref_grads = ref_fn(*ref_args)
  platform = _platform()
  candidates = ["xla", "pallas"] + (["cudnn"] if platform == "gpu" else [])
  out = {"shape": [batch, length, heads, head_dim], "dtype": "bfloat16", "paths": {}}
  for implementation in candidates:
    try:
      fn, args = grads(implementation, jnp.bfloat16)
      value, grad = fn(*args)
      errors = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
                for a, b in zip(grad, ref_grads)]
      out["paths"][implementation] = {
          "ms_forward_backward": _median_ms(fn, *args, repeats=2 if small else 5),
          "loss_error": float(abs(value - ref_value)), "max_grad_error": max(errors)}
    except Exception as e:  # pylint: disable=broad-except
      out["paths"][implementation] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
  xla = out["paths"].get("xla", {}).get("ms_forward_backward")
  for entry in out["paths"].values():
    if xla and "ms_forward_backward" in entry:
      entry["speed_vs_xla"] = xla / entry["ms_forward_backward"]
  return out


def training(small: bool) -> dict:
  """Tokens/s and MFU of a scanned, remat'd decoder on the engine's train step."""
  if small:
    cfg = models.get_preset("gpt-tiny", num_layers=4, scan_layers=True, remat="dots",
                            max_length=128, dropout_rate=0.0)
    length, per_device, steps = 128, 4, 3
  else:
    cfg = models.get_preset("gpt2-medium", vocab_size=32768, max_length=1024, scan_layers=True,
                            remat="dots", dtype="bfloat16", dropout_rate=0.0)
    length, per_device, steps = 1024, 8, 20
  devices = jax.device_count()
  global_batch = per_device * devices
  optimizer = train_lib.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=100)
  job = dataclasses.replace(loop.model_job(cfg, optimizer), init_args=(jax.random.key(0),))
  mesh = parallel.make_mesh(-1, 1)
  options = trainer.Options(steps=steps, strategy="data")
  sharding = trainer.state_sharding(job, mesh, options)
  state = jax.jit(job.init, out_shardings=sharding)(*job.init_args)
  step = trainer.train_step(job, mesh, options)
  tokens = np.random.RandomState(0).randint(1, cfg.vocab_size, (global_batch, length + 1))
  batch = {"decoder_input_tokens": tokens[:, :-1].astype(np.int32),
           "decoder_target_tokens": tokens[:, 1:].astype(np.int32),
           "decoder_loss_weights": np.ones((global_batch, length), np.float32)}
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))
  start = time.perf_counter()
  state, metrics = step(state, batch)
  first_loss = float(metrics["loss"])
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  flops_per_token = flops.training_flops(flops.config_matmuls(cfg, length, causal=True)) / length
  flops_per_step = flops_per_token * global_batch * length
  peak = monitor.device_peak_flops()
  return {"model": f"d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
                   f"length {length}, {cfg.dtype}, scan_layers, remat {cfg.remat}",
          "params": models.num_params(cfg), "devices": devices, "global_batch": global_batch,
          "first_step_s": compile_s, "step_s": step_s,
          "tokens_per_s": global_batch * length / step_s,
          "mfu": flops.mfu(flops_per_step, step_s, peak, devices) if peak else float("nan"),
          "first_loss": first_loss, "loss": float(metrics["loss"]),
          "batch_tokens": tokens.tolist() if small else None}


def objective_cell(small: bool, out_dir: str) -> dict:
  """One compare_objectives cell through the experiment script."""
  sys.path.insert(0, EXPERIMENTS)
  import compare_objectives  # pylint: disable=g-import-not-at-top
  config = os.path.join(EXPERIMENTS, "configs", "compare_objectives.py")
  overrides = ["--config.grid.architectures=causal_decoder", "--config.grid.objectives=full_lm",
               "--config.grid.skip=", "--config.grid.num_seeds=1",
               "--config.output.progress=False"]
  if not small:
    overrides += ["--config.train.steps=300", "--config.train.checkpoint_every=0",
                  "--config.readouts.num_sequences=256", "--config.finetune.steps=100",
                  "--config.finetune.num_eval=128", "--config.zero_shot.limit=50",
                  "--config.zero_shot.multitask_steps=50"]
  start = time.perf_counter()
  summary = compare_objectives.main(
      ["--config", config + (":smoke" if small else ":gpu"),
       "--workdir", os.path.join(out_dir, "compare_objectives"),
       "--scratch", tempfile.mkdtemp(prefix="accelerator_check_"), *overrides])
  entry = summary[0]
  return {"seconds": time.perf_counter() - start,
          **{k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for results.json and summary.md")
  parser.add_argument("--small", action="store_true",
                      help="the tiny version (the default on a CPU)")
  parser.add_argument("--parts", default="attention,training,objective_cell",
                      help="comma-separated parts to run")
  args = parser.parse_args(argv)
  wanted = args.parts.split(",")
  small = args.small or _platform() == "cpu"
  os.makedirs(args.out, exist_ok=True)
  results = {"platform": _platform(), "device_kind": jax.devices()[0].device_kind,
             "devices": jax.device_count(), "jax": jax.__version__, "small": small}
  parts = (("attention", lambda: attention_paths(small)), ("training", lambda: training(small)),
           ("objective_cell", lambda: objective_cell(small, args.out)))
  for name, part in parts:
    if name not in wanted:
      continue
    start = time.perf_counter()
    try:
      results[name] = part()
    except Exception as e:  # pylint: disable=broad-except
      results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0],
                       "traceback": traceback.format_exc()[-3000:]}
    results[name]["part_seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(results, f, indent=1, default=str)
    print(f"{name}: {json.dumps(results[name], default=str)[:400]}", flush=True)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary_markdown(results))
  return results


def summary_markdown(results: dict) -> str:
  lines = [f"# Accelerator check: {results['device_kind']} x {results['devices']} "
           f"({results['platform']}, jax {results['jax']})", ""]
  att = results.get("attention", {})
  if "paths" in att:
    lines += [f"## Attention, bfloat16 {att['shape']} causal, forward + backward", "",
              "| path | ms | vs XLA | max grad error | loss error |", "|---|---|---|---|---|"]
    for name, entry in att["paths"].items():
      if "error" in entry:
        lines.append(f"| {name} | {entry['error']} | | | |")
      else:
        lines.append(f"| {name} | {entry['ms_forward_backward']:.2f} | "
                     f"{entry.get('speed_vs_xla', float('nan')):.2f}x | "
                     f"{entry['max_grad_error']:.3g} | {entry['loss_error']:.3g} |")
    lines.append("")
  tr = results.get("training", {})
  if "step_s" in tr:
    lines += ["## Training", "", f"{tr['model']}, {tr['params']:,} parameters, global batch "
              f"{tr['global_batch']} on {tr['devices']} devices: {tr['step_s'] * 1e3:.1f} ms per "
              f"step, {tr['tokens_per_s']:,.0f} tokens/s, MFU {100 * tr['mfu']:.1f}% (first "
              f"step with compilation {tr['first_step_s']:.1f} s).", ""]
  for name in ("attention", "training", "objective_cell"):
    if "error" in results.get(name, {}):
      lines += [f"{name} failed: {results[name]['error']}", ""]
  cell = results.get("objective_cell", {})
  if "seconds" in cell:
    lines += ["## compare_objectives cell", "", f"causal decoder, full LM: continuation NLL "
              f"{cell['continuation_nll'][0]:.3f}, in {cell['seconds']:.0f} s.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
