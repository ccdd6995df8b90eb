"""Pallas attention kernels: `dot_product_attention(..., implementation="pallas")`.

Same contract as `seqlab.attention.reference_attention` (q `[B, T, N, H]`, k/v `[B, S, K, H]`,
boolean masks broadcastable to `[B, N, T, S]`, float32 softmax, a query row with no allowed key
outputs exactly 0 with finite gradients), on JAX's Pallas kernels:

* TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), also chosen by
  `implementation=None` there when the constraints below hold. K/V are never repeated: the
  multi-query kernel runs once per (example, kv head) over that head's G = N // K query heads
  (`jax.vmap` over examples and kv heads; K == N is G = 1, K == 1 is plain MQA).
* CPU: the same splash kernel in Pallas interpret mode (slow; for tests, never picked by None).
* NVIDIA GPU: the Triton kernel `jax.experimental.pallas.ops.gpu.attention.mha`, which knows only
  causal masking and segment ids; seqlab's cuDNN path (`implementation="cudnn"`) takes masks.

How a mask reaches splash:

* `is_causal` and no mask: splash's `CausalMask`, computed inside the kernel; blocks above the
  diagonal are skipped. No mask at all: `FullMask`.
* A mask that is the same for every example and head and known at trace time (a NumPy array or
  a concrete jax array of shape `[1, 1, T, S]`, e.g. `masks.local_window`): a static
  `NumpyMask` (ANDed with the causal mask), whose all-False blocks are skipped and whose mixed
  blocks are stored once.
* Any other mask (traced, or differing per example or per head, e.g. the prefix-LM or packed
  masks of `masks.decoder_mask`): a dynamic splash mask per (example, kv head), `[G|1, T, S]`,
  built inside the vmap. All-False blocks are still skipped at run time, but the whole mask is
  kept (`T * S` bytes per example and mask head).
* `segment_ids` (`pallas_attention` only; `dot_product_attention` passes dense masks): splash's
  own `SegmentIds`, O(T) instead of a dense mask; id 0 is padding and sees nothing, as in
  `masks.segments`.

Splash does not scale q (it is multiplied by `scale` here, in its own dtype), and a row with no
allowed key is not zeroed by it (it averages the values, or divides 0 by 0 where all of the
row's blocks are skipped). Such rows may attend key 0 in the mask handed to the kernel, so its
forward and backward passes stay finite, and their outputs are set to 0 afterwards; the zero
cotangent they then receive contributes exactly 0 to every gradient.

Shape constraints (`pallas_unsupported_reason` names the one that fails; implementation="pallas"
raises ValueError with it, implementation=None falls back to XLA):

* no additive `bias` (relative position biases, ALiBi): the kernels have no bias input;
* splash: T and S multiples of 128 (splash's key blocks fill the TPU's 128 lanes); the blocks
  are the largest of 512, 256, 128 dividing both lengths (`block_size` overrides it). head_dim
  may be any size (the kernel reads whole heads; multiples of 128 fill the lanes, 64 runs
  half-empty);
* Triton (GPU): no mask (is_causal and segment_ids are fine), K == N (the kernel has no
  grouped heads; use cuDNN for GQA), T == S (its fused backward pass), T a multiple of 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash

# Splash key blocks must be multiples of the TPU's 128 lanes; larger blocks mean fewer grid
# steps, so the largest that divides both lengths is used.
_LANES = 128
_SPLASH_BLOCKS = (512, 256, 128)
_GPU_BACKENDS = ("cuda", "gpu")


def pallas_unsupported_reason(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    *,
    has_mask: bool = False,
    has_bias: bool = False,
    backend: str,
) -> str | None:
  """Why the Pallas path cannot run this call on `backend`, or None when it can.

  `q_shape` [B,T,N,H], `k_shape` [B,S,K,H] (already validated); `backend` as the first element
  of `attention_kernels.current_backend()` ('tpu', 'cpu', 'cuda', 'gpu', ...). The constraints
  are the module docstring's.
  """
  q_len, num_heads = q_shape[1], q_shape[2]
  kv_len, num_kv_heads = k_shape[1], k_shape[2]
  if has_bias:
    return ("Pallas attention does not support an additive bias (relative position biases, "
            "ALiBi); use implementation='xla'")
  if backend in ("tpu", "cpu"):
    if q_len % _LANES or kv_len % _LANES:
      return (f"Pallas splash attention needs q and k/v lengths that are multiples of the "
              f"block size {_LANES}, got q length {q_len} and k/v length {kv_len}")
    return None
  if backend in _GPU_BACKENDS:
    if has_mask:
      return ("Pallas GPU (Triton) attention supports only is_causal and segment ids, not a "
              "mask; use implementation='cudnn'")
    if num_kv_heads != num_heads:
      return (f"Pallas GPU (Triton) attention needs num_kv_heads == num_heads, got "
              f"num_kv_heads={num_kv_heads} and num_heads={num_heads}; use "
              "implementation='cudnn'")
    if q_len != kv_len or q_len % _LANES:
      return (f"Pallas GPU (Triton) attention needs equal q and k/v lengths that are multiples "
              f"of the block size {_LANES}, got q length {q_len} and k/v length {kv_len}")
    return None
  return f"Pallas attention needs a TPU, an NVIDIA GPU or a CPU (interpreted), not {backend!r}"


def pallas_attention(q, k, v, *, scale: float, mask=None, bias=None, is_causal: bool = False,
                     segment_ids=None, block_size: int | None = None,
                     backend: str | None = None) -> jax.Array:
  """Attention on the Pallas kernel of `backend`: splash (TPU, interpreted on a CPU) or Triton.

  q `[B, T, N, H]`, k/v `[B, S, K, H]`, mask bool broadcastable to `[B, N, T, S]` (validated as
  by `dot_product_attention`), `scale` a float; is_causal needs T == S. `segment_ids` int
  `[B, T]` for packed self-attention (T == S): query and key must share an id, id 0 is padding
  and sees nothing (`masks.segments`). `block_size` (splash only) overrides the block size, a
  multiple of 128 dividing T and S. `backend` defaults to JAX's ('gpu' means the Triton
  kernel). Returns `[B, T, N, H]` in the dtype of q, equal to `reference_attention` with the
  mask ANDed with the causal and segment masks. Raises ValueError naming a failed constraint.
  """
  if backend is None:
    backend = jax.default_backend()
  reason = pallas_unsupported_reason(q.shape, k.shape, has_mask=mask is not None,
                                     has_bias=bias is not None, backend=backend)
  if reason is not None:
    raise ValueError(f"implementation='pallas' is not possible here: {reason}")
  batch, q_len = q.shape[:2]
  kv_len = k.shape[1]
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if q_len != kv_len or segment_ids.shape != (batch, q_len) or not jnp.issubdtype(
        segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be integer [B, T] = {(batch, q_len)} for "
                       f"self-attention (T == S), got {segment_ids.dtype} "
                       f"{tuple(segment_ids.shape)} with q length {q_len} and k/v length "
                       f"{kv_len}")
  if backend in _GPU_BACKENDS:
    return _attend_triton(q, k, v, scale, is_causal, segment_ids)
  if block_size is None:
    block_size = next(b for b in _SPLASH_BLOCKS if q_len % b == 0 and kv_len % b == 0)
  elif block_size % _LANES or q_len % block_size or kv_len % block_size:
    raise ValueError(f"block_size={block_size} must be a multiple of {_LANES} dividing q "
                     f"length {q_len} and k/v length {kv_len}")
  return _attend_splash(q, k, v, mask, scale, is_causal, segment_ids, block_size,
                        interpret=backend != "tpu")


# ----------------------------------------------------------------------------------------------
# Rows with no allowed key.
# ----------------------------------------------------------------------------------------------


def _row_valid(mask, is_causal: bool, segment_ids, q_len: int, kv_len: int):
  """`[B|1, N|1, T|1]` True where a query row may attend some key; None when every row may.

  mask `[B|1, N|1, T|1, S|1]` or None, segment_ids `[B, T]` or None (T == S). NumPy when
  everything is static.
  """
  if mask is None and segment_ids is None:
    return None  # no mask, or causal only: every query sees at least key 0 or itself
  if mask is None:
    # Self-attention with ids: a non-padding query always sees itself (same id, diagonal).
    return (segment_ids != 0)[:, None, :]
  xp = np if isinstance(mask, np.ndarray) and segment_ids is None else jnp
  allowed = mask
  if is_causal:
    allowed = xp.logical_and(allowed, np.tril(np.ones((q_len, kv_len), bool))[None, None])
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = jnp.logical_and(allowed, (same & (segment_ids != 0)[:, :, None])[:, None])
  row_valid = xp.any(allowed, axis=-1)
  if xp is np and row_valid.all():
    return None
  return row_valid


def _first_key(kv_len: int) -> np.ndarray:
  """`[1, 1, 1, S]` True on key 0 only: what a row with no allowed key may attend in the kernel.

  A row whose blocks are all skipped would leave splash dividing 0 by 0 (NaN in its output and
  residuals, which jax_debug_nans reports although the row is zeroed afterwards); one key keeps
  it finite at the cost of a single block, and its zero cotangent adds exactly 0 to every
  gradient.
  """
  return (np.arange(kv_len) == 0).reshape(1, 1, 1, kv_len)


def _zero_invalid_rows(out_BTNH, row_valid):
  """Sets the rows of `[B, T, N, H]` where `row_valid` `[B|1, N|1, T]` is False to 0."""
  if row_valid is None:
    return out_BTNH
  row_valid_BTN1 = jnp.asarray(row_valid).transpose(0, 2, 1)[..., None]
  return jnp.where(row_valid_BTN1, out_BTNH, jnp.zeros((), out_BTNH.dtype))


# ----------------------------------------------------------------------------------------------
# Splash attention (TPU; interpreted on a CPU).
# ----------------------------------------------------------------------------------------------


def _static_mask_TS(mask, is_causal: bool, q_len: int, kv_len: int):
  """The mask as a NumPy `[T, S]` when it is the same for all examples and heads and known at
  trace time (ANDed with the causal mask), else None."""
  if mask is None or mask.shape[:2] != (1, 1):
    return None
  try:
    mask_TS = np.broadcast_to(np.asarray(mask)[0, 0], (q_len, kv_len))
  except jax.errors.TracerArrayConversionError:
    return None
  if is_causal:
    mask_TS = mask_TS & np.tril(np.ones((q_len, kv_len), bool))
  return mask_TS


def _splash_kernel(mask_HTS, block_size: int, interpret: bool):
  """A multi-query splash kernel for a mask `[heads, T, S]`: a splash `Mask` (static) or a
  bool jax.Array (dynamic, possibly traced)."""
  kernel = splash.make_splash_mqa_single_device(
      mask_HTS, block_sizes=splash.BlockSizes(
          block_q=block_size, block_kv=block_size, block_kv_compute=block_size,
          block_q_dkv=block_size, block_kv_dkv=block_size, block_kv_dkv_compute=block_size,
          block_q_dq=block_size, block_kv_dq=block_size),
      interpret=interpret)
  # make_splash_* turns the is_dynamic_mask flag into an array, which is a tracer when the mask
  # info is built under jit or vmap, and the kernel then branches on it in Python; a Python bool
  # is what it means.
  dynamic = isinstance(mask_HTS, jax.Array)
  fix = lambda info: None if info is None else info._replace(is_dynamic_mask=dynamic)
  return splash.splash_attention_kernel.SplashAttentionKernel(
      fix(kernel.fwd_mask_info), fix(kernel.dq_mask_info), fix(kernel.dkv_mask_info),
      **kernel.kwargs)


def _attend_splash(q, k, v, mask, scale: float, is_causal: bool, segment_ids, block_size: int,
                   interpret: bool):
  """Splash attention, one multi-query kernel per (example, kv head); see the module doc."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  static_TS = _static_mask_TS(mask, is_causal, q_len, kv_len)
  if static_TS is not None:
    mask = static_TS[None, None]
  row_valid = _row_valid(mask, is_causal, segment_ids, q_len, kv_len)
  kernel, mask_BKGTS = None, None
  if mask is None:
    shape = (q_len, kv_len)
    kernel = _splash_kernel(splash.MultiHeadMask(
        [splash.CausalMask(shape) if is_causal else splash.FullMask(shape)] * groups),
        block_size, interpret)
  elif static_TS is not None:
    static_TS = static_TS | (~static_TS.any(axis=-1, keepdims=True) & _first_key(kv_len)[0, 0])
    kernel = _splash_kernel(splash.MultiHeadMask([splash.NumpyMask(static_TS)] * groups),
                            block_size, interpret)
  else:
    mask = jnp.asarray(mask)
    if is_causal:
      mask = jnp.logical_and(mask, np.tril(np.ones((q_len, kv_len), bool))[None, None])
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
    mask = jnp.logical_or(mask, ~jnp.any(mask, axis=-1, keepdims=True) & _first_key(kv_len))
    mask_BKGTS = (mask[:, :, None] if mask.shape[1] == 1 else
                  mask.reshape(mask.shape[0], num_kv_heads, groups, q_len, kv_len))

  # vmap maps a mask over examples (kv heads) only where it differs between them.
  def per_kv_head(q_GTH, k_SH, v_SH, mask_GTS, ids_T):
    run = kernel if mask_GTS is None else _splash_kernel(mask_GTS, block_size, interpret)
    ids = None if ids_T is None else splash.SegmentIds(q=ids_T, kv=ids_T)
    return run(q_GTH, k_SH, v_SH, segment_ids=ids)

  def per_example(q_KGTH, k_KSH, v_KSH, mask_KGTS, ids_T):
    axis = None if mask_KGTS is None or mask_KGTS.shape[0] == 1 else 0
    mask_KGTS = mask_KGTS[0] if mask_KGTS is not None and axis is None else mask_KGTS
    return jax.vmap(per_kv_head, in_axes=(0, 0, 0, axis, None))(q_KGTH, k_KSH, v_KSH,
                                                                mask_KGTS, ids_T)

  mask_axis = None if mask_BKGTS is None or mask_BKGTS.shape[0] == 1 else 0
  if mask_BKGTS is not None and mask_axis is None:
    mask_BKGTS = mask_BKGTS[0]
  ids_BT = None if segment_ids is None else segment_ids.astype(jnp.int32)
  q_BKGTH = (q * jnp.asarray(scale, q.dtype)).reshape(
      batch, q_len, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  out_BKGTH = jax.vmap(per_example, in_axes=(0, 0, 0, mask_axis, 0))(
      q_BKGTH, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask_BKGTS, ids_BT)
  out = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)
  return _zero_invalid_rows(out, row_valid)


# ----------------------------------------------------------------------------------------------
# Triton (NVIDIA GPU).
# ----------------------------------------------------------------------------------------------


def _attend_triton(q, k, v, scale: float, is_causal: bool, segment_ids,
                   interpret: bool = False):
  """The Pallas GPU kernel `mha`: causal and/or segment ids, K == N, T == S (checked before).

  Its segment mask lets padding (id 0) attend padding, so those rows stay finite; seqlab's
  id 0 sees nothing, so they are zeroed afterwards.
  """
  ids_BT = None if segment_ids is None else segment_ids.astype(jnp.int32)
  out = triton_attention.mha(q, k, v, ids_BT, sm_scale=float(scale), causal=is_causal,
                             interpret=interpret)
  row_valid = _row_valid(None, is_causal, segment_ids, q.shape[1], k.shape[1])
  return _zero_invalid_rows(out, row_valid)
