"""Pure attention functions: multi-head, multi-query, grouped-query, cross and Swin windowed.

Layout: queries `[B, T, N, H]`, keys and values `[B, S, K, H]` with `N % K == 0`; query head `n`
reads key/value head `n // (N // K)` (the `jnp.repeat` convention of
`jax.nn.dot_product_attention`). K == N is multi-head, K == 1 multi-query, anything between is
grouped-query attention. Masks are boolean (True = may attend) and broadcast to `[B, N, T, S]`;
additive biases (relative position, ALiBi) travel separately as float `bias` of the same rank.
Logits and softmax are float32 whatever the input dtype; the output has the input dtype. A query
row with no allowed key outputs exactly zero, with finite gradients.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import masks

Implementation = Literal["xla", "cudnn"]

# Finite, so a fully masked row never computes inf - inf; next to any allowed logit its exp()
# underflows to exactly 0. Same constant as jax.nn's XLA path.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# The XLA path computes attention whole (all logits of a layer, or of a causal chunk, at once) up
# to _WHOLE_LOGITS_BYTES of float32 logits, and beyond that in blocks of about _BLOCK_BYTES (one
# kv head, its G query heads, a chunk of queries, all keys) in a loop. A block stays in cache and
# its buffers are reused, where big whole logits stream through memory several times: on a CPU
# blocks halve a 1024-token prefill with N = 16 heads (256 MB of logits). Below the threshold
# the loop's per-block overhead costs more than it saves: forward + backward of a causal layer
# of 16 x 256 tokens with 4 heads (16 MB) takes 37 ms whole against 71 ms blocked
# (experiments/benchmarks/attention_training.py).
_BLOCK_BYTES = 1 << 20
_WHOLE_LOGITS_BYTES = 1 << 26
# Causal layers split their queries into up to this many chunks (`_causal_chunks`).
_MAX_CAUSAL_CHUNKS = 8
_CAUSAL_CHUNK_ROWS = 128


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
    backend: tuple[str, tuple[int, int] | None] | None = None,
) -> Implementation:
  """The path `dot_product_attention` takes: 'xla' or 'cudnn'.

  None picks cuDNN when `cudnn_unsupported_reason` finds nothing against it, else XLA; 'cudnn'
  raises ValueError with the failed constraint. `backend` (name, compute capability) defaults
  to `current_backend()`.
  """
  if implementation not in (None, "xla", "cudnn"):
    raise ValueError(f"implementation={implementation!r} must be None, 'xla' or 'cudnn'")
  if implementation == "xla":
    return "xla"
  name, capability = current_backend() if backend is None else backend
  reason = cudnn_unsupported_reason(q_shape, k_shape, dtype, has_mask_or_bias=has_mask_or_bias,
                                    backend=name, compute_capability=capability)
  if implementation == "cudnn" and reason is not None:
    raise ValueError(f"implementation='cudnn' is not possible here: {reason}")
  return "xla" if reason else "cudnn"


# ----------------------------------------------------------------------------------------------
# Dot-product attention.
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
  (autodiff's dV = P^T dO makes XLA transpose P first). On a CPU a layer's forward + backward
  is 1.7-1.8x faster than with autodiff (experiments/benchmarks/attention_training.py).
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

  Not for `[..., G, 1, S]` (per-head rows broadcast over T), which `_attend` keeps 5-D.
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


def _attend(q_KGTH, k_KSH, v_KSH, mask, bias, scale: float, keys_transposed: bool = False):
  """XLA attention in head-major layout; returns [..., K, G, T, H] in the dtype of q.

  q `[..., K, G, T, H]` (query head n = k * G + g), k/v `[..., K, S, H]`, mask/bias
  `[..., K|1, G|1, T|1, S|1]`. K/V are never repeated: each kv head is contracted with its G
  query heads in one matmul of G*T rows (decode with T = 1 still gets a G-row matmul). Head-major
  operands are what the dot kernels want (batch dims outermost), so XLA adds no copies of the
  [T, S]-sized tensors; a numpy `mask` is treated as a compile-time constant. The gradient is
  written out (`_attend_trainable_bwd`) rather than left to autodiff.
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
  """Query chunks of a causal layer: one per 128 queries, at most 8 (0.56 of the logits)."""
  return max(1, min(_MAX_CAUSAL_CHUNKS, length // _CAUSAL_CHUNK_ROWS))


def _attend_xla(q, k_BKSH, v_BKSH, mask, bias, scale: float, keys_transposed: bool = False,
                is_causal: bool = False):
  """`_attend` for q [B,T,N,H], head-major k/v [B,K,S,H], mask/bias [B|1, N|1, T|1, S|1].

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
    return _attend(q_KGTH, k, v, mask, bias, scale, keys_transposed)

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
  """`_attend` one (example, kv head) at a time, `chunk` queries (times G heads) at a time.

  q `[B, K, G, T, H]`, k/v `[B, K, S, H]` (k `[B, K, H, S]` when `keys_transposed`), mask/bias
  `[B|1, K|1, G|1, T|1, S|1]`. Rows are
  independent, so this is `_attend` on slices; T is padded to a multiple of `chunk` (padded
  queries are computed and dropped).
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
      out = _attend(q_GtH[None], k_SH[None], v_SH[None], add_head(rows(mask_GTS, c)),
                    add_head(rows(bias_GTS, c)), scale, keys_transposed)
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
    implementation: None picks cuDNN flash attention on an NVIDIA GPU when its constraints hold
      (see `cudnn_unsupported_reason`), else XLA; 'xla' forces XLA; 'cudnn' forces cuDNN and
      raises ValueError naming the constraint that fails. On the XLA path, inputs whose logits
      exceed a few MB are processed in blocks (one kv head and a chunk of queries at a time),
      which changes nothing but speed and peak memory.
    is_causal: AND the mask with the causal mask (query t attends keys s <= t; needs T == S).
      The XLA path then skips the blocks above the diagonal (about 3/8 of the logits for
      T >= 512, 1/4 for T = 256); passing a mask that already holds the causal mask is fine.

  Returns:
    `[B, T, N, H]` in the dtype of q. Logits and softmax are float32. A query row whose mask
    allows no key is exactly 0, with finite gradients.
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
  path = select_implementation(implementation, q.shape, k.shape, q.dtype,
                               has_mask_or_bias=mask is not None or bias is not None)
  if path == "cudnn":
    if is_causal:
      mask = masks.combine(mask, masks.causal(q_len))
    return _attend_cudnn(q, k, v, mask, bias, scale)
  return _attend_xla(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, bias, scale,
                     is_causal=is_causal)


def _attend_cache_update(q_KGTH, k_KHL, v_KLH, k_KHT, v_KTH, index, mask, bias,
                         scale: float):
  """`_attend` over a cache whose slots [index, index + T) hold the new k/v, without writing it.

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

  Why this shape of function: on a CPU, XLA copies the whole cache on every decode step unless
  (1) the matmuls read it in their own layouts (not `[B, L, K, H]`, which is transposed) and
  (2) the write comes after the reads: for a few new tokens attention reads the old cache plus
  the new keys (one softmax over both), and the write is made to depend on its result, so the
  cache is updated in place.
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
  path = select_implementation(implementation, q.shape, cache_bskh.shape, q.dtype,
                               has_mask_or_bias=mask is not None or bias is not None)
  groups = num_heads // kv_heads
  index = jnp.clip(jnp.asarray(index, jnp.int32), 0, cache_len - q_len)
  if path == "xla" and batch * num_heads * q_len * cache_len * 4 <= 4 * _BLOCK_BYTES:
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
  if path == "xla" and batch * num_heads * q_len * cache_len * 4 <= 4 * _BLOCK_BYTES:
    return out, k_BKHL, v_BKLH
  # Many new tokens (a prompt): attend to the written cache; one copy per call is cheap here.
  if path == "cudnn":
    out = _attend_cudnn(q, k_BKHL.transpose(0, 3, 1, 2), v_BKLH.transpose(0, 2, 1, 3), mask,
                        bias, scale)
  else:
    out = _attend_xla(q, k_BKHL, v_BKLH, mask, bias, scale, keys_transposed=True)
  return out, k_BKHL, v_BKLH


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


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """Splits an image into non-overlapping windows: `[B, H, W, C] -> [B * nW, window², C]`.

  Windows are ordered batch-major, then row-major over the `H/window x W/window` grid; tokens
  row-major inside a window (Swin's order). H and W must be multiples of `window`.
  """
  x = jnp.asarray(x)
  _check_positive_int("window", window)
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
    _check_positive_int(name, value)
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
  _check_positive_int("window", window)
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
  num_kv_heads = k.shape[3]
  area = window * window
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (num_heads, area, area) or not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be float [num_heads, window², window²] = "
                       f"{(num_heads, area, area)}, got {bias.dtype} {tuple(bias.shape)}")

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
  out = _attend(q_KGTH, to_windows(k), to_windows(v), mask, bias, 1.0 / math.sqrt(head_dim))
  out = out.reshape(batch, -1, num_heads, area, head_dim).transpose(0, 1, 3, 2, 4)
  out = jnp.take(out.reshape(batch, -1, num_heads, head_dim), scatter, axis=1, mode="clip",
                 unique_indices=True)
  return out.reshape(batch, height, width, num_heads, head_dim)
