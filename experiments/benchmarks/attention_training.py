"""Forward + backward of one causal self-attention layer: seqlab's paths vs jax.nn vs PyTorch.

Run:  python experiments/benchmarks/attention_training.py           (~2 minutes on a 2-core CPU)
      python experiments/benchmarks/attention_training.py --quick   (small shapes: a smoke run)

Times jitted `vjp(attention)(cotangent)` — what a training step spends on the attention core —
for causal self-attention with a key-padding mask (as a packed / padded LM batch has), at
B=16 T=256 N=4 H=64 (the layer of experiments/benchmarks/train_throughput.py) and B=4 T=1024:

* seqlab: `dot_product_attention(mask=..., is_causal=True)`, as seqlab's decoders call it: whole
  logits, queries in causal chunks (the blocks above the diagonal skipped), written-out gradient;
* seqlab, no is_causal: the same mask (causal included) without the chunking;
* seqlab, blocks: is_causal with the whole-logits limit at 0, so that the blocked loop runs;
* seqlab, autodiff: seqlab's plain forward differentiated by JAX instead of the written-out
  gradient (what seqlab did before), no chunking;
* jax.nn: `jax.nn.dot_product_attention(mask=..., is_causal=True)` (XLA on a CPU);
* torch: `scaled_dot_product_attention(is_causal=True)` on [B, N, T, H] tensors (PyTorch's CPU
  flash-attention kernel; the padding mask is dropped, since PyTorch takes a mask or is_causal
  but not both — which only favours it), when torch is installed.

Variants run in shuffled rounds (`train_throughput.median_step_seconds`), so machine load hits
them alike. Ratios are against the first row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import median_step_seconds  # noqa: E402  pylint: disable=g-import-not-at-top

from seqlab import attention, host_memory  # noqa: E402  pylint: disable=g-import-not-at-top
from seqlab import attention_kernels  # noqa: E402  pylint: disable=g-import-not-at-top


def _autodiff_attend(q, k, v, mask, bias, scale, keys_transposed=False):
  row_valid = attention_kernels._row_valid(mask)  # pylint: disable=protected-access
  return attention_kernels._attend_inference(  # pylint: disable=protected-access
      q, k, v, mask, bias, row_valid, scale, keys_transposed).astype(q.dtype)


def make_inputs(batch: int, length: int, heads: int, head_dim: int, seed: int = 0):
  """q, k, v, the output cotangent g `[B, T, N, H]`, and a causal + key-padding mask."""
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
                for _ in range(4))
  valid = np.ones((batch, length), bool)
  valid[0, length * 3 // 4:] = False  # one padded row
  mask = jnp.asarray(valid[:, None, None, :] & np.tril(np.ones((length, length), bool)))
  return q, k, v, g, mask


def jax_variants(q, k, v, g, mask) -> dict:
  """name -> zero-argument compiled call returning (dq, dk, dv)."""
  def bind(fn, patches=()):
    def grads(q, k, v, mask):
      return jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)[1](g)
    with contextlib.ExitStack() as stack:  # patches apply while tracing
      for patch in patches:
        stack.enter_context(mock.patch.object(*patch))
      compiled = jax.jit(grads).lower(q, k, v, mask).compile()
    return lambda: compiled(q, k, v, mask)

  seqlab_causal = lambda q, k, v, m: attention.dot_product_attention(q, k, v, mask=m,
                                                                     is_causal=True)
  seqlab_mask = lambda q, k, v, m: attention.dot_product_attention(q, k, v, mask=m)
  return {
      "seqlab": bind(seqlab_causal),
      "seqlab, no is_causal": bind(seqlab_mask),
      "seqlab, blocks": bind(seqlab_causal, [(attention_kernels, "_WHOLE_LOGITS_BYTES", 0)]),
      "seqlab, autodiff": bind(seqlab_mask, [(attention_kernels, "attend_head_major",
                                                _autodiff_attend)]),
      "jax.nn": bind(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m,
                                                                     is_causal=True)),
  }


def _torch_variant(q, k, v, g):
  import torch  # pylint: disable=g-import-not-at-top
  to_torch = lambda x: torch.from_numpy(np.array(x)).transpose(1, 2).contiguous()
  tq, tk, tv = (to_torch(x).requires_grad_() for x in (q, k, v))
  tg = to_torch(g)

  def run():
    for x in (tq, tk, tv):
      x.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    out.backward(tg)
    return tq.grad

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, one round")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  host_memory.keep_freed_host_memory()  # before JAX starts: seqlab/host_memory.py
  shapes = [(16, 256, 4, 64), (4, 1024, 4, 64)]
  rounds, steps = args.rounds, 3
  if args.quick:
    shapes, rounds, steps = [(2, 64, 2, 16)], 1, 1
  print(f"backend {jax.default_backend()}, float32; jitted forward + backward of one causal "
        f"layer with a key-padding mask; median ms over {rounds} rounds x {steps} calls")
  for batch, length, heads, head_dim in shapes:
    q, k, v, g, mask = make_inputs(batch, length, heads, head_dim)
    fns = jax_variants(q, k, v, g, mask)
    try:
      fns["torch sdpa (flash)"] = _torch_variant(q, k, v, g)
    except ImportError:
      pass
    block = lambda x: jax.block_until_ready(x) if isinstance(x, (jax.Array, tuple)) else x
    times, _ = median_step_seconds({name: functools.partial(lambda f: block(f()), fn)
                                    for name, fn in fns.items()}, rounds, steps)
    base = times["seqlab"]
    logits_mb = batch * heads * length * length * 4 / 2**20
    print(f"\nB={batch} T={length} N={heads} H={head_dim} ({logits_mb:.0f} MB of logits)")
    print(f"  {'variant':24s} {'ms':>8s} {'/ seqlab':>9s}")
    for name, seconds in times.items():
      print(f"  {name:24s} {seconds * 1e3:8.1f} {seconds / base:8.2f}x")


if __name__ == "__main__":
  main()
