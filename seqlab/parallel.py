"""Device meshes and the parallel strategies: data parallel (pmap semantics), FSDP, tensor.

The mesh has three axes, `[data, fsdp, model]`. Both strategies run the same pure
`train_step(state, batch, axis_name) -> (state, metrics)` and give the same numbers as one
device:

* **data**: the step runs per device under `jax.shard_map`; parameters and optimizer state are
  replicated, the batch is split over every device, and gradients and loss sums are reduced
  with `lax.psum` — what `jax.pmap` + `lax.pmean` do, without the pmap API.
* **fsdp**: the step is `jax.jit`-ed with `NamedSharding`s: parameters and their optimizer state
  are split over the `fsdp` mesh axis, the batch over the `data` and `fsdp` axes, and XLA
  inserts the all-gathers and reduce-scatters. With a `model` axis > 1 (tensor parallelism,
  Megatron-style) parameters are also split over `model` by the logical rules
  `TENSOR_PARALLEL_RULES`: query / key / value projections by head and the MLP's input by its
  hidden unit (column-parallel), the attention output and the MLP's output likewise on their
  input side (row-parallel), embeddings and LM head by vocabulary entry. The mesh axes are
  `AxisType.Auto`, so XLA's sharding propagation derives the activations' shardings and the
  collectives (Megatron's all-reduce after each row-parallel matmul) from the parameters'
  alone; the models carry no sharding annotations. Every device of one `model` group sees the
  same batch rows. "data" (shard_map) replicates the parameters and refuses `model` > 1.

Which dimension of a parameter FSDP splits:

* with logical axis rules (`rules=(("embed", "fsdp"), ...)`, from the config, plus
  `TENSOR_PARALLEL_RULES` for the logical names they leave out when `model` > 1), every
  parameter whose path `seqlab.layers.param_logical_axes` names gets the mesh axis of the first
  rule of one of its logical axes that divides the dimension (t5x / MaxText's rule); one that
  the rules leave off "fsdp" gets it on its largest remaining divisible dimension as
  `fsdp_spec` chooses (never a scanned stack's "layers" axis); optimizer-state leaves follow
  the parameter they mirror (same path suffix and shape);
* everything else, and every leaf when no rules apply, follows `fsdp_spec`: the largest
  dimension divisible by the fsdp size, replicated below 1,024 elements.

A logical axis that a rule maps to "model" must divide by the `model` size (as t5x requires;
MaxText pads the vocabulary instead, which would change the parameters' shapes): heads,
kv heads, d_ff and the vocabulary; anything else is a ValueError naming the field. A rule
`("vocab", None)` keeps the vocabulary whole (replicated over `model`) instead.

Multi-host: call `initialize_distributed()` first; each process then feeds its own rows of the
global batch through `global_batch(...)` (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from seqlab import layers

DATA_AXES = ("data", "fsdp")  # the batch is split over both; "model" groups share rows
STRATEGIES = ("data", "fsdp")
# Ordered by increasing communication: `jax.make_mesh` puts the last axis on the nearest chips.
MESH_AXES = ("data", "fsdp", "model")
# Megatron's split, as logical axis rules: added for the names a config's rules leave out.
TENSOR_PARALLEL_RULES = (("heads", "model"), ("mlp", "model"), ("vocab", "model"))
# The config field behind each logical name that tensor parallelism splits (error messages).
_FIELDS = {"mlp": "d_ff", "vocab": "vocab_size"}


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           heartbeat_timeout_s: int | None = None) -> None:
  """Joins a multi-process run: automatic on TPU pods / SLURM, or an explicit coordinator.

  On CPU, cross-process collectives use gloo over TCP (jax's default
  `jax_cpu_collectives_implementation`), so local multi-process runs need nothing else.
  `heartbeat_timeout_s` bounds how long the others wait for a process that died before the
  coordination service stops them with an error (JAX's default when None).
  """
  extra = {} if heartbeat_timeout_s is None else {
      "heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
  if not coordinator_address and not num_processes and process_id is None:
    jax.distributed.initialize(**extra)
    return
  if not coordinator_address or not num_processes or process_id is None:
    raise ValueError(f"coordinator_address={coordinator_address!r}, num_processes="
                     f"{num_processes!r} and process_id={process_id!r} go together")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **extra)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None, *,
              model: int = 1) -> Mesh:
  """A `[data, fsdp, model]` device mesh with axes `MESH_AXES`, all of type `AxisType.Auto`.

  `-1` for `data` or `fsdp` means "all remaining devices"; data * fsdp * model must equal the
  device count. `jax.make_mesh` lays the devices out (`jax.devices()` order on CPU, by
  physical topology on TPU, with "model" on the nearest chips); each process's devices then
  hold whole `model` groups, so a process feeds distinct batch rows (ValueError otherwise).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if isinstance(model, bool) or not isinstance(model, (int, np.integer)) or (
      model < 1 or n % model):
    raise ValueError(f"mesh model={model!r} does not divide the device count {n}")
  if data == -1 and fsdp == -1:
    raise ValueError("mesh data=-1 and fsdp=-1: at most one axis may be -1")
  if data == -1:
    if fsdp <= 0 or n % (fsdp * model):
      raise ValueError(f"mesh fsdp={fsdp} x model={model} does not divide the device count {n}")
    data = n // (fsdp * model)
  if fsdp == -1:
    if data <= 0 or n % (data * model):
      raise ValueError(f"mesh data={data} x model={model} does not divide the device count {n}")
    fsdp = n // (data * model)
  if data < 1 or fsdp < 1 or data * fsdp * model != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x model={model} does not match the "
                     f"device count {n}")
  mesh = jax.make_mesh((data, fsdp, model), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)
  # A model group split over processes would need the same rows from each of them.
  groups = mesh.devices.reshape(-1, model)
  if any(len({d.process_index for d in group}) > 1 for group in groups):
    raise ValueError(f"mesh model={model} spans the devices of several processes; it must "
                     f"divide the {jax.local_device_count()} devices of each process")
  return mesh


def model_size(mesh) -> int:
  """The size of the mesh's "model" (tensor-parallel) axis; 1 for a mesh without one."""
  return dict(mesh.shape).get("model", 1)


def check_strategy(strategy: str, model: int = 1) -> None:
  """ValueError unless `strategy` is known and can run with a "model" axis of size `model`
  ("data" replicates every parameter, so it needs `model` == 1)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"mesh.strategy={strategy!r} is not one of {STRATEGIES}")
  if strategy != "fsdp" and model > 1:
    raise ValueError(f"mesh.model={model} needs mesh.strategy=fsdp (strategy {strategy!r} "
                     "replicates every parameter on every device)")


def num_data_shards(mesh: Mesh) -> int:
  """How many pieces the global batch is split into (every device gets one)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """ValueError unless `batch_size` splits evenly over every device of `mesh`."""
  shards, model = num_data_shards(mesh), model_size(mesh)
  if batch_size < 1 or batch_size % shards:
    where = (f"devices of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
             if model == 1 else f"batch shards of the mesh (data={mesh.shape['data']} x fsdp="
             f"{mesh.shape['fsdp']}; each shard's rows go to mesh.model={model} devices)")
    raise ValueError(f"{name}={batch_size} is not divisible by the {shards} {where}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device; other dimensions replicated."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**10,
              base: P | None = None, frozen: Sequence[int] = ()) -> P:
  """Splits the largest dimension divisible by `fsdp_size` over "fsdp"; small arrays replicate.

  MaxText's default FSDP rule: it needs no per-layer annotations and shards almost all the
  bytes of a Transformer. Ties go to the earlier dimension. With `base` (a spec from logical
  rules that leaves "fsdp" unused), only its unsplit dimensions outside `frozen` are candidates
  and the result keeps `base`'s other entries.
  """
  spec = [None] * len(shape) if base is None else [*base, *[None] * (len(shape) - len(base))]
  if fsdp_size > 1 and math.prod(shape) >= min_size and "fsdp" not in spec:
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
      if spec[i] is None and i not in frozen and shape[i] % fsdp_size == 0:
        spec[i] = "fsdp"
        break
  return P(*spec) if any(axis is not None for axis in spec) else P()


def logical_spec(axes: Sequence[str | None], shape: tuple[int, ...], mesh: Mesh,
                 rules: Sequence[Sequence[str | None]]) -> P | None:
  """The `PartitionSpec` that `rules` give a parameter with logical `axes`, or None if none apply.

  Each dimension takes the mesh axis of the first rule naming its logical axis whose mesh axis
  is unused so far in this spec, has size > 1 and divides the dimension.
  """
  spec, used = [], set()
  for name, size in zip(axes, shape):
    chosen = None
    for logical, mesh_axis in rules:
      if (name is not None and logical == name and mesh_axis is not None
          and mesh_axis not in used and mesh.shape[mesh_axis] > 1
          and size % mesh.shape[mesh_axis] == 0):
        chosen = mesh_axis
        break
    if chosen is not None:
      used.add(chosen)
    spec.append(chosen)
  return P(*spec) if used else None


def _check_rules(rules, mesh: Mesh):
  rules = [tuple(rule) for rule in rules]
  for rule in rules:
    if len(rule) != 2 or (rule[1] is not None and rule[1] not in mesh.shape):
      raise ValueError(f"logical axis rule {rule!r} is not (logical_name, mesh_axis) with "
                       f"mesh_axis in {tuple(mesh.shape)} or None")
  return rules


def effective_rules(rules: Sequence[Sequence[str | None]] | None, mesh) -> list[tuple]:
  """`rules` plus, on a mesh whose "model" axis is > 1, the `TENSOR_PARALLEL_RULES` entries
  for the logical names `rules` do not mention (so `("vocab", None)` keeps "vocab" whole)."""
  rules = _check_rules(rules or (), mesh)
  if model_size(mesh) > 1:
    named = {rule[0] for rule in rules}
    rules += [rule for rule in TENSOR_PARALLEL_RULES if rule[0] not in named]
  return rules


def _check_divisible(keys: tuple[str, ...], axes, shape, mesh, rules) -> None:
  """ValueError naming the config field when a dimension that `rules` send to "model" does not
  divide by its size (`logical_spec` would quietly leave it whole)."""
  model = model_size(mesh)
  to_model = {logical for logical, mesh_axis in rules if mesh_axis == "model"}
  for name, size in zip(axes, shape):
    if model > 1 and name in to_model and size % model:
      field = _FIELDS.get(name, name)
      if name == "heads":
        field = "num_kv_heads" if {"key", "value"} & set(keys) else "num_heads"
      raise ValueError(f"mesh.model={model} does not divide {field}={size} (logical axis "
                       f"{name!r} of {'/'.join(keys)}); use a mesh.model that divides it, or "
                       f"a rule ({name!r}, None) in mesh.rules to keep it whole")


def _path_keys(path) -> tuple[str, ...]:
  keys = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        keys.append(str(getattr(k, attr)))
        break
  return tuple(keys)


def state_shardings(state_shapes: Any, mesh: Mesh, strategy: str,
                    rules: Sequence[Sequence[str | None]] | None = None) -> Any:
  """A pytree of `NamedSharding` for a train state (shapes from `jax.eval_shape`).

  "data" replicates everything. "fsdp" uses the logical `rules` (with the tensor-parallel
  defaults when the mesh's "model" axis is > 1: `effective_rules`) for the parameters they
  name (and the optimizer-state leaves mirroring them) and `fsdp_spec` for the rest; see the
  module docstring. ValueError for "data" on a "model" axis > 1 and for a dimension the rules
  send to "model" that it does not divide.
  """
  check_strategy(strategy, model_size(mesh))
  if strategy == "data":
    return jax.tree_util.tree_map(lambda _: replicated(mesh), state_shapes)
  fsdp_size = mesh.shape["fsdp"]
  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}
  params = getattr(state_shapes, "params", None)
  rules = effective_rules(rules, mesh)
  if rules and params is not None:
    axes_tree = layers.param_logical_axes(params)
    for (path, leaf), axes in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_leaves(axes_tree, is_leaf=lambda x: isinstance(x, tuple))):
      keys, shape = _path_keys(path), tuple(leaf.shape)
      _check_divisible(keys, axes, shape, mesh, rules)
      spec = logical_spec(axes, shape, mesh, rules)
      if spec is not None:
        frozen = [i for i, name in enumerate(axes) if name == "layers"]
        by_path[keys] = (shape, fsdp_spec(shape, fsdp_size, base=spec, frozen=frozen))

  def sharding(path, leaf):
    shape = tuple(leaf.shape)
    keys = _path_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == shape:
        return NamedSharding(mesh, hit[1])
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size))

  return jax.tree_util.tree_map_with_path(sharding, state_shapes)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows of the batch into global arrays split over the mesh.

  `local_batch` holds this process's `global_batch_size / process_count` rows (the rows of its
  own devices, in device order); on one process it is the whole batch.
  """
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(x))
          for name, x in local_batch.items()}


def distribute_step(step_fn: Callable, mesh: Mesh, strategy: str, state_sharding: Any,
                    *, donate: bool = True) -> Callable:
  """Jits `step_fn(state, batch, axis_name=...) -> (state, metrics)` for `strategy` on `mesh`.

  `step_fn` must reduce its gradient and metric sums over `axis_name` (None on one device and
  under FSDP, where the step sees the global batch). Under "data" each device sees its rows;
  `check_vma=False` keeps pmap's semantics: gradients of replicated parameters are local until
  the step's explicit `psum` (with vma checking, autodiff would insert a second one).
  """
  check_strategy(strategy, model_size(mesh))
  batch_shard = batch_sharding(mesh)
  donate_argnums = (0,) if donate else ()
  if strategy == "data":
    per_device = jax.shard_map(
        lambda state, batch: step_fn(state, batch, axis_name=DATA_AXES),
        mesh=mesh, in_specs=(P(), P(DATA_AXES)), out_specs=(P(), P()), check_vma=False)
    return jax.jit(per_device, in_shardings=(state_sharding, batch_shard),
                   out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=donate_argnums)
  if strategy == "fsdp":
    return jax.jit(lambda state, batch: step_fn(state, batch, axis_name=None),
                   in_shardings=(state_sharding, batch_shard),
                   out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=donate_argnums)
  raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")


def psum_if(x: Any, axis_name) -> Any:
  """`lax.psum` over `axis_name`, or the identity when not inside a mapped axis."""
  return x if axis_name is None else lax.psum(x, axis_name)


def force_host_devices(count: int) -> None:
  """Asks XLA for `count` CPU devices; only effective before JAX initialises its backend."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def tree_max_abs_diff(a: Any, b: Any) -> float:
  """Largest absolute elementwise difference between two pytrees of arrays (float64 on host)."""
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                                initial=0.0)), a, b)
  return float(max(jax.tree_util.tree_leaves(diffs), default=0.0))
