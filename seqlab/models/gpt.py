"""Decoder-only Transformer (GPT-2), causal or prefix-LM, with any number of kv heads.

Pre-LN blocks, learned (GPT-2), rotary or no positions, a tied (or untied) LM head. The model
reads seqio's decoder features and returns float32 next-token logits `[B, T, V]`:

  decoder_input_tokens      int [B, T]   required
  decoder_segment_ids       int [B, T]   packing (1, 2, ... per sequence, 0 = padding); optional
  decoder_positions         int [B, T]   restart at 0 per segment; default arange(T)
  decoder_causal_attention  int [B, T]   prefix decoders only: 1 on the bidirectional prefix
  decoder_target_tokens     int [B, T]   optional; like t5x, target 0 marks padding in the mask

KV-cache decoding (`init_cache`, `extend`) follows `seqlab.decoding`'s contract.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqlab import layers
from seqlab import masks

ATTENTION_TYPES = ("causal", "prefix")
POSITION_EMBEDDINGS = ("learned", "rope", "none")


def check_positive(config, *names: str) -> None:
  """ValueError unless every named config field is a positive int."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer")


def check_heads(num_heads: int, num_kv_heads: int) -> None:
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")


def check_length(name: str, length: int, max_length: int) -> None:
  """A sequence must fit the learned position table."""
  if length > max_length:
    raise ValueError(f"{name} has length {length} > max_length={max_length}, the size of the "
                     "position table")


def default_positions(batch: dict, name: str, length: int) -> jax.Array:
  """`batch[name]` as int32 `[B, T]`, or arange(T) as `[1, T]` when absent."""
  positions = batch.get(name)
  if positions is None:
    return jnp.arange(length, dtype=jnp.int32)[None, :]
  return jnp.asarray(positions).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A decoder-only model. Defaults are GPT-2 small (124,439,808 parameters)."""
  vocab_size: int = 50257
  d_model: int = 768
  num_heads: int = 12
  num_kv_heads: int = 12
  head_dim: int = 64
  d_ff: int = 3072
  num_layers: int = 12
  max_length: int = 1024          # learned position table; RoPE / none are unbounded
  attention: str = "causal"       # "causal" | "prefix" (uses decoder_causal_attention)
  position_embedding: str = "learned"  # "learned" | "rope" | "none"
  activation: str = "gelu_tanh"   # see seqlab.layers.ACTIVATIONS
  norm: str = "layernorm"         # "layernorm" | "rmsnorm"
  norm_eps: float = 1e-5
  use_bias: bool = True
  tie_embeddings: bool = True
  rope_base: float = 10_000.0
  dropout_rate: float = 0.1
  init_std: float = 0.02
  dtype: str = "float32"          # compute dtype; parameters are float32
  scan_layers: bool = False       # blocks under nn.scan, parameters stacked (seqlab.layers)
  remat: str = "none"             # "none" | "full" | "dots" (seqlab.layers.REMAT_POLICIES)

  STACKS = ("blocks",)            # the layer stacks' names (seqlab.layers.stack_params)

  def __post_init__(self):
    check_positive(self, "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                   "d_ff", "num_layers", "max_length")
    layers.check_stack_options(self.scan_layers, self.remat)
    check_heads(self.num_heads, self.num_kv_heads)
    layers.check_choice("attention", self.attention, ATTENTION_TYPES)
    layers.check_choice("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
    layers.check_choice("activation", self.activation, layers.ACTIVATIONS)
    layers.check_choice("norm", self.norm, layers.NORMS)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")

  def build(self) -> "Decoder":
    return Decoder(self)

  def dummy_batch(self, batch_size: int = 1) -> dict:
    length = min(8, self.max_length)
    batch = {"decoder_input_tokens": jnp.ones((batch_size, length), jnp.int32)}
    if self.attention == "prefix":
      batch["decoder_causal_attention"] = jnp.ones((batch_size, length), jnp.int32)
    return batch


class Decoder(nn.Module):
  """GPT-style decoder: token (+ learned position) embedding, pre-LN blocks, final norm, head."""
  config: DecoderConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.token_embed = layers.Embed(c.vocab_size, c.d_model, init_std=c.init_std, dtype=dtype)
    if c.position_embedding == "learned":
      self.position_embed = layers.Embed(c.max_length, c.d_model, init_std=c.init_std,
                                         dtype=dtype)
    self.blocks = layers.block_stack(
        layers.Block, c.num_layers, name="blocks", scan_layers=c.scan_layers, remat=c.remat,
        features=c.d_model, num_heads=c.num_heads, head_dim=c.head_dim, d_ff=c.d_ff,
        num_kv_heads=c.num_kv_heads, activation=c.activation, norm=c.norm,
        norm_position="pre", norm_eps=c.norm_eps, use_bias=c.use_bias,
        rope=c.position_embedding == "rope", rope_base=c.rope_base,
        dropout_rate=c.dropout_rate, init_std=c.init_std, dtype=dtype)
    self.final_norm = layers.make_norm(c.norm, c.norm_eps, dtype)
    if not c.tie_embeddings:
      self.lm_head = layers.Dense(c.vocab_size, use_bias=False, init_std=c.init_std,
                                  dtype=dtype)
    self.dropout = nn.Dropout(c.dropout_rate)

  def _embed(self, tokens_BT, positions_BT, train: bool):
    x_BTD = self.token_embed(tokens_BT)
    if self.config.position_embedding == "learned":
      x_BTD = x_BTD + self.position_embed(positions_BT)
    return self.dropout(x_BTD, deterministic=not train)

  def _logits(self, x_BTD):
    x_BTD = self.final_norm(x_BTD)
    if self.config.tie_embeddings:
      logits = self.token_embed.attend(x_BTD)
    else:
      logits = self.lm_head(x_BTD)
    return logits.astype(jnp.float32)

  def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
    """Decoder features (module docstring) -> float32 logits `[B, T, V]`."""
    c = self.config
    tokens_BT = jnp.asarray(batch["decoder_input_tokens"])
    length = tokens_BT.shape[1]
    if c.position_embedding == "learned":
      check_length("decoder_input_tokens", length, c.max_length)
    positions_BT = default_positions(batch, "decoder_positions", length)
    causal_attention = batch.get("decoder_causal_attention") if c.attention == "prefix" else None
    mask = masks.decoder_mask(batch.get("decoder_segment_ids"), causal_attention,
                              decoder_target_tokens=batch.get("decoder_target_tokens"),
                              length=length)
    x_BTD = self._embed(tokens_BT, positions_BT, train)
    x_BTD, _ = layers.apply_stack(self.blocks, x_BTD, mask=mask, positions=positions_BT,
                                  train=train, is_causal=c.attention == "causal")
    return self._logits(x_BTD)

  def init_cache(self, batch_size: int, max_length: int) -> dict:
    """An empty KV cache with `max_length` slots per row (see `seqlab.layers.init_kv_cache`)."""
    c = self.config
    return layers.init_kv_cache(c.num_layers, batch_size, max_length, c.num_kv_heads,
                                c.head_dim, jnp.dtype(c.dtype), stacked=c.scan_layers)

  def extend(self, tokens_BT: jax.Array, cache: dict, valid_BT: jax.Array | None = None,
             bidirectional: bool = False) -> tuple[jax.Array, dict]:
    """Writes tokens `[B, T]` into the cache; returns their float32 logits `[B, T, V]`, cache.

    `valid_BT` False marks left padding. `bidirectional=True` (prefix decoders only) lets the
    new tokens see each other, as the prompt of a prefix-LM.
    """
    c = self.config
    if bidirectional and c.attention != "prefix":
      raise ValueError("bidirectional=True needs a prefix decoder; this decoder has "
                       f"attention={c.attention!r}")
    step = layers.cache_step(cache, tokens_BT, valid_BT, bidirectional=bidirectional)
    if c.position_embedding == "learned":
      last = layers.concrete_int(jnp.max(step.next_position))
      if last is not None and last > c.max_length:
        raise ValueError(f"decoding reaches position {last - 1} but the position table has "
                         f"max_length={c.max_length}")
    x_BTD = self._embed(jnp.asarray(tokens_BT), step.positions, False)
    x_BTD, new_layers = layers.apply_stack(self.blocks, x_BTD, mask=step.mask,
                                           positions=step.positions, cache=cache["layers"],
                                           cache_index=cache["end"])
    new_cache = {"layers": new_layers, "valid": step.kv_valid, "end": step.end,
                 "next_position": step.next_position}
    return self._logits(x_BTD), new_cache


def _gpt2(**kw) -> DecoderConfig:
  return DecoderConfig(**kw)


PRESETS = {
    # Radford et al. 2019; Hugging Face GPT2LMHeadModel counts (tied head counted once).
    "gpt2-small": _gpt2(),                                                        # 124,439,808
    "gpt2-medium": _gpt2(d_model=1024, num_heads=16, num_kv_heads=16, d_ff=4096,
                         num_layers=24),                                          # 354,823,168
    # Tiny models for tests and CPU experiments (byte-level vocabulary fits in 512).
    "gpt-tiny": DecoderConfig(vocab_size=512, d_model=64, num_heads=4, num_kv_heads=4,
                              head_dim=16, d_ff=256, num_layers=2, max_length=256,
                              dropout_rate=0.0),
}
