"""Swin Transformer (Liu et al. 2021): shifted-window attention in a four-stage hierarchy.

`Swin.__call__(batch)` takes `image` [B, H, W, C] (any H, W that the patch size divides;
non-square is fine) and returns class logits `[B, num_classes]` (pooled features when
`num_classes == 0`); `Swin.features` returns the final normalised token map `[B, h, w, C]`.

Each stage runs blocks that alternate window attention with shift 0 and `window // 2`, with a
learned relative-position bias per block, then merges 2x2 patches (except the last stage).
The official rule shrinks a stage's window to its resolution and turns the shift off when
`min(resolution) <= window`. As in the official model, windows, shifts and the bias tables are
fixed by `image_size`; another input size runs with them as long as the rule would give every
stage the same window (otherwise ValueError).

Padded windows. A stage whose grid is not a multiple of its window is padded bottom/right with
zeros to the next multiple. By default (`SwinConfig.mask_padded_keys=False`) this is the
official Swin and Hugging Face behaviour: the normalised features are padded *before* the
q/k/v projections and real tokens attend to the padded ones (whose keys and values are the
projection biases); only the shift mask (computed on the padded size) restricts attention.
A converted checkpoint then reproduces Hugging Face's logits on every input size.
`mask_padded_keys=True` instead pads after the projections and hides padded keys
(`seqlab.attention.window_attention`, `seqlab.masks.swin_shift(..., mask_padded_keys=True)`),
so a real token's output does not depend on how far its window reaches past the image; it
differs from the official numbers wherever padding occurs and is equal to them elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqlab import attention, layers, positions
from seqlab.models.vit import (DropPath, PatchEmbed, check_common, drop_path_rates,
                               image_batch, pair)


def stage_window(resolution: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
  """(window, shift) a block uses at `resolution`: the official rule for small resolutions."""
  if min(resolution) <= window:
    return min(resolution), 0
  return window, shift


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """Swin hyperparameters; stage i has width `embed_dim * 2**i` and `num_heads[i]` heads.

  `drop_path_rate` is the stochastic-depth rate of the last block, rising linearly from 0 at
  the first block over all stages (the official rule). `mask_padded_keys` chooses how windows
  that reach past the token grid treat their zero padding (module docstring): False (default)
  attends to it as the official Swin and Hugging Face do, True masks it.
  """
  image_size: int | tuple[int, int] = 224
  patch_size: int = 4
  num_channels: int = 3
  num_classes: int = 1000
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  patch_norm: bool = True
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.1
  mask_padded_keys: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    # Lists (from a command-line override) become tuples: configs stay hashable.
    for name in ("image_size", "depths", "num_heads"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    check_common(self)
    if len(self.depths) != len(self.num_heads) or not self.depths:
      raise ValueError(f"depths={self.depths} and num_heads={self.num_heads} must be non-empty "
                       "and of equal length")
    for i, heads in enumerate(self.num_heads):
      if (self.embed_dim * 2 ** i) % heads:
        raise ValueError(f"stage {i} width {self.embed_dim * 2 ** i} is not a multiple of "
                         f"num_heads[{i}]={heads}")
    if self.window_size < 1:
      raise ValueError(f"window_size={self.window_size} must be >= 1")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")

  @property
  def grid_size(self) -> tuple[int, int]:
    height, width = pair(self.image_size)
    return height // self.patch_size, width // self.patch_size

  def stage_resolutions(self, grid_hw: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Token-grid resolution of each stage (a merge halves it, rounding up as it pads)."""
    height, width = self.grid_size if grid_hw is None else grid_hw
    out = []
    for _ in self.depths:
      out.append((height, width))
      height, width = (height + 1) // 2, (width + 1) // 2
    return out

  def build(self) -> "Swin":
    return Swin(self)

  def dummy_batch(self, batch_size: int = 1) -> dict:
    return image_batch(self, batch_size)


class WindowAttention(nn.Module):
  """Multi-head (shifted-)window self-attention with a relative-position bias table.

  x `[B, H, W, C]` -> `[B, H, W, C]`. Projections are `seqlab.layers.Dense` under
  `seqlab.layers.Attention`'s names (query/key/value `[C, N, Dh]`, out `[N, Dh, C]`); the bias
  table `[(2M-1)², N]` is a parameter, its index a constant
  (`seqlab.positions.swin_relative_position_index`). H or W not a multiple of the window: x is
  zero-padded before the projections and padded keys are attended to (official Swin), or, with
  `mask_padded_keys`, padded after them and masked; padded outputs are cropped either way.
  """
  num_heads: int
  window: int
  shift: int
  qkv_bias: bool = True
  mask_padded_keys: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    _, height, width, channels = x_BHWC.shape
    if not self.mask_padded_keys:
      # Padding the features (not q/k/v) gives padded keys and values the projection biases,
      # as the official model's F.pad before window_partition; window_attention then sees a
      # divisible grid and masks nothing but the shift.
      x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, -height % self.window), (0, -width % self.window),
                                (0, 0)))
    head_dim = channels // self.num_heads
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32)
    project = lambda name: layers.Dense((self.num_heads, head_dim), use_bias=self.qkv_bias,
                                        dtype=self.dtype, name=name)(x_BHWC)
    q, k, v = project("query"), project("key"), project("value")
    bias_NLL = positions.swin_relative_bias(table, self.window)
    y_BHWNH = attention.window_attention(q, k, v, window=self.window, shift=self.shift,
                                         bias=bias_NLL)[:, :height, :width]
    return layers.Dense(channels, num_in_axes=2, dtype=self.dtype, name="out")(y_BHWNH)


class SwinBlock(nn.Module):
  """x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))), on a token map `[B, H, W, C]`."""
  num_heads: int
  window: int
  shift: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  mask_padded_keys: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    channels = x.shape[-1]
    drop_path = DropPath(self.drop_path_rate)
    dropout = nn.Dropout(self.dropout_rate)
    y = layers.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="self_attention_norm")(x)
    y = WindowAttention(self.num_heads, self.window, self.shift, self.qkv_bias,
                        self.mask_padded_keys, self.dtype, name="self_attention")(y)
    x = x + drop_path(dropout(y, deterministic=not train), deterministic=not train)
    y = layers.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="mlp_norm")(x)
    y = layers.MLP(channels, int(channels * self.mlp_ratio), activation="gelu", dtype=self.dtype,
                   name="mlp")(y)
    return x + drop_path(dropout(y, deterministic=not train), deterministic=not train)


class PatchMerging(nn.Module):
  """2x2 neighbouring tokens concatenated, normalised and projected: `[B,H,W,C] -> [B,H/2,W/2,2C]`.

  Concatenation order (0,0), (1,0), (0,1), (1,1) as the official code; an odd H or W is padded
  with zeros at the bottom / right first (as Hugging Face).
  """
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, channels = x.shape
    if height % 2 or width % 2:
      x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                         x[:, 1::2, 1::2]], axis=-1)
    x = layers.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm")(x)
    return layers.Dense(2 * channels, use_bias=False, dtype=self.dtype, name="reduction")(x)


class Swin(nn.Module):
  """Swin Transformer classifier; see the module docstring for inputs and outputs."""
  config: SwinConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.patch_size, cfg.num_channels, dtype)
    if cfg.patch_norm:
      self.patch_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
    rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
    resolutions = cfg.stage_resolutions()
    stages, merges = [], []
    first = 0
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
      blocks = []
      for j in range(depth):
        window, shift = stage_window(resolutions[i], cfg.window_size,
                                     0 if j % 2 == 0 else cfg.window_size // 2)
        blocks.append(SwinBlock(heads, window, shift, cfg.mlp_ratio, cfg.qkv_bias,
                                cfg.layer_norm_eps, cfg.dropout_rate, rates[first + j],
                                cfg.mask_padded_keys, dtype, name=f"stage_{i}_block_{j}"))
      first += depth
      stages.append(blocks)
      if i < len(cfg.depths) - 1:
        merges.append(PatchMerging(cfg.layer_norm_eps, dtype, name=f"stage_{i}_merge"))
    self.stages = stages
    self.merges = merges
    self.norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
    if cfg.num_classes:
      self.head = nn.Dense(cfg.num_classes, dtype=dtype,
                           kernel_init=nn.initializers.truncated_normal(0.02))
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def features(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """Final normalised token map `[B, h, w, C_last]` of `image` `[B, H, W, C]`."""
    cfg = self.config
    x = self.patch_embed(image)
    if cfg.patch_norm:
      x = self.patch_norm(x)
    x = self.dropout(x, deterministic=not train)
    expected = cfg.stage_resolutions()
    for i, blocks in enumerate(self.stages):
      resolution = tuple(x.shape[1:3])
      window, _ = stage_window(resolution, cfg.window_size, 0)
      built_window, _ = stage_window(expected[i], cfg.window_size, 0)
      if blocks and window != built_window:
        raise ValueError(
            f"image {image.shape[1]}x{image.shape[2]} gives stage {i} a {resolution[0]}x"
            f"{resolution[1]} grid and window {window}, but the model was built for "
            f"image_size={cfg.image_size} with window {built_window} there")
      for block in blocks:
        x = block(x, train=train)
      if i < len(self.merges):
        x = self.merges[i](x)
    return self.norm(x)

  def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
    """Logits `[B, num_classes]` (float32) of `batch["image"]`; pooled `[B, C]` if no head."""
    x = self.features(batch["image"], train=train)
    pooled_BC = jnp.mean(x, axis=(1, 2))
    if not self.config.num_classes:
      return pooled_BC
    return self.head(pooled_BC).astype(jnp.float32)


def _swin(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], drop_path_rate: float,
          **kw) -> SwinConfig:
  return SwinConfig(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                    drop_path_rate=drop_path_rate, **kw)


PRESETS = {
    # ImageNet-1k at 224², window 7; drop-path rates of the official configs.
    "swin-t": _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "swin-s": _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "swin-b": _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
    # scikit-learn's 8x8 grayscale digits: 2x2 patches give a 4x4 grid (shifted windows of 2),
    # merged to 2x2 (one window, no shift).
    "swin-tiny-digits": _swin(32, (2, 2), (2, 4), 0.1, image_size=8, patch_size=2,
                              num_channels=1, num_classes=10, window_size=2),
}
