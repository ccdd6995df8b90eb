"""`seqlab train` in library form: a config file's model, data and schedule on the engine.

`train_and_evaluate(config, workdir)` validates `config`, joins the processes, builds the mesh,
the model, the task and the input pipeline, and hands them to `seqlab.trainer.run` (the one
training engine: resume, checkpoints, preemption, lock, drift check, logging, evaluations).
`seqlab eval` / `seqlab generate` reuse the pieces here (`build`, `evaluate`, `restore_params`).

Config fields read here (see `experiments/configs/tiny.py` for a complete file): `seed`,
`model.preset` + `model.overrides` (any field of the preset's dataclass, e.g. `dtype`),
`data.*` (source, tokenizer, objective, lengths, global `batch_size`, packing),
`optimizer.*` (`seqlab.train.OptimizerConfig`; `total_steps` 0 follows `train.steps`),
`train.*` (steps, log/eval/checkpoint intervals, `accum_steps`, `task_kwargs`, `max_to_keep`,
optional `best_metric`, `stop_check_every`, `profile_steps` "a,b": a `jax.profiler` trace of
steps a through b in `<workdir>/profile`), `mesh.*` (strategy "data" | "fsdp", data x fsdp x
model sizes, `model` > 1 being tensor parallelism under "fsdp", logical `rules`) and
`distributed.*` (`initialize=True`: `jax.distributed.initialize()` with no arguments, which
finds the processes itself on TPU pods and SLURM; or explicit coordinator_address,
num_processes, process_id: num_processes > 1 joins that multi-process run;
`heartbeat_timeout_s`: how soon the others stop when one process dies). A `workdir` may be a
cloud-storage URL (`gs://bucket/run`; `seqlab.workdir`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from seqlab import checkpoint, flops, models, parallel, trainer
from seqlab.validation import check_int
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
  source_kwargs = dict(data.get("source_kwargs", {}) or {})
  try:
    source = sources_lib.get_source(data.source, split=split, **source_kwargs)
  except TypeError as e:  # an unknown keyword: a typo in data.source_kwargs
    raise ValueError(f"data.source_kwargs={source_kwargs!r} do not fit data.source="
                     f"{data.source!r}: {e}") from None
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
  tx = train_lib.make_optimizer(optimizer_config(config))
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


def make_eval_fn(experiment: Experiment) -> Callable:
  """`eval_fn(params, batch) -> sums`, jitted (XLA partitions it over the inputs' shardings)."""
  step = train_lib.make_eval_step(experiment.task)
  return jax.jit(lambda params, batch: step(params, batch, experiment.model.apply))


# ─── train_and_evaluate: a config onto the engine ───────────────────────────────────────────


def _int_field(config, name: str, minimum: int, default=None) -> int:
  section, _, key = name.partition(".")
  value = config[section].get(key, default) if key else config.get(section, default)
  return check_int(name, value, minimum)


def validate(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the field and value for a config `train_and_evaluate` cannot run."""
  for section in ("model", "data", "optimizer", "train", "mesh"):
    if section not in config:
      raise ValueError(f"the config has no {section!r} section")
  steps = _int_field(config, "train.steps", 1)
  _int_field(config, "data.batch_size", 1)
  _int_field(config, "seed", 0)
  for name, minimum in (("train.log_every", 1), ("train.checkpoint_every", 0),
                        ("train.eval_every", 0), ("train.eval_batches", 1),
                        ("train.max_to_keep", 1)):
    _int_field(config, name, minimum)
  opt = config.optimizer
  lr = opt.get("learning_rate", None)
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ValueError(f"optimizer.learning_rate={lr!r} must be a finite number > 0")
  total = int(opt.get("total_steps", 0) or 0) or steps
  warmup = opt.get("warmup_steps", 0)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= total:
    raise ValueError(f"optimizer.warmup_steps={warmup!r} must be an integer in [0, "
                     f"total steps={total}]")
  if config.data.get("source_kwargs") is not None and not hasattr(
      config.data.source_kwargs, "keys"):
    raise ValueError(f"data.source_kwargs={config.data.source_kwargs!r} is not a mapping")


def optimizer_config(config: ml_collections.ConfigDict) -> train_lib.OptimizerConfig:
  """`config.optimizer`; `total_steps` 0 or absent means `train.steps` (so a run resumed with
  more steps stretches its schedule to them)."""
  fields = config.optimizer.to_dict()
  if not fields.get("total_steps"):
    fields["total_steps"] = int(config.train.steps)
  try:
    return train_lib.OptimizerConfig(**fields)
  except TypeError as e:
    known = [f.name for f in dataclasses.fields(train_lib.OptimizerConfig)]
    raise ValueError(f"optimizer: {e}; the fields are {known}") from None


def options(config: ml_collections.ConfigDict) -> trainer.Options:
  """The engine's `Options` from `config.train` and `config.mesh`."""
  t = config.train
  return trainer.Options(
      steps=int(t.steps), strategy=config.mesh.strategy,
      rules=tuple(tuple(r) for r in (config.mesh.get("rules", None) or ())),
      accum_steps=int(t.get("accum_steps", 1)), log_every=int(t.log_every),
      checkpoint_every=int(t.checkpoint_every), eval_every=int(t.eval_every),
      max_to_keep=int(t.max_to_keep), best_metric=t.get("best_metric", "") or "",
      best_mode=t.get("best_mode", "min"), progress=bool(t.get("progress", True)),
      stop_check_every=int(t.get("stop_check_every", 1)),
      profile_steps=t.get("profile_steps", "") or "")


def join_processes(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` as `config.distributed` asks (nothing for one process)."""
  dist = config.get("distributed", ml_collections.ConfigDict())
  explicit = int(dist.get("num_processes", 0) or 0) > 1
  if bool(dist.get("initialize", False)) and explicit:
    raise ValueError("distributed.initialize=True discovers the processes itself (TPU pods, "
                     "SLURM); do not also set distributed.num_processes="
                     f"{dist.num_processes}")
  if jax.distributed.is_initialized():
    return
  heartbeat = int(dist.get("heartbeat_timeout_s", 0) or 0) or None
  if explicit:
    parallel.initialize_distributed(dist.coordinator_address, int(dist.num_processes),
                                    int(dist.process_id), heartbeat_timeout_s=heartbeat)
  elif bool(dist.get("initialize", False)):
    parallel.initialize_distributed(heartbeat_timeout_s=heartbeat)


def make_mesh(config: ml_collections.ConfigDict):
  """The `[data, fsdp, model]` mesh of `config.mesh` over every device of the run.

  `mesh.model` (tensor parallelism) is 1 when the config's mesh section has no such field;
  above 1 it needs `mesh.strategy="fsdp"`.
  """
  mesh_cfg = config.mesh
  model = check_int("mesh.model", mesh_cfg.get("model", 1), 1)
  parallel.check_strategy(mesh_cfg.strategy, model)  # before any device is asked
  try:
    return parallel.make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), model=model)
  except ValueError as e:
    raise ValueError(f"{e} (mesh.data={mesh_cfg.data}, mesh.fsdp={mesh_cfg.fsdp}, "
                     f"mesh.model={model})") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) on `seqlab.trainer`.

  Returns {"status": "finished" | "preempted", "step", "start_step", "history" (logged
  metrics per step), "data_stats", "skipped_checkpoints"}. Raises ValueError for a bad config
  or batch size, a locked or drifted work directory, `checkpoint.CheckpointMismatchError` when
  `workdir` holds another model, and FloatingPointError when the loss stops being finite (the
  last good checkpoint stays).
  """
  validate(config)
  join_processes(config)
  mesh = make_mesh(config)
  global_batch_size = int(config.data.batch_size)
  parallel.check_batch_size(global_batch_size, mesh, "data.batch_size")
  process_count, process_index = jax.process_count(), jax.process_index()
  run_options = options(config)
  per_device = global_batch_size // parallel.num_data_shards(mesh)
  if per_device % run_options.accum_steps:
    raise ValueError(f"train.accum_steps={run_options.accum_steps} does not divide the "
                     f"per-device batch of {per_device} rows (data.batch_size="
                     f"{global_batch_size})")
  experiment = build(config)
  model_cfg, architecture = experiment.model_cfg, experiment.architecture
  tokenizer = None
  if architecture in TEXT_ARCHITECTURES:
    tokenizer = make_tokenizer(config)
    if model_cfg.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"model vocab_size={model_cfg.vocab_size} is smaller than the "
                       f"tokenizer's vocab_size={tokenizer.vocab_size}")
  train_iter = make_input(config, architecture, "train",
                          batch_size=global_batch_size // process_count,
                          shard_index=process_index, shard_count=process_count,
                          tokenizer=tokenizer, model_cfg=model_cfg)
  eval_fn = make_eval_fn(experiment)

  def evaluate_state(state):
    return evaluate(state.params, experiment, config, mesh, eval_fn,
                    batch_size=global_batch_size // process_count,
                    num_batches=int(config.train.eval_batches), tokenizer=tokenizer)

  result = trainer.run(
      job(experiment, global_batch_size), train_iter, mesh, run_options,
      workdir=workdir, config=config.to_dict(),
      evaluate=evaluate_state if int(config.train.eval_every) else None)
  return {"status": result.status, "step": result.step, "start_step": result.start_step,
          "history": result.history, "data_stats": result.data_stats,
          "skipped_checkpoints": result.skipped_checkpoints}


def job(experiment: Experiment, global_batch_size: int) -> trainer.Job:
  """The engine's `Job` of an experiment: its task, initialiser and throughput accounting."""
  unit = "tokens" if experiment.lengths else "images"
  return trainer.Job(
      experiment.task, experiment.init,
      flops_per_batch=flops_per_batch(experiment.model_cfg, experiment.architecture,
                                      experiment.lengths, global_batch_size),
      items_per_batch=global_batch_size * (sum(experiment.lengths.values()) or 1), unit=unit)


@functools.lru_cache(maxsize=None)
def model_job(model_cfg, optimizer: train_lib.OptimizerConfig, from_params: bool = False
              ) -> trainer.Job:
  """The engine's `Job` training `model_cfg` with `optimizer` on its architecture's task.

  `init_args` (set per training): `(key,)` initialises the parameters from `key`; with
  `from_params`, `(params, key)` starts from `params`. The dropout key is `fold_in(key, 1)`.
  Cached, so every training of one model and optimizer shares the engine's compiled programs.
  """
  model = model_cfg.build()
  tx = train_lib.make_optimizer(optimizer)
  task = train_lib.task_for(architecture_of(model_cfg))

  def state(params, key):
    return train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                       rng=jax.random.fold_in(key, 1))

  if from_params:
    return trainer.Job(task, state)
  dummy = model_cfg.dummy_batch(1)
  return trainer.Job(task, lambda key: state(model.init(key, dummy)["params"], key))


def last_values(history: list[dict[str, float]]) -> dict[str, float]:
  """The newest value of every metric in a `train_and_evaluate` history."""
  out: dict[str, float] = {}
  for entry in history:
    out.update({k: v for k, v in entry.items() if k != "step" and not (
        isinstance(v, float) and math.isnan(v))})
  return out


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a `seqlab train` run saved in `workdir` (its `config.json`)."""
  path = workdir_lib.join(workdir, "config.json")
  if not workdir_lib.isfile(path):
    raise ValueError(f"workdir={workdir!r} has no config.json; run `seqlab train` first")
  return ml_collections.ConfigDict(json.loads(workdir_lib.read_text(path)))


def restore_params(config: ml_collections.ConfigDict, workdir: str):
  """(experiment, params, step) of the newest readable checkpoint in `workdir`, on one device.

  Reads a checkpoint written on any mesh and by any number of processes (only the
  parameters' values matter here, not their layout).
  """
  experiment = build(config)
  ckpt = checkpoint.Checkpointer(workdir_lib.join(workdir, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore(jax.eval_shape(experiment.init), data=False)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"workdir={workdir!r} holds no checkpoint; run `seqlab train` first")
  return experiment, restored.state.params, restored.step


def numpy_params(params) -> Any:
  """Parameters as host NumPy arrays (for comparisons and export)."""
  return jax.tree_util.tree_map(np.asarray, jax.device_get(params))
