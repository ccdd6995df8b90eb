"""seqlab.attention against NumPy float64 oracles, hand-built masks and jax.nn; every tuned path
of seqlab.attention_kernels against the reference path, `attention.reference_attention`."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from seqlab import attention, attention_kernels

import _helpers

# ----------------------------------------------------------------------------------------------
# Oracles (NumPy float64, loops over heads and rows; nothing shared with the implementation).
# ----------------------------------------------------------------------------------------------


def np_attention(q, k, v, mask=None, bias=None, scale=None):
  """softmax(q k^T * scale + bias) v per head; query head n reads kv head n // (N // K)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
  shape = (batch, num_heads, q_len, kv_len)
  mask = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), shape)
  bias = np.zeros(shape) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), shape)
  out = np.zeros(q.shape)
  for b in range(batch):
    for n in range(num_heads):
      keys, values = k[b, :, n // groups], v[b, :, n // groups]
      logits = np.where(mask[b, n], q[b, :, n] @ keys.T * scale + bias[b, n], -np.inf)
      rows = mask[b, n].any(axis=1)  # rows with no allowed key stay 0
      weights = np.exp(logits[rows] - logits[rows].max(axis=1, keepdims=True))
      out[b, rows, n] = weights / weights.sum(axis=1, keepdims=True) @ values
  return out


def rel_error(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  denominator = np.linalg.norm(ref)
  return np.linalg.norm(out - ref) / denominator if denominator else np.abs(out).max()


def random_qkv(rng, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype=np.float32):
  q = rng.normal(size=(batch, q_len, num_heads, head_dim)).astype(dtype)
  k = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(dtype)
  v = rng.normal(size=(batch, kv_len, num_kv_heads, head_dim)).astype(dtype)
  return q, k, v


def broadcast_case(seed, batch, q_len, kv_len, num_kv_heads, groups, head_dim, mask_dims,
                   bias_dims):
  """q, k, v and a mask and bias broadcast over the dims flagged True (None: absent)."""
  rng = np.random.default_rng(seed)
  num_heads = num_kv_heads * groups
  q, k, v = random_qkv(rng, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim)
  full = (batch, num_heads, q_len, kv_len)
  pick = lambda dims: tuple(size if keep else 1 for size, keep in zip(full, dims))
  mask = None if mask_dims is None else rng.random(pick(mask_dims)) < 0.6
  bias = None if bias_dims is None else rng.normal(size=pick(bias_dims)).astype(np.float32)
  return q, k, v, mask, bias


def blocks_of(block_bytes):
  """Context: dot_product_attention's XLA path uses blocks of `block_bytes` (None = default)."""
  if block_bytes is None:
    return mock.patch.object(attention_kernels, "_BLOCK_BYTES", attention_kernels._BLOCK_BYTES)
  return mock.patch.multiple(attention_kernels, _BLOCK_BYTES=block_bytes,
                             _WHOLE_LOGITS_BYTES=4 * block_bytes)


def causal_chunk_rows(rows):
  """Context: causal self-attention splits its queries into chunks of about `rows`."""
  return mock.patch.object(attention_kernels, "_CAUSAL_CHUNK_ROWS", rows)


def jitted(fn, q, k, v, **kwargs):
  """fn(q, k, v, **kwargs) under jit, with the array keyword arguments traced too."""
  names = sorted(kwargs)
  run = jax.jit(lambda q, k, v, *values: fn(q, k, v, **dict(zip(names, values))))
  return run(q, k, v, *(kwargs[name] for name in names))


LAYOUTS = [  # (function, num_heads, num_kv_heads)
    pytest.param(attention.multi_head_attention, 4, 4, id="MHA"),
    pytest.param(attention.multi_query_attention, 4, 1, id="MQA"),
    pytest.param(attention.grouped_query_attention, 6, 2, id="GQA"),
]

# ----------------------------------------------------------------------------------------------
# The reference path against the oracle; every tuned path against both.
# ----------------------------------------------------------------------------------------------


@settings(max_examples=16, deadline=None)
@given(batch=st.integers(1, 2), q_len=st.integers(1, 6), kv_len=st.integers(1, 6),
       num_kv_heads=st.integers(1, 3), groups=st.integers(1, 3), head_dim=st.integers(1, 8),
       mask_dims=st.none() | st.lists(st.booleans(), min_size=4, max_size=4),
       bias_dims=st.none() | st.lists(st.booleans(), min_size=4, max_size=4),
       scale=st.none() | st.floats(0.1, 2.0), seed=st.integers(0, 2**31 - 1))
def test_reference_matches_oracle(batch, q_len, kv_len, num_kv_heads, groups, head_dim,
                                  mask_dims, bias_dims, scale, seed):
  """`reference_attention` is the float64 oracle in float32, for any head grouping and any
  broadcast pattern of mask and bias (True = full size); rows with no allowed key are 0."""
  q, k, v, mask, bias = broadcast_case(seed, batch, q_len, kv_len, num_kv_heads, groups,
                                       head_dim, mask_dims, bias_dims)
  out = jitted(functools.partial(attention.reference_attention, scale=scale), q, k, v,
               mask=mask, bias=bias)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  assert rel_error(out, np_attention(q, k, v, mask, bias, scale)) < 1e-5
  if mask is not None:
    full = (batch, num_kv_heads * groups, q_len, kv_len)
    empty_rows = ~np.broadcast_to(mask, full).any(axis=-1)     # [B, N, T]
    assert np.all(np.asarray(out).transpose(0, 2, 1, 3)[empty_rows] == 0)


def test_reference_bfloat16_matches_oracle_with_finite_gradients():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(rng, 2, 5, 7, 6, 2, 16))
  mask = rng.random((2, 6, 5, 7)) < 0.6
  mask[:, :, 2] = False
  bias = rng.normal(size=(1, 6, 5, 7)).astype(np.float32)
  out = attention.reference_attention(q, k, v, mask=mask, bias=bias)
  assert out.dtype == jnp.bfloat16
  assert rel_error(out, np_attention(q, k, v, mask, bias)) < 1e-2
  assert np.all(np.asarray(out[:, 2], np.float32) == 0)
  loss = lambda q, k, v: jnp.sum(attention.reference_attention(
      q, k, v, mask=mask, bias=bias).astype(jnp.float32) ** 2)
  for grad in jax.grad(loss, argnums=(0, 1, 2))(q, k, v):
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


TUNED_PATHS = {  # name: (block bytes, causal chunk rows); None = the default / not causal
    "whole": (None, None),
    "blocked": (64, None),
    "causal-chunks": (None, 3),        # T = 10 in chunks of 3, 3 and 4 queries
    "causal-chunks-blocked": (64, 3),
}


@pytest.mark.parametrize("path", list(TUNED_PATHS))
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2), (4, 1)],
                         ids=["MHA", "GQA", "MQA"])
def test_tuned_paths_match_reference_and_oracle(path, num_heads, num_kv_heads):
  """The XLA paths of `attention_kernels.attend` (whole, the blocked loop with the block size
  forced down, causal chunks with and without blocks) equal `reference_attention` and the
  oracle, with GQA/MQA grouping, a padding mask, a bias and a query row with no allowed key."""
  block_bytes, chunk_rows = TUNED_PATHS[path]
  is_causal = chunk_rows is not None
  rng = np.random.default_rng([num_heads, num_kv_heads, len(path)])
  q, k, v = random_qkv(rng, 2, 10, 10, num_heads, num_kv_heads, 8)
  mask = rng.random((2, 1, 10, 10)) < 0.7
  mask[0, 0, 4] = False                                     # query 4 of example 0 sees nothing
  bias = rng.normal(size=(1, num_heads, 10, 10)).astype(np.float32)
  full_mask = mask & np.tril(np.ones((10, 10), bool)) if is_causal else mask
  fn = lambda q, k, v, m, b: attention.dot_product_attention(q, k, v, mask=m, bias=b,
                                                             is_causal=is_causal)
  with blocks_of(block_bytes), causal_chunk_rows(chunk_rows or 128):
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v, mask, bias))
    out = jax.jit(fn)(q, k, v, mask, bias)
    assert attention_kernels._causal_chunks(10) == (3 if is_causal else 1)
  assert (" scan[" in jaxpr) == (block_bytes is not None)  # the blocked loop ran, or did not
  reference = attention.reference_attention(q, k, v, mask=full_mask, bias=bias)
  assert rel_error(out, reference) < 1e-5
  assert rel_error(out, np_attention(q, k, v, full_mask, bias)) < 1e-5
  assert np.all(np.asarray(out[0, 4]) == 0)


# ----------------------------------------------------------------------------------------------
# dot_product_attention and the three layouts against the oracle.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("q_len, kv_len", [(5, 5), (3, 8)], ids=["self", "cross"])
@pytest.mark.parametrize("extras", ["plain", "mask+bias"])  # one at a time: property test
def test_float32_matches_oracle(fn, num_heads, num_kv_heads, q_len, kv_len, extras):
  rng = np.random.default_rng([num_heads, num_kv_heads, q_len, kv_len, len(extras)])
  q, k, v = random_qkv(rng, 2, q_len, kv_len, num_heads, num_kv_heads, 8)
  mask = rng.random((2, 1, q_len, kv_len)) < 0.6 if "mask" in extras else None
  bias = rng.normal(size=(1, num_heads, q_len, kv_len)).astype(np.float32) if "bias" in extras \
      else None
  out = jitted(fn, q, k, v, mask=mask, bias=bias)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  assert rel_error(out, np_attention(q, k, v, mask, bias)) < 1e-5


@pytest.mark.parametrize("fn, num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("q_len, kv_len, extras", [(6, 6, "plain"), (4, 9, "mask+bias")],
                         ids=["self-plain", "cross-mask+bias"])
def test_bfloat16_matches_oracle(fn, num_heads, num_kv_heads, q_len, kv_len, extras):
  rng = np.random.default_rng([7, num_heads, num_kv_heads, q_len, len(extras)])
  q, k, v = (jnp.asarray(x, jnp.bfloat16)
             for x in random_qkv(rng, 2, q_len, kv_len, num_heads, num_kv_heads, 16))
  mask = bias = None
  if extras == "mask+bias":
    mask = rng.random((2, num_heads, q_len, kv_len)) < 0.7
    bias = rng.normal(size=(2, 1, q_len, kv_len)).astype(np.float32)
  # mask and bias are compile-time constants here (the float32 test traces them).
  out = jax.jit(functools.partial(fn, mask=mask, bias=bias))(q, k, v)
  assert out.dtype == jnp.bfloat16
  # The oracle sees exactly the bf16-rounded inputs, so the error is the kernel's own.
  assert rel_error(out, np_attention(q, k, v, mask, bias)) < 1e-2


def test_scale_argument():
  rng = np.random.default_rng(3)
  q, k, v = random_qkv(rng, 1, 4, 6, 2, 2, 8)
  out = attention.dot_product_attention(q, k, v, scale=0.3)
  assert rel_error(out, np_attention(q, k, v, scale=0.3)) < 1e-5


@settings(max_examples=16, deadline=None)
@given(batch=st.integers(1, 2), q_len=st.integers(1, 6), kv_len=st.integers(1, 6),
       num_kv_heads=st.integers(1, 3), groups=st.integers(1, 3), head_dim=st.integers(1, 8),
       mask_dims=st.none() | st.lists(st.booleans(), min_size=4, max_size=4),
       bias_dims=st.none() | st.lists(st.booleans(), min_size=4, max_size=4),
       block_bytes=st.sampled_from([None, 16, 48, 96]), seed=st.integers(0, 2**31 - 1))
def test_property_matches_oracle(batch, q_len, kv_len, num_kv_heads, groups, head_dim,
                                 mask_dims, bias_dims, block_bytes, seed):
  """Any shapes, head layouts and broadcast patterns of mask and bias (True = full size), in
  one piece or in blocks (`block_bytes` shrinks the blocks so that tiny inputs use them)."""
  q, k, v, mask, bias = broadcast_case(seed, batch, q_len, kv_len, num_kv_heads, groups,
                                       head_dim, mask_dims, bias_dims)
  with blocks_of(block_bytes):
    out = jitted(attention.dot_product_attention, q, k, v, mask=mask, bias=bias)
  assert out.shape == q.shape
  assert rel_error(out, np_attention(q, k, v, mask, bias)) < 1e-5


def test_large_inputs_are_computed_in_blocks():
  """With the real block size (1 MB; 5 MB of logits, over a lowered whole-logits limit of 4 MB)
  T=300 queries run in chunks of 119 (the last one padded), mask and bias sliced per block."""
  rng = np.random.default_rng(14)
  q, k, v = random_qkv(rng, 1, 300, 1100, 4, 2, 8)
  mask = rng.random((1, 1, 300, 1100)) < 0.5
  mask[0, 0, 7] = False
  bias = rng.normal(size=(1, 4, 300, 1100)).astype(np.float32)
  fn = lambda q, k, v, m, b: attention.dot_product_attention(q, k, v, mask=m, bias=b)
  with mock.patch.object(attention_kernels, "_WHOLE_LOGITS_BYTES", 4 << 20):
    assert " scan[" in str(jax.make_jaxpr(fn)(q, k, v, mask, bias))  # the loop over blocks
    out = jax.jit(fn)(q, k, v, mask, bias)
  assert np.all(np.asarray(out[0, 7]) == 0)
  assert rel_error(out, np_attention(q, k, v, mask, bias)) < 1e-5


@pytest.mark.parametrize("block_bytes", [None, 60], ids=["whole", "blocks"])
def test_gradients_match_jax_nn(block_bytes):
  rng = np.random.default_rng(15)
  q, k, v = random_qkv(rng, 2, 7, 5, 4, 2, 8)
  mask = rng.random((2, 1, 7, 5)) < 0.6
  mask[..., 0] = True  # jax.nn averages fully masked rows instead of zeroing them.
  bias = rng.normal(size=(1, 4, 7, 5)).astype(np.float32)
  cotangent = rng.normal(size=q.shape).astype(np.float32)
  loss = lambda fn: lambda q, k, v, b: jnp.sum(fn(q, k, v, mask=mask, bias=b) * cotangent)
  with blocks_of(block_bytes):
    grads = jax.jit(jax.grad(loss(attention.dot_product_attention), argnums=(0, 1, 2, 3)))(
        q, k, v, bias)
  reference = jax.jit(jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2, 3)))(
      q, k, v, bias)
  for grad, expected in zip(grads, reference):
    assert rel_error(grad, expected) < 1e-5


def test_gqa_equals_repeated_mha_and_jax_nn():
  rng = np.random.default_rng(11)
  q, k, v = random_qkv(rng, 2, 7, 9, 8, 2, 16)
  mask = rng.random((2, 1, 7, 9)) < 0.6
  mask[..., 0] = True  # jax.nn averages fully masked rows instead of zeroing them.
  bias = rng.normal(size=(1, 8, 7, 9)).astype(np.float32)
  gqa = jitted(attention.grouped_query_attention, q, k, v, mask=mask, bias=bias)
  k_rep, v_rep = jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2)
  mha = jitted(attention.multi_head_attention, q, k_rep, v_rep, mask=mask, bias=bias)
  reference = jitted(jax.nn.dot_product_attention, q, k, v, mask=mask, bias=bias)
  np.testing.assert_allclose(gqa, mha, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gqa, reference, rtol=1e-5, atol=1e-5)


def test_mqa_equals_gqa_with_one_kv_head():
  rng = np.random.default_rng(12)
  q, k, v = random_qkv(rng, 2, 5, 6, 4, 1, 8)
  mask = rng.random((1, 4, 5, 6)) < 0.7
  mqa = jitted(attention.multi_query_attention, q, k, v, mask=mask)
  gqa = jitted(attention.grouped_query_attention, q, k, v, mask=mask)
  mha = jitted(attention.multi_head_attention, q, jnp.repeat(k, 4, axis=2),
               jnp.repeat(v, 4, axis=2), mask=mask)
  np.testing.assert_array_equal(mqa, gqa)
  np.testing.assert_allclose(mqa, mha, rtol=1e-6, atol=1e-6)


def test_jit_matches_eager():
  rng = np.random.default_rng(13)
  q, k, v = random_qkv(rng, 2, 4, 6, 4, 2, 8)
  mask = rng.random((2, 4, 4, 6)) < 0.5
  eager = attention.dot_product_attention(q, k, v, mask=mask)
  run = jax.jit(lambda q, k, v, m: attention.dot_product_attention(q, k, v, mask=m))
  np.testing.assert_allclose(run(q, k, v, mask), eager, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradients prove the masks.
# ----------------------------------------------------------------------------------------------


def dependency(mask, block_bytes=None):
  """[T, S] bool: does output row t have a nonzero gradient w.r.t. q[s], k[s], v[s]?"""
  q, k, v = random_qkv(np.random.default_rng(21), 1, *mask.shape, 4, 2, 8)
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask[None, None])[0]
  with blocks_of(block_bytes):
    jacobians = jax.jit(jax.jacrev(fn, argnums=(0, 1, 2)))(q, k, v)  # [T,N,H, 1,S,n,H] each
  reduce = lambda jac: np.abs(np.asarray(jac)).sum(axis=(1, 2, 3, 5, 6)) > 0
  return tuple(reduce(jac) for jac in jacobians)


@pytest.mark.parametrize("block_bytes", [None, 100], ids=["whole", "blocks"])
def test_causal_mask_gradients(block_bytes):
  size = 7
  causal = np.tril(np.ones((size, size), bool))  # causal[t, s] = s <= t
  assert causal[2].tolist() == [True, True, True, False, False, False, False]
  from_q, from_k, from_v = dependency(causal, block_bytes)
  # Output t depends on v at every s <= t and nowhere else; on k likewise, except that a row
  # with a single visible key has softmax weight 1 whatever that key is; on q at t only.
  np.testing.assert_array_equal(from_v, causal)
  several_keys = causal.sum(1, keepdims=True) > 1
  np.testing.assert_array_equal(from_k, causal & several_keys)
  np.testing.assert_array_equal(from_q, np.eye(size, dtype=bool) & several_keys)


def test_prefix_lm_mask_gradients():
  size, prefix = 7, 3
  rows, cols = np.arange(size)[:, None], np.arange(size)[None, :]
  prefix_lm = (cols <= rows) | ((rows < prefix) & (cols < prefix))
  from_q, from_k, from_v = dependency(prefix_lm)
  np.testing.assert_array_equal(from_k, prefix_lm)
  np.testing.assert_array_equal(from_v, prefix_lm)
  # Prefix position 0 receives gradient from the whole prefix (keys 1 and 2 lie after it) ...
  assert from_k[0, :prefix].all() and not from_k[0, prefix:].any()
  # ... while targets stay causal: position 4 sees keys 0..4, not 5 or 6.
  assert from_k[4, :5].all() and not from_k[4, 5:].any()
  np.testing.assert_array_equal(from_q, np.eye(size, dtype=bool))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fully_masked_rows_are_zero_with_finite_gradients(dtype):
  rng = np.random.default_rng(31)
  q, k, v = (jnp.asarray(x, dtype) for x in random_qkv(rng, 2, 4, 5, 4, 2, 8))
  mask = rng.random((2, 4, 4, 5)) < 0.7
  mask[:, :, 1] = False      # row 1 of every head and example
  mask[0, 3, 2] = False      # row 2 of head 3 of example 0 only
  bias = jnp.asarray(rng.normal(size=(1, 4, 4, 5)), jnp.float32)
  loss = lambda q, k, v, b: jnp.sum(attention.dot_product_attention(
      q, k, v, mask=mask, bias=b).astype(jnp.float32) ** 2)
  out = jitted(attention.dot_product_attention, q, k, v, mask=mask, bias=bias)
  assert np.all(np.asarray(out[:, 1], np.float32) == 0)
  assert np.all(np.asarray(out[0, 2, 3], np.float32) == 0)
  assert rel_error(out, np_attention(q, k, v, mask, bias)) < (1e-5 if dtype == jnp.float32
                                                               else 1e-2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for grad in grads:
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  assert np.all(np.asarray(grads[0][:, 1], np.float32) == 0)  # masked queries get no gradient


def jnp_attention(q, k, v, mask=None, bias=None, scale=None):
  """Plain jnp attention (repeated K/V, softmax, fully masked rows 0) for autodiff gradients."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
  return jnp.einsum("bnts,bsnh->btnh", weights, v)


GRADIENT_CASES = {
    # name: (N, K, mask shape or None, dynamic mask, bias shape or None, is_causal, blocks)
    "mha-static-mask-bias": (4, 4, (2, 1, 10, 10), False, (1, 4, 10, 10), False, None),
    "gqa-dynamic-mask": (6, 2, (2, 6, 10, 10), True, None, False, None),
    "mqa-key-padding-bias": (4, 1, (2, 1, 1, 10), True, (2, 1, 1, 10), False, None),
    "gqa-per-head-rows": (4, 2, (1, 4, 1, 10), False, (1, 4, 1, 10), False, None),
    "causal-chunks": (4, 2, None, False, None, True, None),
    "causal-chunks-padding-bias": (4, 2, (2, 1, 10, 10), True, (1, 4, 10, 10), True, None),
    "causal-chunks-blocks": (6, 2, (2, 1, 1, 10), True, None, True, 60),
    "gqa-blocks-bias": (6, 3, (2, 1, 10, 10), False, (1, 6, 10, 10), False, 60),
}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_gradients_match_autodiff_of_reference(case):
  """The written-out gradient (`_attend_trainable_bwd`) against autodiff of
  `reference_attention` and of the test's own `jnp_attention` (K/V repeated to N heads):
  GQA/MQA, static and traced masks of every broadcast pattern, fully masked rows, biases
  broadcast over batch or rows (their gradient summed back), causal chunks (T = 10 in chunks
  of 3, 3, 4) and blocks."""
  num_heads, num_kv_heads, mask_shape, dynamic, bias_shape, is_causal, blocks = (
      GRADIENT_CASES[case])
  rng = np.random.default_rng(sum(map(ord, case)))
  q, k, v = random_qkv(rng, 2, 10, 10, num_heads, num_kv_heads, 8)
  mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
  if mask is not None and mask_shape[2] > 1:
    mask[..., 3, :] = False  # a fully masked query row
  bias = None if bias_shape is None else rng.normal(size=bias_shape).astype(np.float32)
  cotangent = rng.normal(size=q.shape).astype(np.float32)
  causal = np.tril(np.ones((10, 10), bool))[None, None]
  reference_mask = causal if mask is None and is_causal else (
      mask & causal if is_causal else mask)

  def loss(fn, mask, **kwargs):
    return lambda q, k, v, b: jnp.sum(fn(q, k, v, mask=mask, bias=b, **kwargs) * cotangent)

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  with blocks_of(blocks), causal_chunk_rows(3):
    if dynamic:  # the mask is traced
      grads = jax.jit(lambda q, k, v, b, m: jax.grad(
          loss(attention.dot_product_attention, m, is_causal=is_causal), argnums)(q, k, v, b))(
              q, k, v, bias, mask)
    else:
      grads = jax.jit(jax.grad(loss(attention.dot_product_attention, mask, is_causal=is_causal),
                               argnums))(q, k, v, bias)
  for reference in (attention.reference_attention, jnp_attention):
    expected = jax.jit(jax.grad(loss(reference, reference_mask), argnums))(q, k, v, bias)
    for name, grad, want in zip("qkvb", grads, expected):
      assert np.asarray(grad).shape == np.asarray(want).shape, name
      assert rel_error(grad, want) < 2e-5, (reference.__name__, name)
  if mask is not None and mask_shape[2] > 1:
    assert np.all(np.asarray(grads[0])[:, 3] == 0)  # the masked row's queries get nothing


def test_is_causal_forward_matches_oracle_in_chunks():
  rng = np.random.default_rng(41)
  q, k, v = random_qkv(rng, 2, 11, 11, 4, 2, 8)
  mask = rng.random((2, 1, 1, 11)) < 0.8
  causal = np.tril(np.ones((11, 11), bool))[None, None]
  expected = np_attention(q, k, v, mask & causal)
  for rows in (128, 4, 1):  # one chunk; 11 queries in 2 chunks; in 8 chunks (the cap)
    with causal_chunk_rows(rows):
      out = jax.jit(lambda q, k, v, m: attention.dot_product_attention(
          q, k, v, mask=m, is_causal=True))(q, k, v, mask)
    assert rel_error(out, expected) < 1e-6, rows


def test_is_causal_needs_as_many_queries_as_keys():
  q, k, v = random_qkv(np.random.default_rng(0), 1, 4, 6, 2, 2, 8)
  with pytest.raises(ValueError, match="is_causal=True needs as many queries as keys.*4.*6"):
    attention.dot_product_attention(q, k, v, is_causal=True)


# ----------------------------------------------------------------------------------------------
# cuDNN routing (no GPU needed: the checker takes the backend as data).
# ----------------------------------------------------------------------------------------------

HOPPER, AMPERE, CPU = ("cuda", (9, 0)), ("cuda", (8, 0)), ("cpu", None)


def route(implementation, head_dim=64, dtype=jnp.bfloat16, backend=HOPPER, q_len=16,
          has_mask_or_bias=False):
  return attention.select_implementation(
      implementation, (2, q_len, 8, head_dim), (2, 32, 2, head_dim), dtype,
      has_mask_or_bias=has_mask_or_bias, backend=backend)


def test_default_route_picks_cudnn_only_where_valid():
  assert route(None) == "cudnn"
  assert route(None, dtype=jnp.float16, backend=AMPERE) == "cudnn"
  assert route(None, backend=CPU) == "xla"
  assert route(None, dtype=jnp.float32) == "xla"
  assert route(None, head_dim=160, backend=AMPERE) == "xla"
  assert route(None, head_dim=160, backend=HOPPER) == "cudnn"
  assert route(None, q_len=7, has_mask_or_bias=True) == "xla"
  assert route(None, q_len=7) == "cudnn"
  assert route("xla") == "xla"
  assert attention.select_implementation(None, (1, 4, 2, 8), (1, 4, 2, 8), jnp.float32) == "xla"


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend=CPU), "NVIDIA GPU"),
    (dict(backend=("gpu", None)), "NVIDIA GPU"),
    (dict(dtype=jnp.float32), "bfloat16 or float16.*float32"),
    (dict(head_dim=12), "multiple of 8.*head_dim=12"),
    (dict(head_dim=136, backend=AMPERE), "<= 128.*head_dim=136"),
    (dict(head_dim=264), "<= 256.*head_dim=264"),
    (dict(q_len=7, has_mask_or_bias=True), "even lengths.*7"),
])
def test_forced_cudnn_names_the_failed_constraint(kwargs, message):
  with pytest.raises(ValueError, match="implementation='cudnn'.*" + message):
    route("cudnn", **kwargs)


def test_forced_cudnn_on_this_machine_and_unknown_implementation():
  rng = np.random.default_rng(41)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(rng, 1, 4, 4, 2, 2, 8))
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="cudnn.*NVIDIA GPU.*'cpu'"):
      attention.dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="implementation='flash'"):
    attention.dot_product_attention(q, k, v, implementation="flash")


def test_cudnn_route_keeps_seqlab_semantics(monkeypatch):
  """On a (pretend) Hopper GPU the call goes to jax.nn's cuDNN path with full-size masks and
  bf16 biases, and rows with no allowed key still come back as exactly 0."""
  calls = []
  original = jax.nn.dot_product_attention

  def fake_cudnn(q, k, v, *, bias=None, mask=None, scale=None, implementation=None):
    calls.append(dict(implementation=implementation, mask_shape=mask.shape,
                      bias_dtype=bias.dtype))
    return original(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")

  monkeypatch.setattr(attention_kernels, "current_backend", lambda: HOPPER)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  rng = np.random.default_rng(42)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(rng, 2, 4, 6, 4, 2, 8))
  key_valid = np.array([[True] * 4 + [False] * 2, [False] * 6])  # example 1: no valid key
  mask = key_valid[:, None, None, :]                                # [B, 1, 1, S] padding mask
  bias = rng.normal(size=(1, 4, 4, 6)).astype(np.float32)
  out = jitted(attention.dot_product_attention, q, k, v, mask=mask, bias=bias)
  assert calls == [dict(implementation="cudnn", mask_shape=(2, 1, 4, 6),
                        bias_dtype=jnp.bfloat16)]
  assert np.all(np.asarray(out[1], np.float32) == 0)
  bias_bf16 = np.asarray(bias, jnp.bfloat16)
  assert rel_error(out, np_attention(q, k, v, mask, bias_bf16)) < 1e-2
  reference = attention.reference_attention(q, k, v, mask=mask, bias=jnp.asarray(bias_bf16))
  assert rel_error(out, reference) < 1e-2


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------

Q = np.zeros((2, 5, 4, 8), np.float32)
KV = np.zeros((2, 7, 2, 8), np.float32)


@pytest.mark.parametrize("fn, args, kwargs, message", [
    (attention.dot_product_attention, (Q, KV[..., :4], KV[..., :4]), {},
     r"head_dim of q \(8\) differs from head_dim of k and v \(4\)"),
    (attention.dot_product_attention, (Q[:, :, :3], KV, KV), {},
     "num_heads=3 .*not a multiple of num_kv_heads=2"),
    (attention.dot_product_attention, (Q[:1], KV, KV), {}, r"batch size of q \(1\).*\(2\)"),
    (attention.dot_product_attention, (Q, KV, KV[:, :6]), {}, "k and v must have the same shape"),
    (attention.dot_product_attention, (Q[0], KV, KV), {}, "q must have rank 4"),
    (attention.dot_product_attention, (Q, KV, KV), dict(mask=np.ones((5, 7), bool)),
     r"mask must have rank 4 .*got shape \(5, 7\)"),
    (attention.dot_product_attention, (Q, KV, KV), dict(mask=np.ones((1, 1, 5, 7), np.float32)),
     "mask must be boolean.*float32"),
    (attention.dot_product_attention, (Q, KV, KV), dict(mask=np.ones((1, 1, 6, 7), bool)),
     r"mask of shape \(1, 1, 6, 7\) does not broadcast to .*\(2, 4, 5, 7\)"),
    (attention.dot_product_attention, (Q, KV, KV), dict(bias=np.ones((4, 5, 7), np.float32)),
     r"bias must have rank 4 .*got shape \(4, 5, 7\)"),
    (attention.dot_product_attention, (Q, KV, KV), dict(bias=np.ones((1, 3, 5, 7), np.float32)),
     r"bias of shape \(1, 3, 5, 7\) does not broadcast"),
    (attention.dot_product_attention, (Q, KV, KV), dict(bias=np.ones((1, 1, 5, 7), np.int32)),
     "bias must be floating point.*int32"),
    (attention.multi_head_attention, (Q, KV, KV), {},
     "num_kv_heads == num_heads.*num_kv_heads=2.*num_heads=4"),
    (attention.multi_query_attention, (Q, KV, KV), {}, "num_kv_heads == 1.*num_kv_heads=2"),
    (attention.grouped_query_attention, (Q[:, :, :3], KV, KV), {},
     "num_heads % num_kv_heads == 0.*num_heads=3.*num_kv_heads=2"),
])
def test_bad_input_raises_naming_the_argument(fn, args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    fn(*args, **kwargs)


@pytest.mark.parametrize("block_bytes", [None, 64])  # reads old cache + new keys / blocked path
@pytest.mark.parametrize("index", [3, 6])             # 6: clamped to L - T = 5, as the write is
def test_cache_attention_equals_writing_then_attending(block_bytes, index):
  rng = np.random.default_rng(11)
  batch, q_len, cache_len, num_heads, num_kv_heads, head_dim = 2, 2, 7, 4, 2, 8
  q, k_new, v_new = random_qkv(rng, batch, q_len, q_len, num_heads, num_kv_heads, head_dim)
  k_old = rng.normal(size=(batch, cache_len, num_kv_heads, head_dim)).astype(np.float32)
  v_old = rng.normal(size=(batch, cache_len, num_kv_heads, head_dim)).astype(np.float32)
  mask = rng.random((batch, 1, q_len, cache_len)) < 0.6
  mask[0, 0, 1] = False  # a row with no allowed key
  mask[1, 0, :, min(index, cache_len - q_len)] = True  # a new slot is attended to
  bias = rng.normal(size=(1, num_heads, q_len, cache_len)).astype(np.float32)
  start = min(index, cache_len - q_len)
  k_ref, v_ref = k_old.copy(), v_old.copy()
  k_ref[:, start:start + q_len], v_ref[:, start:start + q_len] = k_new, v_new
  expected = np_attention(q, k_ref, v_ref, mask, bias)
  with blocks_of(block_bytes):
    out, k_cache, v_cache = jax.jit(functools.partial(attention.cache_attention, index=index))(
        q, k_old.transpose(0, 2, 3, 1), v_old.transpose(0, 2, 1, 3), k_new, v_new,
        mask=mask, bias=bias)
  assert rel_error(out, expected) < 1e-5
  assert rel_error(out, attention.reference_attention(q, k_ref, v_ref, mask=mask, bias=bias)) < 1e-5
  np.testing.assert_array_equal(out[0, 1], 0.0)
  np.testing.assert_array_equal(k_cache, k_ref.transpose(0, 2, 3, 1))  # [B, K, H, L]
  np.testing.assert_array_equal(v_cache, v_ref.transpose(0, 2, 1, 3))  # [B, K, L, H]


@pytest.mark.parametrize("block_bytes", [None, 64])  # 64: the prompt is written, then blocked
@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["GQA", "MQA"])
def test_cache_decoding_equals_reference_on_the_full_sequence(block_bytes, num_kv_heads):
  """A 2-token prompt, then 4 tokens one at a time, through `cache_attention` (the update path
  `_attend_cache_update` for single tokens) equal causal `reference_attention` over all 6."""
  rng = np.random.default_rng(num_kv_heads)
  batch, length, num_heads, head_dim = 2, 6, 4, 8
  q, k, v = random_qkv(rng, batch, length, length, num_heads, num_kv_heads, head_dim)
  key_valid = np.ones((batch, length), bool)
  key_valid[1, 0] = False                                   # a padded first token
  mask = key_valid[:, None, None, :] & np.tril(np.ones((length, length), bool))
  k_cache = np.zeros((batch, num_kv_heads, head_dim, length), np.float32)
  v_cache = np.zeros((batch, num_kv_heads, length, head_dim), np.float32)
  step = jax.jit(attention.cache_attention)
  outs = []
  with blocks_of(block_bytes):
    for start, end in [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]:
      out, k_cache, v_cache = step(q[:, start:end], k_cache, v_cache, k[:, start:end],
                                   v[:, start:end], start, mask=mask[:, :, start:end])
      outs.append(out)
  out = jnp.concatenate(outs, axis=1)
  assert rel_error(out, attention.reference_attention(q, k, v, mask=mask)) < 1e-5
  assert rel_error(out, np_attention(q, k, v, mask)) < 1e-5
  np.testing.assert_array_equal(out[1, 0], 0.0)            # the padded token sees no key


# ----------------------------------------------------------------------------------------------
# Swin window attention.
# ----------------------------------------------------------------------------------------------


def test_window_partition_order_and_round_trip():
  rng = np.random.default_rng(51)
  for batch, height, width, window in [(2, 6, 9, 3), (1, 8, 8, 4), (3, 4, 12, 2)]:
    x = rng.normal(size=(batch, height, width, 5)).astype(np.float32)
    windows = attention.window_partition(x, window)
    expected = [x[b, i:i + window, j:j + window].reshape(-1, 5)
                for b in range(batch)
                for i in range(0, height, window)
                for j in range(0, width, window)]
    np.testing.assert_array_equal(windows, np.stack(expected))
    np.testing.assert_array_equal(attention.window_reverse(windows, window, height, width), x)


def window_oracle(q, k, v, window, shift, bias):
  """Global float64 attention over the padded, rolled image with a hand-built window mask.

  Token i may see token j iff both lie in the same window of the rolled image, are on the same
  side of the cyclic wrap-around along each axis (rolled position p came from padded position
  (p + shift) % size, which wrapped iff p >= size - shift), and j is not padding.
  """
  batch, height, width, num_heads, head_dim = q.shape
  height_pad, width_pad = -(-height // window) * window, -(-width // window) * window
  pad = ((0, 0), (0, height_pad - height), (0, width_pad - width), (0, 0), (0, 0))
  rolled = [np.roll(np.pad(np.asarray(x, np.float64), pad), (-shift, -shift), axis=(1, 2))
            for x in (q, k, v)]
  rows, cols = np.meshgrid(np.arange(height_pad), np.arange(width_pad), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  window_id = rows // window * (width_pad // window) + cols // window
  wrapped = (rows >= height_pad - shift) * 2 + (cols >= width_pad - shift)
  is_real = ((rows + shift) % height_pad < height) & ((cols + shift) % width_pad < width)
  mask = ((window_id[:, None] == window_id[None, :]) & (wrapped[:, None] == wrapped[None, :])
          & is_real[None, :])
  full_bias = np.zeros((num_heads, rows.size, rows.size))
  if bias is not None:
    within = (rows % window * window + cols % window)  # position inside its window
    full_bias = np.asarray(bias, np.float64)[:, within[:, None], within[None, :]]
  flat = [x.reshape(batch, -1, x.shape[3], head_dim) for x in rolled]
  out = np_attention(*flat, mask[None, None], full_bias[None])
  out = out.reshape(batch, height_pad, width_pad, num_heads, head_dim)
  return np.roll(out, (shift, shift), axis=(1, 2))[:, :height, :width]


def block_diagonal_oracle(q, k, v, window):
  """Shift 0: global attention where token (r, c) sees the tokens of window (r//w, c//w)."""
  batch, height, width, num_heads, head_dim = q.shape
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  window_id = (rows // window * 1000 + cols // window).reshape(-1)
  mask = window_id[:, None] == window_id[None, :]
  flat = [np.asarray(x).reshape(batch, height * width, x.shape[3], head_dim) for x in (q, k, v)]
  return np_attention(*flat, mask[None, None]).reshape(q.shape)


@pytest.mark.parametrize("height, width, window, num_kv_heads", [
    (6, 9, 3, 4), (8, 8, 4, 2), (5, 7, 3, 4)], ids=["6x9", "8x8-gqa", "5x7-padded"])
def test_window_attention_without_shift_is_block_diagonal_global_attention(
    height, width, window, num_kv_heads):
  rng = np.random.default_rng([height, width])
  q = rng.normal(size=(2, height, width, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, height, width, num_kv_heads, 8)).astype(np.float32)
          for _ in range(2))
  out = jax.jit(functools.partial(attention.window_attention, window=window))(q, k, v)
  assert out.shape == q.shape
  assert rel_error(out, block_diagonal_oracle(q, k, v, window)) < 1e-5


@pytest.mark.parametrize("height, width, window, shift", [
    (8, 8, 4, 2), (6, 9, 3, 1), (9, 6, 3, 2), (5, 7, 3, 1), (10, 4, 7, 3)],
    ids=["8x8", "6x9", "9x6", "5x7-padded", "10x4-padded"])
def test_shifted_window_attention_is_masked_attention_on_rolled_image(
    height, width, window, shift):
  rng = np.random.default_rng([height, width, shift])
  q, k, v = (rng.normal(size=(2, height, width, 3, 8)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(3, window**2, window**2)).astype(np.float32)
  out = jax.jit(functools.partial(attention.window_attention, window=window, shift=shift))(
      q, k, v, bias=bias)
  assert rel_error(out, window_oracle(q, k, v, window, shift, bias)) < 1e-5


def test_window_attention_with_padding_has_finite_gradients():
  rng = np.random.default_rng(61)
  q, k, v = (rng.normal(size=(1, 10, 4, 2, 8)).astype(np.float32) for _ in range(3))
  loss = lambda q, k, v: jnp.sum(attention.window_attention(q, k, v, window=7, shift=3) ** 2)
  for grad in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_shifted_window_attention_gradients_match_autodiff():
  """Swin's layout (6-D, a static shift-and-padding mask, a [N, a, a] bias): the written-out
  gradient equals JAX autodiff of the plain forward (`_attend_inference`)."""
  rng = np.random.default_rng(62)
  q, k, v = (rng.normal(size=(2, 9, 7, 3, 8)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(3, 9, 9)).astype(np.float32)
  cotangent = rng.normal(size=q.shape).astype(np.float32)
  loss = lambda q, k, v, b: jnp.sum(
      attention.window_attention(q, k, v, window=3, shift=1, bias=b) * cotangent)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

  def autodiff_attend(q, k, v, mask, bias, scale, keys_transposed=False):
    row_valid = attention_kernels._row_valid(mask)
    return attention_kernels._attend_inference(q, k, v, mask, bias, row_valid, scale,
                                               keys_transposed).astype(q.dtype)

  with mock.patch.object(attention_kernels, "attend_head_major", autodiff_attend):
    expected = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for name, grad, want in zip("qkvb", grads, expected):
    assert rel_error(grad, want) < 1e-5, name
    assert np.any(np.asarray(grad) != 0), name


X = np.zeros((1, 6, 6, 2, 4), np.float32)


@pytest.mark.parametrize("fn, message", [
    (lambda: attention.window_partition(np.zeros((1, 5, 6, 3)), 3),
     "height=5 and width=6 must be multiples of window=3"),
    (lambda: attention.window_partition(np.zeros((5, 6, 3)), 3), "x must have rank 4"),
    (lambda: attention.window_reverse(np.zeros((3, 9, 2)), 3, 6, 6),
     r"windows must be \[B \* 4, 9, C\].*\(3, 9, 2\)"),
    (lambda: attention.window_attention(X, X, X, window=0), "window=0 must be an integer >= 1"),
    (lambda: attention.window_attention(X, X, X, window=3, shift=3),
     "shift=3 must satisfy 0 <= shift < window=3"),
    (lambda: attention.window_attention(X, X, X, window=3, shift=-1), "shift=-1"),
    (lambda: attention.window_attention(X, X, X, window=3, bias=np.zeros((2, 9, 8))),
     r"bias must be float \[num_heads, window², window²\] = \(2, 9, 9\)"),
    (lambda: attention.window_attention(X[0], X, X, window=3), "q must have rank 5"),
    (lambda: attention.window_attention(X, X[:, :4], X[:, :4], window=3),
     "q and k must cover the same"),
    (lambda: attention.window_attention(X, X[..., :3], X[..., :3], window=3),
     "head_dim of q"),
])
def test_window_bad_input_raises_naming_the_argument(fn, message):
  with pytest.raises(ValueError, match=message):
    fn()


def test_training_benchmark_variants_compute_the_same_gradients():
  """experiments/benchmarks/attention_training.py times equal work: every seqlab path (chunks,
  no chunks, blocks, autodiff) gives jax.nn's gradients."""
  bench = _helpers.load_script("experiments/benchmarks/attention_training.py",
                               "bench_attention_training")
  # 5 causal chunks of 8 queries; blocks of 3 queries
  with mock.patch.multiple(attention_kernels, _CAUSAL_CHUNK_ROWS=8, _BLOCK_BYTES=4 * 40 * 3):
    fns = bench.jax_variants(*bench.make_inputs(2, 40, 2, 8))
  expected = fns.pop("jax.nn")()
  for name, fn in fns.items():
    for grad, want in zip(fn(), expected):
      assert rel_error(grad, want) < 1e-5, name
