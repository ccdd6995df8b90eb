"""seqlab.attention_pallas against a NumPy float64 oracle (forward) and autodiff of
`attention.reference_attention` (gradients): splash attention in Pallas interpret mode on the
CPU, for every way a seqlab mask reaches it, and the Triton GPU kernel interpreted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqlab import attention, attention_pallas, masks

# ----------------------------------------------------------------------------------------------
# Oracle and checks.
# ----------------------------------------------------------------------------------------------


def np_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(H)) v in float64; query head n reads kv head n // (N // K); a row
  with no allowed key is 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, groups = k.shape[1], num_heads // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(head_dim)
  shape = (batch, num_heads, q_len, kv_len)
  mask = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), shape)
  logits = np.where(mask, logits, -np.inf)
  row_max = np.max(logits, axis=-1, keepdims=True)
  weights = np.where(mask, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0)), 0)
  total = weights.sum(axis=-1, keepdims=True)
  probs = np.divide(weights, total, out=np.zeros(shape), where=total > 0)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def random_qkv(batch, length, num_heads, num_kv_heads, head_dim, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda heads: rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
  return normal(num_heads), normal(num_kv_heads), normal(num_kv_heads)


def assert_matches(attend, q, k, v, full_mask, jit=True):
  """attend(q, k, v) equals the float64 oracle under `full_mask` [B|1, N|1, T, S], and its
  gradients w.r.t. q, k, v (for a random cotangent) equal autodiff of reference_attention."""
  cotangent = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)

  def value_and_grads(fn, q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)

  run = jax.jit(value_and_grads, static_argnums=0) if jit else value_and_grads
  out, grads = run(attend, q, k, v)
  reference = lambda q, k, v: attention.reference_attention(q, k, v, mask=full_mask)
  _, expected = jax.jit(value_and_grads, static_argnums=0)(reference, q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, np_attention(q, k, v, full_mask), atol=2e-5, rtol=0)
  for name, got, want in zip("qkv", grads, expected):
    assert np.all(np.isfinite(got)), f"d{name} is not finite"
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0, err_msg=f"d{name}")
  return out, grads


def pallas(mask=None, is_causal=False):
  """dot_product_attention(..., implementation='pallas') with the mask closed over."""
  return lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=mask, is_causal=is_causal, implementation="pallas")


# ----------------------------------------------------------------------------------------------
# Splash attention in interpret mode, one case per way a mask reaches the kernel.
# ----------------------------------------------------------------------------------------------


def test_causal_uses_blocks_below_the_diagonal():
  """is_causal alone (splash's CausalMask) over 2 x 2 blocks of 128, run eagerly: the block
  above the diagonal is skipped and the diagonal blocks are masked inside."""
  q, k, v = random_qkv(1, 256, 2, 2, 64)
  attend = lambda q, k, v: attention_pallas.pallas_attention(
      q, k, v, scale=0.125, is_causal=True, block_size=128, backend="cpu")
  assert_matches(attend, q, k, v, masks.causal(256), jit=False)


def test_prefix_lm_per_example_grouped_query():
  """GQA (4 query heads, 2 kv heads): the prefix-LM mask of `masks.decoder_mask` with a
  different prefix per example reaches splash as a traced (dynamic) per-example mask."""
  q, k, v = random_qkv(2, 128, 4, 2, 64)
  causal_attention = np.zeros((2, 128), np.int32)
  causal_attention[0, :37] = 1
  causal_attention[1, :100] = 1
  mask = masks.decoder_mask(decoder_causal_attention=causal_attention)
  attend = jax.jit(lambda q, k, v, mask: attention.grouped_query_attention(
      q, k, v, mask=mask, implementation="pallas"))
  assert_matches(lambda q, k, v: attend(q, k, v, mask), q, k, v, mask)


def test_packed_prefix_lm_multi_query_with_padding_is_zero():
  """MQA: a packed prefix-LM mask with padding, and one example that is padding throughout (all
  its blocks are skipped, so splash alone would divide 0 by 0): those rows are exactly 0, nothing
  in between is NaN, and every gradient is finite and equal to the reference's."""
  q, k, v = random_qkv(2, 128, 2, 1, 64)
  segment_ids = np.zeros((2, 128), np.int32)
  segment_ids[0, :50], segment_ids[0, 50:110] = 1, 2
  causal_attention = np.zeros((2, 128), np.int32)
  causal_attention[0, :20] = causal_attention[0, 50:60] = 1
  tokens = np.where(segment_ids > 0, 5, 0)
  mask = masks.decoder_mask(segment_ids, causal_attention, decoder_target_tokens=tokens)
  with jax.debug_nans(True):  # eagerly, so a NaN inside the kernel's output would be seen
    out, _ = assert_matches(pallas(mask), q, k, v, mask, jit=False)
  assert np.all(np.asarray(out)[0, 110:] == 0) and np.all(np.asarray(out)[1] == 0)
  assert np.all(np.asarray(out)[0, :110] != 0)


def test_segment_ids_equal_the_dense_packed_mask():
  """pallas_attention's segment_ids (splash's SegmentIds, GQA) with is_causal and a per-example
  token padding mask equal the dense mask of `masks.decoder_mask`; padding rows (id 0, or a
  padding token inside a segment) are 0."""
  q, k, v = random_qkv(2, 128, 4, 2, 64)
  segment_ids = np.ones((2, 128), np.int32)
  segment_ids[0, 40:], segment_ids[0, 100:] = 2, 0
  segment_ids[1, 64:] = 3
  tokens = np.where(segment_ids > 0, 5, 0)
  tokens[1, 64] = tokens[1, 30] = 0
  pad = masks.padding(tokens > 0, tokens > 0)
  attend = lambda q, k, v: attention_pallas.pallas_attention(
      q, k, v, scale=0.125, mask=pad, is_causal=True, segment_ids=segment_ids, backend="cpu")
  full_mask = masks.decoder_mask(segment_ids, decoder_target_tokens=tokens)
  out, _ = assert_matches(attend, q, k, v, full_mask)
  assert np.all(np.asarray(out)[0, 100:] == 0) and np.all(np.asarray(out)[1, [30, 64]] == 0)


def test_static_local_window_with_an_empty_row():
  """A NumPy mask shared by all examples (a causal local window, one query row emptied) is a
  static splash mask over 2 x 2 blocks: blocks outside the window are skipped, the empty row
  is 0."""
  q, k, v = random_qkv(1, 256, 2, 2, 128)
  window = np.array(masks.local_window(256, 256, (100, 0)))
  window[:, :, 7] = False
  attend = lambda q, k, v: attention_pallas.pallas_attention(
      q, k, v, scale=128 ** -0.5, mask=window, is_causal=True, block_size=128, backend="cpu")
  out, _ = assert_matches(attend, q, k, v, window)
  assert np.all(np.asarray(out)[:, 7] == 0)


def test_triton_kernel_interpreted():
  """The GPU path (Pallas Triton `mha`, interpreted): causal with segment ids, padding rows 0."""
  q, k, v = random_qkv(1, 128, 2, 2, 64)
  segment_ids = np.ones((1, 128), np.int32)
  segment_ids[0, 60:], segment_ids[0, 120:] = 2, 0
  attend = lambda q, k, v: attention_pallas._attend_triton(
      q, k, v, 0.125, True, jnp.asarray(segment_ids), interpret=True)
  out, _ = assert_matches(attend, q, k, v, masks.decoder_mask(segment_ids))
  assert np.all(np.asarray(out)[0, 120:] == 0)


# ----------------------------------------------------------------------------------------------
# Constraints and dispatch.
# ----------------------------------------------------------------------------------------------


def test_unsupported_inputs_raise_naming_the_constraint():
  q, k, v = random_qkv(1, 128, 2, 2, 64)
  bias = np.zeros((1, 2, 128, 128), np.float32)
  with pytest.raises(ValueError, match="bias"):
    attention.dot_product_attention(q, k, v, bias=bias, implementation="pallas")
  q, k, v = random_qkv(1, 100, 2, 2, 64)
  with pytest.raises(ValueError, match="multiples of the block size 128.*length 100"):
    attention.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
  q, k, v = random_qkv(1, 256, 2, 2, 64)
  with pytest.raises(ValueError, match="block_size=384"):
    attention_pallas.pallas_attention(q, k, v, scale=0.125, block_size=384, backend="cpu")
  with pytest.raises(ValueError, match="segment_ids must be integer"):
    attention_pallas.pallas_attention(q, k, v, scale=0.125, backend="cpu",
                                      segment_ids=np.ones((1, 128), np.int32))
  gpu = dict(backend=("cuda", (9, 0)))
  select = attention.select_implementation
  with pytest.raises(ValueError, match="not a mask"):
    select("pallas", q.shape, k.shape, jnp.bfloat16, has_mask=True, **gpu)
  with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
    select("pallas", q.shape, (1, 256, 1, 64), jnp.bfloat16, **gpu)
  assert select("pallas", q.shape, k.shape, jnp.bfloat16, **gpu) == "pallas"


def test_select_implementation_picks_pallas_on_tpu():
  """None picks splash on a TPU whenever its constraints hold, XLA otherwise; never on a CPU."""
  select = attention.select_implementation
  q_shape, k_shape = (2, 512, 8, 128), (2, 512, 2, 128)
  tpu = dict(backend=("tpu", None))
  assert select(None, q_shape, k_shape, jnp.bfloat16, has_mask=True, **tpu) == "pallas"
  assert select(None, q_shape, k_shape, jnp.float32, **tpu) == "pallas"
  assert select(None, q_shape, k_shape, jnp.bfloat16, has_mask=True, has_bias=True,
                **tpu) == "xla"
  assert select(None, (2, 200, 8, 128), (2, 200, 2, 128), jnp.bfloat16, **tpu) == "xla"
  assert select("xla", q_shape, k_shape, jnp.bfloat16, **tpu) == "xla"
  assert select(None, q_shape, k_shape, jnp.float32, backend=("cpu", None)) == "xla"
  assert select("pallas", q_shape, k_shape, jnp.float32, backend=("cpu", None)) == "pallas"
  # cuDNN still sees a mask passed as has_mask.
  assert select(None, (2, 511, 8, 128), (2, 511, 2, 128), jnp.bfloat16, has_mask=True,
                backend=("cuda", (9, 0))) == "xla"
  with pytest.raises(ValueError, match="must be None, 'xla', 'cudnn' or 'pallas'"):
    select("splash", q_shape, k_shape, jnp.float32)


def test_cache_attention_stays_on_xla():
  """A KV-cache update asked for 'pallas' runs (and equals) the XLA path."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(1, 1, 4, 64)).astype(np.float32)
  k_cache = rng.normal(size=(1, 2, 64, 128)).astype(np.float32)
  v_cache = rng.normal(size=(1, 2, 128, 64)).astype(np.float32)
  k, v = (rng.normal(size=(1, 1, 2, 64)).astype(np.float32) for _ in range(2))
  run = lambda implementation: attention.cache_attention(
      q, k_cache, v_cache, k, v, 5, implementation=implementation)
  for got, want in zip(run("pallas"), run("xla")):
    np.testing.assert_array_equal(got, want)
