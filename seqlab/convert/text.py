"""Hugging Face PyTorch checkpoints <-> seqlab text models (GPT-2, BERT, T5, Llama / Mistral).

A state dict is a mapping from Hugging Face parameter names to torch tensors or NumPy arrays,
or a path to a `.safetensors` / `.bin` / `.pt` file (`load_hf_state_dict`). The `*_from_hf`
functions return seqlab `params` (a nested dict of float32 arrays, to be used as
`model.apply({"params": params}, batch)`) and check every shape against the config; a missing
key or a key they do not understand raises ValueError. `*_config_from_hf` read a
`transformers` config object (or its `to_dict()`).

Hugging Face layouts: `nn.Linear` stores `[out, in]` (transposed here), GPT-2's `Conv1D`
stores `[in, out]` with q, k, v fused in `c_attn`; seqlab kernels are `[in, *out]` with heads
split (`[D, N, H]`, `[N, H, D]`).

The `*_to_hf` functions invert `*_from_hf` exactly (a round trip is bitwise) and accept params
in either layer layout (`scan_layers` stacked or unrolled). They return a state dict of torch
tensors (`return_tensors="pt"`) or NumPy arrays ("np") holding every key the Hugging Face
model's `state_dict()` has, so it loads with `load_state_dict(state_dict, strict=True)`.

Not accepted: RoBERTa (and its relatives) in the BERT converters. Its position ids start at
`padding_idx + 1` and its padding id is 1 (id 0 is `<s>`), so its weights in seqlab's BERT
give silently wrong outputs; `bert_config_from_hf` refuses `model_type="roberta"` and
`bert_from_hf` refuses `roberta.` / `lm_head.` keys. A bare `RobertaModel` state dict has
BERT's key names and cannot be told apart without its config.
"""

from __future__ import annotations

import os
import re
import warnings
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
    "bert_config_from_hf", "bert_from_hf", "bert_to_hf",
    "t5_config_from_hf", "t5_from_hf", "t5_to_hf",
    "llama_config_from_hf", "llama_from_hf", "llama_to_hf",
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


def _linear_in(kernel_DNH: np.ndarray) -> np.ndarray:
  """seqlab kernel [D, N, H] -> Linear weight [N*H, D] (inverse of `_heads_in`)."""
  return kernel_DNH.reshape(kernel_DNH.shape[0], -1).T


def _linear_out(kernel_NHD: np.ndarray) -> np.ndarray:
  """seqlab kernel [N, H, D] -> Linear weight [D, N*H] (inverse of `_heads_out`)."""
  return kernel_NHD.reshape(-1, kernel_NHD.shape[-1]).T


def _unrolled_numpy(params: dict, config) -> dict:
  """Params of either layer layout -> the unrolled layout as float32 NumPy arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                                dict(models.match_layout(params, models.unrolled(config))))


def _export(out: dict, return_tensors: str) -> dict:
  """Contiguous NumPy arrays ("np") or torch tensors ("pt") of an exported state dict."""
  if return_tensors not in ("pt", "np"):
    raise ValueError(f"return_tensors={return_tensors!r} is not one of ('pt', 'np')")
  out = {k: np.ascontiguousarray(v) for k, v in out.items()}
  if return_tensors == "np":
    return out
  import torch
  return {k: torch.from_numpy(v.copy()) for k, v in out.items()}


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
  _export({}, return_tensors)  # checks return_tensors before any work
  p = _unrolled_numpy(params, config)
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
  return _export(out, return_tensors)


# ---------------------------------------------------------------------------------------------
# BERT.
# ---------------------------------------------------------------------------------------------


def _check_not_roberta(model_type) -> None:
  if model_type not in (None, "bert"):
    raise ValueError(f"model_type={model_type!r} is not BERT: seqlab's BERT converters read "
                     "BERT checkpoints only (RoBERTa's positions start at padding_idx + 1 and "
                     "its padding id is 1, so its weights would give wrong outputs)")


def bert_config_from_hf(hf_config, *, pretraining_heads: bool = True,
                        **overrides) -> EncoderConfig:
  """An `EncoderConfig` equal to a Hugging Face `BertConfig` (or its dict).

  A config whose `model_type` is not "bert" (RoBERTa, XLM-R, CamemBERT, ...) raises ValueError.
  """
  _check_not_roberta(_hf_attr(hf_config, "model_type", None))
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


def _check_bert_config(config: EncoderConfig) -> None:
  if not isinstance(config, EncoderConfig):
    raise ValueError(f"config must be an EncoderConfig, got {type(config).__name__}")
  if config.num_kv_heads != config.num_heads or config.num_heads * config.head_dim \
      != config.d_model:
    raise ValueError("BERT checkpoints have num_kv_heads == num_heads and num_heads * head_dim "
                     f"== d_model, got {config}")


def _fresh_dense(rng: np.random.RandomState, d_in: int, d_out: int, std: float) -> dict:
  """Hugging Face's init of a new Linear: normal(0, std) weight, zero bias."""
  return {"kernel": (std * rng.standard_normal((d_in, d_out))).astype(np.float32),
          "bias": np.zeros((d_out,), np.float32)}


def bert_from_hf(state_dict, config: EncoderConfig, *, seed: int = 0) -> dict:
  """BertForPreTraining / BertForMaskedLM / BertModel state dict -> seqlab `Encoder` params.

  With `config.pretraining_heads` the `cls.*` heads are read too; without, they are ignored if
  present. seqlab's `Encoder` always has the pooler (and, with heads, the NSP head); a
  checkpoint saved without them (`BertForMaskedLM` has neither) gets them freshly initialised
  as Hugging Face initialises missing weights (normal(0, `config.init_std`) kernels from
  `numpy.random.RandomState(seed)`, zero biases), with a warning naming them: "pooled" and
  "nsp_logits" are then untrained. RoBERTa checkpoints (`roberta.` / `lm_head.` keys) raise.
  """
  _check_bert_config(config)
  ignore = [r".*position_ids", r".*embeddings\.token_type_ids", r"cls\.predictions\.decoder\..*"]
  if not config.pretraining_heads:
    ignore.append(r"cls\..*")
  read = _Reader(state_dict, ("bert.",), ignore=tuple(ignore))
  roberta = sorted(k for k in read.arrays if k.startswith(("roberta.", "lm_head.")))
  if roberta:
    raise ValueError(f"a RoBERTa checkpoint ({roberta[0]!r}, ...) is not a BERT checkpoint: "
                     "its positions start at padding_idx + 1 and its padding id is 1, so "
                     "seqlab's BERT would give wrong outputs")
  n, d = config.num_heads, config.d_model
  norm = lambda prefix: {"scale": read(prefix + ".weight"), "bias": read(prefix + ".bias")}
  linear = lambda prefix: {"kernel": read(prefix + ".weight").T, "bias": read(prefix + ".bias")}
  rng, fresh = np.random.RandomState(seed), []

  def linear_or_fresh(prefix, d_out):
    if read.has(prefix + ".weight") or read.has(prefix + ".bias"):
      return linear(prefix)
    fresh.append(prefix)
    return _fresh_dense(rng, d, d_out, config.init_std)

  e = "embeddings."
  params = {"token_embed": {"embedding": read(e + "word_embeddings.weight")},
            "position_embed": {"embedding": read(e + "position_embeddings.weight")},
            "type_embed": {"embedding": read(e + "token_type_embeddings.weight")},
            "embed_norm": norm(e + "LayerNorm"),
            "pooler": linear_or_fresh("pooler.dense", d)}
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
    params["nsp"] = linear_or_fresh("cls.seq_relationship", 2)
  read.finish()
  if fresh:
    warnings.warn(f"the checkpoint has no {fresh}: freshly initialised (untrained)",
                  stacklevel=2)
  return _check_shapes(params, config)


_BERT_ARCHITECTURES = ("BertModel", "BertForPreTraining", "BertForMaskedLM")


def bert_to_hf(params: dict, config: EncoderConfig, *, architecture: str | None = None,
               return_tensors: str = "pt") -> dict:
  """seqlab `Encoder` params -> a Hugging Face BERT state dict (torch tensors, or "np" arrays).

  `architecture` names the Hugging Face class the state dict loads into (strictly):
  "BertForPreTraining" (default with `config.pretraining_heads`), "BertModel" (default
  without; no `bert.` prefix, no heads) or "BertForMaskedLM" (the MLM head, no pooler, no NSP
  head). The tied MLM decoder (`cls.predictions.decoder.*`) is the word embedding and bias.
  """
  _check_bert_config(config)
  if architecture is None:
    architecture = "BertForPreTraining" if config.pretraining_heads else "BertModel"
  if architecture not in _BERT_ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not one of {_BERT_ARCHITECTURES}")
  if architecture != "BertModel" and not config.pretraining_heads:
    raise ValueError(f"architecture={architecture!r} needs config.pretraining_heads=True")
  _export({}, return_tensors)
  p = _unrolled_numpy(params, config)
  prefix = "" if architecture == "BertModel" else "bert."
  out = {}

  def norm(key, value):
    out[key + ".weight"], out[key + ".bias"] = value["scale"], value["bias"]

  def linear(key, value):
    out[key + ".weight"], out[key + ".bias"] = value["kernel"].T, value["bias"]

  e = prefix + "embeddings."
  out[e + "word_embeddings.weight"] = p["token_embed"]["embedding"]
  out[e + "position_embeddings.weight"] = p["position_embed"]["embedding"]
  out[e + "token_type_embeddings.weight"] = p["type_embed"]["embedding"]
  norm(e + "LayerNorm", p["embed_norm"])
  for i in range(config.num_layers):
    b, h = p[f"blocks_{i}"], f"{prefix}encoder.layer.{i}."
    a = b["self_attention"]
    for name in ("query", "key", "value"):
      out[h + f"attention.self.{name}.weight"] = _linear_in(a[name]["kernel"])
      out[h + f"attention.self.{name}.bias"] = a[name]["bias"].reshape(-1)
    out[h + "attention.output.dense.weight"] = _linear_out(a["out"]["kernel"])
    out[h + "attention.output.dense.bias"] = a["out"]["bias"]
    norm(h + "attention.output.LayerNorm", b["self_attention_norm"])
    linear(h + "intermediate.dense", b["mlp"]["wi"])
    linear(h + "output.dense", b["mlp"]["wo"])
    norm(h + "output.LayerNorm", b["mlp_norm"])
  if architecture != "BertForMaskedLM":
    linear(prefix + "pooler.dense", p["pooler"])
  if architecture != "BertModel":
    out["cls.predictions.bias"] = p["mlm_bias"]
    linear("cls.predictions.transform.dense", p["mlm_transform"])
    norm("cls.predictions.transform.LayerNorm", p["mlm_norm"])
    out["cls.predictions.decoder.weight"] = p["token_embed"]["embedding"]
    out["cls.predictions.decoder.bias"] = p["mlm_bias"]
  if architecture == "BertForPreTraining":
    linear("cls.seq_relationship", p["nsp"])
  return _export(out, return_tensors)


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


def _check_t5_config(config: EncoderDecoderConfig) -> None:
  if not isinstance(config, EncoderDecoderConfig):
    raise ValueError(f"config must be an EncoderDecoderConfig, got {type(config).__name__}")
  if (config.position_embedding != "relative" or config.norm != "rmsnorm"
      or config.norm_position != "pre" or config.use_bias or config.scale_attention
      or config.num_kv_heads != config.num_heads):
    raise ValueError(f"T5 checkpoints need relative positions, pre-LN RMSNorm, no biases, "
                     f"unscaled attention and num_kv_heads == num_heads; got {config}")


def _t5_mlp_names(config) -> tuple[str, ...]:
  return ("wi_0", "wi_1", "wo") if config.activation in ("gated_gelu", "swiglu") \
      else ("wi", "wo")


def t5_from_hf(state_dict, config: EncoderDecoderConfig) -> dict:
  """T5ForConditionalGeneration / T5Model state dict (v1.0 or v1.1) -> `EncoderDecoder` params."""
  _check_t5_config(config)
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
    return {name: {"kernel": read(f"{prefix}.DenseReluDense.{name}.weight").T}
            for name in _t5_mlp_names(config)}

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


def t5_to_hf(params: dict, config: EncoderDecoderConfig, *, return_tensors: str = "pt") -> dict:
  """seqlab `EncoderDecoder` params -> a T5ForConditionalGeneration state dict (v1.0 or v1.1).

  The shared embedding is also written as `encoder.embed_tokens`, `decoder.embed_tokens` and,
  with a tied head, `lm_head` (Hugging Face lists the tied copies in its state dict).
  """
  _check_t5_config(config)
  _export({}, return_tensors)
  p = _unrolled_numpy(params, config)
  embedding = p["token_embed"]["embedding"]
  out = {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding,
         "decoder.embed_tokens.weight": embedding}

  def attention(prefix, a):
    for name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
      out[f"{prefix}.{hf}.weight"] = _linear_in(a[name]["kernel"])
    out[prefix + ".o.weight"] = _linear_out(a["out"]["kernel"])

  for stack, num_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
    for i in range(num_layers):
      b, h = p[f"{stack}_blocks_{i}"], f"{stack}.block.{i}.layer."
      attention(h + "0.SelfAttention", b["self_attention"])
      if i == 0:
        out[h + "0.SelfAttention.relative_attention_bias.weight"] = \
            p[f"{stack}_relative_bias"]["table"]
      out[h + "0.layer_norm.weight"] = b["self_attention_norm"]["scale"]
      ff = 1
      if stack == "decoder":
        attention(h + "1.EncDecAttention", b["cross_attention"])
        out[h + "1.layer_norm.weight"] = b["cross_attention_norm"]["scale"]
        ff = 2
      for name in _t5_mlp_names(config):
        out[f"{h}{ff}.DenseReluDense.{name}.weight"] = b["mlp"][name]["kernel"].T
      out[f"{h}{ff}.layer_norm.weight"] = b["mlp_norm"]["scale"]
    out[f"{stack}.final_layer_norm.weight"] = p[f"{stack}_norm"]["scale"]
  out["lm_head.weight"] = embedding if config.tie_embeddings else p["lm_head"]["kernel"].T
  return _export(out, return_tensors)


# ---------------------------------------------------------------------------------------------
# Llama / Mistral.
# ---------------------------------------------------------------------------------------------


_LLAMA_MODEL_TYPES = (None, "llama", "mistral")


def _llama_rope_base(hf_config) -> float:
  """`rope_theta` of a Llama config (transformers >= 5 keeps it in `rope_parameters`); raises
  for any RoPE variant other than the plain one."""
  parameters = _hf_attr(hf_config, "rope_parameters", None) or {}
  scaling = _hf_attr(hf_config, "rope_scaling", None) or {}
  for name, value in (("rope_parameters", parameters), ("rope_scaling", scaling)):
    kind = value.get("rope_type", value.get("type", "default"))
    if kind != "default":
      raise ValueError(f"{name}={dict(value)!r}: RoPE scaling ({kind!r}) is not supported by "
                       "seqlab's decoder (plain RoPE only)")
  partial = parameters.get("partial_rotary_factor",
                           _hf_attr(hf_config, "partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor={partial} is not supported (seqlab's decoder "
                     "rotates the whole head)")
  for source in (parameters, scaling):
    if "rope_theta" in source:
      return float(source["rope_theta"])
  return float(_hf_attr(hf_config, "rope_theta", 10_000.0))


def llama_config_from_hf(hf_config, **overrides) -> DecoderConfig:
  """A `DecoderConfig` equal to a Hugging Face `LlamaConfig` / `MistralConfig` (or its dict).

  Pre-RMSNorm blocks, SwiGLU MLP (gate = `wi_0`, up = `wi_1`), RoPE with base `rope_theta`
  in Hugging Face's half-split pairing (seqlab's default, so q/k weights need no permutation),
  grouped-query attention with `num_key_value_heads`, no biases, a head tied or not as
  `tie_word_embeddings`. ValueError names the field for what seqlab's decoder cannot express:
  RoPE scaling (`rope_scaling` / `rope_parameters` other than "default"),
  `partial_rotary_factor`, `attention_bias`, `mlp_bias`, an activation other than SiLU, and a
  Mistral `sliding_window` (the decoder has no local attention).
  """
  model_type = _hf_attr(hf_config, "model_type", None)
  if model_type not in _LLAMA_MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not one of {_LLAMA_MODEL_TYPES[1:]}")
  for flag in ("attention_bias", "mlp_bias"):
    if _hf_attr(hf_config, flag, False):
      raise ValueError(f"{flag}=True is not supported: seqlab's Llama has no biases")
  activation = _hf_attr(hf_config, "hidden_act", "silu")
  if activation != "silu":
    raise ValueError(f"hidden_act={activation!r} is not supported (Llama's SwiGLU uses 'silu')")
  window = _hf_attr(hf_config, "sliding_window", None)
  if window is not None:
    raise ValueError(
        f"sliding_window={window} is not supported: seqlab's decoder has no local attention. "
        "For sequences no longer than the window the model is the same with "
        "sliding_window=None; set that on the config to convert it.")
  rope_base = _llama_rope_base(hf_config)
  d_model = _hf_attr(hf_config, "hidden_size")
  num_heads = _hf_attr(hf_config, "num_attention_heads")
  fields = dict(
      vocab_size=_hf_attr(hf_config, "vocab_size"), d_model=d_model, num_heads=num_heads,
      num_kv_heads=_hf_attr(hf_config, "num_key_value_heads", None) or num_heads,
      head_dim=_hf_attr(hf_config, "head_dim", None) or d_model // num_heads,
      d_ff=_hf_attr(hf_config, "intermediate_size"),
      num_layers=_hf_attr(hf_config, "num_hidden_layers"),
      max_length=_hf_attr(hf_config, "max_position_embeddings", 2048),
      position_embedding="rope", rope_base=rope_base, activation="swiglu",
      norm="rmsnorm", norm_eps=_hf_attr(hf_config, "rms_norm_eps", 1e-6), use_bias=False,
      tie_embeddings=bool(_hf_attr(hf_config, "tie_word_embeddings", False)),
      dropout_rate=0.0, init_std=_hf_attr(hf_config, "initializer_range", 0.02))
  fields.update(overrides)
  return DecoderConfig(**fields)


def _check_llama_config(config: DecoderConfig) -> None:
  if not isinstance(config, DecoderConfig):
    raise ValueError(f"config must be a DecoderConfig, got {type(config).__name__}")
  if (config.position_embedding != "rope" or config.norm != "rmsnorm"
      or config.activation != "swiglu" or config.use_bias or config.attention != "causal"):
    raise ValueError("Llama checkpoints need RoPE, RMSNorm, SwiGLU, no biases and causal "
                     f"attention; got {config}")


def llama_from_hf(state_dict, config: DecoderConfig) -> dict:
  """LlamaForCausalLM / MistralForCausalLM (or their base models) state dict -> `Decoder` params.

  Take the config from `llama_config_from_hf`. A tied model's `lm_head.weight` (the embedding
  again) is ignored; an untied config needs it.
  """
  _check_llama_config(config)
  ignore = [r".*rotary_emb\.inv_freq"]
  if config.tie_embeddings:
    ignore.append(r"lm_head\.weight")
  read = _Reader(state_dict, ("model.",), ignore=tuple(ignore))
  n, k = config.num_heads, config.num_kv_heads
  scale = lambda name: {"scale": read(name + ".weight")}
  params = {"token_embed": {"embedding": read("embed_tokens.weight")},
            "final_norm": scale("norm")}
  for i in range(config.num_layers):
    h = f"layers.{i}."
    attention = {name: {"kernel": _heads_in(read(f"{h}self_attn.{hf}_proj.weight"), heads)}
                 for name, hf, heads in (("query", "q", n), ("key", "k", k), ("value", "v", k))}
    attention["out"] = {"kernel": _heads_out(read(h + "self_attn.o_proj.weight"), n)}
    params[f"blocks_{i}"] = {
        "self_attention_norm": scale(h + "input_layernorm"),
        "self_attention": attention,
        "mlp_norm": scale(h + "post_attention_layernorm"),
        "mlp": {name: {"kernel": read(f"{h}mlp.{hf}_proj.weight").T}
                for name, hf in (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))}}
  if not config.tie_embeddings:
    params["lm_head"] = {"kernel": read("lm_head.weight").T}
  read.finish()
  return _check_shapes(params, config)


def llama_to_hf(params: dict, config: DecoderConfig, *, return_tensors: str = "pt") -> dict:
  """seqlab `Decoder` params -> a LlamaForCausalLM / MistralForCausalLM state dict.

  A tied head is written as `lm_head.weight` too (Hugging Face lists the tied copy).
  """
  _check_llama_config(config)
  _export({}, return_tensors)
  p = _unrolled_numpy(params, config)
  embedding = p["token_embed"]["embedding"]
  out = {"model.embed_tokens.weight": embedding}
  for i in range(config.num_layers):
    b, h = p[f"blocks_{i}"], f"model.layers.{i}."
    a = b["self_attention"]
    for name, hf in (("query", "q"), ("key", "k"), ("value", "v")):
      out[f"{h}self_attn.{hf}_proj.weight"] = _linear_in(a[name]["kernel"])
    out[h + "self_attn.o_proj.weight"] = _linear_out(a["out"]["kernel"])
    for name, hf in (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down")):
      out[f"{h}mlp.{hf}_proj.weight"] = b["mlp"][name]["kernel"].T
    out[h + "input_layernorm.weight"] = b["self_attention_norm"]["scale"]
    out[h + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
  out["model.norm.weight"] = p["final_norm"]["scale"]
  out["lm_head.weight"] = embedding if config.tie_embeddings else p["lm_head"]["kernel"].T
  return _export(out, return_tensors)
