"""Encoder-decoder Transformers: the original (Vaswani et al. 2017) and T5 v1.0 / v1.1.

One module, two published recipes chosen by config fields:

* Transformer: post-LN LayerNorm, biases, ReLU, sinusoidal positions added to embeddings
  scaled by sqrt(d_model), one embedding shared by both stacks and the output softmax.
* T5: pre-LN RMSNorm, no biases, unscaled attention logits, a relative-position bias per stack
  (one table shared by that stack's layers, bidirectional in the encoder, causal in the
  decoder); v1.0 has ReLU and a tied head fed `decoder_output * d_model^-0.5`, v1.1 has
  gated-GELU and an untied head.

Features (seqio's encoder-decoder contract): encoder_input_tokens, encoder_segment_ids,
encoder_positions, decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
decoder_positions. Token 0 is padding in the encoder input (and in decoder targets, as t5x);
segment ids, when given, must be given for both streams. Returns float32 logits `[B, T, V]`.

Decoding: `encode`, `init_cache` (cross-attention keys/values computed once), `extend`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqlab import layers
from seqlab import masks
from seqlab import positions as positions_lib
from seqlab.models.gpt import check_heads, check_positive, default_positions

POSITION_EMBEDDINGS = ("relative", "sinusoidal")


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  """An encoder-decoder. Defaults are T5 v1.0 small (60,506,624 parameters)."""
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  num_kv_heads: int = 8
  head_dim: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  max_length: int = 512           # nominal training length; positions here are unbounded
  position_embedding: str = "relative"  # "relative" (T5) | "sinusoidal" (Vaswani)
  relative_num_buckets: int = 32
  relative_max_distance: int = 128
  activation: str = "relu"        # see seqlab.layers.ACTIVATIONS
  norm: str = "rmsnorm"           # "rmsnorm" | "layernorm"
  norm_position: str = "pre"      # "pre" | "post"
  norm_eps: float = 1e-6
  use_bias: bool = False
  scale_attention: bool = False   # logits * head_dim^-0.5 (T5 folds it into the init)
  tie_embeddings: bool = True     # output head = shared embedding^T
  rescale_tied_logits: bool = True  # T5 v1.0: decoder output * d_model^-0.5 before a tied head
  scale_embeddings: bool = False  # Vaswani: embeddings * sqrt(d_model)
  dropout_rate: float = 0.1
  dtype: str = "float32"
  scan_layers: bool = False       # blocks under nn.scan, parameters stacked (seqlab.layers)
  remat: str = "none"             # "none" | "full" | "dots" (seqlab.layers.REMAT_POLICIES)

  STACKS = ("encoder_blocks", "decoder_blocks")  # seqlab.layers.stack_params

  def __post_init__(self):
    check_positive(self, "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                   "d_ff", "num_encoder_layers", "num_decoder_layers", "max_length",
                   "relative_num_buckets", "relative_max_distance")
    layers.check_stack_options(self.scan_layers, self.remat)
    check_heads(self.num_heads, self.num_kv_heads)
    layers.check_choice("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
    layers.check_choice("activation", self.activation, layers.ACTIVATIONS)
    layers.check_choice("norm", self.norm, layers.NORMS)
    layers.check_choice("norm_position", self.norm_position, layers.NORM_POSITIONS)
    if self.position_embedding == "sinusoidal" and self.d_model % 2:
      raise ValueError(f"d_model={self.d_model} must be even for sinusoidal positions")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")

  def build(self) -> "EncoderDecoder":
    return EncoderDecoder(self)

  def dummy_batch(self, batch_size: int = 1) -> dict:
    tokens = jnp.ones((batch_size, 8), jnp.int32)
    return {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens,
            "decoder_target_tokens": tokens}


class EncoderDecoder(nn.Module):
  """Encoder and decoder stacks joined by cross-attention, sharing one token embedding."""
  config: EncoderDecoderConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    # Vaswani scales embeddings by sqrt(d); initialising them with std d^-0.5 keeps inputs O(1).
    self.token_embed = layers.Embed(c.vocab_size, c.d_model, dtype=dtype,
                                    init_std=c.d_model ** -0.5 if c.scale_embeddings else 1.0)

    def stack(num_layers, cross, name):
      return layers.block_stack(
          layers.Block, num_layers, name=name, scan_layers=c.scan_layers, remat=c.remat,
          features=c.d_model, num_heads=c.num_heads, head_dim=c.head_dim, d_ff=c.d_ff,
          num_kv_heads=c.num_kv_heads, activation=c.activation, norm=c.norm,
          norm_position=c.norm_position, norm_eps=c.norm_eps, use_bias=c.use_bias,
          has_cross_attention=cross, attention_scale=None if c.scale_attention else 1.0,
          dropout_rate=c.dropout_rate, mlp_dropout_rate=c.dropout_rate, dtype=dtype)

    self.encoder_blocks = stack(c.num_encoder_layers, False, "encoder_blocks")
    self.decoder_blocks = stack(c.num_decoder_layers, True, "decoder_blocks")
    if c.norm_position == "pre":
      self.encoder_norm = layers.make_norm(c.norm, c.norm_eps, dtype)
      self.decoder_norm = layers.make_norm(c.norm, c.norm_eps, dtype)
    if c.position_embedding == "relative":
      bias = lambda bidirectional: layers.RelativePositionBias(
          c.num_heads, bidirectional, c.relative_num_buckets, c.relative_max_distance)
      self.encoder_relative_bias = bias(True)
      self.decoder_relative_bias = bias(False)
    if not c.tie_embeddings:
      self.lm_head = layers.Dense(c.vocab_size, use_bias=False, dtype=dtype)
    self.dropout = nn.Dropout(c.dropout_rate)

  # -- pieces ----------------------------------------------------------------------------------

  def _embed(self, tokens_BT, positions_BT, train: bool):
    c = self.config
    x_BTD = self.token_embed(tokens_BT)
    if c.scale_embeddings:
      x_BTD = x_BTD * math.sqrt(c.d_model)
    if c.position_embedding == "sinusoidal":
      x_BTD = x_BTD + positions_lib.sinusoidal(positions_BT, c.d_model).astype(x_BTD.dtype)
    return self.dropout(x_BTD, deterministic=not train)

  def _final(self, norm_name: str, x_BTD, train: bool):
    if self.config.norm_position == "pre":
      x_BTD = self.dropout(getattr(self, norm_name)(x_BTD), deterministic=not train)
    return x_BTD

  def _logits(self, x_BTD):
    c = self.config
    if c.tie_embeddings:
      if c.rescale_tied_logits:
        x_BTD = x_BTD * (c.d_model ** -0.5)
      logits = self.token_embed.attend(x_BTD)
    else:
      logits = self.lm_head(x_BTD)
    return logits.astype(jnp.float32)

  # -- encoder ---------------------------------------------------------------------------------

  def encode(self, batch: dict, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Encoder features -> (encoded `[B, S, D]`, encoder_valid bool `[B, S]`).

    A position is valid when its token is not 0 and (if given) its segment id is not 0.
    """
    tokens_BS = jnp.asarray(batch["encoder_input_tokens"])
    length = tokens_BS.shape[1]
    segment_ids = batch.get("encoder_segment_ids")
    positions_BS = default_positions(batch, "encoder_positions", length)
    valid_BS = tokens_BS > 0
    if segment_ids is not None:
      valid_BS = valid_BS & (jnp.asarray(segment_ids) != 0)
    mask = masks.encoder_mask(segment_ids, encoder_input_tokens=tokens_BS)
    bias = None
    if self.config.position_embedding == "relative":
      bias = self.encoder_relative_bias(positions_BS, positions_BS)
    x_BSD = self._embed(tokens_BS, positions_BS, train)
    x_BSD, _ = layers.apply_stack(self.encoder_blocks, x_BSD, mask=mask, bias=bias, train=train)
    return self._final("encoder_norm", x_BSD, train), valid_BS

  # -- decoder ---------------------------------------------------------------------------------

  def decode(self, batch: dict, encoded_BSD: jax.Array, encoder_valid_BS: jax.Array, *,
             train: bool = False) -> jax.Array:
    """Decoder features + `encode`'s outputs -> float32 logits `[B, T, V]`."""
    tokens_BT = jnp.asarray(batch["decoder_input_tokens"])
    batch_size, length = tokens_BT.shape
    decoder_segment_ids = batch.get("decoder_segment_ids")
    encoder_segment_ids = batch.get("encoder_segment_ids")
    if (decoder_segment_ids is None) != (encoder_segment_ids is None):
      raise ValueError("packed encoder-decoder batches need both decoder_segment_ids and "
                       "encoder_segment_ids (or neither)")
    targets_BT = batch.get("decoder_target_tokens")
    positions_BT = default_positions(batch, "decoder_positions", length)
    self_mask = masks.decoder_mask(decoder_segment_ids, None, decoder_target_tokens=targets_BT,
                                   length=length)
    # A decoder position is padding when its target is 0 (t5x) or its segment id is 0.
    decoder_valid_BT = jnp.ones((batch_size, length), jnp.bool_)
    if targets_BT is not None:
      decoder_valid_BT = jnp.asarray(targets_BT) > 0
    if decoder_segment_ids is not None:
      decoder_valid_BT = decoder_valid_BT & (jnp.asarray(decoder_segment_ids) != 0)
    packing = None
    if decoder_segment_ids is not None:
      packing = masks.segments(decoder_segment_ids, encoder_segment_ids)
    cross_mask = masks.combine(packing, masks.padding(decoder_valid_BT, encoder_valid_BS))
    bias = None
    if self.config.position_embedding == "relative":
      bias = self.decoder_relative_bias(positions_BT, positions_BT)
    x_BTD = self._embed(tokens_BT, positions_BT, train)
    x_BTD, _ = layers.apply_stack(self.decoder_blocks, x_BTD, mask=self_mask, bias=bias,
                                  encoded=encoded_BSD, cross_mask=cross_mask, train=train,
                                  is_causal=True)
    return self._logits(self._final("decoder_norm", x_BTD, train))

  def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
    """Encoder-decoder features -> float32 logits `[B, T, V]`."""
    encoded_BSD, encoder_valid_BS = self.encode(batch, train=train)
    return self.decode(batch, encoded_BSD, encoder_valid_BS, train=train)

  # -- KV-cache decoding -------------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: int, encoded: jax.Array,
                 encoder_valid: jax.Array) -> dict:
    """An empty decoder cache plus every layer's cross-attention keys/values `[B, S, K, H]`."""
    c = self.config
    encoded = jnp.asarray(encoded)
    if encoded.shape[0] != batch_size or encoded.shape[:2] != jnp.shape(encoder_valid):
      raise ValueError(f"encoded {tuple(encoded.shape)} and encoder_valid "
                       f"{tuple(jnp.shape(encoder_valid))} do not match batch_size={batch_size}")
    cache = layers.init_kv_cache(c.num_decoder_layers, batch_size, max_length, c.num_kv_heads,
                                 c.head_dim, jnp.dtype(c.dtype), stacked=c.scan_layers)
    _, cross_kv = layers.apply_stack(self.decoder_blocks, encoded[:, :0],
                                     method="stack_cross_kv", encoded=encoded)
    if c.scan_layers:
      cache["layers"]["cross_k"], cache["layers"]["cross_v"] = cross_kv
    else:
      for layer_cache, (cross_k, cross_v) in zip(cache["layers"], cross_kv):
        layer_cache["cross_k"], layer_cache["cross_v"] = cross_k, cross_v
    cache["encoder_valid"] = jnp.asarray(encoder_valid).astype(jnp.bool_)
    return cache

  def extend(self, tokens_BT: jax.Array, cache: dict, valid_BT: jax.Array | None = None,
             bidirectional: bool = False) -> tuple[jax.Array, dict]:
    """Writes decoder tokens `[B, T]` into the cache; returns float32 logits `[B, T, V]`, cache."""
    if bidirectional:
      raise ValueError("bidirectional=True is for prefix decoders; an encoder-decoder's "
                       "decoder is causal")
    c = self.config
    step = layers.cache_step(cache, tokens_BT, valid_BT, bidirectional=False)
    q_valid_BT = (jnp.ones(jnp.shape(tokens_BT), jnp.bool_) if valid_BT is None
                  else jnp.asarray(valid_BT).astype(jnp.bool_))
    cross_mask = masks.padding(q_valid_BT, cache["encoder_valid"])
    bias = None
    if c.position_embedding == "relative":
      bias = self.decoder_relative_bias(step.positions, step.kv_positions)
    x_BTD = self._embed(jnp.asarray(tokens_BT), step.positions, False)
    per_layer = cache["layers"]
    if c.scan_layers:
      self_cache = {"k": per_layer["k"], "v": per_layer["v"]}
      cross_kv = (per_layer["cross_k"], per_layer["cross_v"])
    else:
      self_cache = [{"k": layer["k"], "v": layer["v"]} for layer in per_layer]
      cross_kv = [(layer["cross_k"], layer["cross_v"]) for layer in per_layer]
    x_BTD, self_cache = layers.apply_stack(
        self.decoder_blocks, x_BTD, mask=step.mask, bias=bias, cross_mask=cross_mask,
        cross_kv=cross_kv, cache=self_cache, cache_index=cache["end"])
    new_layers = ({**per_layer, **self_cache} if c.scan_layers
                  else [{**old, **new} for old, new in zip(per_layer, self_cache)])
    new_cache = {"layers": new_layers, "valid": step.kv_valid, "end": step.end,
                 "next_position": step.next_position, "encoder_valid": cache["encoder_valid"]}
    return self._logits(self._final("decoder_norm", x_BTD, False)), new_cache


def _t5(**kw) -> EncoderDecoderConfig:
  return EncoderDecoderConfig(**kw)


def _t5_v1_1(**kw) -> EncoderDecoderConfig:
  return EncoderDecoderConfig(activation="gated_gelu", tie_embeddings=False,
                              rescale_tied_logits=False, **kw)


PRESETS = {
    # Raffel et al. 2020 (Hugging Face T5ForConditionalGeneration counts).
    "t5-small": _t5(),                                                              # 60,506,624
    "t5-base": _t5(d_model=768, num_heads=12, num_kv_heads=12, d_ff=3072,
                   num_encoder_layers=12, num_decoder_layers=12),                  # 222,903,552
    # T5 v1.1: gated-GELU, untied head, no dropout in pre-training.
    "t5.1.1-small": _t5_v1_1(d_model=512, num_heads=6, num_kv_heads=6, d_ff=1024,
                             num_encoder_layers=8, num_decoder_layers=8,
                             dropout_rate=0.0),                                    # 76,961,152
    "t5.1.1-base": _t5_v1_1(d_model=768, num_heads=12, num_kv_heads=12, d_ff=2048,
                            num_encoder_layers=12, num_decoder_layers=12,
                            dropout_rate=0.0),                                     # 247,577,856
    # Vaswani et al. 2017 base: ~37k shared BPE vocabulary; 63,082,496 parameters (paper: 65M).
    "transformer-base": EncoderDecoderConfig(
        vocab_size=37000, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64, d_ff=2048,
        position_embedding="sinusoidal", activation="relu", norm="layernorm",
        norm_position="post", norm_eps=1e-6, use_bias=True, scale_attention=True,
        tie_embeddings=True, rescale_tied_logits=False, scale_embeddings=True,
        dropout_rate=0.1),
    # Tiny T5 v1.1-style model for tests and CPU experiments.
    "t5-tiny": _t5_v1_1(vocab_size=512, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16,
                        d_ff=128, num_encoder_layers=2, num_decoder_layers=2, max_length=256,
                        dropout_rate=0.0),
}
