"""The training engine: the one loop behind `seqlab train`, every experiment and the benchmarks.

    job = trainer.Job(task, init, init_args=(jax.random.key(seed),))
    result = trainer.run(job, batches, mesh, trainer.Options(steps=1000, checkpoint_every=100),
                         workdir="runs/a", config=config_dict, evaluate=my_eval)

`run` owns everything between "a model and a data stream" and "a trained state": shardings,
init or restore, the jitted train step, checkpoints (with the data-iterator state), the work
directory's lock and config-drift check, preemption agreed by every process, the NaN stop,
logging (`metrics.jsonl`, TensorBoard, a progress line with tokens/s, MFU and ETA) and
periodic evaluation. It reads in sections: Shard → Checkpoint → Update → Loop.

Guarantees, on any number of processes:

* **Exact resume.** A killed or preempted run restarts from its newest good checkpoint and
  continues bitwise as if never stopped (state, dropout keys, data order). `metrics.jsonl`
  holds each step once, in order, after any number of resumes.
* **Pod-safe preemption.** SIGTERM sets a flag; every `Options.stop_check_every` steps the
  processes all-gather their flags, so all stop at the same step, save one checkpoint together
  and return status "preempted".
* **One run per work directory** (`workdir_lock`), and **no silent drift**: resuming with a
  config whose model, data or numbers differ from the checkpoint's is a `ValueError` naming the
  fields; `RESUMABLE_FIELDS` may change (`train.steps` may grow: pass a schedule that follows
  it).

Without a `workdir` the engine trains in memory (no checkpoints, lock or files): the
benchmarks and tests use that.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from seqlab import checkpoint, monitor, parallel
from seqlab.validation import check_int
from seqlab import train as train_lib
from seqlab import workdir as workdir_lib

# Config fields that may change when a run resumes: how long to train, how often to log, save
# and evaluate, and how the same numbers are laid out over devices and processes. Anything
# else changes the model, the data or the numbers, and is refused. A field matches an entry
# equal to it or starting with the entry + ".".
RESUMABLE_FIELDS = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.max_to_keep", "train.progress", "train.best_metric",
    "train.best_mode", "train.accum_steps", "train.stop_check_every", "train.profile_steps",
    "optimizer.total_steps", "mesh", "distributed",
)


@dataclasses.dataclass(frozen=True)
class Job:
  """What to train: the task (loss and metrics) and how to make the initial `TrainState`.

  `init(*init_args) -> TrainState` must be jit-able; pass arrays (a key, pretrained
  parameters) through `init_args` rather than closing over them, so they are not baked into
  the program and one compiled program serves every seed. `flops_per_batch` (analytic
  training FLOPs of one global batch; NaN if unknown) and `items_per_batch` (tokens or images)
  feed the logged throughput and MFU. Jobs are hashable: reuse one to reuse its compilation.
  """
  task: train_lib.Task
  init: Callable[..., train_lib.TrainState]
  init_args: tuple = ()
  flops_per_batch: float = float("nan")
  items_per_batch: int = 0
  unit: str = "tokens"

  def __hash__(self):
    return hash((self.task, self.init, self.unit))

  def __eq__(self, other):
    return isinstance(other, Job) and (self.task, self.init, self.unit) == (
        other.task, other.init, other.unit)


@dataclasses.dataclass(frozen=True)
class Options:
  """How to train. Names follow the `train.*` / `mesh.*` config fields they come from.

  `checkpoint_every` 0 saves only at the end (and on preemption); `eval_every` 0 evaluates
  only at the end when an `evaluate` hook is given (-1: never); `best_metric` keeps the best
  checkpoint by an eval metric besides the last `max_to_keep`. `profile_steps` "a,b" (or
  `(a, b)`; "a" is one step) writes a `jax.profiler` trace of steps a through b into
  `<workdir>/profile/` (TensorBoard's profile plugin, or its `perfetto_trace.json.gz` in
  ui.perfetto.dev); "" profiles nothing.
  """
  steps: int
  strategy: str = "data"
  rules: tuple = ()
  accum_steps: int = 1
  log_every: int = 1
  checkpoint_every: int = 0
  eval_every: int = 0
  max_to_keep: int = 2
  best_metric: str = ""
  best_mode: str = "min"
  progress: bool = False
  stop_check_every: int = 1
  label: str = ""
  profile_steps: str | tuple = ""

  def __post_init__(self):
    check_int("train.steps", self.steps)
    check_int("train.accum_steps", self.accum_steps)
    check_int("train.log_every", self.log_every)
    check_int("train.checkpoint_every", self.checkpoint_every, 0)
    check_int("train.eval_every", self.eval_every, -1)
    check_int("train.max_to_keep", self.max_to_keep)
    check_int("train.stop_check_every", self.stop_check_every)
    if self.strategy not in parallel.STRATEGIES:
      raise ValueError(f"mesh.strategy={self.strategy!r} is not one of {parallel.STRATEGIES}")
    if self.best_mode not in ("min", "max"):
      raise ValueError(f"train.best_mode={self.best_mode!r} is not 'min' or 'max'")
    profile_range(self.profile_steps, self.steps)


def profile_range(profile_steps: str | tuple, steps: int) -> tuple[int, int] | None:
  """(first, last) step of `Options.profile_steps`, None for ""; ValueError naming the field
  unless it is "a,b" (or `(a, b)`) or "a" with 1 <= a <= b <= `steps`."""
  if isinstance(profile_steps, str):
    if not profile_steps.strip():
      return None
    try:
      bounds = [int(part) for part in profile_steps.split(",")]
    except ValueError:
      bounds = []
  elif isinstance(profile_steps, (tuple, list)):
    if not profile_steps:
      return None
    bounds = [b for b in profile_steps
              if isinstance(b, (int, np.integer)) and not isinstance(b, bool)]
    bounds = bounds if len(bounds) == len(profile_steps) else []
  else:
    bounds = []
  if not 1 <= len(bounds) <= 2 or not 1 <= bounds[0] <= bounds[-1] <= steps:
    raise ValueError(f"train.profile_steps={profile_steps!r} must be 'first,last' (or one "
                     f"step) with 1 <= first <= last <= train.steps={steps}, or '' for none")
  return int(bounds[0]), int(bounds[-1])


@dataclasses.dataclass
class Result:
  """What `run` returns. `history` holds every logged row (train and eval), also the rows an
  earlier, interrupted run of the same work directory logged before its last checkpoint."""
  status: str  # "finished" | "preempted"
  step: int
  start_step: int
  state: Any
  history: list[dict[str, float]]
  skipped_checkpoints: list[int]
  data_stats: dict

  def losses(self) -> list[float]:
    return [row["loss"] for row in self.history if "loss" in row]

  def final_loss(self, fraction: float = 0.1) -> float:
    """Mean logged loss over the last `fraction` of the logged steps (NaN if none)."""
    losses = self.losses()
    return float(np.mean(losses[-max(1, int(len(losses) * fraction)):])) if losses else math.nan


# ─── Work directory: lock and config drift ───────────────────────────────────────────────────


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class workdir_lock:  # pylint: disable=invalid-name
  """`workdir/run.lock`: one run per work directory (taken by process 0 only).

  The lock file names the host and process that hold it. A lock is stale, and is taken over,
  when its process is gone (same host) or it has not been refreshed for `stale_after_s`
  seconds (another host: the holder refreshes it at every log and save). A live lock makes
  `__enter__` raise ValueError. A cloud-storage work directory has no atomic create: there the
  check is best effort.
  """

  def __init__(self, workdir: str, stale_after_s: float = 600.0):
    self.path = workdir_lib.join(workdir, "run.lock")
    self.stale_after_s = stale_after_s
    self.held = False

  def _holder(self) -> dict | None:
    try:
      return json.loads(workdir_lib.read_text(self.path))
    except (OSError, ValueError):
      return {}

  def _stale(self, holder: dict) -> bool:
    if holder.get("host") == socket.gethostname():
      return not _pid_alive(int(holder.get("pid", -1)))
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return True
    return age > self.stale_after_s

  def __enter__(self) -> "workdir_lock":
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    for _ in range(3):
      if workdir_lib.is_remote(self.path):
        if not workdir_lib.isfile(self.path) or self._stale(self._holder() or {}):
          workdir_lib.write_text(self.path, me)
          self.held = True
          return self
      else:
        try:
          fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
          holder = self._holder()
          if holder is not None and self._stale(holder):
            os.replace(self.path, f"{self.path}.stale")  # only one taker wins the rename
            continue
        else:
          with os.fdopen(fd, "w") as f:
            f.write(me)
          self.held = True
          return self
      break
    holder = self._holder() or {}
    raise ValueError(f"workdir={os.path.dirname(self.path)!r} is in use by another run "
                     f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}; "
                     f"{self.path}); wait for it to finish or use another workdir")

  def refresh(self) -> None:
    if self.held and not workdir_lib.is_remote(self.path):
      os.utime(self.path)

  def __exit__(self, *exc) -> bool:
    if self.held:
      try:
        os.remove(self.path) if not workdir_lib.is_remote(self.path) else None
      except OSError:
        pass
      self.held = False
    return False


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def config_drift(saved: dict, new: dict, resumable=RESUMABLE_FIELDS) -> list[str]:
  """The fields (dotted) where `new` differs from `saved`, outside the `resumable` ones."""
  a, b = _flatten(json.loads(checkpoint.dumps(saved))), _flatten(json.loads(
      checkpoint.dumps(new)))
  allowed = lambda key: any(key == r or key.startswith(r + ".") for r in resumable)
  show = lambda tree, key: repr(tree[key]) if key in tree else "<absent>"
  return [f"{k}: {show(a, k)} -> {show(b, k)}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not allowed(k)]


# ─── Preemption ──────────────────────────────────────────────────────────────────────────────


class _StopFlag:
  """SIGTERM sets `requested`; `agreed()` is True on every process once any one has it."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "_StopFlag":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """A collective on several processes: every process must call it at the same steps."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))
    return bool(np.any(np.asarray(flags)))

  def __exit__(self, *exc) -> bool:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _agree_all(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective on several processes)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.all(np.asarray(flags)))


# ─── Profiling ───────────────────────────────────────────────────────────────────────────────


class _Profile:
  """A `jax.profiler` trace of `options.profile_steps` into `workdir/profile` (a folder per
  process when there are several: each writes its own trace)."""

  def __init__(self, options: Options, workdir: str | None):
    self.steps = profile_range(options.profile_steps, options.steps)
    self.directory, self.tracing = None, False
    if workdir is not None:
      per_process = [f"process_{jax.process_index()}"] if jax.process_count() > 1 else []
      self.directory = workdir_lib.join(workdir, "profile", *per_process)

  def step(self, step: int):
    """The context of step `step` (1-based): starts the trace at the first step in range (of a
    resumed run too) and marks each traced step, whose boundaries TensorBoard's step-time
    breakdown reads from the marks."""
    if self.steps and not self.tracing and self.steps[0] <= step <= self.steps[1]:
      # The Perfetto file is written with pathlib, which cannot reach cloud storage.
      jax.profiler.start_trace(self.directory,
                               create_perfetto_trace=not workdir_lib.is_remote(self.directory))
      self.tracing = True
    if not self.tracing:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, outputs: Any) -> None:
    """Ends the trace after the last step in range, once its device work is done."""
    if self.tracing and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.close()
      _say(f"profiled steps {self.steps[0]}-{self.steps[1]}: {self.directory}")

  def close(self) -> None:
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()


# ─── Compiled programs, shared by every run of the same job on the same mesh ─────────────────

_PROGRAMS: dict[Any, Any] = {}


def _abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _signature(tree: Any) -> tuple:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return (treedef, tuple((np.shape(x), str(x.dtype), getattr(x, "sharding", None))
                         for x in leaves))


def _compile_all(lowered: dict[str, Any]) -> dict[str, Any]:
  """Compiles `jax.stages.Lowered` programs concurrently (XLA releases the GIL meanwhile)."""
  if len(lowered) <= 1:
    return {name: program.compile() for name, program in lowered.items()}
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    futures = {name: pool.submit(program.compile) for name, program in lowered.items()}
    return {name: future.result() for name, future in futures.items()}


def state_sharding(job: Job, mesh, options: Options) -> Any:
  """The `NamedSharding` pytree of the job's train state under `options.strategy`."""
  shapes = jax.eval_shape(job.init, *job.init_args)
  return parallel.state_shardings(shapes, mesh, options.strategy, options.rules or None)


def train_step(job: Job, mesh, options: Options) -> Callable:
  """The jitted, distributed `step(state, batch) -> (state, metrics)` of `job` (cached)."""
  key = ("step", job, mesh, options.strategy, tuple(map(tuple, options.rules)),
         options.accum_steps)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = parallel.distribute_step(
        train_lib.make_train_step(job.task, accum_steps=options.accum_steps), mesh,
        options.strategy, state_sharding(job, mesh, options))
  return _PROGRAMS[key]


def _compiled(job: Job, mesh, options: Options, sharding, *, need_init: bool, batch) -> tuple:
  """(init program or None, step program or None), compiled at once in two threads."""
  init_key = ("init", job, mesh, options.strategy, tuple(map(tuple, options.rules)),
              _signature(job.init_args))
  step = train_step(job, mesh, options)
  step_key = ("compiled", id(step), _signature(batch)) if batch is not None else None
  jobs = {}
  if need_init and init_key not in _PROGRAMS:
    jobs["init"] = jax.jit(job.init, out_shardings=sharding).lower(*job.init_args)
  if step_key is not None and step_key not in _PROGRAMS:
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(job.init, *job.init_args), sharding)
    jobs["step"] = step.lower(abstract_state, _abstract(batch))
  for name, program in _compile_all(jobs).items():
    _PROGRAMS[init_key if name == "init" else step_key] = program
  return (_PROGRAMS[init_key] if need_init else None,
          _PROGRAMS[step_key] if step_key is not None else None)


# ─── run ─────────────────────────────────────────────────────────────────────────────────────


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(f"seqlab: {message}", file=sys.stderr, flush=True)


def run(job: Job, batches: Iterator[dict], mesh, options: Options, *,
        workdir: str | None = None, config: dict | None = None,
        evaluate: Callable[[Any], dict[str, float]] | None = None,
        resumable=RESUMABLE_FIELDS) -> Result:
  """Trains `job` on `batches` (this process's rows of each global batch) to `options.steps`.

  With a `workdir`: takes its lock, resumes from its newest good checkpoint (the state, and
  the data-iterator state through `batches.get_state()` / `set_state()`), refuses a `config`
  that drifted from the checkpoint's (fields outside `resumable`), saves every
  `checkpoint_every` steps, at the end and on an agreed SIGTERM, and writes `metrics.jsonl`,
  TensorBoard events and `config.json`. `evaluate(state) -> metrics` runs every `eval_every`
  steps and at the end (logged as "eval/<name>"). `options.profile_steps` traces those steps
  into `workdir/profile`.

  Raises ValueError for bad options, a locked or drifted work directory or one holding another
  model (`checkpoint.CheckpointMismatchError`), and FloatingPointError when a loss or norm
  stops being finite (the last good checkpoint stays).
  """
  if workdir is None and profile_range(options.profile_steps, options.steps):
    raise ValueError(f"train.profile_steps={options.profile_steps!r} needs a workdir (the "
                     "trace goes to <workdir>/profile)")
  # ── Shard ──
  sharding = state_sharding(job, mesh, options)
  lock = workdir_lock(workdir) if workdir is not None else None
  if lock is not None:
    workdir = workdir_lib.resolve(workdir)
    ok, message = True, ""
    if jax.process_index() == 0:
      try:
        workdir_lib.makedirs(workdir)
        lock.__enter__()
      except (ValueError, OSError) as e:
        ok, message = False, (str(e) if isinstance(e, ValueError) else
                              f"workdir={workdir!r} is not writable: {e.strerror or e}")
    if not _agree_all(ok):
      raise ValueError(message or f"workdir={workdir!r} could not be locked by process 0")
  try:
    return _run_locked(job, batches, mesh, options, sharding, workdir, lock, config, evaluate,
                       resumable)
  finally:
    if lock is not None:
      lock.__exit__()


def _run_locked(job, batches, mesh, options, sharding, workdir, lock, config, evaluate,
                resumable) -> Result:
  # ── Checkpoint ── (a mismatching or drifted checkpoint raises here, before any write)
  abstract_state = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      jax.eval_shape(job.init, *job.init_args), sharding)
  ckpt, restored, skipped = None, None, []
  closers: list[Callable[[], Any]] = []
  stop = _StopFlag().__enter__()
  closers.append(lambda: stop.__exit__())
  try:
    if workdir is not None:
      ckpt = checkpoint.Checkpointer(
          workdir_lib.join(workdir, "checkpoints"), max_to_keep=options.max_to_keep,
          best_metric=options.best_metric or None, best_mode=options.best_mode)
      closers.append(ckpt.close)
      restored = ckpt.restore(abstract_state)
      skipped = list(ckpt.skipped_steps)
      if restored is not None:
        drift = config_drift(restored.config, config or {}, resumable) if config else []
        if drift:
          raise ValueError(f"workdir={workdir!r} was trained with another config; changed "
                           f"fields: {'; '.join(drift)}. Resume with the same values or use "
                           "another workdir (nothing was written)")
        if restored.step > options.steps:
          raise ValueError(f"train.steps={options.steps} is below step {restored.step} "
                           f"already trained in workdir={workdir!r}")
        if restored.data_state is not None and hasattr(batches, "set_state"):
          batches.set_state(restored.data_state)
        moved = ckpt.discard_skipped()
        _say(f"resuming from step {restored.step} in {workdir}" +
             (f" (unreadable checkpoints moved aside: {moved})" if moved else ""))
      if config is not None and jax.process_index() == 0:
        workdir_lib.write_text(workdir_lib.join(workdir, "config.json"),
                               json.dumps(json.loads(checkpoint.dumps(config)), indent=2,
                                          sort_keys=True))
    start_step = restored.step if restored is not None else 0

    # ── Update ── (the initialiser and the train step compile at once, in two threads)
    first_batch = None
    if start_step < options.steps:
      first_batch = parallel.global_batch(next(batches), mesh)
    init_program, step_fn = _compiled(job, mesh, options, sharding,
                                      need_init=restored is None, batch=first_batch)
    state = restored.state if restored is not None else init_program(*job.init_args)

    # ── Loop ──
    writer = None
    if workdir is not None:
      writer = monitor.MetricWriter(workdir, resume_step=start_step if restored else None)
      closers.append(writer.close)
    history = list(writer.rows) if writer is not None else []
    progress = monitor.Progress(options.steps, enabled=options.progress)
    closers.append(progress.close)
    profile = _Profile(options, workdir)
    closers.append(profile.close)
    peak = monitor.device_peak_flops() * jax.device_count() if options.progress or (
        workdir is not None) else math.nan
    step, last_saved, status = start_step, (start_step if restored else None), "finished"
    clock = {"time": time.perf_counter(), "step": step}

    def write(step_done: int, values: dict) -> None:
      if writer is not None:
        writer.write(step_done, values)
      history.append({"step": step_done, **values})

    def finish(step_done: int, metrics) -> None:
      """Fetches a step's metrics, stops on NaN, logs every `log_every` steps."""
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      try:
        monitor.check_finite(step_done, values)
      except FloatingPointError as e:
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {workdir}"
                if last_saved is not None else "no checkpoint was written")
        raise FloatingPointError(f"{options.label + ': ' if options.label else ''}{e}; "
                                 f"stopping: {kept}") from None
      if step_done % options.log_every and step_done != options.steps:
        return
      now = time.perf_counter()
      step_time = (now - clock["time"]) / max(step_done - clock["step"], 1)
      clock.update(time=now, step=step_done)
      if job.items_per_batch:
        values[f"{job.unit}_per_s"] = job.items_per_batch / step_time
      if math.isfinite(job.flops_per_batch) and math.isfinite(peak):
        values["mfu"] = job.flops_per_batch / step_time / peak
      values["step_time_s"] = step_time
      write(step_done, values)
      if lock is not None:
        lock.refresh()
      progress.update(step_done, values["loss"], values.get(f"{job.unit}_per_s", 0.0),
                      values.get("mfu"), start_step, unit=job.unit)

    def run_evaluation(step_done: int) -> dict[str, float]:
      values = {f"eval/{k}": float(v) for k, v in evaluate(state).items()}
      if values:
        write(step_done, values)
      return values

    pending = None
    while step < options.steps:
      with profile.step(step + 1):  # the host's batch is part of the step
        batch = first_batch if first_batch is not None else parallel.global_batch(
            next(batches), mesh)
        first_batch = None
        state, metrics = step_fn(state, batch)
      step += 1
      # The previous step's metrics are fetched after this step is dispatched.
      if pending is not None:
        finish(*pending)
      pending = (step, metrics)
      profile.after(step, (state, metrics))
      preempted = (step % options.stop_check_every == 0 and step < options.steps
                   and stop.agreed())
      last = step == options.steps
      eval_values = {}
      if evaluate is not None and options.eval_every >= 0 and (
          last or (options.eval_every and step % options.eval_every == 0)):
        eval_values = run_evaluation(step)
      if ckpt is not None and (last or preempted or (
          options.checkpoint_every and step % options.checkpoint_every == 0)):
        finish(*pending)  # never save a state whose metrics are not finite
        pending = None
        best = ({options.best_metric: eval_values[f"eval/{options.best_metric}"]}
                if f"eval/{options.best_metric}" in eval_values else None)
        ckpt.save(step, state, data_state=batches.get_state() if hasattr(
            batches, "get_state") else None, config=config, metrics=best, force=True)
        last_saved = step
        if lock is not None:
          lock.refresh()
      if preempted:
        status = "preempted"
        _say(f"SIGTERM: saved step {step} in {workdir}; exiting" if ckpt is not None else
             f"SIGTERM: stopped at step {step} (no workdir, nothing saved)")
        break
    if pending is not None:
      finish(*pending)
  finally:
    for close in reversed(closers):
      close()
  return Result(status=status, step=step, start_step=start_step, state=state,
                history=history, skipped_checkpoints=skipped,
                data_stats=dict(getattr(batches, "stats", {}) or {}))
