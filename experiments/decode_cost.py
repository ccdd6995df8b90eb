"""Inference cost of a decoder: KV-cache bytes, prefill, and timed cached greedy decoding.

Used by `experiments/attention_variants.py` to compare MHA / GQA / MQA at decode time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import flops


def kv_cache_bytes(model, params, *, batch_size: int, length: int) -> tuple[int, int]:
  """(bytes of the key/value arrays of `init_cache`, `seqlab.flops.kv_cache_bytes`)."""
  cache = model.apply({"params": params}, batch_size, length, method="init_cache")
  measured = sum(int(x.nbytes) for layer in cache["layers"] for x in (layer["k"], layer["v"]))
  cfg = model.config
  formula = flops.kv_cache_bytes(num_layers=cfg.num_layers, length=length,
                                 num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                 bytes_per_element=jnp.dtype(cfg.dtype).itemsize,
                                 batch_size=batch_size)
  return measured, formula


@functools.partial(jax.jit, static_argnames=("model", "cache_length"))
def prefill(model, params, prompts_BP: jax.Array, *, cache_length: int):
  """Writes start id 0 + `prompts_BP` into an empty cache of `cache_length` slots.

  Returns (cache, first greedy token int32 [B]); the model was trained on rows that start
  with 0, as `seqlab.decoding.generate` feeds them.
  """
  batch_size = prompts_BP.shape[0]
  tokens_BT = jnp.concatenate([jnp.zeros((batch_size, 1), jnp.int32), prompts_BP], axis=1)
  cache = model.apply({"params": params}, batch_size, cache_length, method="init_cache")
  logits_BTV, cache = model.apply({"params": params}, tokens_BT, cache, method="extend")
  return cache, jnp.argmax(logits_BTV[:, -1], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def greedy_steps(model, params, cache, token_B: jax.Array, *, steps: int):
  """`steps` cached greedy steps from `token_B`; returns (cache, tokens int32 [B, steps]).

  Each step feeds one token per row through `extend` (attending over every filled slot) and
  takes the argmax: the loop `seqlab.decoding.generate` runs, without eos handling.
  """
  def body(carry, _):
    cache, token_B = carry
    logits_B1V, cache = model.apply({"params": params}, token_B[:, None], cache,
                                    method="extend")
    next_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
    return (cache, next_B), next_B

  (cache, _), tokens_SB = jax.lax.scan(body, (cache, token_B), None, length=steps)
  return cache, tokens_SB.T


def time_decoding(models_params: Mapping[Any, tuple[Any, Any]], prompts: np.ndarray, *,
                  new_tokens: int, repeats: int) -> dict[Any, dict[str, float]]:
  """Cached greedy decoding speed of each `name -> (model, params)` on the same prompts.

  The prompts are prefilled once per model (untimed); then `new_tokens - 1` decoding steps, the
  first token coming from the prefill, are timed from a copy of that cache. Rounds alternate
  the models; the fastest of `repeats` rounds counts (timeit's rule: slower runs measure the
  load of other processes, not the code).
  Returns name -> {"tokens_per_s", "ms_per_step"}.
  """
  batch_size, context = prompts.shape
  cache_length = context + new_tokens  # start id + prompt + the new tokens fed back
  steps = new_tokens - 1
  starts = {}
  for name, (model, params) in models_params.items():
    starts[name] = prefill(model, params, jnp.asarray(prompts), cache_length=cache_length)
    jax.block_until_ready(greedy_steps(model, params, *starts[name], steps=steps))  # compile
  times = {name: [] for name in models_params}
  for _ in range(repeats):
    for name, (model, params) in models_params.items():
      start = time.perf_counter()
      jax.block_until_ready(greedy_steps(model, params, *starts[name], steps=steps))
      times[name].append(time.perf_counter() - start)
  out = {}
  for name, values in times.items():
    seconds = min(values)
    out[name] = {"tokens_per_s": batch_size * steps / seconds, "ms_per_step": 1e3 * seconds / steps}
  return out
