"""Flax linen building blocks: Dense, Embed, norms, Attention (with a KV cache), MLP, Block.

Thin shells that own parameters and call the pure functions of `seqlab.attention` and
`seqlab.positions`; masks are built by the caller with `seqlab.masks`. Parameters are float32;
`dtype` is the compute dtype (norm statistics, softmax and logits stay float32).

Parameter layout (what `seqlab.convert` maps checkpoints onto):

  Dense        kernel [*in, *out], bias [*out]
  Embed        embedding [num_embeddings, features]
  LayerNorm    scale [D], bias [D];   RMSNorm  scale [D]
  Attention    query/key/value kernel [D, N|K, H] (+ bias [N|K, H]), out kernel [N, H, D] (+ bias)
  MLP          wi [D, F] (gated: wi_0 = gate, wi_1 = linear), wo [F, D]
  Block        self_attention, self_attention_norm, (cross_attention, cross_attention_norm),
               mlp, mlp_norm

`param_logical_axes(params)` names every parameter axis ("embed", "mlp", "heads", "kv",
"vocab", "layers", or None) for sharding rules.

Layer stacks (`block_stack`, `apply_stack`): a model's blocks either unrolled, one module per
layer (`blocks_0`, `blocks_1`, ...), or with `scan_layers` one module run under `nn.scan`
whose parameters are the layers' stacked on a leading axis (logical name "layers") under the
stack's name (`blocks`): one traced block, so compile time and program size stop growing with
depth. `remat` recomputes activations in the backward pass: "none", "full" (keep only each
block's input) or "dots" (keep the matmul outputs, `jax.checkpoint_policies.checkpoint_dots`).
`stack_params` / `unstack_params` convert parameters between the two layouts.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from seqlab import attention as attention_lib
from seqlab import masks
from seqlab import positions as positions_lib

Array = jax.Array
Dtype = Any

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "gated_gelu", "swiglu")
GATED_ACTIVATIONS = ("gated_gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
REMAT_POLICIES = ("none", "full", "dots")


def check_choice(name: str, value: Any, choices: tuple) -> None:
  """Raises ValueError unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}")


def _expand(p: Array, ndim: int) -> Array:
  """Reshapes a parameter [*shape] to rank `ndim` with leading 1s (rank promotion is off)."""
  return p.reshape((1,) * (ndim - p.ndim) + p.shape)


def _kernel_init(init_std: float | None, num_in_axes: int, num_out_axes: int) -> Callable:
  """normal(init_std), or fan-in truncated-normal variance scaling when init_std is None."""
  if init_std is not None:
    return nn.initializers.normal(init_std)
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=tuple(range(num_in_axes)),
      out_axis=tuple(range(num_in_axes, num_in_axes + num_out_axes)))


class Dense(nn.Module):
  """y = x . kernel (+ bias), contracting the last `num_in_axes` axes of x.

  x `[..., *in]` -> y `[..., *features]`; kernel `[*in, *features]`.
  """
  features: int | tuple[int, ...]
  num_in_axes: int = 1
  use_bias: bool = True
  init_std: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = self.num_in_axes
    in_shape = tuple(x.shape[x.ndim - n_in:])
    kernel = self.param("kernel", _kernel_init(self.init_std, n_in, len(features)),
                        in_shape + features, jnp.float32)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
      y = y + _expand(bias.astype(self.dtype), y.ndim)
    return y


class Embed(nn.Module):
  """Embedding table `[num_embeddings, features]`; `attend` is the tied output projection."""
  num_embeddings: int
  features: int
  init_std: float = 1.0
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", nn.initializers.normal(self.init_std),
                                (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: Array) -> Array:
    """ids int `[...]` -> `[..., features]` in the compute dtype."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """x `[..., features]` -> logits `[..., num_embeddings]` (x . embedding^T)."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with float32 statistics; scale and bias `[D]`."""
  eps: float = 1e-5
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + self.eps)
    y = y * _expand(self.param("scale", nn.initializers.ones, (d,), jnp.float32), y.ndim)
    if self.use_bias:
      y = y + _expand(self.param("bias", nn.initializers.zeros, (d,), jnp.float32), y.ndim)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """T5's norm: x / sqrt(mean(x^2) + eps) * scale (no mean subtraction, no bias)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * _expand(self.param("scale", nn.initializers.ones, (d,), jnp.float32), y.ndim)
    return y.astype(self.dtype)


def make_norm(kind: str, eps: float, dtype: Dtype, name: str | None = None) -> nn.Module:
  """"layernorm" -> LayerNorm, "rmsnorm" -> RMSNorm."""
  check_choice("norm", kind, NORMS)
  if kind == "layernorm":
    return LayerNorm(eps=eps, dtype=dtype, name=name)
  return RMSNorm(eps=eps, dtype=dtype, name=name)


def activation_fn(name: str) -> Callable[[Array], Array]:
  """The elementwise function of an activation name (a gated one's gate function)."""
  check_choice("activation", name, ACTIVATIONS)
  return {"relu": jax.nn.relu,
          "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # BERT: exact erf
          "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's gelu_new
          "gated_gelu": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1
          "swiglu": jax.nn.silu}[name]


class Attention(nn.Module):
  """Multi-head / grouped-query / multi-query attention, self or cross, with an optional cache.

  `num_kv_heads` K divides `num_heads` N (K == N: MHA, K == 1: MQA). `rope=True` rotates q and
  k by their explicit positions (`seqlab.positions.rope`); a T5 relative bias comes in as
  `bias`. `scale` defaults to head_dim^-0.5 (T5 uses 1.0). Attention-probability dropout is not
  applied (residual dropout lives in `Block`).
  """
  features: int
  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  use_bias: bool = True
  rope: bool = False
  rope_base: float = 10_000.0
  scale: float | None = None
  init_std: float | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if num_kv_heads < 1 or self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={num_kv_heads}")
    dense = lambda features, n_in: Dense(features, num_in_axes=n_in, use_bias=self.use_bias,
                                         init_std=self.init_std, dtype=self.dtype)
    self.query = dense((self.num_heads, self.head_dim), 1)
    self.key = dense((num_kv_heads, self.head_dim), 1)
    self.value = dense((num_kv_heads, self.head_dim), 1)
    self.out = dense(self.features, 2)

  def _rotate(self, x_BTNH: Array, positions_BT: Array | None) -> Array:
    if not self.rope:
      return x_BTNH
    if positions_BT is None:
      raise ValueError("positions=None: an Attention with rope=True needs explicit positions")
    return positions_lib.rope(x_BTNH, positions_BT, base=self.rope_base)

  def project_kv(self, x_BSD: Array, positions_BS: Array | None = None) -> tuple[Array, Array]:
    """Keys and values `[B, S, K, H]` of `x_BSD` (keys rotated when rope=True)."""
    return self._rotate(self.key(x_BSD), positions_BS), self.value(x_BSD)

  def __call__(self, x_BTD: Array, kv_BSD: Array | None = None, *, mask: Array | None = None,
               bias: Array | None = None, positions: Array | None = None,
               kv_positions: Array | None = None, kv: tuple[Array, Array] | None = None,
               cache: dict | None = None, cache_index: Array | None = None,
               is_causal: bool = False):
    """Attends from `x_BTD` to itself (self) or to `kv_BSD` (cross); returns `[B, T, D]`.

    mask: bool broadcastable to `[B, N, T, S]` (True = may attend); bias: float, same rank.
    is_causal: the mask is (also) causal, which lets attention skip the blocks above the
      diagonal (`seqlab.attention.dot_product_attention`); ignored with a cache.
    positions `[B, T]` (and `kv_positions` `[B, S]` for cross attention) feed RoPE.
    kv: precomputed `(k, v)` `[B, S, K, H]` (cross-attention keys cached once) replaces the
      key/value projections.
    cache: `{"k": [B, K, H, L], "v": [B, K, L, H]}` (as `init_kv_cache` makes them); the new
      keys/values are written at slot `cache_index` (the mask then covers all L slots) and
      `(y, new_cache)` is returned instead of `y`.
    """
    q_BTNH = self._rotate(self.query(x_BTD), positions)
    if kv is not None:
      k_BSKH, v_BSKH = kv
    elif kv_BSD is None:
      k_BSKH, v_BSKH = self.project_kv(x_BTD, positions)
    else:
      k_BSKH, v_BSKH = self.project_kv(kv_BSD, kv_positions)
    if cache is None:
      q_BTNH = q_BTNH.astype(k_BSKH.dtype)
      out_BTNH = attention_lib.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask,
                                                     bias=bias, scale=self.scale,
                                                     is_causal=is_causal)
      return self.out(out_BTNH)
    # The cache holds what attention's matmuls read in place (keys [B, K, H, L], values
    # [B, K, L, H]); only the T new rows are transposed. A [B, L, K, H] cache is copied whole
    # into that layout on every decode step.
    batch, length, num_kv_heads, head_dim = k_BSKH.shape
    k_shape, v_shape = tuple(cache["k"].shape), tuple(cache["v"].shape)
    if (len(k_shape) != 4 or k_shape[:3] != (batch, num_kv_heads, head_dim)
        or k_shape[3] < length or v_shape != (batch, num_kv_heads, k_shape[3], head_dim)):
      raise ValueError(f"cache k {k_shape} and v {v_shape} must be [B, K, H, L] and "
                       f"[B, K, L, H] with B={batch}, K={num_kv_heads}, H={head_dim}, "
                       f"L >= {length}")
    out_BTNH, k_BKHL, v_BKLH = attention_lib.cache_attention(
        q_BTNH.astype(cache["k"].dtype), cache["k"], cache["v"], k_BSKH, v_BSKH, cache_index,
        mask=mask, bias=bias, scale=self.scale)
    return self.out(out_BTNH), {"k": k_BKHL, "v": v_BKLH}


class MLP(nn.Module):
  """Position-wise feed-forward: wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated."""
  features: int
  d_ff: int
  activation: str = "gelu"
  use_bias: bool = True
  dropout_rate: float = 0.0
  init_std: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array, *, train: bool = False) -> Array:
    act = activation_fn(self.activation)
    dense = lambda features, name: Dense(features, use_bias=self.use_bias,
                                         init_std=self.init_std, dtype=self.dtype, name=name)
    if self.activation in GATED_ACTIVATIONS:
      h_BTF = act(dense(self.d_ff, "wi_0")(x_BTD)) * dense(self.d_ff, "wi_1")(x_BTD)
    else:
      h_BTF = act(dense(self.d_ff, "wi")(x_BTD))
    h_BTF = nn.Dropout(self.dropout_rate)(h_BTF, deterministic=not train)
    return dense(self.features, "wo")(h_BTF)


class Block(nn.Module):
  """A Transformer layer: self-attention, optional cross-attention, MLP; pre- or post-LN.

  pre:  x + drop(f(norm(x)))   (GPT-2, T5)        post: norm(x + drop(f(x)))   (BERT, Vaswani)
  """
  features: int
  num_heads: int
  head_dim: int
  d_ff: int
  num_kv_heads: int | None = None
  activation: str = "gelu"
  norm: str = "layernorm"
  norm_position: str = "pre"
  norm_eps: float = 1e-5
  use_bias: bool = True
  has_cross_attention: bool = False
  rope: bool = False
  rope_base: float = 10_000.0
  attention_scale: float | None = None
  dropout_rate: float = 0.0
  mlp_dropout_rate: float = 0.0
  init_std: float | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    check_choice("norm_position", self.norm_position, NORM_POSITIONS)
    attention = lambda rope: Attention(
        features=self.features, num_heads=self.num_heads, head_dim=self.head_dim,
        num_kv_heads=self.num_kv_heads, use_bias=self.use_bias, rope=rope,
        rope_base=self.rope_base, scale=self.attention_scale, init_std=self.init_std,
        dtype=self.dtype)
    self.self_attention = attention(self.rope)
    self.self_attention_norm = make_norm(self.norm, self.norm_eps, self.dtype)
    if self.has_cross_attention:
      self.cross_attention = attention(False)
      self.cross_attention_norm = make_norm(self.norm, self.norm_eps, self.dtype)
    self.mlp = MLP(features=self.features, d_ff=self.d_ff, activation=self.activation,
                   use_bias=self.use_bias, dropout_rate=self.mlp_dropout_rate,
                   init_std=self.init_std, dtype=self.dtype)
    self.mlp_norm = make_norm(self.norm, self.norm_eps, self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)

  def cross_kv(self, encoded_BSD: Array) -> tuple[Array, Array]:
    """Cross-attention keys and values `[B, S, K, H]` of the encoder output (cached once)."""
    return self.cross_attention.project_kv(encoded_BSD)

  def _residual(self, x, norm, fn, train):
    if self.norm_position == "pre":
      y = fn(norm(x))
      return x + self.dropout(y, deterministic=not train)
    y = fn(x)
    return norm(x + self.dropout(y, deterministic=not train))

  def __call__(self, x_BTD: Array, *, mask: Array | None = None, bias: Array | None = None,
               positions: Array | None = None, encoded: Array | None = None,
               cross_mask: Array | None = None, cross_kv: tuple[Array, Array] | None = None,
               cache: dict | None = None, cache_index: Array | None = None,
               train: bool = False, is_causal: bool = False):
    """x `[B, T, D]` -> `[B, T, D]` (and the new self-attention cache when `cache` is given).

    mask/bias: self-attention mask and additive bias (`is_causal`: the mask is causal, see
    `Attention`); positions `[B, T]` for RoPE; encoded
    `[B, S, D]` with `cross_mask` for cross-attention, or `cross_kv` precomputed by `cross_kv`.
    cache/cache_index: see `Attention`.
    """
    new_cache = None

    def self_attend(h):
      nonlocal new_cache
      out = self.self_attention(h, mask=mask, bias=bias, positions=positions, cache=cache,
                                cache_index=cache_index, is_causal=is_causal)
      if cache is None:
        return out
      out, new_cache = out
      return out

    x_BTD = self._residual(x_BTD, self.self_attention_norm, self_attend, train)
    if self.has_cross_attention:
      if encoded is None and cross_kv is None:
        raise ValueError("a Block with has_cross_attention=True needs encoded= or cross_kv=")
      cross = lambda h: self.cross_attention(h, encoded, mask=cross_mask, kv=cross_kv)
      x_BTD = self._residual(x_BTD, self.cross_attention_norm, cross, train)
    mlp = lambda h: self.mlp(h, train=train)
    x_BTD = self._residual(x_BTD, self.mlp_norm, mlp, train)
    return x_BTD if cache is None else (x_BTD, new_cache)


class RelativePositionBias(nn.Module):
  """T5's relative-position bias: a table `[num_buckets, N]` shared by all layers of a stack."""
  num_heads: int
  bidirectional: bool = True
  num_buckets: int = 32
  max_distance: int = 128
  init_std: float = 1.0

  @nn.compact
  def __call__(self, q_positions: Array, kv_positions: Array) -> Array:
    """Positions `[B, T]`, `[B, S]` -> float32 bias `[B, N, T, S]`."""
    table = self.param("table", nn.initializers.normal(self.init_std),
                       (self.num_buckets, self.num_heads), jnp.float32)
    return positions_lib.t5_relative_bias(table, q_positions, kv_positions,
                                          bidirectional=self.bidirectional,
                                          max_distance=self.max_distance)


# ---------------------------------------------------------------------------------------------
# Layer stacks: unrolled or scanned, with or without rematerialisation.
# ---------------------------------------------------------------------------------------------

# The call arguments of `Block` in the positional order a stack passes them, and those that
# differ per layer with the axis of their layer index (the cache keeps its batch axis first,
# so decoding reorders every per-row array along axis 0); the rest are shared by every layer.
BLOCK_ARGS = ("mask", "bias", "positions", "encoded", "cross_mask", "cross_kv", "cache",
              "cache_index", "train", "is_causal")
BLOCK_PER_LAYER = {"cache": 1, "cross_kv": 1}
_STATIC_ARGS = ("train", "is_causal")
_DEFAULT_ARGS = {"train": False, "is_causal": False}


def check_stack_options(scan_layers: Any, remat: Any) -> None:
  """ValueError naming `scan_layers` or `remat` unless they are a bool and a remat policy."""
  if not isinstance(scan_layers, bool):
    raise ValueError(f"scan_layers={scan_layers!r} must be True or False")
  check_choice("remat", remat, REMAT_POLICIES)


@functools.cache
def _positional(block_cls: type, arg_names: tuple[str, ...]) -> type:
  """`block_cls` called as (x, *args) -> (x, per-layer output or None): `nn.scan` and
  `nn.remat` pass arguments by position, and scan wants a (carry, output) pair.
  `stack_cross_kv` (x, *args) -> (x, the layer's cross-attention keys and values of
  args' `encoded`), for an encoder-decoder's cache."""
  def __call__(self, x, *args):
    out = block_cls.__call__(self, x, **dict(zip(arg_names, args)))
    return out if isinstance(out, tuple) else (out, None)

  def stack_cross_kv(self, x, *args):
    return x, self.cross_kv(dict(zip(arg_names, args))["encoded"])
  return type(block_cls.__name__, (block_cls,),
              {"__call__": __call__, "stack_cross_kv": stack_cross_kv})


def block_stack(block_cls: type, num_layers: int, *, name: str, scan_layers: bool = False,
                remat: str = "none", arg_names: tuple[str, ...] = BLOCK_ARGS,
                per_layer: dict[str, int] | None = None, **block_kwargs):
  """`num_layers` blocks `block_cls(**block_kwargs)`, for a module's `setup`.

  Unrolled: a list of modules named `{name}_0`, `{name}_1`, ...; with `scan_layers` one module
  named `name` whose parameters have a leading layer axis. Run it with `apply_stack` and the
  same `arg_names` (the block's keyword arguments, "train" and "is_causal" static) and
  `per_layer` ({argument: its layer axis}, default `BLOCK_PER_LAYER`): such an argument takes
  one value per layer, a list unrolled and an array with that layer axis scanned.
  """
  check_stack_options(scan_layers, remat)
  per_layer = BLOCK_PER_LAYER if per_layer is None else per_layer
  cls = _positional(block_cls, arg_names)
  methods = ["__call__", "stack_cross_kv"]
  if remat != "none":
    policy = (jax.checkpoint_policies.nothing_saveable if remat == "full"
              else jax.checkpoint_policies.checkpoint_dots)
    # argnums count self (0) and x (1); inside a scan the loop already keeps XLA from merging
    # the recomputation into the forward pass, so no CSE barrier is needed there.
    static = tuple(2 + arg_names.index(a) for a in _STATIC_ARGS if a in arg_names)
    cls = nn.remat(cls, policy=policy, static_argnums=static, prevent_cse=not scan_layers,
                   methods=methods)
  if not scan_layers:
    return [cls(name=f"{name}_{i}", **block_kwargs) for i in range(num_layers)]
  in_axes = tuple(per_layer.get(a, nn.broadcast) for a in arg_names)
  out_axes = max(per_layer.values(), default=0)
  scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=in_axes, out_axes=out_axes, length=num_layers, methods=methods,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(name=name, **block_kwargs)


def apply_stack(stack, x: Array, *, method: str = "__call__",
                arg_names: tuple[str, ...] = BLOCK_ARGS, per_layer: dict[str, int] | None = None,
                **kwargs):
  """Runs a `block_stack` on x; returns (x, the per-layer outputs: None, or a list unrolled /
  a pytree with the layer axis of `per_layer` scanned, such as new caches). `method`
  "stack_cross_kv" returns every layer's cross-attention keys and values instead."""
  per_layer = BLOCK_PER_LAYER if per_layer is None else per_layer
  unknown = set(kwargs) - set(arg_names)
  if unknown:
    raise TypeError(f"unknown stack arguments {sorted(unknown)}")
  args = [kwargs.get(a, _DEFAULT_ARGS.get(a)) for a in arg_names]
  if not isinstance(stack, (list, tuple)):
    return getattr(stack, method)(x, *args)
  outputs = []
  for i, block in enumerate(stack):
    layer_args = [v[i] if a in per_layer and v is not None else v
                  for a, v in zip(arg_names, args)]
    x, out = getattr(block, method)(x, *layer_args)
    outputs.append(out)
  return x, (None if all(o is None for o in outputs) else outputs)


def stack_layers(trees: list, axis: int = 0) -> Any:
  """Per-layer pytrees -> one pytree with a layer axis at `axis` (a scanned stack's layout)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *trees)


def unstack_layers(tree: Any, axis: int = 0) -> list:
  """A pytree with a layer axis at `axis` -> its per-layer pytrees."""
  num_layers = jax.tree.leaves(tree)[0].shape[axis]
  return [jax.tree.map(lambda x, i=i: jnp.take(x, i, axis=axis), tree)
          for i in range(num_layers)]


def stack_params(params: dict, names: tuple[str, ...]) -> dict:
  """Unrolled parameters (`{name}_{i}`) -> the scanned layout (`name`, stacked) for each stack
  `name` in `names`; everything else unchanged. The inverse of `unstack_params`."""
  out = dict(params)
  for name in names:
    pattern = re.compile(rf"{re.escape(name)}_(\d+)")
    found = sorted((int(m.group(1)), k) for k in params if (m := pattern.fullmatch(k)))
    if not found:
      if name in params:
        continue  # already stacked
      raise ValueError(f"no {name}_0, {name}_1, ... in the parameters to stack")
    if [i for i, _ in found] != list(range(len(found))):
      raise ValueError(f"layers {[i for i, _ in found]} of {name} are not 0..{len(found) - 1}")
    out[name] = stack_layers([params[k] for _, k in found])
    for _, k in found:
      del out[k]
  return out


def unstack_params(params: dict, names: tuple[str, ...]) -> dict:
  """Scanned parameters (each stack `name` with a leading layer axis) -> the unrolled layout
  (`{name}_0`, `{name}_1`, ...); everything else unchanged."""
  out = dict(params)
  for name in names:
    if name not in params:
      continue  # already unrolled
    for i, layer in enumerate(unstack_layers(out.pop(name))):
      out[f"{name}_{i}"] = layer
  return out


# ---------------------------------------------------------------------------------------------
# KV cache (the model side of seqlab.decoding's contract).
# ---------------------------------------------------------------------------------------------


def init_kv_cache(num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
                  head_dim: int, dtype: Dtype, *, stacked: bool = False) -> dict:
  """An empty decoder cache: per layer k `[B, K, H, L]`, v `[B, K, L, H]` zeros, no valid slot.

  "layers" is a list of per-layer dicts, or with `stacked` (a scanned stack) one dict whose
  arrays have the layer axis second (`[B, layers, ...]`). "end" is 0. Keys and values are stored in the layouts attention's matmuls read in place
  (`seqlab.attention.cache_attention`), where a `[B, L, K, H]` cache is copied whole on every
  decode step. Every array except the scalar "end" has the batch as its leading axis, so beam
  search can reorder rows with one `tree_map`.
  """
  for name, value in (("batch_size", batch_size), ("max_length", max_length)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer")
  k_shape = (batch_size, num_kv_heads, head_dim, max_length)
  v_shape = (batch_size, num_kv_heads, max_length, head_dim)
  per_layer = [{"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)}
               for _ in range(num_layers)]
  return {"layers": stack_layers(per_layer, axis=1) if stacked else per_layer,
          "valid": jnp.zeros((batch_size, max_length), jnp.bool_),
          "end": jnp.zeros((), jnp.int32),
          "next_position": jnp.zeros((batch_size,), jnp.int32)}


class CacheStep(NamedTuple):
  """What one `extend` call needs besides the layers' keys and values."""
  positions: Array      # int32 [B, T]: positions of the new tokens (0 on padding)
  mask: Array           # bool [B, 1, T, L]: self-attention mask over all cache slots
  kv_valid: Array       # bool [B, L]: cache "valid" after the write
  kv_positions: Array   # int32 [B, L]: position of the token in every slot
  end: Array            # int32 []: cache "end" after the write
  next_position: Array  # int32 [B]: cache "next_position" after the write


def concrete_int(x) -> int | None:
  """int(x) for a concrete scalar, None for a tracer (the value is unknown under jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return int(x)


def cache_step(cache: dict, tokens_BT: Array, valid_BT: Array | None, *,
               bidirectional: bool) -> CacheStep:
  """Positions and masks for writing T tokens into slots [end, end+T) of every row.

  valid_BT False marks left padding: such a slot is never attended to and takes no position.
  Causal: new token i sees valid slots j <= end + i; bidirectional: every valid slot < end + T.
  Writing past the cache raises ValueError when `end` is concrete; under jit
  `lax.dynamic_update_slice` would clamp the write to the last T slots, so the caller sizes
  the cache (as `seqlab.decoding.generate` does).
  """
  tokens_BT = jnp.asarray(tokens_BT)
  if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
    raise ValueError(f"tokens must be int [batch, length], got shape {tuple(tokens_BT.shape)} "
                     f"dtype {tokens_BT.dtype}")
  batch, length = tokens_BT.shape
  cache_batch, max_length = cache["valid"].shape
  if batch != cache_batch:
    raise ValueError(f"tokens have batch {batch} but the cache has batch {cache_batch}")
  valid_BT = (jnp.ones((batch, length), jnp.bool_) if valid_BT is None
              else jnp.asarray(valid_BT).astype(jnp.bool_))
  if valid_BT.shape != (batch, length):
    raise ValueError(f"valid has shape {tuple(valid_BT.shape)}, expected {(batch, length)}")
  end = cache["end"]
  end_value = concrete_int(end)
  if end_value is not None and end_value + length > max_length:
    raise ValueError(f"cannot extend the cache by {length} tokens: {end_value} of its "
                     f"max_length={max_length} slots are used")
  steps_BT = jnp.cumsum(valid_BT.astype(jnp.int32), axis=1)
  positions_BT = jnp.where(valid_BT, cache["next_position"][:, None] + steps_BT - 1, 0)
  kv_valid_BL = lax.dynamic_update_slice(cache["valid"], valid_BT, (0, end))
  mask = masks.padding(valid_BT, kv_valid_BL)
  if not bidirectional:
    mask = masks.combine(mask, masks.causal(length, max_length, offset=end))
  kv_positions_BL = jnp.cumsum(kv_valid_BL.astype(jnp.int32), axis=1) - 1
  return CacheStep(positions=positions_BT.astype(jnp.int32), mask=mask, kv_valid=kv_valid_BL,
                   kv_positions=jnp.maximum(kv_positions_BL, 0), end=end + length,
                   next_position=cache["next_position"] + steps_BT[:, -1])


# Logical axis names per parameter, from the names above.
_AXES = {
    ("query", "kernel"): ("embed", "heads", "kv"), ("query", "bias"): ("heads", "kv"),
    ("key", "kernel"): ("embed", "heads", "kv"), ("key", "bias"): ("heads", "kv"),
    ("value", "kernel"): ("embed", "heads", "kv"), ("value", "bias"): ("heads", "kv"),
    ("out", "kernel"): ("heads", "kv", "embed"), ("out", "bias"): ("embed",),
    ("wi", "kernel"): ("embed", "mlp"), ("wi_0", "kernel"): ("embed", "mlp"),
    ("wi_1", "kernel"): ("embed", "mlp"), ("wo", "kernel"): ("mlp", "embed"),
    ("wi", "bias"): ("mlp",), ("wi_0", "bias"): ("mlp",), ("wi_1", "bias"): ("mlp",),
    ("wo", "bias"): ("embed",), ("token_embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"), ("table",): (None, "heads"),
}


def param_logical_axes(params: Any) -> Any:
  """A pytree like `params` whose leaves are tuples of logical axis names (or None) per axis.

  Names: "embed" (d_model), "mlp" (d_ff), "heads" (N or K), "kv" (head_dim), "vocab",
  "layers" (the leading axis of a scanned stack, `STACK_NAMES`); any axis not covered (position tables, small heads) is None. Feed it to
  `flax.linen.logical_to_mesh_sharding` with rules such as `(("embed", "fsdp"),)`.
  """
  def unstacked(keys, ndim):
    for n in (2, 1):
      if keys[-n:] in _AXES and len(_AXES[keys[-n:]]) == ndim:
        return _AXES[keys[-n:]]
    if keys[-1] in ("scale", "bias") and ndim == 1:
      return ("embed",)
    if keys[-1] == "embedding" and ndim == 2:
      return (None, "embed")
    return (None,) * ndim

  def axes(path, leaf):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if any(k in STACK_NAMES for k in keys):  # a scanned stack: layers first
      return ("layers", *unstacked(keys, leaf.ndim - 1))
    return unstacked(keys, leaf.ndim)
  return jax.tree_util.tree_map_with_path(axes, params)


# The names scanned stacks take in seqlab's models (an unrolled layer is `{name}_{i}`).
STACK_NAMES = frozenset({"blocks", "encoder_blocks", "decoder_blocks", "block",
                         "decoder_block"})

