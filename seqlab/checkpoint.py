"""Checkpoints that resume exactly: train state + data-iterator state + config, via orbax.

A checkpoint at step k holds everything needed to continue as if never stopped: the train
state (parameters, optimizer state, step, dropout key), the input pipeline's iterator state,
the run's config, and the shape of every state leaf. Saves are asynchronous: orbax writes into
a temporary directory and renames it when complete, so a save killed half-way never looks
finished (and its temporary directory is removed at the next start).

Checkpoints are readable on any mesh: `restore` reads every array straight into the
*target's* shardings (the template's `jax.ShapeDtypeStruct(..., sharding=...)`; a leaf without
one goes to the first local device), so a state saved by 8 devices with FSDP or by 2 processes
is read by 1 device, and the reverse.

Integrity: every save records a fingerprint of each array (`fingerprints`: a position-weighted
sum of its bits modulo 2^32, computed on the devices where the array lives, so it does not
depend on the mesh). `restore` recomputes them and treats a mismatch as damage.

Damage (a truncated, missing or bit-flipped file, a fingerprint mismatch) makes `restore` skip
that checkpoint with one warning and use the previous one; `discard_skipped()` then moves the
damaged ones aside (`<step>.corrupt`) so the run can write that step again. Any other failure
(a topology or sharding error, a bug) raises `CheckpointRestoreError` naming the cause and
leaves the checkpoint alone. A checkpoint whose state shapes differ from the model being
restored raises `CheckpointMismatchError` before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from seqlab import workdir as workdir_lib

_STATE, _DATA, _META = "state", "data", "meta"


class CheckpointMismatchError(ValueError):
  """The work directory holds a checkpoint of a different model or optimizer."""


class CheckpointRestoreError(ValueError):
  """A checkpoint could not be restored for a reason other than damage, or none is readable."""


# Status words of TensorStore / orbax read errors that mean the files are damaged or missing.
_DAMAGE_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "Encountered error while reading",
                   "No such file", "JSONDecodeError", "Expecting value", "Unterminated string",
                   "Unexpected end", "checksum", "Corrupt", "corrupt", "truncated")


def _is_damage(error: BaseException) -> bool:
  """Whether `error` (or an exception it chains) reports damaged or missing files."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError, EOFError)):
      return True
    if any(marker in f"{type(error).__name__}: {error}" for marker in _DAMAGE_MARKERS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 (narrower types widened, 64-bit types split in two)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize
  if width == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if width in (1, 2):
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[width]).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> a trailing axis of 2


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """sum_i bits_i * w_i mod 2^32 with odd weights w_i of the flat index i.

  Integer addition modulo 2^32 is associative, so the value is the same whatever the sharding
  and reduction order; odd weights make every single-bit flip change it.
  """
  bits = _as_uint32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis in range(bits.ndim):
    index = index * jnp.uint32(bits.shape[axis]) + lax.broadcasted_iota(jnp.uint32, bits.shape,
                                                                        axis)
  weights = (index * jnp.uint32(2654435761)) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


# One program for the whole state: many small programs with collectives in flight at once can
# stall XLA:CPU's rendezvous on sharded arrays.
_fingerprint_all = jax.jit(lambda tree: jax.tree_util.tree_map(_leaf_fingerprint, tree))


def fingerprints(tree: Any) -> dict[str, int]:
  """{leaf path: fingerprint} of a pytree of arrays (a collective on several processes)."""
  values = jax.device_get(_fingerprint_all(tree))
  leaves, _ = jax.tree_util.tree_flatten_with_path(values)
  return {jax.tree_util.keystr(path): int(np.asarray(v)) for path, v in leaves}


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns."""
  state: Any
  data_state: Any
  config: dict
  step: int


def _shape_signature(tree: Any) -> dict[str, list[int]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): [int(d) for d in np.shape(leaf)] for path, leaf in leaves}


def _describe_mismatch(saved: dict, expected: dict, limit: int = 4) -> str:
  """The first differing entries, parameters before optimizer state."""
  is_param = lambda k: k.startswith((".params", "['params']"))
  keys = sorted(set(saved) | set(expected), key=lambda k: (not is_param(k), k))
  lines = [f"{k}: checkpoint {saved.get(k, 'absent')} vs this config {expected.get(k, 'absent')}"
           for k in keys if saved.get(k) != expected.get(k)]
  more = f" (+{len(lines) - limit} more)" if len(lines) > limit else ""
  return "; ".join(lines[:limit]) + more


def _to_jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, bytes):
    return {"__bytes__": x.decode("latin-1")}
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.ndarray):
    return _to_jsonable(x.tolist())
  return x


def _from_jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    if set(x) == {"__bytes__"}:
      return x["__bytes__"].encode("latin-1")
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x


def _gather_data_states(data_state: Any) -> dict:
  """{"per_process": [state of process 0, 1, ...]}: every process's iterator state.

  Orbax writes JSON items from process 0 only, but each process reads its own shard of the
  data, so the states are gathered (as padded UTF-8 bytes) before saving.
  """
  text = json.dumps(_to_jsonable(data_state))
  if jax.process_count() == 1:
    return {"per_process": [json.loads(text)]}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(text.encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:raw.size] = raw
  gathered = multihost_utils.process_allgather(padded)
  return {"per_process": [json.loads(bytes(row[:int(n)]).decode("utf-8"))
                          for row, n in zip(np.asarray(gathered), np.ravel(lengths))]}


def _own_data_state(states: list) -> Any:
  if len(states) != jax.process_count():
    raise ValueError(f"the checkpoint holds data-iterator states of {len(states)} processes "
                     f"but this run has {jax.process_count()}: training resumes with the same "
                     "number of processes (the data order depends on it); eval and generate "
                     "read it on any number")
  return _from_jsonable(states[jax.process_index()])


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints, plus the best one by `best_metric` if given.

  `best_metric` names a key of the `metrics` passed to `save`; `best_mode` "min" keeps the
  lowest. Checkpoints saved without that metric are kept only while among the last N.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, best_metric: str | None = None,
               best_mode: str = "min", async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be >= 1")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode={best_mode!r} is not 'min' or 'max'")
    self.directory = workdir_lib.resolve(directory)  # a gs:// URL stays as it is
    self.best_metric = best_metric
    self.skipped_steps: list[int] = []
    policies = [pp.LatestN(max_to_keep)]
    if best_metric is not None:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric],
                               reverse=best_mode == "min", n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _DATA, _META))

  # ── saving ──
  def save(self, step: int, state: Any, *, data_state: Any = None, config: dict | None = None,
           metrics: dict | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state`, the data iterator state and the config.

    Refuses (ValueError) metrics that are not finite: a NaN run must not replace a good
    checkpoint.
    """
    meta = {"step": int(step), "config": _to_jsonable(config or {}),
            "shapes": _shape_signature(state), "fingerprints": fingerprints(state)}
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    if metrics is not None and any(not math.isfinite(v) for v in metrics.values()):
      raise ValueError(f"refusing to save step {step} with non-finite metrics {metrics}")
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(_gather_data_states(data_state)),
        _META: ocp.args.JsonSave(meta),
    })
    return self._manager.save(int(step), args=args, metrics=metrics, force=force)

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  # ── restoring ──
  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def read_meta(self, step: int) -> dict:
    """The metadata saved with `step`: {"step", "config", "shapes"}."""
    return self._manager.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))[_META]

  def restore(self, state_template: Any, step: int | None = None, *,
              data: bool = True) -> Restored | None:
    """Restores (state, data_state, config, step) from `step` or the newest readable one.

    `state_template` is a pytree of arrays or `jax.ShapeDtypeStruct` giving the structure and
    the target shardings (a leaf without a sharding goes to the first local device);
    `data=False` skips the data-iterator states (evaluation on any process count). Returns
    None when the directory holds no checkpoint. A damaged checkpoint is skipped with a
    warning (recorded in `skipped_steps`); one whose state shapes differ from the template
    raises `CheckpointMismatchError`; any other failure raises `CheckpointRestoreError`, as
    does a directory whose checkpoints are all damaged.
    """
    steps = self.all_steps() if step is None else [step]
    expected = _shape_signature(state_template)
    self.skipped_steps = []
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                       sharding=getattr(x, "sharding", None) or default),
        state_template)
    for candidate in reversed(steps):
      try:
        with _quiet():
          meta = self.read_meta(candidate)
      except Exception as e:  # pylint: disable=broad-except
        self._skip_or_raise(candidate, e)
        continue
      saved = meta.get("shapes", {})
      if saved != expected:
        raise CheckpointMismatchError(
            f"the checkpoint at step {candidate} in {self.directory} belongs to a different "
            f"model or optimizer: {_describe_mismatch(saved, expected)}. Use another workdir "
            "(nothing was written)")
      try:
        with _quiet():
          items = {_STATE: ocp.args.StandardRestore(abstract)}
          if data:
            items[_DATA] = ocp.args.JsonRestore()
          restored = self._manager.restore(candidate, args=ocp.args.Composite(**items))
          state = jax.block_until_ready(restored[_STATE])
        saved_data = restored[_DATA]["per_process"] if data else None
      except Exception as e:  # pylint: disable=broad-except
        self._skip_or_raise(candidate, e)
        continue
      recorded = meta.get("fingerprints")
      if recorded is not None:
        actual = fingerprints(state)
        bad = [k for k in recorded if recorded[k] != actual.get(k)]
        if bad:
          self._skip(candidate, f"fingerprint mismatch in {len(bad)} array(s), first {bad[0]}")
          continue
      data_state = _own_data_state(saved_data) if data else None
      return Restored(state, data_state, meta.get("config", {}), candidate)
    if steps:
      raise CheckpointRestoreError(
          f"no readable checkpoint among steps {steps} in {self.directory}: all are damaged; "
          "move them aside to start over")
    return None

  def _skip_or_raise(self, step: int, error: Exception) -> None:
    if not _is_damage(error):
      raise CheckpointRestoreError(
          f"cannot restore the checkpoint at step {step} in {self.directory}: "
          f"{type(error).__name__}: {_first_line(error)}") from error
    self._skip(step, f"{type(error).__name__}: {_first_line(error)}")

  def _skip(self, step: int, reason: str) -> None:
    self.skipped_steps.append(step)
    warnings.warn(f"checkpoint at step {step} in {self.directory} is unreadable ({reason}); "
                  "falling back to the previous one", RuntimeWarning, stacklevel=3)

  def discard_skipped(self) -> list[str]:
    """Moves the checkpoints the last `restore` skipped to `<step>.corrupt`; returns new paths.

    Keeps the damaged files for inspection while letting the run save those steps again.
    """
    moved = []
    for step in self.skipped_steps:
      source = workdir_lib.join(self.directory, str(step))
      target = f"{source}.corrupt"
      if jax.process_index() == 0 and workdir_lib.isdir(source):
        suffix = 1
        while epath.Path(target).exists():
          target, suffix = f"{source}.corrupt{suffix}", suffix + 1
        workdir_lib.rename(source, target)
        moved.append(target)
    self.skipped_steps = []
    if moved:
      self._manager.reload()
    return moved


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else "")[:limit]


class _quiet:  # pylint: disable=invalid-name
  """Silences orbax / absl / asyncio logging while a possibly damaged checkpoint is read.

  A damaged file makes orbax log the same error from several threads (thousands of lines);
  the one useful line is the warning `restore` gives.
  """
  _NAMES = ("absl", "orbax", "asyncio", "tensorstore", "jax._src.distributed")

  def __enter__(self):
    self._levels = {n: logging.getLogger(n).level for n in self._NAMES}
    for name in self._NAMES:
      logging.getLogger(name).setLevel(logging.CRITICAL)
    return self

  def __exit__(self, *exc):
    for name, level in self._levels.items():
      logging.getLogger(name).setLevel(level)
    return False


def read_config(directory: str) -> dict | None:
  """The config saved with the newest readable checkpoint in `directory`, or None."""
  if not workdir_lib.isdir(directory):
    return None
  ckpt = Checkpointer(directory, async_save=False)
  try:
    for step in reversed(ckpt.all_steps()):
      try:
        return ckpt.read_meta(step).get("config")
      except Exception:  # pylint: disable=broad-except  # damaged: try an older one
        logging.warning("unreadable checkpoint metadata at step %d", step)
    return None
  finally:
    ckpt.close()


def dumps(obj: Any) -> str:
  """JSON text of a config / data state, with bytes and NumPy scalars made serialisable."""
  return json.dumps(_to_jsonable(obj), sort_keys=True)
