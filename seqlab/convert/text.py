"""Hugging Face PyTorch checkpoints <-> seqlab text models (GPT-2, BERT, T5 v1.0 / v1.1).

A state dict is a mapping from Hugging Face parameter names to torch tensors or NumPy arrays,
or a path to a `.safetensors` / `.bin` / `.pt` file (`load_hf_state_dict`). The `*_from_hf`
functions return seqlab `params` (a nested dict of float32 arrays, to be used as
`model.apply({"params": params}, batch)`) and check every shape against the config; a missing
key or a key they do not understand raises ValueError. `*_config_from_hf` read a
`transformers` config object (or its `to_dict()`).

Hugging Face layouts: `nn.Linear` stores `[out, in]` (transposed here), GPT-2's `Conv1D`
stores `[in, out]` with q, k, v fused in `c_attn`; seqlab kernels are `[in, *out]` with heads
split (`[D, N, H]`, `[N, H, D]`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from seqlab import models
from seqlab.models.bert import EncoderConfig
from seqlab.models.encoder_decoder import EncoderDecoderConfig
from seqlab.models.gpt import DecoderConfig

__all__ = [
    "load_hf_state_dict",
    "gpt2_config_from_hf", "gpt2_from_hf", "gpt2_to_hf",
    "bert_config_from_hf", "bert_from_hf",
    "t5_config_from_hf", "t5_from_hf",
]

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}


# ---------------------------------------------------------------------------------------------
# State dicts.
# ---------------------------------------------------------------------------------------------


def load_hf_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` (NumPy, no torch needed) or a torch `.bin` / `.pt` state dict."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"path={path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  import torch
  return _to_numpy(torch.load(path, map_location="cpu", weights_only=True))


def _to_numpy(state_dict: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
  if isinstance(state_dict, (str, os.PathLike)):
    return load_hf_state_dict(state_dict)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"state_dict must be a mapping or a path, got {type(state_dict).__name__}")
  out = {}
  for name, value in state_dict.items():
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no NumPy dtype: go via float32)
      value = value.detach().cpu().float().numpy()
    out[name] = np.asarray(value, dtype=np.float32)
  return out


class _Reader:
  """Pops named arrays off a state dict (with an optional prefix) and reports leftovers."""

  def __init__(self, state_dict, prefixes: tuple[str, ...], ignore: tuple[str, ...]):
    self.arrays = _to_numpy(state_dict)
    self.prefix = ""
    for prefix in prefixes:  # e.g. GPT2LMHeadModel's "transformer." vs GPT2Model's ""
      if any(name.startswith(prefix) for name in self.arrays):
        self.prefix = prefix
        break
    self.ignore = [re.compile(pattern) for pattern in ignore]

  def has(self, name: str) -> bool:
    return self.prefix + name in self.arrays or name in self.arrays

  def __call__(self, name: str) -> np.ndarray:
    for key in (self.prefix + name, name):
      if key in self.arrays:
        return self.arrays.pop(key)
    raise ValueError(f"the state dict has no {self.prefix + name!r}")

  def finish(self) -> None:
    left = sorted(k for k in self.arrays if not any(p.fullmatch(k) for p in self.ignore))
    if left:
      raise ValueError(f"unexpected keys in the state dict (wrong model or config?): {left}")


def _check_shapes(params: dict, config) -> dict:
  """Checks converted (unrolled) params against the config's parameter shapes; returns jax
  arrays in the config's layer layout (stacked with `scan_layers`)."""
  params = models.match_layout(params, config)
  expected = models.param_shapes(config)
  flat_expected = {jax.tree_util.keystr(p): x.shape
                   for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  flat_actual = {jax.tree_util.keystr(p): x.shape
                 for p, x in jax.tree_util.tree_leaves_with_path(params)}
  problems = [f"{k}: missing (expected {s})" for k, s in flat_expected.items()
              if k not in flat_actual]
  problems += [f"{k}: not a parameter of this config" for k in flat_actual
               if k not in flat_expected]
  problems += [f"{k}: shape {flat_actual[k]} but the config needs {s}"
               for k, s in flat_expected.items() if k in flat_actual and flat_actual[k] != s]
  if problems:
    raise ValueError("converted parameters do not match the config: " + "; ".join(problems))
  return jax.tree_util.tree_map(jax.numpy.asarray, params)


def _hf_attr(hf_config, name: str, default: Any = None) -> Any:
  if isinstance(hf_config, Mapping):
    return hf_config.get(name, default)
  return getattr(hf_config, name, default)


def _activation(name: str) -> str:
  if name not in _ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _heads_in(w_OD: np.ndarray, num_heads: int) -> np.ndarray:
  """Linear weight [N*H, D] -> seqlab kernel [D, N, H]."""
  return w_OD.T.reshape(w_OD.shape[1], num_heads, -1)


def _heads_out(w_DO: np.ndarray, num_heads: int) -> np.ndarray:
  """Linear weight [D, N*H] -> seqlab kernel [N, H, D]."""
  return w_DO.T.reshape(num_heads, -1, w_DO.shape[0])


# ---------------------------------------------------------------------------------------------
# GPT-2.
# ---------------------------------------------------------------------------------------------


def gpt2_config_from_hf(hf_config, **overrides) -> DecoderConfig:
  """A `DecoderConfig` equal to a Hugging Face `GPT2Config` (or its dict)."""
  for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
    if _hf_attr(hf_config, flag, False):
      raise ValueError(f"GPT2Config.{flag}=True is not supported")
  d_model = _hf_attr(hf_config, "n_embd")
  num_heads = _hf_attr(hf_config, "n_head")
  fields = dict(
      vocab_size=_hf_attr(hf_config, "vocab_size"), d_model=d_model, num_heads=num_heads,
      num_kv_heads=num_heads, head_dim=d_model // num_heads,
      d_ff=_hf_attr(hf_config, "n_inner") or 4 * d_model,
      num_layers=_hf_attr(hf_config, "n_layer"), max_length=_hf_attr(hf_config, "n_positions"),
      activation=_activation(_hf_attr(hf_config, "activation_function", "gelu_new")),
      norm_eps=_hf_attr(hf_config, "layer_norm_epsilon", 1e-5),
      dropout_rate=_hf_attr(hf_config, "resid_pdrop", 0.1),
      init_std=_hf_attr(hf_config, "initializer_range", 0.02))
  fields.update(overrides)
  return DecoderConfig(**fields)


def _check_gpt2_config(config: DecoderConfig) -> None:
  if not isinstance(config, DecoderConfig):
    raise ValueError(f"config must be a DecoderConfig, got {type(config).__name__}")
  if (config.num_kv_heads != config.num_heads or config.position_embedding != "learned"
      or config.norm != "layernorm" or not config.use_bias or not config.tie_embeddings
      or config.num_heads * config.head_dim != config.d_model):
    raise ValueError("GPT-2 checkpoints need num_kv_heads == num_heads, learned positions, "
                     "layernorm, biases, a tied head and num_heads * head_dim == d_model; got "
                     f"{config}")


def gpt2_from_hf(state_dict, config: DecoderConfig) -> dict:
  """GPT2LMHeadModel / GPT2Model state dict -> seqlab `Decoder` params."""
  _check_gpt2_config(config)
  read = _Reader(state_dict, ("transformer.",),
                 ignore=(r"lm_head\.weight", r".*attn\.(masked_)?bias"))
  n, d = config.num_heads, config.d_model
  norm = lambda prefix: {"scale": read(prefix + ".weight"), "bias": read(prefix + ".bias")}
  params = {"token_embed": {"embedding": read("wte.weight")},
            "position_embed": {"embedding": read("wpe.weight")},
            "final_norm": norm("ln_f")}
  for i in range(config.num_layers):
    h = f"h.{i}."
    qkv_w = read(h + "attn.c_attn.weight")     # [D, 3D], Conv1D: in x out
    qkv_b = read(h + "attn.c_attn.bias")
    attention = {}
    for j, name in enumerate(("query", "key", "value")):
      attention[name] = {"kernel": qkv_w[:, j * d:(j + 1) * d].reshape(d, n, -1),
                         "bias": qkv_b[j * d:(j + 1) * d].reshape(n, -1)}
    attention["out"] = {"kernel": read(h + "attn.c_proj.weight").reshape(n, -1, d),
                        "bias": read(h + "attn.c_proj.bias")}
    params[f"blocks_{i}"] = {
        "self_attention_norm": norm(h + "ln_1"),
        "self_attention": attention,
        "mlp_norm": norm(h + "ln_2"),
        "mlp": {"wi": {"kernel": read(h + "mlp.c_fc.weight"), "bias": read(h + "mlp.c_fc.bias")},
                "wo": {"kernel": read(h + "mlp.c_proj.weight"),
                       "bias": read(h + "mlp.c_proj.bias")}}}
  read.finish()
  return _check_shapes(params, config)


def gpt2_to_hf(params: dict, config: DecoderConfig, *, return_tensors: str = "pt") -> dict:
  """seqlab `Decoder` params -> a GPT2LMHeadModel state dict (torch tensors, or "np" arrays).

  Loads with `GPT2LMHeadModel(GPT2Config(...)).load_state_dict(state_dict)`.
  """
  _check_gpt2_config(config)
  if return_tensors not in ("pt", "np"):
    raise ValueError(f"return_tensors={return_tensors!r} is not one of ('pt', 'np')")
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                             dict(models.match_layout(params, models.unrolled(config))))
  d = config.d_model
  out = {"transformer.wte.weight": p["token_embed"]["embedding"],
         "transformer.wpe.weight": p["position_embed"]["embedding"]}
  for i in range(config.num_layers):
    b, h = p[f"blocks_{i}"], f"transformer.h.{i}."
    a = b["self_attention"]
    out[h + "ln_1.weight"] = b["self_attention_norm"]["scale"]
    out[h + "ln_1.bias"] = b["self_attention_norm"]["bias"]
    out[h + "attn.c_attn.weight"] = np.concatenate(
        [a[name]["kernel"].reshape(d, d) for name in ("query", "key", "value")], axis=1)
    out[h + "attn.c_attn.bias"] = np.concatenate(
        [a[name]["bias"].reshape(d) for name in ("query", "key", "value")])
    out[h + "attn.c_proj.weight"] = a["out"]["kernel"].reshape(d, d)
    out[h + "attn.c_proj.bias"] = a["out"]["bias"]
    out[h + "ln_2.weight"] = b["mlp_norm"]["scale"]
    out[h + "ln_2.bias"] = b["mlp_norm"]["bias"]
    out[h + "mlp.c_fc.weight"] = b["mlp"]["wi"]["kernel"]
    out[h + "mlp.c_fc.bias"] = b["mlp"]["wi"]["bias"]
    out[h + "mlp.c_proj.weight"] = b["mlp"]["wo"]["kernel"]
    out[h + "mlp.c_proj.bias"] = b["mlp"]["wo"]["bias"]
  out["transformer.ln_f.weight"] = p["final_norm"]["scale"]
  out["transformer.ln_f.bias"] = p["final_norm"]["bias"]
  out["lm_head.weight"] = p["token_embed"]["embedding"]
  out = {k: np.ascontiguousarray(v) for k, v in out.items()}
  if return_tensors == "np":
    return out
  import torch
  return {k: torch.from_numpy(v.copy()) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# BERT.
# ---------------------------------------------------------------------------------------------


def bert_config_from_hf(hf_config, *, pretraining_heads: bool = True,
                        **overrides) -> EncoderConfig:
  """An `EncoderConfig` equal to a Hugging Face `BertConfig` (or its dict)."""
  position_type = _hf_attr(hf_config, "position_embedding_type", "absolute")
  if position_type not in (None, "absolute"):
    raise ValueError(f"position_embedding_type={position_type!r} is not supported")
  d_model = _hf_attr(hf_config, "hidden_size")
  num_heads = _hf_attr(hf_config, "num_attention_heads")
  fields = dict(
      vocab_size=_hf_attr(hf_config, "vocab_size"), d_model=d_model, num_heads=num_heads,
      num_kv_heads=num_heads, head_dim=d_model // num_heads,
      d_ff=_hf_attr(hf_config, "intermediate_size"),
      num_layers=_hf_attr(hf_config, "num_hidden_layers"),
      max_length=_hf_attr(hf_config, "max_position_embeddings"),
      type_vocab_size=_hf_attr(hf_config, "type_vocab_size", 2),
      activation=_activation(_hf_attr(hf_config, "hidden_act", "gelu")),
      norm_eps=_hf_attr(hf_config, "layer_norm_eps", 1e-12),
      dropout_rate=_hf_attr(hf_config, "hidden_dropout_prob", 0.1),
      init_std=_hf_attr(hf_config, "initializer_range", 0.02),
      pretraining_heads=pretraining_heads)
  fields.update(overrides)
  return EncoderConfig(**fields)


def bert_from_hf(state_dict, config: EncoderConfig) -> dict:
  """BertForPreTraining / BertModel state dict -> seqlab `Encoder` params.

  With `config.pretraining_heads` the `cls.*` heads are read too (BertForPreTraining);
  without, they are ignored if present.
  """
  if not isinstance(config, EncoderConfig):
    raise ValueError(f"config must be an EncoderConfig, got {type(config).__name__}")
  if config.num_kv_heads != config.num_heads:
    raise ValueError(f"BERT checkpoints have num_kv_heads == num_heads, got {config}")
  ignore = [r".*position_ids", r".*embeddings\.token_type_ids", r"cls\.predictions\.decoder\..*"]
  if not config.pretraining_heads:
    ignore.append(r"cls\..*")
  read = _Reader(state_dict, ("bert.",), ignore=tuple(ignore))
  n = config.num_heads
  norm = lambda prefix: {"scale": read(prefix + ".weight"), "bias": read(prefix + ".bias")}
  linear = lambda prefix: {"kernel": read(prefix + ".weight").T, "bias": read(prefix + ".bias")}
  e = "embeddings."
  params = {"token_embed": {"embedding": read(e + "word_embeddings.weight")},
            "position_embed": {"embedding": read(e + "position_embeddings.weight")},
            "type_embed": {"embedding": read(e + "token_type_embeddings.weight")},
            "embed_norm": norm(e + "LayerNorm"),
            "pooler": linear("pooler.dense")}
  for i in range(config.num_layers):
    h = f"encoder.layer.{i}."
    attention = {name: {"kernel": _heads_in(read(h + f"attention.self.{name}.weight"), n),
                        "bias": read(h + f"attention.self.{name}.bias").reshape(n, -1)}
                 for name in ("query", "key", "value")}
    attention["out"] = {"kernel": _heads_out(read(h + "attention.output.dense.weight"), n),
                        "bias": read(h + "attention.output.dense.bias")}
    params[f"blocks_{i}"] = {
        "self_attention": attention,
        "self_attention_norm": norm(h + "attention.output.LayerNorm"),
        "mlp": {"wi": linear(h + "intermediate.dense"), "wo": linear(h + "output.dense")},
        "mlp_norm": norm(h + "output.LayerNorm")}
  if config.pretraining_heads:
    params["mlm_transform"] = linear("cls.predictions.transform.dense")
    params["mlm_norm"] = norm("cls.predictions.transform.LayerNorm")
    params["mlm_bias"] = read("cls.predictions.bias")
    params["nsp"] = linear("cls.seq_relationship")
  read.finish()
  return _check_shapes(params, config)


# ---------------------------------------------------------------------------------------------
# T5.
# ---------------------------------------------------------------------------------------------


def t5_config_from_hf(hf_config, **overrides) -> EncoderDecoderConfig:
  """An `EncoderDecoderConfig` equal to a Hugging Face `T5Config` (or its dict).

  v1.1 is recognised by an untied head: `tie_word_embeddings=False` in the dict, or
  `scale_decoder_outputs=False` on a transformers >= 5 config object.
  """
  feed_forward = _hf_attr(hf_config, "feed_forward_proj", "relu")
  gated = feed_forward.startswith("gated-")
  activation = feed_forward.split("-")[-1]
  if gated:
    if activation not in ("gelu", "gelu_new", "silu"):
      raise ValueError(f"feed_forward_proj={feed_forward!r} is not supported")
    activation = "swiglu" if activation == "silu" else "gated_gelu"
  else:
    activation = _activation(activation)
  tied = _hf_attr(hf_config, "scale_decoder_outputs", None)
  if tied is None:
    tied = _hf_attr(hf_config, "tie_word_embeddings", True)
  num_layers = _hf_attr(hf_config, "num_layers")
  num_heads = _hf_attr(hf_config, "num_heads")
  fields = dict(
      vocab_size=_hf_attr(hf_config, "vocab_size"), d_model=_hf_attr(hf_config, "d_model"),
      num_heads=num_heads, num_kv_heads=num_heads, head_dim=_hf_attr(hf_config, "d_kv"),
      d_ff=_hf_attr(hf_config, "d_ff"), num_encoder_layers=num_layers,
      num_decoder_layers=_hf_attr(hf_config, "num_decoder_layers", None) or num_layers,
      position_embedding="relative",
      relative_num_buckets=_hf_attr(hf_config, "relative_attention_num_buckets", 32),
      relative_max_distance=_hf_attr(hf_config, "relative_attention_max_distance", 128),
      activation=activation, norm="rmsnorm", norm_position="pre",
      norm_eps=_hf_attr(hf_config, "layer_norm_epsilon", 1e-6), use_bias=False,
      scale_attention=False, tie_embeddings=bool(tied), rescale_tied_logits=bool(tied),
      scale_embeddings=False, dropout_rate=_hf_attr(hf_config, "dropout_rate", 0.1))
  fields.update(overrides)
  return EncoderDecoderConfig(**fields)


def t5_from_hf(state_dict, config: EncoderDecoderConfig) -> dict:
  """T5ForConditionalGeneration / T5Model state dict (v1.0 or v1.1) -> `EncoderDecoder` params."""
  if not isinstance(config, EncoderDecoderConfig):
    raise ValueError(f"config must be an EncoderDecoderConfig, got {type(config).__name__}")
  if (config.position_embedding != "relative" or config.norm != "rmsnorm"
      or config.norm_position != "pre" or config.use_bias or config.scale_attention
      or config.num_kv_heads != config.num_heads):
    raise ValueError(f"T5 checkpoints need relative positions, pre-LN RMSNorm, no biases, "
                     f"unscaled attention and num_kv_heads == num_heads; got {config}")
  ignore = [r"(encoder|decoder)\.embed_tokens\.weight",
            r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
  if config.tie_embeddings:
    ignore.append(r"lm_head\.weight")
  read = _Reader(state_dict, (), ignore=tuple(ignore))
  n = config.num_heads
  scale = lambda name: {"scale": read(name + ".weight")}

  def attention(prefix):
    out = {name: {"kernel": _heads_in(read(f"{prefix}.{hf}.weight"), n)}
           for name, hf in (("query", "q"), ("key", "k"), ("value", "v"))}
    out["out"] = {"kernel": _heads_out(read(prefix + ".o.weight"), n)}
    return out

  def mlp(prefix):
    names = ("wi_0", "wi_1", "wo") if config.activation in ("gated_gelu", "swiglu") \
        else ("wi", "wo")
    return {name: {"kernel": read(f"{prefix}.DenseReluDense.{name}.weight").T} for name in names}

  params = {"token_embed": {"embedding": read("shared.weight")}}
  for stack, num_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
    params[f"{stack}_relative_bias"] = {
        "table": read(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")}
    params[f"{stack}_norm"] = scale(f"{stack}.final_layer_norm")
    for i in range(num_layers):
      h = f"{stack}.block.{i}.layer."
      block = {"self_attention": attention(h + "0.SelfAttention"),
               "self_attention_norm": scale(h + "0.layer_norm")}
      ff = 1
      if stack == "decoder":
        block["cross_attention"] = attention(h + "1.EncDecAttention")
        block["cross_attention_norm"] = scale(h + "1.layer_norm")
        ff = 2
      block["mlp"] = mlp(f"{h}{ff}")
      block["mlp_norm"] = scale(f"{h}{ff}.layer_norm")
      params[f"{stack}_blocks_{i}"] = block
  if not config.tie_embeddings:
    params["lm_head"] = {"kernel": read("lm_head.weight").T}
  read.finish()
  return _check_shapes(params, config)
