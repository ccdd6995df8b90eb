"""`scan_layers` and `remat`: every Transformer family computes the same numbers either way.

The unrolled model is the reference (it matches Hugging Face, tests/test_convert_*.py): a
scanned model given the same parameters stacked (`seqlab.layers.stack_params`) must give the
same outputs and gradients within float32 rounding, decode the same tokens with a KV cache,
and count the same parameters and FLOPs; remat must not change a gradient.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqlab import decoding, flops, layers, models
from seqlab.models import mae, transformer, vit

RNG = np.random.RandomState(0)


def _text_batch(kind):
  tokens = lambda b, t: jnp.asarray(RNG.randint(1, 500, (b, t)), jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
  if kind == "decoder":
    return {"decoder_input_tokens": tokens(2, 12)}
  if kind == "prefix":
    return {"decoder_input_tokens": tokens(2, 12),
            "decoder_causal_attention": jnp.asarray([[1] * 5 + [0] * 7, [1] * 3 + [0] * 9])}
  if kind == "encoder":
    return {"encoder_input_tokens": tokens(2, 10)}
  return {"encoder_input_tokens": tokens(2, 10), "decoder_input_tokens": tokens(2, 7),
          "decoder_target_tokens": tokens(2, 7)}


def _image_batch(config):
  batch = config.dummy_batch(2)
  batch["image"] = jnp.asarray(RNG.randn(*batch["image"].shape), jnp.float32)
  return batch


CASES = {
    # GQA and rotary positions: the heaviest decoder block.
    "decoder": (dataclasses.replace(transformer.PRESETS["gpt-tiny"], num_layers=3,
                                    num_kv_heads=2, position_embedding="rope"), "decoder"),
    "prefix_decoder": (dataclasses.replace(transformer.PRESETS["gpt-tiny"], attention="prefix"),
                       "prefix"),
    "bert": (dataclasses.replace(transformer.PRESETS["bert-tiny"], dropout_rate=0.0,
                                 pretraining_heads=True), "encoder"),
    "encoder_decoder": (dataclasses.replace(transformer.PRESETS["t5-tiny"], dropout_rate=0.0,
                                            num_decoder_layers=3), "encoder_decoder"),
    # Drop path rises over the layers: a scanned stack gets the rates as an array.
    "vit": (dataclasses.replace(vit.PRESETS["vit-tiny-digits"], num_layers=3,
                                drop_path_rate=0.2), "image"),
    "mae": (mae.PRESETS["mae-tiny"], "image"),
}


def _setup(name):
  config, kind = CASES[name]
  batch = _image_batch(config) if kind == "image" else _text_batch(kind)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1),
          "masking": jax.random.key(2)}
  params = config.build().init(rngs, batch)["params"]
  return config, batch, params


def _output(config, params, batch):
  out = config.build().apply({"params": params}, batch,
                             rngs={"masking": jax.random.key(2)})
  if isinstance(out, dict):  # BERT: hidden and heads; MAE: loss and reconstruction
    return {k: v for k, v in out.items() if jnp.issubdtype(v.dtype, jnp.floating)}
  return out


def _loss(config, batch):
  def loss(params):
    out = _output(config, params, batch)
    leaves = jax.tree.leaves(out)
    # A weighted sum, so every output position's gradient differs.
    return sum(jnp.sum(x * jnp.cos(jnp.arange(x.size).reshape(x.shape))) for x in leaves)
  return loss


def _close(a, b, rtol=2e-5):
  """Leaves equal within float32 rounding relative to each leaf's scale (at least a
  thousandth of the largest leaf's: a leaf whose values are all near zero is rounding noise
  of the others)."""
  pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  largest = max(np.abs(y).max() for _, y in pairs)
  for x, y in pairs:
    assert x.shape == y.shape
    scale = max(np.abs(y).max(), 1e-3 * largest)
    np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale)


# Gradients for the families whose stacks differ (self-attention blocks with GQA and RoPE,
# cross-attention, per-layer drop-path rates); outputs for all.
# (BERT's and MAE's scanned stacks are held to Hugging Face in tests/test_convert_*.py.)
@pytest.mark.parametrize("name, check_gradients", [
    ("decoder", True), ("prefix_decoder", False), ("encoder_decoder", True), ("vit", True)])
def test_scanned_outputs_and_gradients_equal_unrolled(name, check_gradients):
  config, batch, params = _setup(name)
  scanned = dataclasses.replace(config, scan_layers=True)
  stacked = layers.stack_params(params, config.STACKS)
  # The layout: one entry per stack, a leading axis of the stack's depth.
  for stack in config.STACKS:
    assert not any(k.startswith(f"{stack}_") for k in stacked)
  depth = getattr(config, "num_layers", None) or config.num_encoder_layers
  assert jax.tree.leaves(stacked[config.STACKS[0]])[0].shape[0] == depth
  assert jax.tree.structure(stacked) == jax.tree.structure(
      models.param_shapes(scanned))
  assert models.num_params(scanned) == models.num_params(config)
  _close(_output(scanned, stacked, batch), _output(config, params, batch))
  if check_gradients:
    want = layers.stack_params(jax.jit(jax.grad(_loss(config, batch)))(params), config.STACKS)
    _close(jax.jit(jax.grad(_loss(scanned, batch)))(stacked), want)


@pytest.mark.parametrize("remat, scan_layers", [("full", True), ("dots", False)])
def test_remat_keeps_gradients(remat, scan_layers):
  config, batch, params = _setup("decoder")
  stacked = layers.stack_params(params, config.STACKS) if scan_layers else params
  grad = lambda cfg: jax.jit(jax.grad(_loss(cfg, batch)))(stacked)  # pylint: disable=unnecessary-lambda-assignment
  want = grad(dataclasses.replace(config, scan_layers=scan_layers))
  _close(grad(dataclasses.replace(config, scan_layers=scan_layers, remat=remat)), want,
         rtol=1e-6)


def test_remat_recomputes_in_the_backward_pass():
  # "full" keeps no matmul output for the backward pass: the gradient's program recomputes
  # every block's matmuls, so it has more dot products than without remat.
  config, batch, params = _setup("decoder")

  def dots(remat):
    cfg = dataclasses.replace(config, remat=remat)
    text = jax.jit(jax.grad(_loss(cfg, batch))).lower(params).as_text()
    return text.count("dot_general")
  assert dots("full") > dots("none")


@pytest.mark.parametrize("name, strategy", [("decoder", "beam"), ("encoder_decoder", "greedy")])
def test_scanned_kv_cache_decodes_the_same_tokens(name, strategy):
  config, batch, params = _setup(name)
  scanned = dataclasses.replace(config, scan_layers=True)
  stacked = layers.stack_params(params, config.STACKS)
  prompt = (np.asarray(batch["encoder_input_tokens"]) if name == "encoder_decoder"
            else np.asarray([[5, 6, 7, 8], [9, 10, 11, 12]]))
  options = dict(max_new_tokens=6, strategy=strategy)
  if strategy == "beam":
    options["num_beams"] = 3
  want = decoding.generate(config.build(), {"params": params}, prompt, **options)
  got = decoding.generate(scanned.build(), {"params": stacked}, prompt, **options)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
  # The cache keeps the batch first (decoding reorders rows along axis 0), layers second.
  model = scanned.build()
  if name == "encoder_decoder":
    encoded = jnp.zeros((2, 10, config.d_model))
    cache = model.apply({"params": stacked}, 2, 16, encoded, jnp.ones((2, 10), bool),
                        method="init_cache")
    assert cache["layers"]["cross_k"].shape[:2] == (2, config.num_decoder_layers)
  else:
    cache = model.apply({"params": stacked}, 2, 16, method="init_cache")
    assert cache["layers"]["k"].shape == (2, config.num_layers, config.num_kv_heads,
                                          config.head_dim, 16)


def test_stack_and_unstack_params_are_inverse_and_check_the_layers():
  config, _, params = _setup("encoder_decoder")
  stacked = layers.stack_params(params, config.STACKS)
  a = stacked["decoder_blocks"]["mlp"]["wo"]["kernel"]
  np.testing.assert_array_equal(a[2], params["decoder_blocks_2"]["mlp"]["wo"]["kernel"])
  back = layers.unstack_params(stacked, config.STACKS)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # match_layout converts either way and leaves a matching layout alone.
  scanned = dataclasses.replace(config, scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, models.match_layout(params, scanned), stacked)
  jax.tree.map(np.testing.assert_array_equal, models.match_layout(stacked, config), params)
  jax.tree.map(np.testing.assert_array_equal, models.match_layout(stacked, scanned), stacked)
  gap = {k: v for k, v in params.items() if k != "encoder_blocks_0"}
  with pytest.raises(ValueError, match=r"layers \[1\] of encoder_blocks are not 0..0"):
    layers.stack_params(gap, config.STACKS)


def test_logical_axes_name_the_layer_axis():
  config, _, params = _setup("decoder")
  axes = layers.param_logical_axes(layers.stack_params(params, config.STACKS))
  assert axes["blocks"]["mlp"]["wi"]["kernel"] == ("layers", "embed", "mlp")
  assert axes["blocks"]["self_attention"]["query"]["kernel"] == ("layers", "embed", "heads",
                                                                 "kv")
  assert axes["token_embed"]["embedding"] == ("vocab", "embed")
  unrolled = layers.param_logical_axes(params)
  assert unrolled["blocks_0"]["mlp"]["wi"]["kernel"] == ("embed", "mlp")


def test_flops_do_not_depend_on_the_layout():
  config, _, _ = _setup("decoder")
  scanned = dataclasses.replace(config, scan_layers=True, remat="full")
  assert flops.training_flops(flops.config_matmuls(scanned, 12, causal=True)) == (
      flops.training_flops(flops.config_matmuls(config, 12, causal=True)))


@pytest.mark.parametrize("field, value, match", [
    ("scan_layers", "yes", r"scan_layers='yes' must be True or False"),
    ("remat", "some", r"remat='some'"),
])
def test_bad_stack_options_name_the_field(field, value, match):
  for name in CASES:
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(CASES[name][0], **{field: value})
