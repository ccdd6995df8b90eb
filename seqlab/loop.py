"""The training loop: Mesh → Input → Model → Shard → Checkpoint → Update → Evals → Loop.

`train_and_evaluate(config, workdir)` is what `seqlab train` runs. It resumes from the newest
readable checkpoint in `workdir` (train state and data-iterator state, so the data order
continues exactly), saves on SIGTERM before exiting, stops on a NaN / Inf loss keeping the
last good checkpoint, and writes `metrics.jsonl`, TensorBoard events and `config.json`.

Config fields read here (see `experiments/configs/tiny.py` for a complete file): `seed`,
`model.preset` + `model.overrides` (any field of the preset's dataclass, e.g. `dtype`),
`data.*` (source, tokenizer, objective, lengths, global `batch_size`, packing),
`optimizer.*` (`seqlab.train.OptimizerConfig`), `train.*` (steps, log/eval/checkpoint
intervals, `accum_steps`, `task_kwargs`, `max_to_keep`, optional `best_metric`),
`mesh.*` (strategy "data" | "fsdp", data x fsdp sizes, FSDP logical `rules`) and
`distributed.*` (`initialize=True`: `jax.distributed.initialize()` with no arguments, which
finds the processes itself on TPU pods and SLURM; or explicit coordinator_address,
num_processes, process_id: num_processes > 1 joins that multi-process run). A `workdir` may be
a cloud-storage URL (`gs://bucket/run`; `seqlab.workdir`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import signal
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from seqlab import checkpoint, flops, models, monitor, parallel
from seqlab import workdir as workdir_lib
from seqlab import metrics as metrics_lib
from seqlab import train as train_lib

ARCHITECTURES = {"DecoderConfig": "decoder", "EncoderDecoderConfig": "encoder_decoder",
                 "EncoderConfig": "encoder", "MAEConfig": "mae", "ViTConfig": "classifier",
                 "SwinConfig": "classifier"}
TEXT_ARCHITECTURES = ("decoder", "encoder_decoder", "encoder")


# ─── Pieces that `seqlab eval` / `seqlab generate` and the tests reuse ───────────────────────


def model_config(config: ml_collections.ConfigDict):
  """The model config: a preset with `config.model.overrides` applied."""
  overrides = dict(config.model.get("overrides", {}) or {})
  return models.get_preset(config.model.preset, **overrides)


def architecture_of(model_cfg) -> str:
  """"decoder", "encoder_decoder", "encoder", "mae" or "classifier" from the config's type."""
  name = type(model_cfg).__name__
  if name not in ARCHITECTURES:
    raise ValueError(f"model config {name} is not trainable here; expected one of "
                     f"{sorted(ARCHITECTURES)}")
  return ARCHITECTURES[name]


def make_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer named by `config.data.tokenizer` (text models only)."""
  from seqlab.data import tokenizers as tokenizers_lib  # pylint: disable=g-import-not-at-top
  data = config.data
  kwargs = dict(data.get("tokenizer_kwargs", {}) or {})
  return tokenizers_lib.get_tokenizer(data.tokenizer, **kwargs)


def seq_lengths(config: ml_collections.ConfigDict, architecture: str) -> dict[str, int]:
  """Row length per stream: {"decoder": L}, {"encoder": L} or both for an encoder-decoder."""
  data = config.data
  if architecture == "decoder":
    return {"decoder": int(data.seq_length)}
  if architecture == "encoder":
    return {"encoder": int(data.seq_length)}
  if architecture == "encoder_decoder":
    return {"encoder": int(data.inputs_length), "decoder": int(data.targets_length)}
  return {}


def make_input(config, architecture: str, split: str, *, batch_size: int, shard_index: int,
               shard_count: int, num_epochs=None, shuffle=True, tokenizer=None,
               model_cfg=None):
  """The grain batch iterator of `split` for this process's shard (text or images)."""
  from seqlab.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from seqlab.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from seqlab.data import sources as sources_lib  # pylint: disable=g-import-not-at-top
  data = config.data
  seed = int(config.seed) + (0 if split == "train" else 1)
  source = sources_lib.get_source(data.source, split=split,
                                  **dict(data.get("source_kwargs", {}) or {}))
  if architecture in TEXT_ARCHITECTURES:
    return pipeline_lib.make_pipeline(
        source, tokenizer or make_tokenizer(config), data.objective, architecture,
        seq_lengths=seq_lengths(config, architecture), batch_size=batch_size, seed=seed,
        shard_index=shard_index, shard_count=shard_count, packing=bool(data.packing),
        num_epochs=num_epochs, shuffle=shuffle,
        objective_kwargs=dict(data.get("objective_kwargs", {}) or {}))
  mae = architecture == "mae"
  return images_lib.make_image_pipeline(
      source, batch_size=batch_size, seed=seed, shard_index=shard_index,
      shard_count=shard_count, num_epochs=num_epochs, shuffle=shuffle,
      mae_mask_ratio=model_cfg.mask_ratio if mae else None,
      patch_size=model_cfg.patch_size if mae else None)


def flops_per_batch(model_cfg, architecture: str, lengths: dict[str, int],
                    batch_size: int) -> float:
  """Analytic training FLOPs of one global batch (6N + attention, full score matrix); NaN for
  models without a formula here."""
  try:
    if architecture == "encoder_decoder":
      table = flops.config_matmuls(model_cfg, lengths["encoder"],
                                   targets_length=lengths["decoder"])
      return flops.training_flops(table) * batch_size
    if architecture in ("decoder", "encoder"):
      length = lengths.get("decoder", lengths.get("encoder"))
      return flops.training_flops(flops.config_matmuls(model_cfg, length)) * length * batch_size
    if architecture == "classifier" and hasattr(model_cfg, "num_layers"):
      return 3 * 2 * flops.vit_macs(
          image_size=model_cfg.image_size, patch_size=model_cfg.patch_size,
          d_model=model_cfg.d_model, num_layers=model_cfg.num_layers, d_ff=model_cfg.d_ff,
          num_channels=model_cfg.num_channels, num_classes=model_cfg.num_classes,
          class_token=getattr(model_cfg, "pool", "cls") == "cls") * batch_size
  except (AttributeError, TypeError, ValueError):
    pass
  return float("nan")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a config builds before any device work: model, task, optimizer, init function."""
  model_cfg: Any
  model: Any
  architecture: str
  task: train_lib.Task
  tx: Any
  lengths: dict[str, int]
  init: Callable[[], train_lib.TrainState]  # jit-able, no arguments


def build(config: ml_collections.ConfigDict) -> Experiment:
  """Model, task, optimizer and a deterministic state initialiser from `config`."""
  model_cfg = model_config(config)
  architecture = architecture_of(model_cfg)
  model = model_cfg.build()
  tx = train_lib.make_optimizer(train_lib.OptimizerConfig(**config.optimizer.to_dict()))
  task = train_lib.task_for(architecture, **dict(config.train.get("task_kwargs", {}) or {}))
  init_batch = model_cfg.dummy_batch(1)
  seed = int(config.seed)

  def init() -> train_lib.TrainState:
    key = jax.random.key(seed)
    params = model.init(key, init_batch)["params"]
    return train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                       rng=jax.random.fold_in(key, 1))

  return Experiment(model_cfg, model, architecture, task, tx, seq_lengths(config, architecture),
                    init)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> "_Preemption":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _to_float(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(f"seqlab: {message}", file=sys.stderr, flush=True)


def evaluate(params, experiment: Experiment, config, mesh, eval_fn, *, batch_size: int,
             num_batches: int | None, split: str = "validation", tokenizer=None
             ) -> dict[str, float]:
  """Runs `num_batches` full batches of `split` and summarises them with the task's metrics."""
  it = make_input(config, experiment.architecture, split, batch_size=batch_size,
                  shard_index=jax.process_index(), shard_count=jax.process_count(),
                  num_epochs=1, shuffle=False, tokenizer=tokenizer,
                  model_cfg=experiment.model_cfg)
  sums = []
  for i, batch in enumerate(it):
    if num_batches is not None and i >= num_batches:
      break
    if next(iter(batch.values())).shape[0] != batch_size:  # a last partial batch
      break
    sums.append(eval_fn(params, parallel.global_batch(batch, mesh)))
  if not sums:
    return {}
  return experiment.task.summarise(metrics_lib.sum_metrics(jax.device_get(sums)))


def compile_all(lowered: dict[str, Any]) -> dict[str, Any]:
  """Compiles `jax.stages.Lowered` programs concurrently (XLA releases the GIL meanwhile)."""
  if len(lowered) <= 1:
    return {name: program.compile() for name, program in lowered.items()}
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    futures = {name: pool.submit(program.compile) for name, program in lowered.items()}
    return {name: future.result() for name, future in futures.items()}


def make_eval_fn(experiment: Experiment) -> Callable:
  """`eval_fn(params, batch) -> sums`, jitted (XLA partitions it over the inputs' shardings)."""
  step = train_lib.make_eval_step(experiment.task)
  return jax.jit(lambda params, batch: step(params, batch, experiment.model.apply))


# ─── train_and_evaluate ──────────────────────────────────────────────────────────────────────


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns a summary.

  Returns {"status": "finished" | "preempted", "step", "start_step", "history" (logged
  metrics per step), "data_stats", "skipped_checkpoints"}. Raises ValueError for a bad config
  or batch size, `checkpoint.CheckpointMismatchError` when `workdir` holds another model, and
  FloatingPointError when the loss stops being finite (the last good checkpoint stays).
  """
  # ── Mesh ──
  dist = config.get("distributed", ml_collections.ConfigDict())
  explicit = int(dist.get("num_processes", 0) or 0) > 1
  if bool(dist.get("initialize", False)) and explicit:
    raise ValueError("distributed.initialize=True discovers the processes itself (TPU pods, "
                     "SLURM); do not also set distributed.num_processes="
                     f"{dist.num_processes}")
  if not jax.distributed.is_initialized():
    if explicit:
      parallel.initialize_distributed(dist.coordinator_address, int(dist.num_processes),
                                      int(dist.process_id))
    elif bool(dist.get("initialize", False)):
      parallel.initialize_distributed()  # jax.distributed.initialize() with no arguments
  mesh = parallel.make_mesh(int(config.mesh.data), int(config.mesh.fsdp))
  strategy = config.mesh.strategy
  if strategy not in parallel.STRATEGIES:
    raise ValueError(f"mesh.strategy={strategy!r} is not one of {parallel.STRATEGIES}")
  global_batch_size = int(config.data.batch_size)
  parallel.check_batch_size(global_batch_size, mesh, "data.batch_size")
  process_count, process_index = jax.process_count(), jax.process_index()
  local_batch_size = global_batch_size // process_count
  accum_steps = int(config.train.get("accum_steps", 1))
  per_device = global_batch_size // parallel.num_data_shards(mesh)
  if accum_steps < 1 or per_device % accum_steps:
    raise ValueError(f"train.accum_steps={accum_steps} does not divide the per-device batch "
                     f"of {per_device} rows (data.batch_size={global_batch_size})")

  # ── Input ──
  experiment = build(config)
  model_cfg, architecture = experiment.model_cfg, experiment.architecture
  tokenizer = None
  if architecture in TEXT_ARCHITECTURES:
    tokenizer = make_tokenizer(config)
    if model_cfg.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"model vocab_size={model_cfg.vocab_size} is smaller than the "
                       f"tokenizer's vocab_size={tokenizer.vocab_size}")
  train_iter = make_input(config, architecture, "train", batch_size=local_batch_size,
                          shard_index=process_index, shard_count=process_count,
                          tokenizer=tokenizer, model_cfg=model_cfg)

  # ── Shard ──
  state_shapes = jax.eval_shape(experiment.init)
  rules = config.mesh.get("rules", None) or None
  state_sharding = parallel.state_shardings(state_shapes, mesh, strategy, rules)
  abstract_state = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes,
      state_sharding)

  # ── Checkpoint ── (a mismatching checkpoint raises here, before anything is written)
  workdir = workdir_lib.resolve(workdir)
  ckpt_dir = workdir_lib.join(workdir, "checkpoints")
  best_metric = config.train.get("best_metric", None) or None
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=int(config.train.max_to_keep),
                                 best_metric=best_metric,
                                 best_mode=config.train.get("best_mode", "min"))
  # From here on SIGTERM only sets a flag: the loop saves at the next step boundary.
  preemption = _Preemption().install()
  closers = [ckpt.close, preemption.uninstall]
  try:
    restored = ckpt.restore(abstract_state)
    skipped = list(ckpt.skipped_steps)
    if restored is not None:
      state, start_step = restored.state, restored.step
      train_iter.set_state(restored.data_state)
      moved = ckpt.discard_skipped()
      _say(f"resuming from step {start_step} in {workdir}" +
           (f" (unreadable checkpoints moved aside: {moved})" if moved else ""))
    else:
      state, start_step = None, 0
    if process_index == 0:
      workdir_lib.write_text(workdir_lib.join(workdir, "config.json"),
                             config.to_json_best_effort(indent=2, sort_keys=True))

    # ── Update ── (the initialiser and the train step compile at once, in two threads)
    total_steps = int(config.train.steps)
    step_fn = parallel.distribute_step(
        train_lib.make_train_step(experiment.task, accum_steps=accum_steps),
        mesh, strategy, state_sharding)
    eval_fn = make_eval_fn(experiment)
    jobs, first_batch = {}, None
    if state is None:
      jobs["init"] = jax.jit(experiment.init, out_shardings=state_sharding).lower()
    if start_step < total_steps:
      first_batch = parallel.global_batch(next(train_iter), mesh)
      batch_shapes = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first_batch)
      jobs["step"] = step_fn.lower(abstract_state, batch_shapes)
    compiled = compile_all(jobs)
    if state is None:
      state = compiled["init"]()
    step_fn = compiled.get("step", step_fn)

    # ── Loop ──
    writer = monitor.MetricWriter(workdir)
    progress = monitor.Progress(total_steps,
                                enabled=bool(config.train.get("progress", True)))
    closers += [writer.close, progress.close]
    batch_flops = flops_per_batch(model_cfg, architecture, experiment.lengths,
                                  global_batch_size)
    peak = monitor.device_peak_flops() * jax.device_count()
    # Text runs count tokens (every position of every row); vision runs count images.
    unit = "tokens" if experiment.lengths else "images"
    items_per_batch = global_batch_size * (sum(experiment.lengths.values()) or 1)
    log_every = max(int(config.train.log_every), 1)
    save_every = max(int(config.train.checkpoint_every), 1)
    eval_every = int(config.train.eval_every)
    history: list[dict[str, float]] = []
    step = start_step
    last_saved = start_step if restored is not None else None
    status = "finished"
    clock = {"time": time.perf_counter(), "step": step}

    def finish(step_done: int, metrics) -> None:
      """Fetches a step's metrics, stops on NaN, logs every `log_every` steps."""
      values = _to_float(metrics)
      try:
        monitor.check_finite(step_done, values)
      except FloatingPointError as e:
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}"
                if last_saved is not None else "no checkpoint was written")
        raise FloatingPointError(f"{e}; stopping: {kept}") from None
      if step_done % log_every and step_done != total_steps:
        return
      now = time.perf_counter()
      step_time = (now - clock["time"]) / max(step_done - clock["step"], 1)
      clock.update(time=now, step=step_done)
      values[f"{unit}_per_s"] = items_per_batch / step_time
      if math.isfinite(batch_flops):
        values["mfu"] = batch_flops / step_time / peak
      values["step_time_s"] = step_time
      writer.write(step_done, values)
      history.append({"step": step_done, **values})
      progress.update(step_done, values["loss"], values[f"{unit}_per_s"], values.get("mfu"),
                      start_step, unit=unit)

    pending = None
    while step < total_steps:
      if first_batch is not None:
        batch, first_batch = first_batch, None
      else:
        batch = parallel.global_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      # The previous step's metrics are fetched after this step is dispatched.
      if pending is not None:
        finish(*pending)
      pending = (step, metrics)
      must_save = step % save_every == 0 or step == total_steps or preemption.requested
      eval_values = {}
      if eval_every and (step % eval_every == 0 or step == total_steps):
        eval_values = {f"eval/{k}": v for k, v in evaluate(
            state.params, experiment, config, mesh, eval_fn, batch_size=local_batch_size,
            num_batches=int(config.train.eval_batches), tokenizer=tokenizer).items()}
        writer.write(step, eval_values)
        history.append({"step": step, **eval_values})
      if must_save:
        finish(*pending)  # never save a state whose metrics are not finite
        pending = None
        best = ({best_metric: eval_values[best_metric]}
                if best_metric and best_metric in eval_values else None)
        ckpt.save(step, state, data_state=train_iter.get_state(), config=config.to_dict(),
                  metrics=best, force=True)
        last_saved = step
      if preemption.requested:
        status = "preempted"
        _say(f"SIGTERM: saved step {step} in {ckpt_dir}; exiting")
        break
    if pending is not None:
      finish(*pending)
  finally:
    for close in reversed(closers):
      close()
  data_stats = dict(getattr(train_iter, "stats", {}) or {})
  return {"status": status, "step": step, "start_step": start_step, "history": history,
          "data_stats": data_stats, "skipped_checkpoints": skipped}


def last_values(history: list[dict[str, float]]) -> dict[str, float]:
  """The newest value of every metric in a `train_and_evaluate` history."""
  out: dict[str, float] = {}
  for entry in history:
    out.update({k: v for k, v in entry.items() if k != "step" and not (
        isinstance(v, float) and math.isnan(v))})
  return out


def restore_params(config: ml_collections.ConfigDict, workdir: str):
  """(experiment, params, step) of the newest readable checkpoint in `workdir` (one device)."""
  experiment = build(config)
  ckpt = checkpoint.Checkpointer(workdir_lib.join(workdir, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore(jax.eval_shape(experiment.init))
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"workdir={workdir!r} holds no checkpoint; run `seqlab train` first")
  return experiment, restored.state.params, restored.step


def numpy_params(params) -> Any:
  """Parameters as host NumPy arrays (for comparisons and export)."""
  return jax.tree_util.tree_map(np.asarray, jax.device_get(params))
