"""Attention cost vs tokens: one global (ViT) and one windowed (Swin) layer on a token grid.

Analytic multiply-adds (Swin eq. (1) / (2), `seqlab.flops`), XLA's FLOP count and the best
wall time of each layer as the grid grows; `experiments/vision.py` reports them with log-log
slopes (2 = quadratic growth, 1 = linear).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import attention, flops


def attention_layer_fns(num_heads: int, window: int) -> dict[str, Callable]:
  """One attention layer, global (ViT) and windowed (Swin), on a token grid x `[B, g, g, C]`.

  Both project q, k, v with `w_q/w_k/w_v` `[C, N, C/N]`, attend, and project back with
  `w_o` `[N, C/N, C]`; "global" attends over all g² tokens, "window" within `window x window`
  windows (shift 0: a shifted window costs the same).
  """
  def project(x, w):
    q, k, v = (jnp.einsum("bhwc,cnd->bhwnd", x, w[name]) for name in ("q", "k", "v"))
    return q, k, v

  def global_layer(x, w):
    batch, height, width, channels = x.shape
    q, k, v = (t.reshape(batch, height * width, num_heads, channels // num_heads)
               for t in project(x, w))
    out = attention.dot_product_attention(q, k, v)
    return jnp.einsum("btnd,ndc->btc", out, w["o"]).reshape(x.shape)

  def window_layer(x, w):
    q, k, v = project(x, w)
    out = attention.window_attention(q, k, v, window=window)
    return jnp.einsum("bhwnd,ndc->bhwc", out, w["o"])

  return {"global": global_layer, "window": window_layer}


def loop_free_layer_fns(num_heads: int, window: int) -> dict[str, Callable]:
  """The layers of `attention_layer_fns` written as one matmul-softmax-matmul, without loops.

  XLA's cost analysis counts the body of a loop once, whatever its trip count, and
  `seqlab.attention` computes long sequences in blocks under `lax.map` (to bound memory), so
  its compiled program under-reports large grids; these straight-line versions are what the
  "XLA" column counts. Same inputs and outputs as `attention_layer_fns`.
  """
  def attend(x_BTC, w):  # [B, T, C] -> [B, T, C], all T tokens attend to each other
    q, k, v = (jnp.einsum("btc,cnd->bntd", x_BTC, w[name]) for name in ("q", "k", "v"))
    logits = jnp.einsum("bntd,bnsd->bnts", q, k) / math.sqrt(q.shape[-1])
    out = jnp.einsum("bnts,bnsd->bntd", jax.nn.softmax(logits, axis=-1), v)
    return jnp.einsum("bntd,ndc->btc", out, w["o"])

  def global_layer(x, w):
    return attend(x.reshape(x.shape[0], -1, x.shape[-1]), w).reshape(x.shape)

  def window_layer(x, w):
    batch, height, width, channels = x.shape
    windows = (x.reshape(batch, height // window, window, width // window, window, channels)
               .transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels))
    out = attend(windows, w).reshape(batch, height // window, width // window, window, window,
                                     channels)
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)

  return {"global": global_layer, "window": window_layer}


def analytic_macs(kind: str, grid: int, dim: int, window: int) -> int:
  """Swin eq. (1) / (2) multiply-adds of one layer on a `grid x grid` token map."""
  if kind == "global":
    return flops.global_attention_macs(grid, grid, dim)
  return flops.window_attention_macs(grid, grid, dim, window)


def compile_fn(fn: Callable, *args):
  """`jax.jit(fn)` lowered and compiled for `args` (the program XLA's cost analysis reads)."""
  return jax.jit(fn).lower(*args).compile()


def xla_flops(compiled) -> float:
  """FLOPs of a compiled program by XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def best_time(compiled, *args, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls of `compiled(*args)` (after one warm-up call)."""
  jax.block_until_ready(compiled(*args))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return best


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
  """Least-squares slope of log y against log x (2 = quadratic growth, 1 = linear)."""
  if len(x) != len(y) or len(x) < 2:
    raise ValueError(f"need two or more points of equal length, got {len(x)} and {len(y)}")
  return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def attention_cost(grids: Sequence[int], *, dim: int, num_heads: int, window: int,
                   patch_size: int, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
  """Analytic MACs, XLA FLOPs and best time of both layers at every grid side (batch 1).

  "xla_flops" counts the loop-free layers (`loop_free_layer_fns`), "xla_flops_seqlab" the
  program of seqlab's own functions, which `time_ms` measures.
  """
  fns = attention_layer_fns(num_heads, window)
  loop_free = loop_free_layer_fns(num_heads, window)
  rng = np.random.default_rng(seed)
  weights = {name: jnp.asarray(rng.normal(0, dim ** -0.5, shape), jnp.float32)
             for name, shape in (("q", (dim, num_heads, dim // num_heads)),
                                 ("k", (dim, num_heads, dim // num_heads)),
                                 ("v", (dim, num_heads, dim // num_heads)),
                                 ("o", (num_heads, dim // num_heads, dim)))}
  rows = []
  for grid in grids:
    x = jnp.asarray(rng.normal(size=(1, grid, grid, dim)), jnp.float32)
    for kind in ("global", "window"):
      macs = analytic_macs(kind, grid, dim, window)
      compiled = compile_fn(fns[kind], x, weights)
      xla = xla_flops(compile_fn(loop_free[kind], x, weights))
      seconds = best_time(compiled, x, weights, repeats=repeats)
      rows.append({"attention": kind, "grid": grid, "image_size": grid * patch_size,
                   "tokens": grid * grid, "analytic_macs": macs, "xla_flops": xla,
                   "xla_macs_ratio": xla / 2 / macs, "xla_flops_seqlab": xla_flops(compiled),
                   "time_ms": 1e3 * seconds})
  return rows


def cost_slopes(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
  """kind -> {"analytic", "xla", "time"}: log-log slopes vs tokens over the two largest grids."""
  out = {}
  for kind in ("global", "window"):
    mine = sorted((r for r in rows if r["attention"] == kind), key=lambda r: r["tokens"])[-2:]
    tokens = [r["tokens"] for r in mine]
    out[kind] = {"analytic": loglog_slope(tokens, [r["analytic_macs"] for r in mine]),
                 "xla": loglog_slope(tokens, [r["xla_flops"] for r in mine]),
                 "time": loglog_slope(tokens, [r["time_ms"] for r in mine])}
  return out
