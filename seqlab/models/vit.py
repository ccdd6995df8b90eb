"""Vision Transformer (Dosovitskiy et al. 2021) and the vision building blocks MAE and Swin share.

`ViT.__call__(batch)` takes docs/design.md's vision features (`image` [B, H, W, C] float, `label`)
and returns class logits `[B, num_classes]` (the pooled features when `num_classes == 0`);
`ViT.encode` returns the normalised token sequence `[B, prefix + h*w, D]`.

Position embeddings: `learned` (a 1-D table over class token + patches, as the original and
Hugging Face), `sincos2d` (MAE's fixed 2-D sin-cos), `sincos2d_big_vision` (big_vision's
"simple ViT" variant) or `none`. Fixed tables are constants, not parameters. At a resolution
other than `image_size` a learned table is resized (`seqlab.positions.resize_posemb`, bicubic
as Hugging Face's `interpolate_pos_encoding` by default) and a fixed one recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqlab import layers, positions

_POSEMBS = ("learned", "sincos2d", "sincos2d_big_vision", "none")
_POOLS = ("cls", "mean")
_dense_init = nn.initializers.xavier_uniform()


def pair(size: int | tuple[int, int]) -> tuple[int, int]:
  """`size` as (height, width)."""
  if isinstance(size, int):
    return (size, size)
  height, width = size
  return (int(height), int(width))


def check_image(image: jax.Array, patch_size: int, num_channels: int) -> tuple[int, int]:
  """Validates `image` [B, H, W, C]; returns the patch grid (H / p, W / p)."""
  if image.ndim != 4:
    raise ValueError(f"image must have shape [batch, height, width, channels], got "
                     f"{tuple(image.shape)}")
  _, height, width, channels = image.shape
  if channels != num_channels:
    raise ValueError(f"image has {channels} channels, the model expects num_channels="
                     f"{num_channels}")
  if height % patch_size or width % patch_size:
    raise ValueError(f"image height={height} and width={width} must be multiples of "
                     f"patch_size={patch_size}")
  return height // patch_size, width // patch_size


def check_common(config) -> None:
  """Validates the fields every vision config shares (image, patch, channels, classes)."""
  height, width = pair(config.image_size)
  if config.patch_size < 1:
    raise ValueError(f"patch_size={config.patch_size} must be >= 1")
  if height % config.patch_size or width % config.patch_size:
    raise ValueError(f"image_size={config.image_size} is not a multiple of "
                     f"patch_size={config.patch_size}")
  if config.num_channels < 1:
    raise ValueError(f"num_channels={config.num_channels} must be >= 1")
  if getattr(config, "num_classes", 0) < 0:
    raise ValueError(f"num_classes={config.num_classes} must be >= 0")


def image_batch(config, batch_size: int) -> dict:
  """A zero vision batch `{"image": [B, H, W, C] float32, "label": [B] int32}`."""
  height, width = pair(config.image_size)
  return {"image": jnp.zeros((batch_size, height, width, config.num_channels), jnp.float32),
          "label": jnp.zeros((batch_size,), jnp.int32)}


def sincos_posemb(kind: str, grid_hw: tuple[int, int], dim: int) -> jax.Array:
  """Fixed 2-D sin-cos table `[1, h*w, dim]` of `kind` ('sincos2d' = MAE's variant)."""
  if kind == "sincos2d":
    return positions.sincos_2d_mae(grid_hw, dim)
  return positions.sincos_2d_big_vision(grid_hw, dim)


# ─── Modules shared by ViT, MAE and Swin ─────────────────────────────────────────────────────


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches, linearly projected: `[B, H, W, C] -> [B, H/p, W/p, D]`."""
  features: int
  patch_size: int
  num_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    check_image(image, self.patch_size, self.num_channels)
    p = self.patch_size
    return nn.Conv(self.features, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   kernel_init=_dense_init, name="proj")(image.astype(self.dtype))


class DropPath(nn.Module):
  """Stochastic depth: zero a whole example's residual branch with probability `rate`.

  Kept examples are scaled by 1 / (1 - rate) so the expectation is unchanged; identity when
  `deterministic` or `rate == 0`. Draws from the "dropout" rng stream.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool, rate=None) -> jax.Array:
    """`rate` (a float or a traced scalar, as a scanned stack's per-layer rate) overrides the
    attribute; a traced rate of 0 draws a mask of ones and divides by 1: the identity."""
    rate = self.rate if rate is None else rate
    if deterministic or (isinstance(rate, float) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep_mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(keep_mask, x / keep, jnp.zeros_like(x))


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block over tokens `[B, T, D]`: x + attn(LN(x)), then x + MLP(LN(x)).

  `seqlab.layers` modules under `seqlab.layers.Block`'s names (so `param_logical_axes` shards
  it): bidirectional multi-head attention with biases, exact-erf GELU MLP (the reference ViT /
  timm / Hugging Face), dropout after each branch, and stochastic depth on each residual
  branch, which `Block` lacks.
  """
  num_heads: int
  d_ff: int
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, train: bool = False,
               drop_path_rate=None) -> jax.Array:
    """`drop_path_rate` (a scanned stack's per-layer rate) overrides the attribute."""
    d_model = x_BTD.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f"d_model={d_model} is not a multiple of num_heads={self.num_heads}")
    drop_path = functools.partial(DropPath(self.drop_path_rate), deterministic=not train,
                                  rate=drop_path_rate)
    dropout = nn.Dropout(self.dropout_rate)
    y = layers.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="self_attention_norm")(x_BTD)
    y = layers.Attention(d_model, self.num_heads, d_model // self.num_heads, dtype=self.dtype,
                         name="self_attention")(y)
    x_BTD = x_BTD + drop_path(dropout(y, deterministic=not train))
    y = layers.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="mlp_norm")(x_BTD)
    y = layers.MLP(d_model, self.d_ff, activation="gelu", dtype=self.dtype, name="mlp")(y)
    return x_BTD + drop_path(dropout(y, deterministic=not train))


# How ViT and MAE run their `EncoderBlock` stacks (`seqlab.layers.block_stack`): the drop-path
# rate differs per layer, so it is a per-layer call argument (a list of floats unrolled, an
# array over layers scanned).
STACK_ARGS = ("train", "drop_path_rate")
STACK_PER_LAYER = {"drop_path_rate": 0}


def encoder_stack(num_layers: int, *, name: str, scan_layers: bool, remat: str, **block_kwargs):
  """`num_layers` `EncoderBlock`s; run them with `run_encoder_stack`."""
  return layers.block_stack(EncoderBlock, num_layers, name=name, scan_layers=scan_layers,
                            remat=remat, arg_names=STACK_ARGS, per_layer=STACK_PER_LAYER,
                            **block_kwargs)


def run_encoder_stack(stack, x_BTD: jax.Array, num_layers: int, drop_path_rate: float, *,
                      train: bool) -> jax.Array:
  """x through an `encoder_stack`, drop-path rates rising linearly from 0 to `drop_path_rate`."""
  rates = None  # no stochastic depth: no rates, no random draws
  if drop_path_rate:
    rates = drop_path_rates(drop_path_rate, num_layers)
    if not isinstance(stack, (list, tuple)):  # scanned: one array over layers
      rates = jnp.asarray(rates, jnp.float32)
  x_BTD, _ = layers.apply_stack(stack, x_BTD, arg_names=STACK_ARGS, per_layer=STACK_PER_LAYER,
                                train=train, drop_path_rate=rates)
  return x_BTD


# ─── ViT ─────────────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyperparameters. `image_size` is the training resolution (int or (height, width)).

  `pool="cls"` prepends a class token and classifies its final state; `pool="mean"` has no
  class token and averages the final (normalised) patch tokens, as big_vision's "gap".
  `posemb_resize` is how a learned table meets another resolution: "bicubic" (Hugging Face's
  `interpolate_pos_encoding`) or "bilinear" (big_vision's `resample_posemb`).
  `drop_path_rate` rises linearly from 0 at the first block to this value at the last.
  """
  image_size: int | tuple[int, int] = 224
  patch_size: int = 16
  num_channels: int = 3
  num_classes: int = 1000
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  d_ff: int = 3072
  pool: str = "cls"
  posemb: str = "learned"
  posemb_resize: str = "bicubic"
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: str = "float32"
  scan_layers: bool = False       # blocks under nn.scan, parameters stacked (seqlab.layers)
  remat: str = "none"             # "none" | "full" | "dots" (seqlab.layers.REMAT_POLICIES)

  STACKS = ("block",)             # the layer stacks' names (seqlab.layers.stack_params)

  def __post_init__(self):
    if isinstance(self.image_size, list):  # from a command-line override; keep it hashable
      object.__setattr__(self, "image_size", tuple(self.image_size))
    check_common(self)
    layers.check_stack_options(self.scan_layers, self.remat)
    if self.pool not in _POOLS:
      raise ValueError(f"pool={self.pool!r} must be one of {_POOLS}")
    if self.posemb not in _POSEMBS:
      raise ValueError(f"posemb={self.posemb!r} must be one of {_POSEMBS}")
    if self.posemb_resize not in ("bicubic", "bilinear"):
      raise ValueError(f"posemb_resize={self.posemb_resize!r} must be 'bicubic' or 'bilinear'")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}")
    if self.posemb.startswith("sincos") and self.d_model % 4:
      raise ValueError(f"posemb={self.posemb!r} needs d_model={self.d_model} divisible by 4")

  @property
  def grid_size(self) -> tuple[int, int]:
    height, width = pair(self.image_size)
    return height // self.patch_size, width // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    return int(self.pool == "cls")

  def build(self) -> "ViT":
    return ViT(self)

  def dummy_batch(self, batch_size: int = 1) -> dict:
    return image_batch(self, batch_size)


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
  """Stochastic-depth rate of each block: linear from 0 to `rate` (Swin's / DeiT's rule)."""
  return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


class ViT(nn.Module):
  """Vision Transformer classifier; see the module docstring for inputs and outputs."""
  config: ViTConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.patch_embed = PatchEmbed(cfg.d_model, cfg.patch_size, cfg.num_channels, dtype)
    if cfg.pool == "cls":
      self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, cfg.d_model))
    if cfg.posemb == "learned":
      grid_h, grid_w = cfg.grid_size
      self.pos_embedding = self.param(
          "pos_embedding", nn.initializers.normal(0.02),
          (1, cfg.num_prefix_tokens + grid_h * grid_w, cfg.d_model))
    self.blocks = encoder_stack(cfg.num_layers, name="block", scan_layers=cfg.scan_layers,
                                remat=cfg.remat, num_heads=cfg.num_heads, d_ff=cfg.d_ff,
                                layer_norm_eps=cfg.layer_norm_eps, dropout_rate=cfg.dropout_rate,
                                dtype=dtype)
    self.norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
    if cfg.num_classes:
      self.head = nn.Dense(cfg.num_classes, dtype=dtype, kernel_init=nn.initializers.zeros)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def position_table(self, grid_hw: tuple[int, int]) -> jax.Array:
    """`[1, prefix + h*w, D]` float32 position embeddings for a patch grid (resized if needed)."""
    cfg = self.config
    if cfg.posemb == "learned":
      if tuple(grid_hw) == cfg.grid_size:
        return self.pos_embedding
      # bicubic: Hugging Face's interpolate_pos_encoding; bilinear: big_vision's
      # resample_posemb (scipy.ndimage.zoom, order 1, corners aligned).
      return positions.resize_posemb(self.pos_embedding, grid_hw,
                                     num_prefix_tokens=cfg.num_prefix_tokens,
                                     method=cfg.posemb_resize,
                                     align_corners=cfg.posemb_resize == "bilinear",
                                     old_hw=cfg.grid_size)
    table = sincos_posemb(cfg.posemb, grid_hw, cfg.d_model)
    if cfg.pool == "cls":  # the class token gets no position, as MAE's all-zero row
      table = jnp.concatenate([jnp.zeros((1, 1, cfg.d_model), table.dtype), table], axis=1)
    return table

  def encode(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """Final normalised tokens `[B, prefix + h*w, D]` of `image` `[B, H, W, C]`."""
    cfg = self.config
    x_BhwD = self.patch_embed(image)
    batch, grid_h, grid_w, d_model = x_BhwD.shape
    x_BTD = x_BhwD.reshape(batch, grid_h * grid_w, d_model)
    if cfg.pool == "cls":
      cls = jnp.broadcast_to(self.cls_token, (batch, 1, d_model)).astype(x_BTD.dtype)
      x_BTD = jnp.concatenate([cls, x_BTD], axis=1)
    if cfg.posemb != "none":
      x_BTD = x_BTD + self.position_table((grid_h, grid_w)).astype(x_BTD.dtype)
    x_BTD = self.dropout(x_BTD, deterministic=not train)
    x_BTD = run_encoder_stack(self.blocks, x_BTD, cfg.num_layers, cfg.drop_path_rate,
                              train=train)
    return self.norm(x_BTD)

  def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
    """Logits `[B, num_classes]` (float32) of `batch["image"]`; pooled `[B, D]` if no head."""
    x_BTD = self.encode(batch["image"], train=train)
    pooled_BD = x_BTD[:, 0] if self.config.pool == "cls" else jnp.mean(x_BTD, axis=1)
    if not self.config.num_classes:
      return pooled_BD
    return self.head(pooled_BD).astype(jnp.float32)


def _vit(**kw) -> ViTConfig:
  return ViTConfig(**kw)


PRESETS = {
    # ImageNet-1k classifiers at 224², class token, learned positions (timm / HF sizes).
    "vit-ti16": _vit(d_model=192, num_layers=12, num_heads=3, d_ff=768),
    "vit-s16": _vit(d_model=384, num_layers=12, num_heads=6, d_ff=1536),
    "vit-b16": _vit(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "vit-l16": _vit(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    # scikit-learn's 8x8 grayscale digits, 2x2 patches: a laptop-sized classifier.
    "vit-tiny-digits": _vit(image_size=8, patch_size=2, num_channels=1, num_classes=10,
                            d_model=64, num_layers=2, num_heads=4, d_ff=128),
}
