"""Attention speed on the current backend: seqlab vs jax.nn vs repeat-K/V, and window vs global.

Run:  python experiments/benchmarks/attention.py           (a few minutes on a 2-core CPU)
      python experiments/benchmarks/attention.py --quick   (tiny shapes: a smoke run in seconds)

Prints one table of median wall times (ms) of jitted forward passes:
* `seqlab.attention.dot_product_attention` vs `jax.nn.dot_product_attention` vs the naive
  "jnp.repeat K/V to N heads, then multi-head attention", for MHA (K=16), GQA (K=4) and MQA
  (K=1) at prefill (B=4, T=S=1024, N=16, H=64, causal mask) and decode (B=4, T=1, S=4096).
* `window_attention` (Swin-T stage 1: N=3, Dh=32, window 7, shift 3, relative bias, B=1) vs
  global attention over all tokens under the same-window mask, at 56x56 and 112x112 tokens.
Global attention at 112x112 materialises 3 x 12544² float32 logits (~2 GB). Each group of
variants is timed in shuffled rounds (see `_median_times`), so ratios stay fair when other
processes load the machine; absolute times do not.
Targets: seqlab / jax.nn <= 1.1 (<= 1.2 on GPU, where both take cuDNN); GQA and MQA no slower
than MHA at the same N; window attention grows <= 4.5x for 4x the tokens (global grows ~16x).
On CPU the inputs are float32; on GPU bfloat16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import attention, host_memory


def _median_times(fns: dict, repeats: int, seed: int = 0) -> tuple[dict, dict]:
  """Median wall ms and median process-CPU ms per call of each zero-argument jitted fn.

  Process CPU time (all threads) is the work done, which, unlike wall time, other processes on a
  shared machine barely change.

  Each round calls every variant once, in a fresh random order, so that load from other
  processes on a shared machine, and whatever one call leaves behind for the next (caches,
  freed buffers), hit all variants alike.
  """
  for fn in fns.values():  # compile, then one warm call
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  cpu_times = {name: [] for name in fns}
  order = list(fns)
  rng = np.random.default_rng(seed)
  for _ in range(repeats):
    rng.shuffle(order)
    for name in order:
      start, cpu_start = time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[name]())
      times[name].append((time.perf_counter() - start) * 1e3)
      cpu_times[name].append((time.process_time() - cpu_start) * 1e3)
  median = lambda table: {name: statistics.median(values) for name, values in table.items()}
  return median(times), median(cpu_times)


def _bind(fn, *args, **kwargs):
  jitted = jax.jit(lambda *a: fn(*a, **kwargs))
  return lambda: jitted(*args)


def _dense_cases(quick: bool, dtype, on_gpu: bool, repeats: dict[str, int]):
  if quick:
    shapes = {"prefill": (1, 128, 128, 4, 16), "decode": (1, 1, 256, 4, 16)}
    layouts = {"MHA": 4, "GQA": 2, "MQA": 1}
  else:
    shapes = {"prefill": (4, 1024, 1024, 16, 64), "decode": (4, 1, 4096, 16, 64)}
    layouts = {"MHA": 16, "GQA": 4, "MQA": 1}
  rng = np.random.default_rng(0)
  rows = []
  for phase, (batch, q_len, kv_len, num_heads, head_dim) in shapes.items():
    mask = None
    if phase == "prefill":
      mask = jnp.asarray(np.tril(np.ones((q_len, kv_len), bool))[None, None])
    q = jnp.asarray(rng.normal(size=(batch, q_len, num_heads, head_dim)), dtype)
    fns, paths = {}, {}
    for layout, num_kv_heads in layouts.items():
      kv_shape = (batch, kv_len, num_kv_heads, head_dim)
      k = jnp.asarray(rng.normal(size=kv_shape), dtype)
      v = jnp.asarray(rng.normal(size=kv_shape), dtype)
      path = attention.select_implementation(None, q.shape, k.shape, q.dtype,
                                             has_mask_or_bias=mask is not None)
      # On a GPU the reference is jax.nn's own fused path whenever seqlab takes it.
      reference = "cudnn" if path == "cudnn" else None
      groups = num_heads // num_kv_heads

      def repeat_then_mha(q, k, v, mask, groups=groups):
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return attention.multi_head_attention(q, k, v, mask=mask)

      fns[layout, "seqlab"] = _bind(
          lambda q, k, v, m: attention.dot_product_attention(q, k, v, mask=m), q, k, v, mask)
      fns[layout, "jax.nn"] = _bind(
          lambda q, k, v, m, impl=reference: jax.nn.dot_product_attention(
              q, k, v, mask=m, implementation=impl), q, k, v, mask)
      fns[layout, "naive"] = _bind(repeat_then_mha, q, k, v, mask)
      paths[layout] = path
    t, _ = _median_times(fns, repeats[phase])
    for layout, num_kv_heads in layouts.items():
      ratio = t[layout, "seqlab"] / t[layout, "jax.nn"]
      checks = [ratio <= (1.2 if on_gpu else 1.1)]
      vs_mha = None
      if layout != "MHA":
        vs_mha = t[layout, "seqlab"] / t["MHA", "seqlab"]
        checks.append(vs_mha <= 1.0)
      name = (f"{phase} {layout} B{batch} T{q_len} S{kv_len} N{num_heads} K{num_kv_heads} "
              f"H{head_dim}{' causal' if mask is not None else ''} [{paths[layout]}]")
      rows.append((name, t[layout, "seqlab"], t[layout, "jax.nn"], t[layout, "naive"], ratio,
                   vs_mha, None, "PASS" if all(checks) else "FAIL"))
  return rows


def _window_cases(quick: bool, dtype, repeats: dict[str, int]):
  batch, num_heads, head_dim, window, shift = 1, 3, 32, 7, 3
  sizes = (14, 28) if quick else (56, 112)
  rng = np.random.default_rng(1)
  bias = jnp.asarray(rng.normal(size=(num_heads, window**2, window**2)), jnp.float32)
  window_fns, global_fns = {}, {}
  for size in sizes:
    shape = (batch, size, size, num_heads, head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    # Global attention doing the same job: every token sees its own window only.
    window_id = (np.arange(size)[:, None] // window * (size // window)
                 + np.arange(size)[None, :] // window).reshape(-1)
    same_window = jnp.asarray((window_id[:, None] == window_id[None, :])[None, None])
    flat = lambda x, size=size: x.reshape(batch, size * size, num_heads, head_dim)
    window_fns[size] = _bind(lambda q, k, v, b: attention.window_attention(
        q, k, v, window=window, shift=shift, bias=b), q, k, v, bias)
    global_fns[size] = _bind(lambda q, k, v, m, flat=flat: attention.dot_product_attention(
        flat(q), flat(k), flat(v), mask=m), q, k, v, same_window)
  rows, cpu_growth = [], {}
  small, large = sizes
  for kind, fns, n, check in (("window_attention (shift 3)", window_fns, "window", True),
                              ("global masked attention", global_fns, "global", False)):
    # Both sizes interleaved: the ratio is what counts.
    times, cpu_times = _median_times(fns, repeats[n])
    cpu_growth[n] = cpu_times[large] / cpu_times[small]
    rows.append((f"{kind} {small}x{small}", times[small], None, None, None, None, None, ""))
    growth = times[large] / times[small]
    result = ("PASS" if growth <= 4.5 else "FAIL") if check else "info"
    rows.append((f"{kind} {large}x{large}", times[large], None, None, None, None, growth,
                 result))
  return rows, cpu_growth


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per variant (default: 7 prefill, 15 decode, 41 window, "
                           "3 global)")
  args = parser.parse_args()
  host_memory.keep_freed_host_memory()  # before JAX starts: seqlab/host_memory.py
  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  # Cheap cases get more calls: their medians are the noisiest.
  repeats = {"prefill": 7, "decode": 15, "window": 41, "global": 3}
  if args.quick:
    repeats = dict.fromkeys(repeats, 3)
  if args.repeats:
    repeats = dict.fromkeys(repeats, args.repeats)

  load_before = os.getloadavg()[0]
  window_rows, cpu_growth = _window_cases(args.quick, dtype, repeats)
  rows = _dense_cases(args.quick, dtype, on_gpu, repeats) + window_rows
  load_after = os.getloadavg()[0]
  fmt = lambda x, spec: format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)
  print(f"attention benchmark: backend={backend} ({jax.devices()[0].device_kind}), "
        f"dtype={jnp.dtype(dtype).name}; jitted forward passes, median ms over "
        f"{', '.join(f'{n} {r}' for n, r in repeats.items())} calls"
        f"{'  [--quick: smoke run, targets not meaningful]' if args.quick else ''}")
  header = (f"{'case':<52} {'seqlab':>9} {'jax.nn':>9} {'repeatKV':>9} {'seq/jax':>8} "
            f"{'vs MHA':>7} {'growth':>7}  result")
  print(header)
  print("-" * len(header))
  for name, seqlab_ms, jax_ms, naive_ms, ratio, vs_mha, growth, result in rows:
    print(f"{name:<52} {fmt(seqlab_ms, '9.2f')} {fmt(jax_ms, '9.2f')} {fmt(naive_ms, '9.2f')} "
          f"{fmt(ratio, '8.2f')} {fmt(vs_mha, '7.2f')} {fmt(growth, '7.2f')}  {result}")
  print(f"targets: seq/jax <= {1.2 if on_gpu else 1.1}; GQA/MQA vs MHA (same N) <= 1.00; "
        "window growth for 4x tokens <= 4.5 (global is info, ~16x expected)")
  # Wall times on a shared machine: a load far above the core count inflates and skews them.
  print(f"1-min load average {load_before:.1f} at start, {load_after:.1f} at end, on "
        f"{os.cpu_count()} cores; growth in process CPU time (work done, all threads): "
        f"window {cpu_growth['window']:.2f}, global {cpu_growth['global']:.2f}")


if __name__ == "__main__":
  main()
