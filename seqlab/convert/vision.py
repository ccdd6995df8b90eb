"""Hugging Face ViT, Swin and ViT-MAE checkpoints as seqlab parameters.

`vit_from_hf(state_dict, config)`, `swin_from_hf(...)` and `mae_from_hf(...)` take a PyTorch
state dict (`model.state_dict()`, `torch.load(...)` or `safetensors.torch.load_file(...)`; values
may be torch tensors or NumPy arrays) of `ViTModel` / `ViTForImageClassification`, `SwinModel` /
`SwinForImageClassification` or `ViTMAEForPreTraining`, in the current layout
(`layers.N.attention.q_proj`) or the older one (`encoder.layer.N.attention.attention.query`,
`attention.self.query`), and return the
`params` collection of `config.build()` as float32 NumPy arrays: use it as
`model.apply({"params": params}, batch)`. Every parameter of the model must be found and every
tensor of the checkpoint used, except buffers and the unused `ViTModel` pooler (dense + tanh,
which the classifier does not read); anything else raises ValueError naming the keys.
`vit_config_from_hf` / `swin_config_from_hf` / `mae_config_from_hf` turn a Hugging Face config
(object or dict) into the matching seqlab config.

`vit_to_hf`, `swin_to_hf` and `mae_to_hf` are the inverses: seqlab `params` (either layer
layout) -> a state dict in the current Hugging Face layout, torch tensors (`return_tensors=
"pt"`) or NumPy arrays ("np"), that loads strictly (`load_state_dict(sd, strict=True)`) into
`ViTForImageClassification` / `SwinForImageClassification` (`num_classes > 0`), `ViTModel(...,
add_pooling_layer=False)` / `SwinModel` (no head), or `ViTMAEForPreTraining`. A round trip from
Hugging Face is bitwise.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from seqlab.models import match_layout, param_shapes, unrolled
from seqlab.models.mae import MAEConfig
from seqlab.models.mae import position_table as mae_position_table
from seqlab.models.swin import SwinConfig
from seqlab.models.vit import ViTConfig

__all__ = ["vit_from_hf", "swin_from_hf", "mae_from_hf", "vit_config_from_hf",
           "swin_config_from_hf", "mae_config_from_hf", "vit_to_hf", "swin_to_hf", "mae_to_hf"]

# Older Hugging Face layouts -> the current one (transformers' own conversion_mapping rules).
_VIT_RENAMES = [
    (r"encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]
_SWIN_RENAMES = [
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.relative_position_bias_table$",
     ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]
_VIT_IGNORED = (r"^pooler\.",)
_QKV = {"q": "query", "k": "key", "v": "value"}
_SWIN_IGNORED = (r"relative_position_index$", r"attn_mask$")


def _numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor; .float() also handles bfloat16 checkpoints
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def _normalise(state_dict: Mapping[str, Any], prefix: str, renames) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state_dict.items():
    if key.startswith(prefix + "."):
      key = key[len(prefix) + 1:]
    for pattern, replacement in renames:
      key = re.sub(pattern, replacement, key)
    out[key] = value
  return out


class _Builder:
  """Collects (path -> array) from named checkpoint tensors and tracks which were used."""

  def __init__(self, tensors: dict[str, Any], ignored: tuple[str, ...]):
    self.tensors = tensors
    self.ignored = ignored
    self.used: set[str] = set()
    self.flat: dict[tuple[str, ...], np.ndarray] = {}

  def take(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      raise ValueError(f"checkpoint has no tensor {key!r}")
    self.used.add(key)
    return _numpy(self.tensors[key])

  def put(self, path: str, value: np.ndarray) -> None:
    self.flat[tuple(path.split("/"))] = value

  def dense(self, path: str, key: str, bias: bool = True) -> None:
    self.put(f"{path}/kernel", self.take(f"{key}.weight").T)
    if bias:
      self.put(f"{path}/bias", self.take(f"{key}.bias"))

  def norm(self, path: str, key: str) -> None:
    self.put(f"{path}/scale", self.take(f"{key}.weight"))
    self.put(f"{path}/bias", self.take(f"{key}.bias"))

  def conv(self, path: str, key: str) -> None:
    # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
    self.put(f"{path}/kernel", self.take(f"{key}.weight").transpose(2, 3, 1, 0))
    self.put(f"{path}/bias", self.take(f"{key}.bias"))

  def attention(self, path: str, key: str, num_heads: int, qkv_bias: bool) -> None:
    """q/k/v/o `[out, in]` -> `seqlab.layers.Attention` kernels `[D, N, H]` and `[N, H, D]`.

    Heads are contiguous blocks of a projection's output rows, as Hugging Face views them.
    """
    for name in ("q", "k", "v"):
      weight = self.take(f"{key}.{name}_proj.weight")
      d_model = weight.shape[1]
      self.put(f"{path}/{_QKV[name]}/kernel", weight.T.reshape(d_model, num_heads, -1))
      if qkv_bias:
        self.put(f"{path}/{_QKV[name]}/bias",
                 self.take(f"{key}.{name}_proj.bias").reshape(num_heads, -1))
    weight = self.take(f"{key}.o_proj.weight")
    self.put(f"{path}/out/kernel", weight.T.reshape(num_heads, -1, weight.shape[0]))
    self.put(f"{path}/out/bias", self.take(f"{key}.o_proj.bias"))

  def finish(self, config) -> dict:
    unused = sorted(k for k in self.tensors if k not in self.used
                    and not any(re.search(p, k) for p in self.ignored))
    if unused:
      raise ValueError(f"checkpoint tensors not used by the seqlab model (does the config "
                       f"match the checkpoint?): {unused}")
    expected = _flatten(param_shapes(unrolled(config)))
    missing = sorted("/".join(p) for p in expected if p not in self.flat)
    extra = sorted("/".join(p) for p in self.flat if p not in expected)
    if missing or extra:
      raise ValueError(f"parameters missing from the checkpoint: {missing}; "
                       f"parameters the config does not have: {extra}")
    for path, shape in expected.items():
      if self.flat[path].shape != tuple(shape.shape):
        raise ValueError(f"parameter {'/'.join(path)}: checkpoint shape "
                         f"{self.flat[path].shape}, config expects {tuple(shape.shape)}")
    return match_layout(_unflatten(self.flat), config)


def _flatten(tree, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class _Writer:
  """The inverse of `_Builder`: pops seqlab params by path into Hugging Face named tensors."""

  def __init__(self, params: dict, config):
    unrolled_params = match_layout(params, unrolled(config))
    self.flat = {path: np.asarray(value, np.float32)
                 for path, value in _flatten(unrolled_params).items()}
    self.out: dict[str, np.ndarray] = {}

  def take(self, path: str) -> np.ndarray:
    key = tuple(path.split("/"))
    if key not in self.flat:
      raise ValueError(f"params have no {path!r} (does the config match the params?)")
    return self.flat.pop(key)

  def put(self, key: str, value: np.ndarray) -> None:
    self.out[key] = value

  def dense(self, path: str, key: str, bias: bool = True) -> None:
    self.put(f"{key}.weight", self.take(f"{path}/kernel").T)
    if bias:
      self.put(f"{key}.bias", self.take(f"{path}/bias"))

  def norm(self, path: str, key: str) -> None:
    self.put(f"{key}.weight", self.take(f"{path}/scale"))
    self.put(f"{key}.bias", self.take(f"{path}/bias"))

  def conv(self, path: str, key: str) -> None:
    # flax [kh, kw, in, out] -> torch [out, in, kh, kw]
    self.put(f"{key}.weight", self.take(f"{path}/kernel").transpose(3, 2, 0, 1))
    self.put(f"{key}.bias", self.take(f"{path}/bias"))

  def attention(self, path: str, key: str, qkv_bias: bool) -> None:
    for name in ("q", "k", "v"):
      kernel = self.take(f"{path}/{_QKV[name]}/kernel")
      self.put(f"{key}.{name}_proj.weight", kernel.reshape(kernel.shape[0], -1).T)
      if qkv_bias:
        self.put(f"{key}.{name}_proj.bias", self.take(f"{path}/{_QKV[name]}/bias").reshape(-1))
    kernel = self.take(f"{path}/out/kernel")
    self.put(f"{key}.o_proj.weight", kernel.reshape(-1, kernel.shape[-1]).T)
    self.put(f"{key}.o_proj.bias", self.take(f"{path}/out/bias"))

  def finish(self, prefix: str, return_tensors: str) -> dict:
    if self.flat:
      raise ValueError(f"params not exported (does the config match the params?): "
                       f"{sorted('/'.join(p) for p in self.flat)}")
    out = {(k if k.startswith("classifier.") or not prefix else f"{prefix}.{k}"):
           np.ascontiguousarray(v) for k, v in self.out.items()}
    if return_tensors == "np":
      return out
    import torch
    return {k: torch.from_numpy(v.copy()) for k, v in out.items()}


def _check_return_tensors(return_tensors: str) -> None:
  if return_tensors not in ("pt", "np"):
    raise ValueError(f"return_tensors={return_tensors!r} is not one of ('pt', 'np')")


def _block(b: _Builder, path: str, key: str, num_heads: int, qkv_bias: bool = True) -> None:
  b.norm(f"{path}/self_attention_norm", f"{key}.layernorm_before")
  b.attention(f"{path}/self_attention", f"{key}.attention", num_heads, qkv_bias)
  b.norm(f"{path}/mlp_norm", f"{key}.layernorm_after")
  b.dense(f"{path}/mlp/wi", f"{key}.mlp.fc1")
  b.dense(f"{path}/mlp/wo", f"{key}.mlp.fc2")


def _write_block(w: _Writer, path: str, key: str, qkv_bias: bool = True) -> None:
  w.norm(f"{path}/self_attention_norm", f"{key}.layernorm_before")
  w.attention(f"{path}/self_attention", f"{key}.attention", qkv_bias)
  w.norm(f"{path}/mlp_norm", f"{key}.layernorm_after")
  w.dense(f"{path}/mlp/wi", f"{key}.mlp.fc1")
  w.dense(f"{path}/mlp/wo", f"{key}.mlp.fc2")


def _check_vit_config(config: ViTConfig) -> None:
  if config.pool != "cls" or config.posemb != "learned":
    raise ValueError(f"Hugging Face ViT has a class token and learned positions; got "
                     f"pool={config.pool!r}, posemb={config.posemb!r}")


def vit_from_hf(state_dict: Mapping[str, Any], config: ViTConfig) -> dict:
  """seqlab ViT `params` from a Hugging Face ViT state dict (see the module docstring).

  The config must describe the checkpoint: class token, learned positions, and `num_classes`
  equal to the classifier's rows (0 for a `ViTModel` without classifier).
  """
  _check_vit_config(config)
  b = _Builder(_normalise(state_dict, "vit", _VIT_RENAMES), _VIT_IGNORED)
  b.put("cls_token", b.take("embeddings.cls_token"))
  b.put("pos_embedding", b.take("embeddings.position_embeddings"))
  b.conv("patch_embed/proj", "embeddings.patch_embeddings.projection")
  for i in range(config.num_layers):
    _block(b, f"block_{i}", f"layers.{i}", config.num_heads)
  b.norm("norm", "layernorm")
  if config.num_classes:
    b.dense("head", "classifier")
  return b.finish(config)


def vit_to_hf(params: dict, config: ViTConfig, *, return_tensors: str = "pt") -> dict:
  """seqlab ViT `params` -> a `ViTForImageClassification` state dict (`ViTModel` without
  pooler, no `vit.` prefix, when `num_classes == 0`); see the module docstring."""
  _check_vit_config(config)
  _check_return_tensors(return_tensors)
  w = _Writer(params, config)
  w.put("embeddings.cls_token", w.take("cls_token"))
  w.put("embeddings.position_embeddings", w.take("pos_embedding"))
  w.conv("patch_embed/proj", "embeddings.patch_embeddings.projection")
  for i in range(config.num_layers):
    _write_block(w, f"block_{i}", f"layers.{i}")
  w.norm("norm", "layernorm")
  if config.num_classes:
    w.dense("head", "classifier")
  return w.finish("vit" if config.num_classes else "", return_tensors)


def mae_from_hf(state_dict: Mapping[str, Any], config: MAEConfig) -> dict:
  """seqlab MAE `params` from a Hugging Face `ViTMAEForPreTraining` state dict.

  The checkpoint's fixed sin-cos tables are not parameters; they are checked against the ones
  seqlab computes (MAE's layout, column coordinate first) and a mismatch raises ValueError.
  """
  b = _Builder(_normalise(state_dict, "vit", _VIT_RENAMES), ())
  for key, dim in (("embeddings.position_embeddings", config.d_model),
                   ("decoder.decoder_pos_embed", config.decoder_d_model)):
    expected = np.asarray(mae_position_table(config.posemb, config.grid_size, dim))
    stored = b.take(key)
    if stored.shape != expected.shape or not np.allclose(stored, expected, atol=1e-4):
      raise ValueError(f"checkpoint table {key!r} is not the {config.posemb!r} sin-cos table "
                       f"of a {config.grid_size} grid and dim {dim}")
  b.put("cls_token", b.take("embeddings.cls_token"))
  b.conv("patch_embed/proj", "embeddings.patch_embeddings.projection")
  for i in range(config.num_layers):
    _block(b, f"block_{i}", f"layers.{i}", config.num_heads)
  b.norm("norm", "layernorm")
  b.dense("decoder_embed", "decoder.decoder_embed")
  b.put("mask_token", b.take("decoder.mask_token"))
  for i in range(config.decoder_num_layers):
    _block(b, f"decoder_block_{i}", f"decoder.decoder_layers.{i}", config.decoder_num_heads)
  b.norm("decoder_norm", "decoder.decoder_norm")
  b.dense("decoder_pred", "decoder.decoder_pred")
  return b.finish(config)


def mae_to_hf(params: dict, config: MAEConfig, *, return_tensors: str = "pt") -> dict:
  """seqlab MAE `params` -> a `ViTMAEForPreTraining` state dict.

  The fixed sin-cos tables, which are not seqlab parameters, are written as seqlab computes
  them (`seqlab.models.mae.position_table`, MAE's layout), equal to a released checkpoint's.
  """
  _check_return_tensors(return_tensors)
  w = _Writer(params, config)
  w.put("vit.embeddings.cls_token", w.take("cls_token"))
  w.put("vit.embeddings.position_embeddings",
        np.asarray(mae_position_table(config.posemb, config.grid_size, config.d_model)))
  w.conv("patch_embed/proj", "vit.embeddings.patch_embeddings.projection")
  for i in range(config.num_layers):
    _write_block(w, f"block_{i}", f"vit.layers.{i}")
  w.norm("norm", "vit.layernorm")
  w.put("decoder.mask_token", w.take("mask_token"))
  w.put("decoder.decoder_pos_embed", np.asarray(
      mae_position_table(config.posemb, config.grid_size, config.decoder_d_model)))
  w.dense("decoder_embed", "decoder.decoder_embed")
  for i in range(config.decoder_num_layers):
    _write_block(w, f"decoder_block_{i}", f"decoder.decoder_layers.{i}")
  w.norm("decoder_norm", "decoder.decoder_norm")
  w.dense("decoder_pred", "decoder.decoder_pred")
  return w.finish("", return_tensors)


def swin_from_hf(state_dict: Mapping[str, Any], config: SwinConfig) -> dict:
  """seqlab Swin `params` from a Hugging Face Swin state dict (see the module docstring).

  Absolute position embeddings (`use_absolute_embeddings=True`) are not part of seqlab's Swin
  and make the checkpoint's `embeddings.position_embeddings` an unused tensor (ValueError).
  """
  b = _Builder(_normalise(state_dict, "swin", _SWIN_RENAMES), _SWIN_IGNORED)
  b.conv("patch_embed/proj", "embeddings.patch_embeddings.projection")
  if config.patch_norm:
    b.norm("patch_norm", "embeddings.norm")
  for i, depth in enumerate(config.depths):
    for j in range(depth):
      key, path = f"encoder.layers.{i}.blocks.{j}", f"stage_{i}_block_{j}"
      _block(b, path, key, config.num_heads[i], config.qkv_bias)
      b.put(f"{path}/self_attention/relative_position_bias_table",
            b.take(f"{key}.attention.relative_position_bias.relative_position_bias_table"))
    if i < len(config.depths) - 1:
      b.norm(f"stage_{i}_merge/norm", f"encoder.layers.{i}.downsample.norm")
      b.dense(f"stage_{i}_merge/reduction", f"encoder.layers.{i}.downsample.reduction",
              bias=False)
  b.norm("norm", "layernorm")
  if config.num_classes:
    b.dense("head", "classifier")
  return b.finish(config)


def swin_to_hf(params: dict, config: SwinConfig, *, return_tensors: str = "pt") -> dict:
  """seqlab Swin `params` -> a `SwinForImageClassification` state dict (`SwinModel`, no
  `swin.` prefix, when `num_classes == 0`); see the module docstring.

  The relative-position index is a non-persistent buffer in Hugging Face and is not written.
  The parameters do not record `config.mask_padded_keys`: Hugging Face always attends to
  padded window tokens (the seqlab default).
  """
  _check_return_tensors(return_tensors)
  w = _Writer(params, config)
  w.conv("patch_embed/proj", "embeddings.patch_embeddings.projection")
  if config.patch_norm:
    w.norm("patch_norm", "embeddings.norm")
  for i, depth in enumerate(config.depths):
    for j in range(depth):
      key, path = f"encoder.layers.{i}.blocks.{j}", f"stage_{i}_block_{j}"
      _write_block(w, path, key, config.qkv_bias)
      w.put(f"{key}.attention.relative_position_bias.relative_position_bias_table",
            w.take(f"{path}/self_attention/relative_position_bias_table"))
    if i < len(config.depths) - 1:
      w.norm(f"stage_{i}_merge/norm", f"encoder.layers.{i}.downsample.norm")
      w.dense(f"stage_{i}_merge/reduction", f"encoder.layers.{i}.downsample.reduction",
              bias=False)
  w.norm("norm", "layernorm")
  if config.num_classes:
    w.dense("head", "classifier")
  return w.finish("swin" if config.num_classes else "", return_tensors)


def _hf_get(hf_config: Any) -> Callable[[str, Any], Any]:
  if isinstance(hf_config, Mapping):
    return lambda name, default=None: hf_config.get(name, default)
  return lambda name, default=None: getattr(hf_config, name, default)


def _hf_classes(get) -> int:
  id2label = get("id2label")
  return len(id2label) if id2label else int(get("num_labels", 0) or 0)


def _check_gelu(get) -> None:
  if get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hidden_act={get('hidden_act')!r}: seqlab's ViT and Swin use exact GELU")


def vit_config_from_hf(hf_config: Any, *, num_classes: int | None = None,
                       **overrides) -> ViTConfig:
  """The `ViTConfig` of a Hugging Face `ViTConfig` (object or its dict); fields overridable.

  `num_classes` defaults to the config's labels; pass 0 for a headless `ViTModel`.
  """
  get = _hf_get(hf_config)
  _check_gelu(get)
  if not get("qkv_bias", True):
    raise ValueError("qkv_bias=False is not supported by seqlab's ViT (biases everywhere)")
  fields = dict(image_size=get("image_size"), patch_size=get("patch_size"),
                num_channels=get("num_channels", 3), d_model=get("hidden_size"),
                num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                d_ff=get("intermediate_size"), layer_norm_eps=get("layer_norm_eps", 1e-12),
                num_classes=_hf_classes(get) if num_classes is None else num_classes)
  fields.update(overrides)
  return ViTConfig(**fields)


def swin_config_from_hf(hf_config: Any, *, num_classes: int | None = None,
                        **overrides) -> SwinConfig:
  """The `SwinConfig` of a Hugging Face `SwinConfig` (object or its dict); fields overridable."""
  get = _hf_get(hf_config)
  _check_gelu(get)
  if get("use_absolute_embeddings", False):
    raise ValueError("use_absolute_embeddings=True is not supported by seqlab's Swin")
  fields = dict(image_size=get("image_size"), patch_size=get("patch_size"),
                num_channels=get("num_channels", 3), embed_dim=get("embed_dim"),
                depths=tuple(get("depths")), num_heads=tuple(get("num_heads")),
                window_size=get("window_size"), mlp_ratio=float(get("mlp_ratio", 4.0)),
                qkv_bias=get("qkv_bias", True), layer_norm_eps=get("layer_norm_eps", 1e-5),
                drop_path_rate=float(get("drop_path_rate", 0.1)),
                num_classes=_hf_classes(get) if num_classes is None else num_classes)
  fields.update(overrides)
  return SwinConfig(**fields)


def mae_config_from_hf(hf_config: Any, **overrides) -> MAEConfig:
  """The `MAEConfig` of a Hugging Face `ViTMAEConfig` (object or its dict); fields overridable."""
  get = _hf_get(hf_config)
  _check_gelu(get)
  if not get("qkv_bias", True):
    raise ValueError("qkv_bias=False is not supported by seqlab's MAE (biases everywhere)")
  fields = dict(image_size=get("image_size"), patch_size=get("patch_size"),
                num_channels=get("num_channels", 3), d_model=get("hidden_size"),
                num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                d_ff=get("intermediate_size"), decoder_d_model=get("decoder_hidden_size"),
                decoder_num_layers=get("decoder_num_hidden_layers"),
                decoder_num_heads=get("decoder_num_attention_heads"),
                decoder_d_ff=get("decoder_intermediate_size"),
                mask_ratio=float(get("mask_ratio", 0.75)),
                norm_pix_loss=bool(get("norm_pix_loss", False)),
                layer_norm_eps=get("layer_norm_eps", 1e-12))
  fields.update(overrides)
  return MAEConfig(**fields)
