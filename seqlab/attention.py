"""Pure attention functions: multi-head, multi-query, grouped-query, cross and Swin windowed.

Layout: queries `[B, T, N, H]`, keys and values `[B, S, K, H]` with `N % K == 0`; query head `n`
reads key/value head `n // (N // K)` (the `jnp.repeat` convention of
`jax.nn.dot_product_attention`). K == N is multi-head, K == 1 multi-query, anything between is
grouped-query attention. Masks are boolean (True = may attend) and broadcast to `[B, N, T, S]`;
additive biases (relative position, ALiBi) travel separately as float `bias` of the same rank.
Logits and softmax are float32 whatever the input dtype; the output has the input dtype. A query
row with no allowed key outputs exactly zero, with finite gradients.

`reference_attention` is the definition, written to be read. The public functions validate
their inputs and hand them to `seqlab.attention_kernels`, whose tuned paths (cuDNN, XLA whole,
blocked or in causal chunks, the KV-cache update) compute the same numbers faster; the tests
hold each of them to `reference_attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from seqlab.validation import check_int

from seqlab import attention_kernels
from seqlab.attention_kernels import (  # noqa: F401  (re-exported)
    Implementation, cudnn_unsupported_reason, current_backend, select_implementation)


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


def _check_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
  """Checks q [B,T,N,H], k/v [B,S,K,H]; returns (B, T, S, N, K, H)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [batch, length, heads, head_dim], "
                       f"got shape {tuple(x.shape)}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} "
                     f"and v {tuple(v.shape)}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q, k and v must be floating point, got dtype {q.dtype}")
  batch, q_len, num_heads, head_dim = q.shape
  kv_batch, kv_len, num_kv_heads, kv_head_dim = k.shape
  if head_dim != kv_head_dim:
    raise ValueError(f"head_dim of q ({head_dim}) differs from head_dim of k and v "
                     f"({kv_head_dim})")
  if batch != kv_batch:
    raise ValueError(f"batch size of q ({batch}) differs from batch size of k and v "
                     f"({kv_batch})")
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} (q) is not a multiple of "
                     f"num_kv_heads={num_kv_heads} (k, v)")
  return batch, q_len, kv_len, num_heads, num_kv_heads, head_dim


def _check_broadcastable(name: str, x, target: tuple[int, ...], axes: str) -> None:
  if x.ndim != len(target):
    raise ValueError(f"{name} must have rank {len(target)} (broadcastable to [{axes}] = "
                     f"{target}), got shape {tuple(x.shape)}")
  for size, full in zip(x.shape, target):
    if size not in (1, full):
      raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to "
                       f"[{axes}] = {target}")


def _check_mask_and_bias(mask, bias, target: tuple[int, ...], axes: str) -> None:
  if mask is not None:
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
                       "pass additive float masks as bias")
    _check_broadcastable("mask", mask, target, axes)
  if bias is not None:
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point, got dtype {bias.dtype}")
    _check_broadcastable("bias", bias, target, axes)


# ----------------------------------------------------------------------------------------------
# Dot-product attention.
# ----------------------------------------------------------------------------------------------


def reference_attention(q, k, v, *, mask=None, bias=None, scale=None) -> jax.Array:
  """softmax(q k^T * scale + bias) v, written plainly: the definition every tuned path meets.

  Arguments as `dot_product_attention` (not validated here). Query head n = k * G + g reads kv
  head k (G = N // K): the query heads are reshaped into [K, G] groups, so K/V are never
  repeated. Logits, softmax and the value sum are float32. A query row whose mask allows no key
  outputs 0 (softmax would spread it evenly over the masked keys).
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  q_BTKGH = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k, preferred_element_type=jnp.float32)
  logits_BNTS = logits_BKGTS.reshape(batch, num_heads, q_len, kv_len) * scale
  if bias is not None:
    logits_BNTS = logits_BNTS + bias.astype(jnp.float32)
  if mask is not None:
    logits_BNTS = jnp.where(mask, logits_BNTS, jnp.finfo(jnp.float32).min)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
  if mask is not None:
    probs_BNTS = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs_BNTS, 0.0)
  probs_BKGTS = probs_BNTS.reshape(batch, num_kv_heads, groups, q_len, kv_len)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v.astype(jnp.float32))
  return out_BTKGH.reshape(q.shape).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    is_causal: bool = False,
) -> jax.Array:
  """Scaled dot-product attention with grouped key/value heads: softmax(q k^T * scale + bias) v.

  Args:
    q: queries `[B, T, N, H]`.
    k: keys `[B, S, K, H]`, N a multiple of K; query head n uses kv head `n // (N // K)`.
    v: values `[B, S, K, H]`.
    mask: bool, rank 4, broadcastable to `[B, N, T, S]`; True = may attend.
    bias: float, rank 4, broadcastable to `[B, N, T, S]`; added to the scaled logits.
    scale: logit scale, default `1 / sqrt(H)`.
    implementation: None picks Pallas splash attention on a TPU and cuDNN flash attention on
      an NVIDIA GPU when their constraints hold (see `attention_pallas.pallas_unsupported_reason`
      and `cudnn_unsupported_reason`: no bias and lengths that are multiples of 128 for splash),
      else XLA; 'xla' forces XLA; 'cudnn' forces cuDNN; 'pallas' forces the Pallas kernel of the
      backend (splash on a TPU, interpreted on a CPU; on a GPU the Triton kernel, causal only,
      no mask); the forced ones raise ValueError naming the constraint that fails. Large inputs
      run in blocks on the XLA path (`seqlab.attention_kernels`), which changes nothing but
      speed and peak memory; `seqlab.attention_pallas` documents the Pallas path.
    is_causal: AND the mask with the causal mask (query t attends keys s <= t; needs T == S).
      The XLA path then skips most of the masked logits above the diagonal (causal chunks in
      `seqlab.attention_kernels`); passing a mask that already holds the causal mask is fine.

  Returns:
    `[B, T, N, H]` in the dtype of q, equal to `reference_attention`. Logits and softmax are
    float32. A query row whose mask allows no key is exactly 0, with finite gradients.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if mask is not None and not isinstance(mask, np.ndarray):  # numpy masks stay static
    mask = jnp.asarray(mask)
  bias = None if bias is None else jnp.asarray(bias)
  batch, q_len, kv_len, num_heads, _, head_dim = _check_qkv(q, k, v)
  _check_mask_and_bias(mask, bias, (batch, num_heads, q_len, kv_len), "B, N, T, S")
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  if is_causal and q_len != kv_len:
    raise ValueError(f"is_causal=True needs as many queries as keys, got q length {q_len} and "
                     f"k length {kv_len}")
  return attention_kernels.attend(q, k, v, mask=mask, bias=bias, scale=scale,
                                  implementation=implementation, is_causal=is_causal)


def cache_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: jax.Array | int,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes T new keys/values into a KV cache at slot `index` and attends to it from q.

  q `[B, T, N, H]`; the cache in the layouts attention's matmuls read in place: k_cache
  `[B, K, H, L]`, v_cache `[B, K, L, H]`; the new keys/values k, v `[B, T, K, H]`; mask/bias
  broadcastable to `[B, N, T, L]` (over all L slots). Returns (out `[B, T, N, H]`, new k_cache,
  new v_cache): the cache with k, v written at slots [index, index + T) (`index` clamped to
  [0, L - T] as `lax.dynamic_update_slice` clamps), and `dot_product_attention` of q to it.
  Why these layouts, and how the cache is updated in place: `attention_kernels.attend_cache`.
  `implementation` as `dot_product_attention`'s, except that 'pallas' runs XLA here (the Pallas
  kernels are for training and prefill shapes).
  """
  q, k_cache, v_cache = jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache)
  k, v = jnp.asarray(k).astype(k_cache.dtype), jnp.asarray(v).astype(v_cache.dtype)
  if mask is not None and not isinstance(mask, np.ndarray):  # numpy masks stay static
    mask = jnp.asarray(mask)
  bias = None if bias is None else jnp.asarray(bias)
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4, got shape {tuple(x.shape)}")
  batch, kv_heads, head_dim, cache_len = k_cache.shape
  if v_cache.shape != (batch, kv_heads, cache_len, head_dim):
    raise ValueError(f"v_cache {tuple(v_cache.shape)} must be [B, K, L, H] = "
                     f"{(batch, kv_heads, cache_len, head_dim)} for k_cache "
                     f"{tuple(k_cache.shape)} [B, K, H, L]")
  # Validate as the [B, L, K, H] call it equals (shapes only: nothing is transposed here).
  cache_bskh = jax.ShapeDtypeStruct((batch, cache_len, kv_heads, head_dim), k_cache.dtype)
  _, q_len, _, num_heads, _, head_dim = _check_qkv(q, cache_bskh, cache_bskh)
  if k.shape != v.shape or k.shape != (batch, q_len, kv_heads, head_dim):
    raise ValueError(f"new k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, T, K, H] = "
                     f"{(batch, q_len, kv_heads, head_dim)}")
  if q_len > cache_len:
    raise ValueError(f"{q_len} new tokens do not fit a cache of length {cache_len}")
  _check_mask_and_bias(mask, bias, (batch, num_heads, q_len, cache_len), "B, N, T, L")
  scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
  return attention_kernels.attend_cache(q, k_cache, v_cache, k, v, index, mask=mask, bias=bias,
                                        scale=scale, implementation=implementation)


def multi_head_attention(q, k, v, *, mask=None, bias=None, scale=None,
                         implementation=None, is_causal=False) -> jax.Array:
  """`dot_product_attention` requiring K == N (one key/value head per query head)."""
  num_heads, num_kv_heads = np.shape(q)[-2], np.shape(k)[-2]
  if num_kv_heads != num_heads:
    raise ValueError(f"multi-head attention needs num_kv_heads == num_heads, got "
                     f"num_kv_heads={num_kv_heads} (k) and num_heads={num_heads} (q)")
  return dot_product_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                               implementation=implementation, is_causal=is_causal)


def multi_query_attention(q, k, v, *, mask=None, bias=None, scale=None,
                          implementation=None, is_causal=False) -> jax.Array:
  """`dot_product_attention` requiring K == 1 (every query head shares one key/value head)."""
  num_kv_heads = np.shape(k)[-2]
  if num_kv_heads != 1:
    raise ValueError(f"multi-query attention needs num_kv_heads == 1, got "
                     f"num_kv_heads={num_kv_heads} (k)")
  return dot_product_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                               implementation=implementation, is_causal=is_causal)


def grouped_query_attention(q, k, v, *, mask=None, bias=None, scale=None,
                            implementation=None, is_causal=False) -> jax.Array:
  """`dot_product_attention` requiring N % K == 0 (each kv head serves N // K query heads)."""
  num_heads, num_kv_heads = np.shape(q)[-2], np.shape(k)[-2]
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f"grouped-query attention needs num_heads % num_kv_heads == 0, got "
                     f"num_heads={num_heads} (q) and num_kv_heads={num_kv_heads} (k)")
  return dot_product_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                               implementation=implementation, is_causal=is_causal)


# ----------------------------------------------------------------------------------------------
# Swin window attention.
# ----------------------------------------------------------------------------------------------


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """Splits an image into non-overlapping windows: `[B, H, W, C] -> [B * nW, window², C]`.

  Windows are ordered batch-major, then row-major over the `H/window x W/window` grid; tokens
  row-major inside a window (Swin's order). H and W must be multiples of `window`.
  """
  x = jnp.asarray(x)
  check_int("window", window)
  if x.ndim != 4:
    raise ValueError(f"x must have rank 4 [batch, height, width, channels], got shape "
                     f"{tuple(x.shape)}")
  batch, height, width, channels = x.shape
  if height % window or width % window:
    raise ValueError(f"height={height} and width={width} must be multiples of window={window}")
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, channels)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: `[B * nW, window², C] -> [B, height, width, C]`."""
  windows = jnp.asarray(windows)
  for name, value in (("window", window), ("height", height), ("width", width)):
    check_int(name, value)
  if height % window or width % window:
    raise ValueError(f"height={height} and width={width} must be multiples of window={window}")
  num_windows = (height // window) * (width // window)
  if (windows.ndim != 3 or windows.shape[1] != window * window
      or windows.shape[0] % num_windows):
    raise ValueError(f"windows must be [B * {num_windows}, {window * window}, C] for a "
                     f"{height}x{width} image and window={window}, got shape "
                     f"{tuple(windows.shape)}")
  batch = windows.shape[0] // num_windows
  x = windows.reshape(batch, height // window, width // window, window, window, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height, width, -1)


def window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    shift: int = 0,
    bias: jax.Array | None = None,
) -> jax.Array:
  """Swin (shifted-)window attention: W-MSA for `shift=0`, SW-MSA for `0 < shift < window`.

  q `[B, H, W, N, Dh]`, k/v `[B, H, W, K, Dh]` (N % K == 0) -> `[B, H, W, N, Dh]`. The image is
  cyclically shifted by `-shift` (jnp.roll over H and W), split into `window x window` windows
  (`window_partition` order), each query attends to the keys of its own window with scale
  `1/sqrt(Dh)`, the optional relative-position `bias` `[N, window², window²]` and, when
  shifted, `seqlab.masks.swin_shift` (tokens that were not neighbours before the roll do not
  see each other); the result is put back and rolled by `+shift`. Non-square images work. Each
  of roll + partition and its inverse is one gather with static indices.

  H or W not divisible by `window`: the image is padded bottom/right to the next multiple (as
  the official Swin and Hugging Face do, the shift mask is computed on the padded size) and the
  padded keys are MASKED, so every real token's output is independent of the padding; padded
  outputs are cropped. This deliberately differs from Hugging Face / official Swin, which pad
  features before the qkv projection and let real tokens attend to the padded ones; a model that
  needs their exact numbers pads its features to a multiple of the window before projecting.
  Masked keys get exactly zero weight (Hugging Face adds -100 to the logits instead: a weight
  below 1e-40). A window larger than the image is padded like any other size; Swin models
  usually clamp the window to the image and drop the shift there, which is theirs to do.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  check_int("window", window)
  if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)):
    raise ValueError(f"shift={shift!r} must be an integer")
  if not 0 <= shift < window:
    raise ValueError(f"shift={shift} must satisfy 0 <= shift < window={window}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 5:
      raise ValueError(f"{name} must have rank 5 [batch, height, width, heads, head_dim], "
                       f"got shape {tuple(x.shape)}")
  if q.shape[:3] != k.shape[:3]:
    raise ValueError(f"q and k must cover the same [batch, height, width], got q "
                     f"{tuple(q.shape)} and k {tuple(k.shape)}")
  batch, height, width, num_heads, head_dim = q.shape
  # The per-window problem is dot_product_attention's; validate it there, on flat tokens.
  _check_qkv(q.reshape(batch, height * width, num_heads, head_dim),
             k.reshape(batch, height * width, *k.shape[3:]),
             v.reshape(batch, height * width, *v.shape[3:]))
  area = window * window
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (num_heads, area, area) or not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be float [num_heads, window², window²] = "
                       f"{(num_heads, area, area)}, got {bias.dtype} {tuple(bias.shape)}")
  return attention_kernels.attend_windows(q, k, v, window=window, shift=shift, bias=bias)
