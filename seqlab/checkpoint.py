"""Checkpoints that resume exactly: train state + data-iterator state + config, via orbax.

A checkpoint at step k holds everything needed to continue as if never stopped: the train
state (parameters, optimizer state, step, dropout key), the input pipeline's iterator state,
the run's config, and the shape of every state leaf. Saves are asynchronous: orbax writes into
a temporary directory and renames it when complete, so a save killed half-way never looks
finished (and its temporary directory is removed at the next start).

On restore, a newest checkpoint that cannot be read (truncated or corrupted files) is skipped
with a warning and the previous one used; `discard_skipped()` then moves the damaged ones aside
(`<step>.corrupt`) so the run can write that step again. A checkpoint whose state shapes differ
from the model being restored raises `CheckpointMismatchError` before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from seqlab import workdir as workdir_lib

_STATE, _DATA, _META = "state", "data", "meta"


class CheckpointMismatchError(ValueError):
  """The work directory holds a checkpoint of a different model or optimizer."""


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
                     f"but this run has {jax.process_count()}; resume with the same number")
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
            "shapes": _shape_signature(state)}
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

  def restore(self, state_template: Any, step: int | None = None) -> Restored | None:
    """Restores (state, data_state, config, step) from `step` or the newest readable one.

    `state_template` is a pytree of arrays or `jax.ShapeDtypeStruct` (with shardings) giving
    the structure to restore into. Returns None when the directory holds no checkpoint. An
    unreadable checkpoint is skipped with a warning (recorded in `skipped_steps`); one whose
    state shapes differ from the template raises `CheckpointMismatchError`.
    """
    steps = self.all_steps() if step is None else [step]
    expected = _shape_signature(state_template)
    self.skipped_steps = []
    for candidate in reversed(steps):
      try:
        meta = self.read_meta(candidate)
      except Exception as e:  # pylint: disable=broad-except  # unreadable metadata: damaged
        self._skip(candidate, e)
        continue
      saved = meta.get("shapes", {})
      if saved != expected:
        raise CheckpointMismatchError(
            f"the checkpoint at step {candidate} in {self.directory} belongs to a different "
            f"model or optimizer: {_describe_mismatch(saved, expected)}. Use another workdir "
            "(nothing was written)")
      abstract = jax.tree_util.tree_map(
          lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
          jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
          state_template)
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract),
            _DATA: ocp.args.JsonRestore(),
        }))
        state = jax.block_until_ready(restored[_STATE])
        saved_data = restored[_DATA]["per_process"]
      except Exception as e:  # pylint: disable=broad-except  # truncated / corrupted arrays
        self._skip(candidate, e)
        continue
      return Restored(state, _own_data_state(saved_data), meta.get("config", {}), candidate)
    if steps:
      raise RuntimeError(f"no readable checkpoint among steps {steps} in {self.directory}")
    return None

  def _skip(self, step: int, error: Exception) -> None:
    self.skipped_steps.append(step)
    warnings.warn(f"checkpoint at step {step} in {self.directory} is unreadable "
                  f"({type(error).__name__}: {str(error)[:200]}); falling back to the previous "
                  "one", RuntimeWarning, stacklevel=3)

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
