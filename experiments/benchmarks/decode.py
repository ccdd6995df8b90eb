"""KV-cached decoding vs full recompute, per new token, on the current backend.

Run:  python experiments/benchmarks/decode.py           (about 45 minutes on a busy 2-core CPU)
      python experiments/benchmarks/decode.py --quick   (a tiny model: a smoke run in a minute)

Model: the "gpt2-small" preset (12 layers, d 768, N=12 heads of 64) with random parameters and
num_kv_heads = 12 (MHA), 4 (GQA) and 1 (MQA); its learned position table is extended to hold
the longest context (the only change to the preset). Batch 1, contexts 128, 512 and 2048.

* cached: the prompt (the context) is prefilled once, outside the timing; then one jitted
  `lax.fori_loop` runs `--new_tokens` greedy steps of `model.extend` (one token in, its logits
  out, argmax fed back), the loop `seqlab.decoding.generate` runs. The cache has exactly
  context + new_tokens slots, as `generate` sizes it, so attention cost grows with the context.
  Per-token time = call time / new_tokens.
* recompute: one jitted full forward pass (`model.apply`, no cache) over the context, which is
  what producing one new token costs without a cache.

Median wall times over interleaved rounds (every case once per round, in a fresh random order,
so load from other processes hits all cases alike); compilation and a warm call are excluded,
and every timed call ends with `block_until_ready`.
Targets: cached per-token time at the longest context <= 2x its time at the shortest;
cached >= 10x faster than recompute at the longest context.
On CPU the compute dtype is float32, on GPU / TPU bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqlab import host_memory, models

LAYOUTS = {"MHA": 12, "GQA": 4, "MQA": 1}


def _random_params(model, config, seed: int):
  """N(0, 0.02) parameters from shapes alone (compiling `model.init` is slow on a CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), config.dummy_batch(1))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(0.0, 0.02, x.shape).astype(np.float32)), shapes)


def _cases(model, params, context: int, new_tokens: int, seed: int):
  """Zero-argument callables: (cached decode of `new_tokens` tokens, one full forward)."""
  variables = {"params": params}
  tokens_1C = jnp.asarray(np.random.default_rng(seed).integers(3, 1000, (1, context)), jnp.int32)

  @jax.jit
  def prefill(variables, tokens_1C):
    cache = model.apply(variables, 1, context + new_tokens, method="init_cache")
    logits, cache = model.apply(variables, tokens_1C, cache, method="extend")
    return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  @jax.jit
  def decode(variables, cache, token_B):
    def step(_, carry):
      cache, token_B = carry
      logits, cache = model.apply(variables, token_B[:, None], cache, method="extend")
      return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return lax.fori_loop(0, new_tokens, step, (cache, token_B))[1]

  @jax.jit
  def recompute(variables, tokens_1C):
    logits = model.apply(variables, {"decoder_input_tokens": tokens_1C})
    return jnp.argmax(logits[:, -1], axis=-1)

  cache, token_B = jax.block_until_ready(prefill(variables, tokens_1C))
  cache_bytes = sum(layer[name].nbytes for layer in cache["layers"] for name in ("k", "v"))
  return (lambda: decode(variables, cache, token_B),
          lambda: recompute(variables, tokens_1C), cache_bytes)


def _median_times(fns: dict, repeats: int, seed: int = 0) -> dict:
  """Median seconds per call of each zero-argument jitted fn, in shuffled interleaved rounds."""
  for fn in fns.values():  # compile, then one warm call
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  order = list(fns)
  rng = np.random.default_rng(seed)
  for _ in range(repeats):
    rng.shuffle(order)
    for name in order:
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
  parser.add_argument("--contexts", default=None, help="comma-separated (default 128,512,2048)")
  parser.add_argument("--new_tokens", type=int, default=None,
                      help="decode steps per cached call (default 32; --quick 8)")
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
  parser.add_argument("--layouts", default=",".join(LAYOUTS),
                      help=f"comma-separated subset of {','.join(LAYOUTS)} (default all)")
  args = parser.parse_args()
  host_memory.keep_freed_host_memory()  # before JAX starts: seqlab/host_memory.py
  backend = jax.default_backend()
  dtype = "float32" if backend == "cpu" else "bfloat16"
  contexts = [int(c) for c in (args.contexts or ("32,64,128" if args.quick
                                                 else "128,512,2048")).split(",")]
  new_tokens = args.new_tokens or (8 if args.quick else 32)
  repeats = args.repeats or (2 if args.quick else 5)
  max_length = max(contexts) + new_tokens
  if args.quick:  # gpt2-small's shape scaled down: 2 layers, d 96, N=12 heads of 8
    base = dict(vocab_size=1024, d_model=96, head_dim=8, d_ff=384, num_layers=2)
  else:
    base = {}

  layouts = {name: LAYOUTS[name] for name in args.layouts.split(",")}
  fns, cache_bytes = {}, {}
  for layout, num_kv_heads in layouts.items():
    config = models.get_preset("gpt2-small", num_kv_heads=num_kv_heads, max_length=max_length,
                               dropout_rate=0.0, dtype=dtype, **base)
    model = config.build()
    params = _random_params(model, config, seed=num_kv_heads)
    for context in contexts:
      print(f"compiling {layout} context {context} ...", file=sys.stderr, flush=True)
      cached, recompute, nbytes = _cases(model, params, context, new_tokens, seed=context)
      fns[layout, context, "cached"] = cached
      fns[layout, context, "recompute"] = recompute
      cache_bytes[layout, context] = nbytes
  print("timing ...", file=sys.stderr, flush=True)
  t = _median_times(fns, repeats)

  print(f"decode benchmark: backend={backend} ({jax.devices()[0].device_kind}), dtype={dtype}, "
        f"batch 1, {'--quick tiny model [smoke run, targets not meaningful]' if args.quick else 'gpt2-small'}"
        f"; cached = {new_tokens} greedy steps per call; median of {repeats} rounds")
  header = (f"{'layout':<5} {'K':>3} {'context':>7} {'cache MB':>9} {'cached ms/tok':>14} "
            f"{'cached tok/s':>13} {'recompute ms/tok':>17} {'recompute tok/s':>16} "
            f"{'speedup':>8}")
  print(header)
  print("-" * len(header))
  verdicts = []
  shortest, longest = min(contexts), max(contexts)
  for layout, num_kv_heads in layouts.items():
    for context in contexts:
      cached = t[layout, context, "cached"] / new_tokens
      recompute = t[layout, context, "recompute"]
      print(f"{layout:<5} {num_kv_heads:>3} {context:>7} "
            f"{cache_bytes[layout, context] / 2**20:>9.2f} {cached * 1e3:>14.2f} "
            f"{1 / cached:>13.1f} {recompute * 1e3:>17.2f} {1 / recompute:>16.1f} "
            f"{recompute / cached:>8.1f}")
    growth = (t[layout, longest, "cached"] / t[layout, shortest, "cached"])
    speedup = t[layout, longest, "recompute"] / (t[layout, longest, "cached"] / new_tokens)
    verdicts.append((layout, growth, speedup))
  print()
  print(f"{'layout':<5} {f'cached {longest} / {shortest}':>22} {'target':>7} "
        f"{f'recompute / cached at {longest}':>27} {'target':>7}  result")
  for layout, growth, speedup in verdicts:
    ok = growth <= 2.0 and speedup >= 10.0
    print(f"{layout:<5} {growth:>22.2f} {'<= 2':>7} {speedup:>27.1f} {'>= 10':>7}  "
          f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
  main()
