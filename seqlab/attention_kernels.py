"""The tuned attention paths behind `seqlab.attention`, and the dispatcher that picks one.

Every path computes `seqlab.attention.reference_attention` (tests/test_attention.py checks
each against it and a float64 NumPy oracle); they differ in speed and peak memory only. Which
one runs, and why:

* Pallas (`seqlab.attention_pallas`) on a TPU whenever `pallas_unsupported_reason` finds
  nothing against the call (splash attention), or when forced with implementation='pallas' (on
  a GPU the Triton kernel, on a CPU splash interpreted). Training and prefill only: a KV-cache
  update runs on XLA.
* cuDNN (`_attend_cudnn`) on an NVIDIA GPU whenever `cudnn_unsupported_reason` finds nothing
  against the call, or when forced with implementation='cudnn': jax.nn's fused flash attention
  never materialises the logits. seqlab adds full-size masks and zero rows where no key is
  allowed (cuDNN would average the values there).
* XLA, whole (`attend_head_major`) everywhere else while the float32 logits fit in
  `_WHOLE_LOGITS_BYTES`. Queries are laid out head-major `[B, K, G, T, H]`, so each kv head
  meets its G query heads in one matmul and K/V are never repeated; the gradient is written
  out (`_attend_trainable`, a custom VJP) so that the backward pass reads the kept
  probabilities in their stored layout instead of transposing them.
* XLA, blocked (`_attend_blocked`) beyond that: one (example, kv head) and a chunk of queries
  of about `_BLOCK_BYTES` of logits at a time, in a loop. A block stays in cache and its
  buffers are reused, where logits too large for the cache stream through memory several
  times; below the limit the loop's per-block overhead costs more than it saves.
* Causal chunks (is_causal=True on the XLA path): the queries are split into chunks that each
  read only the keys up to their last row, so most of the all-masked logits above the diagonal
  are never computed; each chunk then goes whole or blocked as above.
* KV cache (`attend_cache`): the cache lives in the layouts the matmuls read in place (k
  `[B, K, H, L]`, v `[B, K, L, H]`). For a few new tokens, attention reads the old cache plus
  the new keys (`_attend_cache_update`) and the write is ordered after those reads, so XLA
  updates the cache in place instead of copying it on every decode step; a prompt is written
  first and attended to like any keys.
* Swin windows (`attend_windows`): roll, pad and partition as one static gather, straight into
  the head-major layout; each window is small, so it is attended whole.

Entry points: `attend` (for `dot_product_attention`), `attend_cache` (`cache_attention`) and
`attend_windows` (`window_attention`), each called after `seqlab.attention` has validated the
inputs.

The size limits are where experiments/benchmarks/attention.py (prefill, decode),
attention_training.py (forward + backward) and decode.py put them on a CPU; rerun those to
move them.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import attention_pallas, masks
from seqlab.attention_pallas import pallas_unsupported_reason

Implementation = Literal["xla", "cudnn", "pallas"]

# Finite, so a fully masked row never computes inf - inf; next to any allowed logit its exp()
# underflows to exactly 0. Same constant as jax.nn's XLA path.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# The XLA path computes attention whole (all logits of a layer, or of a causal chunk, at once)
# up to _WHOLE_LOGITS_BYTES of float32 logits, and beyond that in blocks of about _BLOCK_BYTES
# (one kv head, its G query heads, a chunk of queries, all keys) in a loop: past the limit the
# whole logits no longer fit in cache and each pass over them goes to memory, while below it
# the loop's per-block overhead is the larger cost. KV-cache reads (inference only) switch at
# the smaller 4 * _BLOCK_BYTES (experiments/benchmarks/decode.py measures them).
_BLOCK_BYTES = 1 << 20
_WHOLE_LOGITS_BYTES = 1 << 26
# Causal layers split their queries into one chunk per _CAUSAL_CHUNK_ROWS queries, at most
# _MAX_CAUSAL_CHUNKS (`_causal_chunks`).
_MAX_CAUSAL_CHUNKS = 8
_CAUSAL_CHUNK_ROWS = 128


# ----------------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------------


def attend(q, k, v, *, mask, bias, scale: float, implementation: str | None,
           is_causal: bool = False) -> jax.Array:
  """`seqlab.attention.dot_product_attention` after validation, on the path chosen here.

  q `[B, T, N, H]`, k/v `[B, S, K, H]`, mask/bias rank 4, broadcastable to `[B, N, T, S]` (a
  numpy mask stays a compile-time constant), `scale` a float; is_causal needs T == S. Returns
  `[B, T, N, H]` in the dtype of q. Raises ValueError for an implementation that cannot run.
  """
  path = select_implementation(implementation, q.shape, k.shape, q.dtype,
                               has_mask=mask is not None, has_bias=bias is not None)
  if path == "pallas":
    return attention_pallas.pallas_attention(q, k, v, scale=scale, mask=mask, bias=bias,
                                             is_causal=is_causal,
                                             backend=current_backend()[0])
  if path == "cudnn":
    if is_causal:
      mask = masks.combine(mask, masks.causal(q.shape[1]))
    return _attend_cudnn(q, k, v, mask, bias, scale)
  return _attend_xla(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, bias, scale,
                     is_causal=is_causal)


def attend_cache(q, k_cache, v_cache, k, v, index, *, mask, bias, scale: float,
                 implementation: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`seqlab.attention.cache_attention` after validation: (out, new k_cache, new v_cache).

  q `[B, T, N, H]`, k_cache `[B, K, H, L]`, v_cache `[B, K, L, H]`, new k/v `[B, T, K, H]` in
  the cache dtype, mask/bias broadcastable to `[B, N, T, L]`, `scale` a float. The new keys go
  to slots [index, index + T), `index` clamped to [0, L - T].

  On a CPU, XLA copies the whole cache on every decode step unless (1) the matmuls read it in
  their own layouts (not `[B, L, K, H]`, which is transposed) and (2) the write comes after the
  reads: for a few new tokens attention reads the old cache plus the new keys (one softmax over
  both), and the write is made to depend on its result, so the cache is updated in place.
  """
  batch, kv_heads, head_dim, cache_len = k_cache.shape
  q_len, num_heads = q.shape[1], q.shape[2]
  # The Pallas kernels are for training and prefill shapes; a cache update runs on XLA.
  implementation = "xla" if implementation == "pallas" else implementation
  path = select_implementation(implementation, q.shape, (batch, cache_len, kv_heads, head_dim),
                               q.dtype, has_mask_or_bias=mask is not None or bias is not None)
  path = "xla" if path == "pallas" else path
  groups = num_heads // kv_heads
  index = jnp.clip(jnp.asarray(index, jnp.int32), 0, cache_len - q_len)
  read_before_write = path == "xla" and batch * num_heads * q_len * cache_len * 4 <= (
      4 * _BLOCK_BYTES)
  if read_before_write:
    q_KGTH = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    group = lambda x: None if x is None else _group_heads(x, kv_heads)
    out_KGTH = _attend_cache_update(q_KGTH, k_cache, v_cache, k.transpose(0, 2, 3, 1),
                                    v.transpose(0, 2, 1, 3), index, group(mask), group(bias),
                                    scale)
    out = out_KGTH.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)
    # An exact zero computed from the output: adding it to the new rows orders the write after
    # the reads (XLA does not fold x * 0 for floats; non-finite x is replaced first).
    first = out.reshape(-1)[0]
    zero = (jnp.where(jnp.isfinite(first), first, 0) * 0).astype(k_cache.dtype)
    k, v = k + zero, v + zero
  write = lambda cache, new, start: jax.lax.dynamic_update_slice(cache, new, start)
  k_BKHL = write(k_cache, k.transpose(0, 2, 3, 1), (0, 0, 0, index))
  v_BKLH = write(v_cache, v.transpose(0, 2, 1, 3), (0, 0, index, 0))
  if read_before_write:
    return out, k_BKHL, v_BKLH
  # Many new tokens (a prompt): attend to the written cache; one copy per call is cheap here.
  if path == "cudnn":
    out = _attend_cudnn(q, k_BKHL.transpose(0, 3, 1, 2), v_BKLH.transpose(0, 2, 1, 3), mask,
                        bias, scale)
  else:
    out = _attend_xla(q, k_BKHL, v_BKLH, mask, bias, scale, keys_transposed=True)
  return out, k_BKHL, v_BKLH


# ----------------------------------------------------------------------------------------------
# Choosing the implementation.
# ----------------------------------------------------------------------------------------------


def current_backend() -> tuple[str, tuple[int, int] | None]:
  """('cuda', (major, minor) compute capability) on an NVIDIA GPU, else (platform, None)."""
  platform = jax.default_backend()
  if platform != "gpu":
    return platform, None
  device = jax.local_devices(backend="gpu")[0]
  try:
    major, minor = (int(x) for x in str(device.compute_capability).split("."))
  except (AttributeError, ValueError):  # ROCm reports e.g. "gfx90a"; cuDNN is CUDA only.
    return "gpu", None
  return "cuda", (major, minor)


def cudnn_unsupported_reason(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    dtype,
    *,
    has_mask_or_bias: bool = False,
    backend: str,
    compute_capability: tuple[int, int] | None,
) -> str | None:
  """Why cuDNN flash attention cannot run this call, or None when it can.

  `q_shape` [B,T,N,H], `k_shape` [B,S,K,H] (already validated); `backend` is 'cuda' on an
  NVIDIA GPU. The constraints are those `jax.nn.dot_product_attention(implementation="cudnn")`
  enforces in jax 0.10: an NVIDIA GPU; bfloat16/float16 inputs; head_dim a multiple of 8 and
  <= 128, or <= 256 from Hopper (compute capability 9.0) on; with a mask or bias, even T and S
  (cuDNN's backward pass refuses odd lengths with a bias; whether the call will be
  differentiated is unknown when the path is chosen, so it is required for every call). Masks and
  biases that broadcast over T or S are expanded before the call (cuDNN wants a full [T, S]
  bias), so their shape is no constraint.
  """
  if backend != "cuda":
    return f"cuDNN attention needs an NVIDIA GPU, the backend is {backend!r}"
  dtype = jnp.dtype(dtype)
  if dtype not in _CUDNN_DTYPES:
    return f"cuDNN attention needs bfloat16 or float16 inputs, got dtype {dtype}"
  head_dim = q_shape[-1]
  max_head_dim = 256 if compute_capability and tuple(compute_capability) >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return (f"cuDNN attention needs head_dim a multiple of 8 and <= {max_head_dim} on compute "
            f"capability {compute_capability}, got head_dim={head_dim}")
  q_len, kv_len = q_shape[1], k_shape[1]
  if has_mask_or_bias and (q_len % 2 or kv_len % 2):
    return (f"cuDNN attention with a mask or bias needs even lengths, got q length {q_len} "
            f"and k/v length {kv_len}")
  return None


def select_implementation(
    implementation: str | None,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    dtype,
    *,
    has_mask_or_bias: bool = False,
    has_mask: bool = False,
    has_bias: bool = False,
    backend: tuple[str, tuple[int, int] | None] | None = None,
) -> Implementation:
  """The path `dot_product_attention` takes: 'xla', 'cudnn' or 'pallas'.

  None picks Pallas (splash attention) on a TPU when `pallas_unsupported_reason` finds nothing
  against it, cuDNN when `cudnn_unsupported_reason` finds nothing against it, else XLA;
  'cudnn' and 'pallas' raise ValueError with the failed constraint. cuDNN needs to know only
  `has_mask_or_bias`; Pallas needs `has_mask` and `has_bias` apart (either implies the former).
  `backend` (name, compute capability) defaults to `current_backend()`.
  """
  if implementation not in (None, "xla", "cudnn", "pallas"):
    raise ValueError(f"implementation={implementation!r} must be None, 'xla', 'cudnn' or "
                     "'pallas'")
  if implementation == "xla":
    return "xla"
  name, capability = current_backend() if backend is None else backend
  if implementation == "pallas" or (implementation is None and name == "tpu"):
    reason = pallas_unsupported_reason(q_shape, k_shape, has_mask=has_mask, has_bias=has_bias,
                                       backend=name)
    if implementation == "pallas" and reason is not None:
      raise ValueError(f"implementation='pallas' is not possible here: {reason}")
    return "xla" if reason else "pallas"
  has_mask_or_bias = has_mask_or_bias or has_mask or has_bias
  reason = cudnn_unsupported_reason(q_shape, k_shape, dtype, has_mask_or_bias=has_mask_or_bias,
                                    backend=name, compute_capability=capability)
  if implementation == "cudnn" and reason is not None:
    raise ValueError(f"implementation='cudnn' is not possible here: {reason}")
  return "xla" if reason else "cudnn"


# ----------------------------------------------------------------------------------------------
# XLA: head-major attention with a written-out gradient, whole, blocked or in causal chunks.
# ----------------------------------------------------------------------------------------------


def _group_heads(x, num_kv_heads: int):
  """[..., n, T|1, S|1] with n in {1, N} -> [..., K|1, G|1, T|1, S|1], the logits layout."""
  *lead, heads, t, s = x.shape
  if heads == 1:
    return x.reshape(*lead, 1, 1, t, s)
  return x.reshape(*lead, num_kv_heads, heads // num_kv_heads, t, s)


def _row_valid(mask):
  """`[..., 1]` True where a query row may attend some key; None when every row may (static)."""
  if mask is None:
    return None
  row_valid = (np if isinstance(mask, np.ndarray) else jnp).any(mask, axis=-1, keepdims=True)
  if isinstance(row_valid, np.ndarray) and row_valid.all():
    return None
  return row_valid


def _softmax_parts(q, k, mask, bias, row_valid, scale: float, logits_eq: str):
  """(exp(logits - row max), 1 / row sum): softmax = their product; masked entries are 0.

  Subtracting a constant (the row max) leaves softmax unchanged. A row with no allowed key
  would average all values uniformly; its 1 / sum is defined as 0, so its output is 0.
  """
  logits = jnp.einsum(logits_eq, q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASKED_LOGIT)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalized = jnp.exp(logits - row_max)
  inverse = 1.0 / jnp.sum(unnormalized, axis=-1, keepdims=True)  # sum >= 1: exp(0) is in it
  if row_valid is not None:
    inverse = jnp.where(row_valid, inverse, 0.0)
  return unnormalized, inverse


def _attend_inference(q_KGTH, k_KSH, v_KSH, mask, bias, row_valid, scale: float,
                      keys_transposed: bool):
  """Forward-only attention `[..., K, G, T, H]` (float32), the softmax normalised after the
  value matmul: the division then touches [.., T, H] instead of [.., T, S] values."""
  unnormalized, inverse = _softmax_parts(
      q_KGTH, k_KSH, mask, bias, row_valid, scale,
      "...kgth,...khs->...kgts" if keys_transposed else "...kgth,...ksh->...kgts")
  out_KGTH = jnp.einsum("...kgts,...ksh->...kgth", unnormalized.astype(v_KSH.dtype), v_KSH,
                        preferred_element_type=jnp.float32)
  return out_KGTH * inverse


def _attend_rows(q_KRH, k_KSH, v_KSH, mask, bias, row_valid, scale: float, keep_probs: bool):
  """(out `[..., K, R, H]` float32, probabilities `[..., K, R, S]` float32 or None); R = G * T.

  keep_probs (under differentiation, for the backward pass): the probabilities are normalised
  before the value matmul and returned; otherwise the output is normalised after it (a [R, H]
  instead of a [R, S] product).
  """
  unnormalized, inverse = _softmax_parts(q_KRH, k_KSH, mask, bias, row_valid, scale,
                                         "...krh,...ksh->...krs")
  weights = unnormalized * inverse if keep_probs else unnormalized
  out = jnp.einsum("...krs,...ksh->...krh", weights.astype(v_KSH.dtype), v_KSH,
                   preferred_element_type=jnp.float32)
  return (out, weights) if keep_probs else (out * inverse, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend_trainable(q_KRH, k_KSH, v_KSH, mask, bias, row_valid, scale):
  out, _ = _attend_rows(q_KRH, k_KSH, v_KSH, mask, bias, row_valid, scale, keep_probs=False)
  return out.astype(q_KRH.dtype)


def _attend_trainable_fwd(q_KRH, k_KSH, v_KSH, mask, bias, row_valid, scale):
  out, probs = _attend_rows(q_KRH, k_KSH, v_KSH, mask, bias, row_valid, scale, keep_probs=True)
  return out.astype(q_KRH.dtype), (q_KRH, k_KSH, v_KSH, bias, out, probs)


def _attend_trainable_bwd(scale, residuals, g_KRH):
  """The attention gradient written out, in the layouts the CPU matmuls read in place.

  With P the probabilities kept from the forward pass and O its output: dL = P * (dO V^T -
  rowsum(dO * O)) is the gradient of the scaled logits (the bias gradient), dQ = scale dL K,
  and the key / value gradients are computed transposed, dK^T = scale Q^T dL and
  dV^T = dO^T P, so that the two [R, S]-sized operands are read in their stored layout
  (autodiff's dV = P^T dO makes XLA transpose P first). experiments/benchmarks/
  attention_training.py times it against autodiff of the same forward (its "seqlab, autodiff"
  row); tests/test_attention.py checks it against autodiff of `reference_attention`.
  """
  q_KRH, k_KSH, v_KSH, bias, out, probs = residuals
  f32 = jnp.float32
  # Matmul operands keep the input dtype (bfloat16 runs bfloat16 matmuls, float32 accumulate),
  # except on a CPU, whose dot kernels lack some bfloat16 x bfloat16 -> float32 forms.
  low = f32 if jax.default_backend() == "cpu" else v_KSH.dtype
  mm = lambda eq, a, b: jnp.einsum(eq, a.astype(low), b.astype(low), preferred_element_type=f32)
  g_KRH = g_KRH.astype(f32)
  d_probs = mm("...krh,...ksh->...krs", g_KRH, v_KSH)
  row_dot = jnp.sum(g_KRH * out, axis=-1, keepdims=True)
  d_logits = probs * (d_probs - row_dot)                      # masked entries: P = 0
  d_q = mm("...krs,...ksh->...krh", d_logits, k_KSH)
  d_k_T = mm("...krh,...krs->...khs", q_KRH, d_logits)
  d_v_T = mm("...krh,...krs->...khs", g_KRH, probs)
  d_bias = None
  if bias is not None:
    axes = tuple(i for i, n in enumerate(bias.shape) if n == 1 and d_logits.shape[i] != 1)
    d_bias = jnp.sum(d_logits, axis=axes, keepdims=True).astype(bias.dtype)
  return ((d_q * scale).astype(q_KRH.dtype),
          (jnp.swapaxes(d_k_T, -1, -2) * scale).astype(k_KSH.dtype),
          jnp.swapaxes(d_v_T, -1, -2).astype(v_KSH.dtype), None, d_bias, None)


_attend_trainable.defvjp(_attend_trainable_fwd, _attend_trainable_bwd)


def _merge_rows(x, groups: int):
  """A `[..., K|1, G|1, T|1, S|1]` mask / bias as `[..., K|1, (G*T)|1, S|1]` (rows g * T + t).

  Not for `[..., G, 1, S]` (per-head rows broadcast over T), which `attend_head_major` keeps
  5-D.
  """
  if x is None:
    return None
  *lead, g, t, s = x.shape
  if g == 1 and t == 1:
    return x.reshape(*lead, 1, s)
  xp = np if isinstance(x, np.ndarray) else jnp
  if groups > 1 and t > 1:
    x = xp.broadcast_to(x, (*lead, groups, t, s))
  return x.reshape(*lead, x.shape[-3] * t, s)


def attend_head_major(q_KGTH, k_KSH, v_KSH, mask, bias, scale: float,
                      keys_transposed: bool = False):
  """XLA attention in head-major layout, whole; returns [..., K, G, T, H] in the dtype of q.

  The core of every XLA path, and all that `attend_windows` needs (its windows are already
  head-major, and each is small).

  q `[..., K, G, T, H]` (query head n = k * G + g), k/v `[..., K, S, H]`, mask/bias
  `[..., K|1, G|1, T|1, S|1]`. K/V are never repeated: each kv head is contracted with its G
  query heads in one matmul of G*T rows (decode with T = 1 still gets a G-row matmul).
  Head-major operands are what the dot kernels want (batch dims outermost), so XLA adds no
  copies of the [T, S]-sized tensors; a numpy `mask` is treated as a compile-time constant.
  The gradient is written out (`_attend_trainable_bwd`) rather than left to autodiff.
  """
  # keys_transposed: k is `[..., K, H, S]`, the layout a CPU batched matmul wants for q . k^T
  # (the KV cache's; inference only).
  row_valid = _row_valid(mask)
  *lead, num_kv_heads, groups, q_len, head_dim = q_KGTH.shape
  per_head_rows = any(x is not None and x.shape[-3] > 1 and x.shape[-2] == 1
                      for x in (mask, bias))
  if keys_transposed or per_head_rows:
    out = _attend_inference(q_KGTH, k_KSH, v_KSH, mask, bias, row_valid, scale,
                            keys_transposed)
    return out.astype(q_KGTH.dtype)
  rows = lambda x: None if x is None else jnp.asarray(_merge_rows(x, groups))
  out = _attend_trainable(q_KGTH.reshape(*lead, num_kv_heads, groups * q_len, head_dim),
                          k_KSH, v_KSH, rows(mask), rows(bias), rows(row_valid), float(scale))
  return out.reshape(q_KGTH.shape)


def _causal_chunks(length: int) -> int:
  """Query chunks of a causal layer: one per `_CAUSAL_CHUNK_ROWS` queries, at most
  `_MAX_CAUSAL_CHUNKS`.

  c equal chunks compute (c + 1) / (2c) of the logits; each further chunk saves less (the limit
  is 1/2) and adds a matmul and a copy of its rows, hence the cap.
  """
  return max(1, min(_MAX_CAUSAL_CHUNKS, length // _CAUSAL_CHUNK_ROWS))


def _attend_xla(q, k_BKSH, v_BKSH, mask, bias, scale: float, keys_transposed: bool = False,
                is_causal: bool = False):
  """XLA attention of q [B,T,N,H] to head-major k/v [B,K,S,H]: whole, blocked or in chunks.

  mask/bias `[B|1, N|1, T|1, S|1]`; returns `[B, T, N, H]`.

  keys_transposed: k is `[B, K, H, S]` instead. is_causal (T == S): the mask is ANDed with the
  causal mask, and the queries are split into chunks that each read only the keys up to their
  last row, so the all-masked blocks above the diagonal are never computed.
  """
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads, kv_len = v_BKSH.shape[1], v_BKSH.shape[2]
  groups = num_heads // num_kv_heads
  head_major = lambda q: q.reshape(batch, q.shape[1], num_kv_heads, groups,
                                   head_dim).transpose(0, 2, 3, 1, 4)
  token_major = lambda out_KGTH: out_KGTH.transpose(0, 3, 1, 2, 4).reshape(
      batch, out_KGTH.shape[3], num_heads, head_dim)
  mask = None if mask is None else _group_heads(mask, num_kv_heads)
  bias = None if bias is None else _group_heads(bias, num_kv_heads)

  def attend(q_KGTH, k, v, mask, bias):
    rows, keys = q_KGTH.shape[3], k.shape[3 if keys_transposed else 2]
    # A KV cache (keys_transposed, inference) keeps the smaller limit of its forward passes.
    limit = 4 * _BLOCK_BYTES if keys_transposed else _WHOLE_LOGITS_BYTES
    if batch * num_heads * rows * keys * 4 > limit:
      chunk = max(1, _BLOCK_BYTES // (4 * keys * groups))
      return _attend_blocked(q_KGTH, k, v, mask, bias, scale, min(chunk, rows), keys_transposed)
    return attend_head_major(q_KGTH, k, v, mask, bias, scale, keys_transposed)

  if not is_causal:
    return token_major(attend(head_major(q), k_BKSH, v_BKSH, mask, bias))
  if keys_transposed:
    raise ValueError("is_causal=True is for self-attention, not a KV cache (keys_transposed)")
  num_chunks = _causal_chunks(q_len)
  bounds = [q_len * i // num_chunks for i in range(num_chunks + 1)]
  causal = np.tril(np.ones((q_len, kv_len), bool))
  outs = []
  for start, end in zip(bounds[:-1], bounds[1:]):
    def part(x, start=start, end=end):  # rows [start, end), keys [0, end) of a mask / bias
      if x is None:
        return None
      return x[..., slice(start, end) if x.shape[3] > 1 else slice(None),
               slice(0, end) if x.shape[4] > 1 else slice(None)]
    chunk_mask = causal[None, None, None, start:end, :end]
    if mask is not None:
      chunk_mask = (np if isinstance(mask, np.ndarray) else jnp).logical_and(part(mask),
                                                                            chunk_mask)
    # Rows are sliced (and outputs joined) token-major, where a chunk is contiguous: the
    # slice and the transpose to head-major are then one copy.
    outs.append(token_major(attend(head_major(q[:, start:end]), k_BKSH[:, :, :end],
                                   v_BKSH[:, :, :end], chunk_mask, part(bias))))
  return jnp.concatenate(outs, axis=1)


def _attend_blocked(q_KGTH, k_KSH, v_KSH, mask, bias, scale: float, chunk: int,
                    keys_transposed: bool = False):
  """`attend_head_major` one (example, kv head) and `chunk` queries (times G heads) at a time.

  q `[B, K, G, T, H]`, k/v `[B, K, S, H]` (k `[B, K, H, S]` when `keys_transposed`), mask/bias
  `[B|1, K|1, G|1, T|1, S|1]`. Rows are independent, so this is `attend_head_major` on slices;
  T is padded to a multiple of `chunk` (padded queries are computed and dropped).
  """
  batch, num_kv_heads, groups, q_len, head_dim = q_KGTH.shape
  num_chunks = -(-q_len // chunk)
  pad = num_chunks * chunk - q_len
  pad_rows = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (x.ndim - 4))
  if pad:
    q_KGTH = pad_rows(q_KGTH)
    mask = mask if mask is None or mask.shape[3] == 1 else pad_rows(mask)
    bias = bias if bias is None or bias.shape[3] == 1 else pad_rows(bias)

  def select(x, b, k):  # the [G|1, T|1, S|1] slice of a mask or bias for example b, kv head k
    if x is None:
      return None
    x = jax.lax.dynamic_index_in_dim(x, b if x.shape[0] > 1 else 0, 0, keepdims=False)
    return jax.lax.dynamic_index_in_dim(x, k if x.shape[0] > 1 else 0, 0, keepdims=False)

  def rows(x, c):  # query rows of chunk c of a [G|1, T|1, S|1] slice
    if x is None or x.shape[1] == 1:
      return x
    return jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)

  def per_head(args):
    q_GTH, k_SH, v_SH, index = args
    b, k = index // num_kv_heads, index % num_kv_heads
    mask_GTS, bias_GTS = select(mask, b, k), select(bias, b, k)
    q_CGtH = q_GTH.reshape(groups, num_chunks, chunk, head_dim).transpose(1, 0, 2, 3)

    def per_chunk(args):
      q_GtH, c = args
      add_head = lambda x: None if x is None else x[None]
      out = attend_head_major(q_GtH[None], k_SH[None], v_SH[None],
                              add_head(rows(mask_GTS, c)), add_head(rows(bias_GTS, c)), scale,
                              keys_transposed)
      return out[0]

    out_CGtH = jax.lax.map(per_chunk, (q_CGtH, jnp.arange(num_chunks)))
    return out_CGtH.transpose(1, 0, 2, 3).reshape(groups, num_chunks * chunk, head_dim)

  flat = lambda x: x.reshape(batch * num_kv_heads, *x.shape[2:])
  out = jax.lax.map(per_head, (flat(q_KGTH), flat(k_KSH), flat(v_KSH),
                               jnp.arange(batch * num_kv_heads)))
  out = out.reshape(batch, num_kv_heads, groups, num_chunks * chunk, head_dim)
  return out[:, :, :, :q_len]


def _attend_cudnn(q, k, v, mask, bias, scale: float):
  """cuDNN flash attention through jax.nn, with seqlab's mask semantics kept."""
  q_len, kv_len = q.shape[1], k.shape[1]
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
  if bias is not None:
    bias = jnp.broadcast_to(bias.astype(q.dtype), bias.shape[:2] + (q_len, kv_len))
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                     implementation="cudnn")
  if mask is not None:
    # cuDNN turns the mask into a large negative bias, so a row with no allowed key averages
    # the values; seqlab defines that row as 0.
    row_valid_BTN1 = jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None]
    out = out * row_valid_BTN1.astype(out.dtype)
  return out


# ----------------------------------------------------------------------------------------------
# KV cache: attend to old cache + new keys before writing them.
# ----------------------------------------------------------------------------------------------


def _attend_cache_update(q_KGTH, k_KHL, v_KLH, k_KHT, v_KTH, index, mask, bias,
                         scale: float):
  """Attention over a cache whose slots [index, index + T) hold the new k/v, before the write.

  q `[B, K, G, T, H]`; cache k `[B, K, H, L]`, v `[B, K, L, H]`; new k `[B, K, H, T]`, v
  `[B, K, T, H]`; mask/bias `[B|1, K|1, G|1, T|1, L|1]`. The softmax runs over the cache slots
  outside the window plus the new keys; the window's columns of mask and bias go with the new
  keys. `index` is clamped to [0, L - T] as `lax.dynamic_update_slice` clamps the write.
  """
  cache_len, new_len = v_KLH.shape[-2], v_KTH.shape[-2]
  index = jnp.clip(jnp.asarray(index, jnp.int32), 0, cache_len - new_len)
  window = lambda x: (x if x is None or x.shape[-1] == 1
                      else jax.lax.dynamic_slice_in_dim(x, index, new_len, axis=x.ndim - 1))
  slot = jnp.arange(cache_len, dtype=jnp.int32)
  outside = ((slot < index) | (slot >= index + new_len)).reshape(1, 1, 1, 1, cache_len)
  mask_old = outside if mask is None else jnp.logical_and(mask, outside)
  mask_new = window(mask)
  parts = []
  for k_part, mask_part, bias_part in ((k_KHL, mask_old, bias), (k_KHT, mask_new, window(bias))):
    logits = jnp.einsum("...kgth,...khs->...kgts", q_KGTH, k_part,
                        preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if bias_part is not None:
      logits = logits + bias_part.astype(jnp.float32)
    if mask_part is not None:
      logits = jnp.where(mask_part, logits, _MASKED_LOGIT)
    parts.append(logits)
  row_max = jax.lax.stop_gradient(jnp.maximum(jnp.max(parts[0], axis=-1, keepdims=True),
                                              jnp.max(parts[1], axis=-1, keepdims=True)))
  out_KGTH, denominator = 0.0, 0.0
  for logits, v_part in zip(parts, (v_KLH, v_KTH)):
    unnormalized = jnp.exp(logits - row_max)
    denominator = denominator + jnp.sum(unnormalized, axis=-1, keepdims=True)
    out_KGTH = out_KGTH + jnp.einsum("...kgts,...ksh->...kgth",
                                     unnormalized.astype(v_part.dtype), v_part,
                                     preferred_element_type=jnp.float32)
  inverse = 1.0 / denominator
  if mask is not None:
    row_valid = jnp.logical_or(jnp.any(mask_old, axis=-1, keepdims=True),
                               jnp.any(jnp.broadcast_to(mask_new, mask_new.shape[:-1]
                                                        + (new_len,)), axis=-1, keepdims=True))
    inverse = jnp.where(row_valid, inverse, 0.0)
  return (out_KGTH * inverse).astype(q_KGTH.dtype)


# ----------------------------------------------------------------------------------------------
# Swin windows: roll + partition as one gather, then whole head-major attention per window.
# ----------------------------------------------------------------------------------------------


def attend_windows(q, k, v, *, window: int, shift: int, bias) -> jax.Array:
  """`seqlab.attention.window_attention` after validation: q `[B, H, W, N, Dh]`, k/v
  `[B, H, W, K, Dh]`, bias `[N, window², window²]` or None -> `[B, H, W, N, Dh]`.

  The cyclic shift, padding and partition into windows (and their inverse) are each one gather
  with static indices (`_window_layout`), straight into the head-major layout
  `attend_head_major` reads; the shift-and-padding mask is a compile-time constant. Windows
  are small, so they are attended whole.
  """
  batch, height, width, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[3]
  area = window * window
  pad_bottom, pad_right = -height % window, -width % window
  groups = num_heads // num_kv_heads
  gather, scatter, key_valid = _window_layout(height, width, window, shift)

  def to_windows(x):  # [B, H, W, n, Dh] -> [B, nW, n, window², Dh]
    if pad_bottom or pad_right:
      x = jnp.pad(x, ((0, 0), (0, pad_bottom), (0, pad_right), (0, 0), (0, 0)))
    x = jnp.take(x.reshape(batch, -1, *x.shape[3:]), gather, axis=1, mode="clip",
                 unique_indices=True)
    return x.reshape(batch, -1, area, *x.shape[2:]).transpose(0, 1, 3, 2, 4)

  mask = None
  if shift or pad_bottom or pad_right:
    # Static: built in numpy at trace time, so XLA sees a constant and row checks are free.
    with jax.ensure_compile_time_eval():
      mask = np.asarray(masks.swin_shift(height + pad_bottom, width + pad_right, window, shift))
    mask = (mask & key_valid)[None, :, None, None]    # [1, nW, 1, 1, window², window²]
  if bias is not None:                                  # [1, 1, K, G, window², window²]
    bias = bias.reshape(1, 1, num_kv_heads, groups, area, area)

  q_KGTH = to_windows(q)
  q_KGTH = q_KGTH.reshape(*q_KGTH.shape[:2], num_kv_heads, groups, area, head_dim)
  out = attend_head_major(q_KGTH, to_windows(k), to_windows(v), mask, bias,
                          1.0 / math.sqrt(head_dim))
  out = out.reshape(batch, -1, num_heads, area, head_dim).transpose(0, 1, 3, 2, 4)
  out = jnp.take(out.reshape(batch, -1, num_heads, head_dim), scatter, axis=1, mode="clip",
                 unique_indices=True)
  return out.reshape(batch, height, width, num_heads, head_dim)


def _window_layout(height: int, width: int, window: int, shift: int):
  """Static layout of (shifted-)window attention on a `height x width` image.

  Returns (gather, scatter, key_valid):
    gather `[nW * window²]`: for each window slot (`window_partition` order over the image padded
      bottom/right to multiples of `window` and rolled by `-shift`), the flat index of the
      padded-image token it holds: roll + partition as one gather.
    scatter `[height * width]`: for each real token, its window slot: un-partition, roll back
      and crop as one gather.
    key_valid bool `[nW, 1, window²]`: False on slots holding padding.
  """
  height_pad = -(-height // window) * window
  width_pad = -(-width // window) * window
  # Rolled position p holds padded-image position (p + shift) % size (jnp.roll by -shift).
  rows = (np.arange(height_pad) + shift) % height_pad
  cols = (np.arange(width_pad) + shift) % width_pad
  source_HW = rows[:, None] * width_pad + cols[None, :]
  to_windows = lambda x_HW: x_HW.reshape(height_pad // window, window, width_pad // window,
                                         window).transpose(0, 2, 1, 3).reshape(-1)
  gather = to_windows(source_HW)
  scatter = np.argsort(gather).reshape(height_pad, width_pad)[:height, :width].reshape(-1)
  key_valid = to_windows((rows < height)[:, None] & (cols < width)[None, :])
  return gather, scatter, key_valid.reshape(-1, 1, window * window)
