"""Swin: exact sizes, the official window / shift rule, stochastic depth, bad input, padded
windows (attended or masked) against a float64 oracle.

Numerical parity with the reference (non-square input, shifted stages) is in
test_convert_vision.py; FLOPs in test_flops.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqlab import models
from seqlab.models.swin import SwinConfig, WindowAttention


@pytest.mark.parametrize("name,expected", [
    ("swin-t", 28_288_354), ("swin-s", 49_606_258), ("swin-b", 87_768_224)])
def test_preset_parameter_counts_are_exact(name, expected):
  assert models.num_params(name) == expected


def _windows(config, image_hw=None):
  """(window, shift) of every block, read off the built model."""
  model = config.build()
  batch = config.dummy_batch(1)
  if image_hw is not None:
    batch = {"image": jnp.zeros((1, *image_hw, config.num_channels))}
  variables = jax.eval_shape(model.init, jax.random.key(0), batch)
  return [[(b.window, b.shift) for b in stage] for stage in model.bind(variables).stages]


def test_swin_t_windows_and_shifts_follow_the_official_layout():
  # 224²: stages at 56, 28, 14 (> 7: shift 3 on odd blocks) and 7 (= window: no shift).
  assert _windows(models.get_preset("swin-t")) == [
      [(7, 0), (7, 3)], [(7, 0), (7, 3)], [(7, 0), (7, 3)] * 3, [(7, 0), (7, 0)]]


def test_small_resolution_shrinks_the_window_and_turns_the_shift_off():
  # 96x160 with 4x4 patches: 24x40, 12x20, 6x10 (min 6 <= 7: window 6, no shift), 3x5 (window 3).
  config = SwinConfig(image_size=(96, 160), embed_dim=16, depths=(2, 2, 2, 2),
                      num_heads=(1, 2, 4, 8), num_classes=0)
  assert _windows(config) == [[(7, 0), (7, 3)], [(7, 0), (7, 3)], [(6, 0), (6, 0)],
                              [(3, 0), (3, 0)]]
  table = models.param_shapes(config)["stage_3_block_0"]["self_attention"][
      "relative_position_bias_table"]
  assert table.shape == ((2 * 3 - 1) ** 2, 8)  # sized by the shrunk window, as the official


def test_an_input_size_that_changes_a_window_raises():
  config = models.get_preset("swin-tiny-digits")  # built for 8x8: windows 2, 2
  with pytest.raises(ValueError, match=r"stage 1 .*window 1.*window 2"):
    _windows(config, (4, 4))


def test_image_size_not_divisible_by_patch_size_raises_naming_the_sizes():
  with pytest.raises(ValueError, match=r"height=9 and width=8 .*patch_size=2"):
    _windows(models.get_preset("swin-tiny-digits"), (9, 8))
  with pytest.raises(ValueError, match=r"image_size=\(30, 32\) .*patch_size=4"):
    SwinConfig(image_size=(30, 32))
  with pytest.raises(ValueError, match=r"num_heads\[1\]=5"):
    SwinConfig(num_heads=(3, 5, 12, 24))


def test_stochastic_depth_is_active_in_training_only():
  config = models.get_preset("swin-tiny-digits", drop_path_rate=0.5)
  model = config.build()
  rng = np.random.RandomState(0)
  shapes = models.param_shapes(config)
  params = jax.tree_util.tree_map(lambda s: (0.3 * rng.randn(*s.shape)).astype(np.float32),
                                  shapes)
  image = rng.rand(4, 8, 8, 1).astype(np.float32)
  run = jax.jit(lambda train, key: model.apply({"params": params}, {"image": image}, train=train,
                                               rngs={"dropout": key}), static_argnums=0)
  eval_a, eval_b = run(False, jax.random.key(0)), run(False, jax.random.key(1))
  train_a, train_b = run(True, jax.random.key(0)), run(True, jax.random.key(1))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-3
  assert np.abs(np.asarray(train_a) - np.asarray(eval_a)).max() > 1e-3


def window_attention_oracle(params, x_BHWC, window, shift, mask_padded_keys):
  """NumPy float64 shifted-window attention, written from the official definition.

  The features are zero-padded bottom/right to multiples of the window and projected; token
  (y, x) of the padded grid sits at (y - shift, x - shift) mod size after the cyclic shift.
  Query i sees key j iff they share a window of the rolled grid and the same region label
  (rolled coordinate r along each axis: 0 below size - window, 1 below size - shift, else 2;
  one label without shift) and, with `mask_padded_keys`, j is inside the image. Bias: the
  table row of the in-window offset (dy + M - 1) * (2M - 1) + (dx + M - 1).
  """
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  batch, height, width, _ = x_BHWC.shape
  height_pad, width_pad = -(-height // window) * window, -(-width // window) * window
  x = np.pad(np.asarray(x_BHWC, np.float64),
             ((0, 0), (0, height_pad - height), (0, width_pad - width), (0, 0)))
  x_BLC = x.reshape(batch, height_pad * width_pad, -1)
  q, k, v = (np.einsum("blc,cnd->bnld", x_BLC, p[name]["kernel"])
             + p[name]["bias"][None, :, None, :] for name in ("query", "key", "value"))
  rows, cols = np.meshgrid(np.arange(height_pad), np.arange(width_pad), indexing="ij")
  rolled_r, rolled_c = ((rows - shift) % height_pad).ravel(), ((cols - shift) % width_pad).ravel()
  label = lambda r, size: 0 if not shift else int(r >= size - window) + int(r >= size - shift)
  window_id = rolled_r // window * (width_pad // window) + rolled_c // window
  region = np.array([label(r, height_pad) * 3 + label(c, width_pad)
                     for r, c in zip(rolled_r, rolled_c)])
  allowed = (window_id[:, None] == window_id[None, :]) & (region[:, None] == region[None, :])
  if mask_padded_keys:
    allowed &= ((rows < height) & (cols < width)).ravel()[None, :]
  dy = (rolled_r % window)[:, None] - (rolled_r % window)[None, :]
  dx = (rolled_c % window)[:, None] - (rolled_c % window)[None, :]
  bias_NLL = p["relative_position_bias_table"][(dy + window - 1) * (2 * window - 1)
                                               + dx + window - 1].transpose(2, 0, 1)
  logits = np.einsum("bnld,bnmd->bnlm", q, k) / np.sqrt(q.shape[-1]) + bias_NLL[None]
  logits = np.where(allowed[None, None], logits, -1e30)  # padded queries may see no key
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  y = np.einsum("bnlm,bnmd->blnd", weights / weights.sum(-1, keepdims=True), v)
  y = np.einsum("blnd,ndc->blc", y, p["out"]["kernel"]) + p["out"]["bias"]
  return y.reshape(batch, height_pad, width_pad, -1)[:, :height, :width]


def test_padded_window_attention_matches_its_oracle_in_both_modes():
  """6x7 tokens in windows of 4 (padded to 8x8): attending to padded keys (official Swin, the
  default) and masking them (`mask_padded_keys=True`) each match the oracle, and differ."""
  rng = np.random.RandomState(0)
  x = rng.randn(2, 6, 7, 8).astype(np.float32)
  for shift in (0, 2):
    shapes = jax.eval_shape(WindowAttention(2, 4, shift).init, jax.random.key(0), x)["params"]
    # Random biases give padded keys (projections of zeros) non-zero keys and values.
    params = jax.tree_util.tree_map(lambda s: (0.5 * rng.randn(*s.shape)).astype(np.float32),
                                    shapes)
    outputs = []
    for mask_padded_keys in (False, True):
      module = WindowAttention(2, 4, shift, mask_padded_keys=mask_padded_keys)
      outputs.append(np.asarray(module.apply({"params": params}, x)))
      np.testing.assert_allclose(
          outputs[-1], window_attention_oracle(params, x, 4, shift, mask_padded_keys),
          atol=1e-5, rtol=0)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2
