"""Bidirectional encoder (BERT): token + segment-type + learned position embeddings, post-LN.

Features (docs/design.md's encoder contract):

  encoder_input_tokens  int [B, T]   required; token 0 ([PAD]) is padding
  encoder_segment_ids   int [B, T]   packing (1, 2, ... per sequence, 0 = padding); optional
  encoder_positions     int [B, T]   restart at 0 per segment; default arange(T)
  token_type_ids        int [B, T]   sentence A / B; default 0

Returns a dict of float32 arrays:

  "hidden"      [B, T, D]  last layer (Hugging Face BertModel's last_hidden_state)
  "pooled"      [B, T, D]  tanh(dense(hidden)) at every token; a sequence's pooled output is at
                           its first token (BertModel's pooler_output = pooled[:, 0])
  with `pretraining_heads=True` also
  "mlm_logits"  [B, T, V]  transform (dense, gelu, LayerNorm) -> tied decoder + bias
  "nsp_logits"  [B, T, 2]  next-sentence logits from "pooled"; read at each sequence's first
                           token (where the feature converter puts `nsp_label`, so it packs)

Parameter counts: the presets (pretraining_heads=False) are exactly Hugging Face's BertModel,
encoder + pooler (bert-base 109,482,240). The heads add d^2 + 3d + V + 2d + 2 more
(BertForPreTraining: bert-base 110,106,428); MLM / NSP training sets pretraining_heads=True,
e.g. `get_preset("bert-base", pretraining_heads=True)`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from seqlab import layers
from seqlab import masks
from seqlab.models.gpt import check_heads, check_length, check_positive, default_positions


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """A BERT encoder. Defaults are BERT-base (uncased vocabulary)."""
  vocab_size: int = 30522
  d_model: int = 768
  num_heads: int = 12
  num_kv_heads: int = 12
  head_dim: int = 64
  d_ff: int = 3072
  num_layers: int = 12
  max_length: int = 512           # learned position table
  type_vocab_size: int = 2
  activation: str = "gelu"        # exact (erf) GELU, as BERT
  norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  pretraining_heads: bool = False  # add MLM + NSP heads (see the module docstring)
  init_std: float = 0.02
  dtype: str = "float32"
  scan_layers: bool = False       # blocks under nn.scan, parameters stacked (seqlab.layers)
  remat: str = "none"             # "none" | "full" | "dots" (seqlab.layers.REMAT_POLICIES)

  STACKS = ("blocks",)            # the layer stacks' names (seqlab.layers.stack_params)

  def __post_init__(self):
    check_positive(self, "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                   "d_ff", "num_layers", "max_length", "type_vocab_size")
    layers.check_stack_options(self.scan_layers, self.remat)
    check_heads(self.num_heads, self.num_kv_heads)
    layers.check_choice("activation", self.activation, layers.ACTIVATIONS)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")

  def build(self) -> "Encoder":
    return Encoder(self)

  def dummy_batch(self, batch_size: int = 1) -> dict:
    return {"encoder_input_tokens": jnp.ones((batch_size, min(8, self.max_length)), jnp.int32)}


class Encoder(nn.Module):
  """BERT: embeddings + LayerNorm, post-LN blocks, pooler, optional MLM / NSP heads."""
  config: EncoderConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    embed = lambda n: layers.Embed(n, c.d_model, init_std=c.init_std, dtype=dtype)
    dense = lambda features: layers.Dense(features, init_std=c.init_std, dtype=dtype)
    self.token_embed = embed(c.vocab_size)
    self.position_embed = embed(c.max_length)
    self.type_embed = embed(c.type_vocab_size)
    self.embed_norm = layers.LayerNorm(eps=c.norm_eps, dtype=dtype)
    self.blocks = layers.block_stack(
        layers.Block, c.num_layers, name="blocks", scan_layers=c.scan_layers, remat=c.remat,
        features=c.d_model, num_heads=c.num_heads, head_dim=c.head_dim, d_ff=c.d_ff,
        num_kv_heads=c.num_kv_heads, activation=c.activation, norm="layernorm",
        norm_position="post", norm_eps=c.norm_eps, use_bias=True,
        dropout_rate=c.dropout_rate, init_std=c.init_std, dtype=dtype)
    self.pooler = dense(c.d_model)
    if c.pretraining_heads:
      self.mlm_transform = dense(c.d_model)
      self.mlm_norm = layers.LayerNorm(eps=c.norm_eps, dtype=dtype)
      self.mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (c.vocab_size,),
                                 jnp.float32)
      self.nsp = dense(2)
    self.dropout = nn.Dropout(c.dropout_rate)

  def __call__(self, batch: dict, *, train: bool = False) -> dict:
    """Encoder features (module docstring) -> dict of float32 outputs."""
    c = self.config
    tokens_BT = jnp.asarray(batch["encoder_input_tokens"])
    length = tokens_BT.shape[1]
    check_length("encoder_input_tokens", length, c.max_length)
    positions_BT = default_positions(batch, "encoder_positions", length)
    types_BT = batch.get("token_type_ids")
    types_BT = (jnp.zeros_like(tokens_BT) if types_BT is None
                else jnp.asarray(types_BT).astype(jnp.int32))
    mask = masks.encoder_mask(batch.get("encoder_segment_ids"), encoder_input_tokens=tokens_BT)

    x_BTD = (self.token_embed(tokens_BT) + self.position_embed(positions_BT)
             + self.type_embed(types_BT))
    x_BTD = self.dropout(self.embed_norm(x_BTD), deterministic=not train)
    x_BTD, _ = layers.apply_stack(self.blocks, x_BTD, mask=mask, train=train)
    pooled_BTD = jnp.tanh(self.pooler(x_BTD))
    out = {"hidden": x_BTD.astype(jnp.float32), "pooled": pooled_BTD.astype(jnp.float32)}
    if c.pretraining_heads:
      act = layers.activation_fn(c.activation)
      h_BTD = self.mlm_norm(act(self.mlm_transform(x_BTD)))
      logits_BTV = self.token_embed.attend(h_BTD).astype(jnp.float32)
      out["mlm_logits"] = logits_BTV + self.mlm_bias[None, None, :]
      out["nsp_logits"] = self.nsp(pooled_BTD).astype(jnp.float32)
    return out


PRESETS = {
    # Devlin et al. 2019; Hugging Face BertModel counts (encoder + pooler).
    "bert-base": EncoderConfig(),                                                # 109,482,240
    "bert-large": EncoderConfig(d_model=1024, num_heads=16, num_kv_heads=16, d_ff=4096,
                                num_layers=24),                                  # 335,141,888
    # Tiny encoder for tests and CPU experiments.
    "bert-tiny": EncoderConfig(vocab_size=512, d_model=64, num_heads=4, num_kv_heads=4,
                               head_dim=16, d_ff=256, num_layers=2, max_length=256,
                               dropout_rate=0.0),
}
