"""Masked autoencoder (He et al. 2022): a ViT encoder on the visible patches, a light decoder.

`MAE.__call__(batch)` takes `image` [B, H, W, C] and the masking of the MAE transform
(`seqlab.objectives.mae_mask`): `ids_restore` [B, L] int (position of each patch in the
per-example shuffle; the first `int(L * (1 - mask_ratio))` of the shuffle are kept), plus
`mask` [B, L] (1 = removed) and `ids_keep`, which are accepted but recomputed from
`ids_restore` so the three can never disagree (the length of `ids_keep` is checked against
`mask_ratio`). Without `ids_restore` the model masks on device with the "masking" rng stream
(or "dropout" when no "masking" key is given), by the same rule: per-example uniform noise,
argsort, keep the smallest.

It returns `{"loss", "patch_loss", "mask", "ids_restore", "pred"}`: `pred` [B, L, p*p*C] is
the decoder's reconstruction in `patchify` order, `patch_loss` [B, L] the mean squared error of
each patch (against per-patch normalised pixels when `norm_pix_loss`), `loss` its mean over the
removed patches only; `mask` and `ids_restore` are the masking used (drawn on device or
given). Positions are MAE's fixed 2-D sin-cos tables (constants, not parameters), with an
all-zero row for the class token, in the encoder and the decoder.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqlab import layers
from seqlab.models.vit import (PatchEmbed, check_common, check_image, encoder_stack, pair,
                               run_encoder_stack, sincos_posemb)

_dense_init = nn.initializers.xavier_uniform()


# ─── Pure functions ──────────────────────────────────────────────────────────────────────────


def patchify(image: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, C] -> [B, h*w, p*p*C]`: row-major patches, each flattened as (row, col, channel).

  The order of MAE's `patchify` (`nchpwq -> nhwpqc`) for channels-last images.
  """
  batch, height, width, channels = image.shape
  p = patch_size
  if height % p or width % p:
    raise ValueError(f"image height={height} and width={width} must be multiples of "
                     f"patch_size={p}")
  x = image.reshape(batch, height // p, p, width // p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: jax.Array, patch_size: int, grid_hw: tuple[int, int]) -> jax.Array:
  """Inverse of `patchify`: `[B, h*w, p*p*C] -> [B, h*p, w*p, C]`."""
  batch, length, dim = patches.shape
  grid_h, grid_w = grid_hw
  p = patch_size
  if length != grid_h * grid_w or dim % (p * p):
    raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit grid {grid_hw} with "
                     f"patch_size={p}")
  x = patches.reshape(batch, grid_h, grid_w, p, p, dim // (p * p))
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * p, grid_w * p, -1)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per image: `int(L * (1 - mask_ratio))`, MAE's `len_keep`."""
  return int(num_patches * (1 - mask_ratio))


def random_masking(rng: jax.Array, batch_size: int, num_patches: int,
                   mask_ratio: float) -> dict:
  """MAE's per-example random masking on device (argsort of uniform noise, keep the smallest).

  Returns `ids_keep` [B, len_keep], `ids_restore` [B, L] int32 and `mask` [B, L] float32 with
  1 on the removed patches.
  """
  len_keep = num_kept(num_patches, mask_ratio)
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  return {"ids_keep": ids_shuffle[:, :len_keep], "ids_restore": ids_restore,
          "mask": (ids_restore >= len_keep).astype(jnp.float32)}


def mae_loss(image: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int, *,
             norm_pix_loss: bool = False, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """MAE's reconstruction loss: (mean over removed patches, per-patch loss [B, L]), float32.

  image [B, H, W, C], pred [B, L, p*p*C], mask [B, L] (1 = removed). With `norm_pix_loss` each
  target patch is normalised by its mean and unbiased variance (torch's `.var()` default):
  `(t - mean) / sqrt(var + eps)`.
  """
  target = patchify(image.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + eps)
  patch_loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(patch_loss * mask) / jnp.sum(mask), patch_loss


# ─── Model ───────────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class MAEConfig:
  """MAE hyperparameters: a ViT encoder (`d_model`, ...) and a decoder (`decoder_*`)."""
  image_size: int | tuple[int, int] = 224
  patch_size: int = 16
  num_channels: int = 3
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  d_ff: int = 3072
  decoder_d_model: int = 512
  decoder_num_layers: int = 8
  decoder_num_heads: int = 16
  decoder_d_ff: int = 2048
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  posemb: str = "sincos2d"
  layer_norm_eps: float = 1e-6
  drop_path_rate: float = 0.0
  dtype: str = "float32"
  scan_layers: bool = False       # blocks under nn.scan, parameters stacked (seqlab.layers)
  remat: str = "none"             # "none" | "full" | "dots" (seqlab.layers.REMAT_POLICIES)

  STACKS = ("block", "decoder_block")  # the layer stacks' names (seqlab.layers.stack_params)

  def __post_init__(self):
    if isinstance(self.image_size, list):  # from a command-line override; keep it hashable
      object.__setattr__(self, "image_size", tuple(self.image_size))
    check_common(self)
    layers.check_stack_options(self.scan_layers, self.remat)
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio={self.mask_ratio} must be in [0, 1)")
    if self.posemb not in ("sincos2d", "sincos2d_big_vision"):
      raise ValueError(f"posemb={self.posemb!r} must be 'sincos2d' or 'sincos2d_big_vision'")
    for name, dim, heads in (("d_model", self.d_model, self.num_heads),
                             ("decoder_d_model", self.decoder_d_model, self.decoder_num_heads)):
      if dim % heads:
        raise ValueError(f"{name}={dim} is not a multiple of its num_heads={heads}")
      if dim % 4:
        raise ValueError(f"{name}={dim} must be divisible by 4 for 2-D sin-cos positions")

  @property
  def grid_size(self) -> tuple[int, int]:
    height, width = pair(self.image_size)
    return height // self.patch_size, width // self.patch_size

  @property
  def num_patches(self) -> int:
    grid_h, grid_w = self.grid_size
    return grid_h * grid_w

  def build(self) -> "MAE":
    return MAE(self)

  def dummy_batch(self, batch_size: int = 1) -> dict:
    height, width = pair(self.image_size)
    length, len_keep = self.num_patches, num_kept(self.num_patches, self.mask_ratio)
    ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    return {"image": jnp.zeros((batch_size, height, width, self.num_channels), jnp.float32),
            "ids_restore": ids, "ids_keep": ids[:, :len_keep],
            "mask": (ids >= len_keep).astype(jnp.float32)}


def position_table(kind: str, grid_hw: tuple[int, int], dim: int) -> jax.Array:
  """MAE's fixed positions `[1, 1 + h*w, dim]`: an all-zero class-token row, then the grid."""
  table = sincos_posemb(kind, grid_hw, dim)
  return jnp.concatenate([jnp.zeros((1, 1, dim), table.dtype), table], axis=1)


class MAE(nn.Module):
  """Masked autoencoder ViT; see the module docstring for inputs and outputs."""
  config: MAEConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    # Encoder: the names of a ViT with posemb="sincos2d", so its weights fine-tune a ViT.
    self.patch_embed = PatchEmbed(cfg.d_model, cfg.patch_size, cfg.num_channels, dtype)
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.d_model))
    stack = functools.partial(encoder_stack, scan_layers=cfg.scan_layers, remat=cfg.remat,
                              layer_norm_eps=cfg.layer_norm_eps, dtype=dtype)
    self.blocks = stack(cfg.num_layers, name="block", num_heads=cfg.num_heads, d_ff=cfg.d_ff)
    self.norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
    # Decoder.
    self.decoder_embed = nn.Dense(cfg.decoder_d_model, dtype=dtype, kernel_init=_dense_init)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                                 (1, 1, cfg.decoder_d_model))
    self.decoder_blocks = stack(cfg.decoder_num_layers, name="decoder_block",
                                num_heads=cfg.decoder_num_heads, d_ff=cfg.decoder_d_ff)
    self.decoder_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=dtype)
    self.decoder_pred = nn.Dense(cfg.patch_size ** 2 * cfg.num_channels, dtype=dtype,
                                 kernel_init=_dense_init)

  def encode(self, image: jax.Array, ids_keep: jax.Array, *, train: bool = False) -> jax.Array:
    """Encoder states `[B, 1 + len_keep, D]` (class token first) of the patches `ids_keep`."""
    cfg = self.config
    x = self.patch_embed(image)
    batch, grid_h, grid_w, d_model = x.shape
    x_BLD = x.reshape(batch, grid_h * grid_w, d_model)
    x_BLD = x_BLD + position_table(cfg.posemb, (grid_h, grid_w), d_model)[:, 1:].astype(x.dtype)
    x_BKD = jnp.take_along_axis(x_BLD, ids_keep[:, :, None], axis=1)
    cls = jnp.broadcast_to(self.cls_token, (batch, 1, d_model)).astype(x.dtype)
    x_BTD = jnp.concatenate([cls, x_BKD], axis=1)
    x_BTD = run_encoder_stack(self.blocks, x_BTD, cfg.num_layers, cfg.drop_path_rate,
                              train=train)
    return self.norm(x_BTD)

  def decode(self, latent: jax.Array, ids_restore: jax.Array, grid_hw: tuple[int, int], *,
             train: bool = False) -> jax.Array:
    """Reconstruction `[B, L, p*p*C]` from encoder states and the un-shuffle `ids_restore`."""
    cfg = self.config
    x = self.decoder_embed(latent)
    batch, num_visible, dim = x.shape
    length = ids_restore.shape[1]
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                   (batch, length + 1 - num_visible, dim))
    shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    x_BLD = jnp.take_along_axis(shuffled, ids_restore[:, :, None], axis=1)
    x_BTD = jnp.concatenate([x[:, :1], x_BLD], axis=1)
    x_BTD = x_BTD + position_table(cfg.posemb, grid_hw, dim).astype(x.dtype)
    x_BTD = run_encoder_stack(self.decoder_blocks, x_BTD, cfg.decoder_num_layers, 0.0,
                              train=train)
    return self.decoder_pred(self.decoder_norm(x_BTD))[:, 1:]

  def __call__(self, batch: dict, *, train: bool = False) -> dict:
    """`{"loss", "patch_loss", "mask", "ids_restore", "pred"}`; see the module docstring."""
    cfg = self.config
    image = batch["image"]
    grid_hw = check_image(image, cfg.patch_size, cfg.num_channels)
    length = grid_hw[0] * grid_hw[1]
    len_keep = num_kept(length, cfg.mask_ratio)
    if "ids_keep" in batch and batch["ids_keep"].shape[-1] != len_keep:
      # A static check that the data's masking and this config agree on the ratio.
      raise ValueError(f"ids_keep keeps {batch['ids_keep'].shape[-1]} of {length} patches, but "
                       f"mask_ratio={cfg.mask_ratio} keeps {len_keep}")
    if "ids_restore" in batch:
      ids_restore = jnp.asarray(batch["ids_restore"]).astype(jnp.int32)
      if ids_restore.shape != (image.shape[0], length):
        raise ValueError(f"ids_restore has shape {tuple(ids_restore.shape)}, expected "
                         f"{(image.shape[0], length)} for a {grid_hw[0]}x{grid_hw[1]} patch grid")
    else:
      stream = "masking" if self.has_rng("masking") else "dropout"
      ids_restore = random_masking(self.make_rng(stream), image.shape[0], length,
                                   cfg.mask_ratio)["ids_restore"]
    ids_keep = jnp.argsort(ids_restore, axis=1)[:, :len_keep]
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    latent = self.encode(image, ids_keep, train=train)
    pred = self.decode(latent, ids_restore, grid_hw, train=train)
    loss, patch_loss = mae_loss(image, pred, mask, cfg.patch_size,
                                norm_pix_loss=cfg.norm_pix_loss)
    return {"loss": loss, "patch_loss": patch_loss, "mask": mask, "ids_restore": ids_restore,
            "pred": pred}


PRESETS = {
    # mae_vit_base_patch16_dec512d8b of the official code, 224², 75% masking, norm_pix_loss.
    "mae-vit-b16": MAEConfig(),
    "mae-vit-l16": MAEConfig(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    # scikit-learn's 8x8 digits: 16 patches of 2x2, 4 visible.
    "mae-tiny": MAEConfig(image_size=8, patch_size=2, num_channels=1, d_model=64, num_layers=2,
                          num_heads=4, d_ff=128, decoder_d_model=32, decoder_num_layers=1,
                          decoder_num_heads=4, decoder_d_ff=64, norm_pix_loss=False),
}
