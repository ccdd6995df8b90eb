"""TrainState, optimizers, losses and the pure train / eval steps.

`train_step(state, batch) -> (state, metrics)` is a pure function. Losses are computed as sums
over the batch and divided by the *global* count of weighted targets (summed over devices and
micro-batches before any loss is taken), so one device, data parallel, FSDP and gradient
accumulation all compute the same mean over the same global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from seqlab import metrics as metrics_lib
from seqlab import parallel

# ─── TrainState ──────────────────────────────────────────────────────────────────────────────


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: counters, parameters, optimizer state and the dropout key."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, params, tx, rng) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
               else rng, apply_fn=apply_fn, tx=tx)


# ─── Optimizers and schedules ────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer hyperparameters. `schedule` is "cosine", "inverse_sqrt" or "constant"."""
  name: str = "adamw"                # "adamw" | "adafactor"
  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int = 100
  total_steps: int = 1000
  end_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-9
  clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.name not in ("adamw", "adafactor"):
      raise ValueError(f"optimizer name={self.name!r} is not one of ('adamw', 'adafactor')")
    if self.schedule not in ("cosine", "inverse_sqrt", "constant"):
      raise ValueError(f"schedule={self.schedule!r} is not one of "
                       "('cosine', 'inverse_sqrt', 'constant')")
    if self.warmup_steps < 0 or self.total_steps <= 0:
      raise ValueError(f"warmup_steps={self.warmup_steps} and total_steps={self.total_steps} "
                       "must be >= 0 and > 0")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay, inverse square root, or constant."""
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=max(warmup, 1) if warmup else 0,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=peak * cfg.end_learning_rate_fraction)
  if cfg.schedule == "inverse_sqrt":
    def schedule(step):
      step = jnp.asarray(step, jnp.float32) + 1.0
      ramp = step / max(warmup, 1)
      decay = jnp.sqrt(max(warmup, 1) / step)
      return peak * jnp.minimum(ramp, decay)
    return schedule
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup]) if warmup else (
      optax.constant_schedule(peak))


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """AdamW or Adafactor with the schedule, preceded by global-norm gradient clipping."""
  schedule = learning_rate_schedule(cfg)
  if cfg.name == "adamw":
    # Decay matrices only, the usual rule (no decay on biases, norms' scales, 1-D tables).
    mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=mask)
  else:
    opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  return optax.chain(*chain, opt)


# ─── Losses (sums; the step divides by global counts) ────────────────────────────────────────


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *,
                           label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
  """Sums over weighted positions of cross-entropy, z-loss, and correct argmax predictions.

  logits [..., V] (any dtype; computed in float32), targets [...] int, weights [...] float.
  Label smoothing spreads `label_smoothing` uniformly over the V classes (as optax / Hugging
  Face): loss = (1 - a) * nll + a * mean_v(-log p_v). z-loss adds `z_loss * log(Z)^2` per token
  (PaLM), which keeps the softmax normaliser near 1 in bfloat16. Returns
  {"loss", "nll", "z_loss", "correct", "weight"} sums (z_loss is the unscaled log(Z)^2 sum).
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # -log p_t = log Z - logit_t: no [..., V] array of log-probabilities is formed.
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
  nll = log_z - target_logits[..., 0]
  loss = nll
  if label_smoothing:
    smooth = log_z - jnp.mean(logits, axis=-1)  # mean_v(-log p_v)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
  z = jnp.square(log_z)
  if z_loss:
    loss = loss + z_loss * z
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss": jnp.sum(loss * weights), "nll": jnp.sum(nll * weights),
          "z_loss": jnp.sum(z * weights), "correct": jnp.sum(correct * weights),
          "weight": jnp.sum(weights)}


@dataclasses.dataclass(frozen=True)
class Task:
  """How a model's outputs on a batch become loss terms and evaluation metrics.

  `counts(batch)` gives each loss term's normaliser (independent of the parameters; summed
  over the global batch), `terms(outputs, batch)` each term's sum plus metric sums; the loss is
  sum over terms of term_sum / global_count. `eval_sums(outputs, batch)` gives the sums of one
  evaluation batch, and `summarise(totals)` turns the sums over all batches into rates.
  """
  name: str
  counts: Callable[[dict], dict]
  terms: Callable[[Any, dict], tuple[dict, dict]]
  eval_sums: Callable[[Any, dict], dict]
  summarise: Callable[[dict], dict]


def _lm_summary(totals: dict) -> dict:
  return metrics_lib.lm_summary(totals) if totals.get("token_count", 0) > 0 else {}


def lm_task(label_smoothing: float = 0.0, z_loss: float = 0.0) -> Task:
  """Decoder and encoder-decoder language modelling on `decoder_target_tokens`.

  Evaluation: `seqlab.metrics.lm_metrics` (NLL, token accuracy, per-sequence exact match) and
  `lm_summary` (loss in nats, bits per token, perplexity, accuracy, exact match).
  """

  def counts(batch):
    return {"lm": jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))}

  def terms(logits, batch):
    sums = weighted_cross_entropy(logits, batch["decoder_target_tokens"],
                                  batch["decoder_loss_weights"],
                                  label_smoothing=label_smoothing, z_loss=z_loss)
    return {"lm": sums["loss"]}, {"nll": sums["nll"], "correct": sums["correct"],
                                  "z_loss": sums["z_loss"], "weight": sums["weight"]}

  def eval_sums(logits, batch):
    return metrics_lib.lm_metrics(logits, batch["decoder_target_tokens"],
                                  batch["decoder_loss_weights"],
                                  batch.get("decoder_segment_ids"))

  return Task("lm", counts, terms, eval_sums, _lm_summary)


def _nsp_positions(batch: dict) -> jax.Array:
  """Where `nsp_label` lives: the first token of every segment (float [B, T])."""
  tokens = batch["encoder_input_tokens"]
  segments = batch.get("encoder_segment_ids")
  positions = batch.get("encoder_positions")
  if positions is None:
    first = jnp.zeros(tokens.shape, bool).at[:, 0].set(True)
  else:
    first = positions == 0
  valid = (segments > 0) if segments is not None else (tokens != 0)
  return (first & valid).astype(jnp.float32)


def mlm_task(nsp: bool = True) -> Task:
  """BERT pre-training: masked-token loss over `mlm_weights` plus NSP when `nsp_label` is fed.

  `nsp_label` [B, T] sits at the first token of each packed segment (the feature contract);
  the NSP head's logits [B, T, 2] are read there. Each term is a mean over the global batch.
  """

  def has_nsp(batch):
    return nsp and "nsp_label" in batch

  def counts(batch):
    out = {"mlm": jnp.sum(batch["mlm_weights"].astype(jnp.float32))}
    if has_nsp(batch):
      out["nsp"] = jnp.sum(_nsp_positions(batch))
    return out

  def terms(outputs, batch):
    mlm = weighted_cross_entropy(outputs["mlm_logits"], batch["mlm_targets"],
                                 batch["mlm_weights"])
    term_sums = {"mlm": mlm["loss"]}
    metric_sums = {"nll": mlm["nll"], "correct": mlm["correct"], "weight": mlm["weight"]}
    if has_nsp(batch):
      sums = weighted_cross_entropy(outputs["nsp_logits"], batch["nsp_label"],
                                    _nsp_positions(batch))
      term_sums["nsp"] = sums["loss"]
      metric_sums.update(nsp_correct=sums["correct"], nsp_weight=sums["weight"])
    return term_sums, metric_sums

  def eval_sums(outputs, batch):
    out = metrics_lib.lm_metrics(outputs["mlm_logits"], batch["mlm_targets"],
                                 batch["mlm_weights"], batch.get("encoder_segment_ids"))
    if has_nsp(batch):
      sums = weighted_cross_entropy(outputs["nsp_logits"], batch["nsp_label"],
                                    _nsp_positions(batch))
      out.update(nsp_correct=sums["correct"], nsp_count=sums["weight"])
    return out

  def summarise(totals):
    out = _lm_summary(totals)
    if totals.get("nsp_count", 0) > 0:
      out["nsp_accuracy"] = totals["nsp_correct"] / totals["nsp_count"]
    return out

  return Task("mlm", counts, terms, eval_sums, summarise)


def classification_task(label_smoothing: float = 0.0) -> Task:
  """Image (or sequence) classification: `label` int [B] against logits [B, C]."""

  def counts(batch):
    return {"classify": jnp.asarray(batch["label"].shape[0], jnp.float32)}

  def terms(logits, batch):
    ones = jnp.ones(batch["label"].shape, jnp.float32)
    sums = weighted_cross_entropy(logits, batch["label"], ones, label_smoothing=label_smoothing)
    return {"classify": sums["loss"]}, {"nll": sums["nll"], "correct": sums["correct"],
                                        "weight": sums["weight"]}

  def eval_sums(logits, batch):
    ones = jnp.ones(batch["label"].shape, jnp.float32)
    sums = weighted_cross_entropy(logits, batch["label"], ones)
    return {"nll_sum": sums["nll"], "correct_count": sums["correct"], "count": sums["weight"]}

  def summarise(totals):
    if not totals.get("count"):
      return {}
    return {"loss": totals["nll_sum"] / totals["count"],
            "accuracy": totals["correct_count"] / totals["count"]}

  return Task("classify", counts, terms, eval_sums, summarise)


def mae_task() -> Task:
  """MAE pixel reconstruction: mean squared error over the removed patches of the global batch.

  Reads the model's `patch_loss` [B, L] (per-patch MSE, against normalised pixels when the
  model has `norm_pix_loss`) and the batch's `mask` [B, L] (1 = removed; the MAE transform's
  output). Over one batch on one device this is the model's own `loss`; over many devices and
  micro-batches it is the same mean over all removed patches, not a mean of means.
  """

  def counts(batch):
    if "mask" not in batch:
      raise ValueError("the MAE task needs batch['mask'] (1 = removed patch) from the MAE "
                       "masking transform; the batch has keys " + str(sorted(batch)))
    return {"mae": jnp.sum(batch["mask"].astype(jnp.float32))}

  def sums(outputs, batch):
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(outputs["patch_loss"].astype(jnp.float32) * mask), jnp.sum(mask)

  def terms(outputs, batch):
    total, count = sums(outputs, batch)
    return {"mae": total}, {"weight": count}

  def eval_sums(outputs, batch):
    total, count = sums(outputs, batch)
    return {"patch_loss_sum": total, "masked_patches": count}

  def summarise(totals):
    if not totals.get("masked_patches"):
      return {}
    return {"loss": totals["patch_loss_sum"] / totals["masked_patches"]}

  return Task("mae", counts, terms, eval_sums, summarise)


TASKS = {"decoder": lm_task, "encoder_decoder": lm_task, "encoder": mlm_task,
         "classifier": classification_task, "mae": mae_task}


def task_for(architecture: str, **kwargs) -> Task:
  """The default task of an architecture (keys of `TASKS`), built with `kwargs`."""
  if architecture not in TASKS:
    raise ValueError(f"architecture={architecture!r} is not one of {tuple(TASKS)}")
  return TASKS[architecture](**kwargs)


# ─── Steps ───────────────────────────────────────────────────────────────────────────────────


def _split_microbatches(batch: dict, num: int) -> dict:
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"per-device batch size {x.shape[0]} is not divisible by "
                       f"accum_steps={num}")
    return x.reshape((num, x.shape[0] // num) + x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


def make_train_step(task: Task, *, accum_steps: int = 1) -> Callable:
  """Returns `train_step(state, batch, axis_name=None) -> (state, metrics)`.

  With `accum_steps = k` the batch is cut into k micro-batches of consecutive rows whose
  gradients are summed in a `lax.scan` before one optimizer update: the same update as one
  step on the whole batch, since every micro-batch loss is divided by the whole batch's count.
  Under data parallelism (`axis_name` set) gradient and metric sums are `psum`-ed, so the
  result equals the single-device step on the global batch.

  Dropout keys: the state's key folded with the step (then with the device index under data
  parallelism, and the micro-batch index under accumulation), so a resumed run draws the same
  masks. Metrics: "loss" (and "loss/<term>"), "sum/<metric>" sums over the global batch,
  "grad_norm", and "param_norm" of the updated parameters (a NaN there means the update broke
  the model even if this step's loss was finite).
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps} must be >= 1")

  def train_step(state: TrainState, batch: dict, axis_name=None):
    counts = parallel.psum_if(task.counts(batch), axis_name)
    counts = jax.tree_util.tree_map(lambda c: jnp.maximum(lax.stop_gradient(c), 1e-9), counts)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:  # different dropout on every device
      rng = jax.random.fold_in(rng, lax.axis_index(axis_name))

    def loss_fn(params, micro_batch, micro_rng):
      outputs = state.apply_fn({"params": params}, micro_batch, train=True,
                               rngs={"dropout": micro_rng})
      term_sums, metric_sums = task.terms(outputs, micro_batch)
      loss = sum(term_sums[k] / counts[k] for k in term_sums)
      return loss, (term_sums, metric_sums)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
      (_, sums), grads = grad_fn(state.params, batch, rng)
    else:
      micro = _split_microbatches(batch, accum_steps)
      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      _, zero_sums = jax.eval_shape(loss_fn, state.params, first, rng)
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     (state.params, zero_sums))

      def body(carry, inputs):
        index, micro_batch = inputs
        (_, sums), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

      (grads, sums), _ = lax.scan(body, zeros, (jnp.arange(accum_steps), micro))

    grads = parallel.psum_if(grads, axis_name)
    sums = parallel.psum_if(sums, axis_name)
    term_sums, metric_sums = sums
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"loss/{k}": term_sums[k] / counts[k] for k in term_sums}
    metrics["loss"] = sum(metrics.values())
    metrics.update({f"sum/{k}": v for k, v in metric_sums.items()})
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(task: Task) -> Callable:
  """Returns `eval_step(params, batch, apply_fn, axis_name=None) -> task.eval_sums` (no dropout).

  Add the sums over batches (`seqlab.metrics.sum_metrics`) and call `task.summarise` once.
  """

  def eval_step(params, batch, apply_fn, axis_name=None):
    outputs = apply_fn({"params": params}, batch, train=False)
    return parallel.psum_if(task.eval_sums(outputs, batch), axis_name)

  return eval_step
