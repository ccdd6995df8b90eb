"""seqlab.train: losses, schedules, AdamW, tasks and the pure train step, against NumPy oracles.

Multi-device equivalence lives in test_parallel.py; resume and determinism of whole runs in
test_cli.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _helpers
from seqlab import models
from seqlab import train as train_lib


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ─── Losses ──────────────────────────────────────────────────────────────────────────────────


def test_weighted_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
  targets = rng.integers(0, 11, (3, 5))
  weights = rng.random((3, 5)).astype(np.float32) * (rng.random((3, 5)) > 0.3)
  loss_fn = jax.jit(functools.partial(train_lib.weighted_cross_entropy, label_smoothing=0.1,
                                      z_loss=1e-2))
  out = loss_fn(logits, targets, weights)
  logp = _log_softmax(logits)
  log_z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  # Smoothed targets: 0.9 on the label + 0.1 / V everywhere (optax.smooth_labels).
  smoothed = np.full(logits.shape, 0.1 / 11) + 0.9 * np.eye(11)[targets]
  loss = -(smoothed * logp).sum(-1) + 1e-2 * log_z**2
  w = weights.astype(np.float64)
  np.testing.assert_allclose(out["loss"], (loss * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["nll"], (nll * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["z_loss"], (log_z**2 * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["correct"], ((logits.argmax(-1) == targets) * w).sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(out["weight"], w.sum(), rtol=1e-6)


def test_lm_eval_summary_is_perplexity_of_weighted_nll():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
  targets = rng.integers(1, 9, (2, 6))
  weights = (rng.random((2, 6)) > 0.4).astype(np.float32)
  weights[0, 0] = 1
  batch = {"decoder_target_tokens": jnp.asarray(targets),
           "decoder_loss_weights": jnp.asarray(weights)}
  task = train_lib.lm_task()
  eval_sums = jax.jit(task.eval_sums)
  halves = [eval_sums(jnp.asarray(logits[i:i + 1]), {k: v[i:i + 1] for k, v in batch.items()})
            for i in range(2)]
  totals = {k: float(halves[0][k] + halves[1][k]) for k in halves[0]}
  summary = task.summarise(totals)
  nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  mean_nll = (nll * weights).sum() / weights.sum()
  np.testing.assert_allclose(summary["loss"], mean_nll, rtol=1e-5)
  np.testing.assert_allclose(summary["perplexity"], math.exp(mean_nll), rtol=1e-5)
  correct = (logits.argmax(-1) == targets) * weights
  np.testing.assert_allclose(summary["accuracy"], correct.sum() / weights.sum(), rtol=1e-6)


def test_mlm_task_reads_nsp_at_segment_starts():
  rng = np.random.default_rng(2)
  batch_size, length, vocab = 2, 6, 7
  segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  positions = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
  nsp_label = np.zeros((batch_size, length), np.int32)
  nsp_label[0, 0], nsp_label[0, 3], nsp_label[1, 0] = 1, 0, 1
  batch = {"encoder_input_tokens": jnp.asarray(np.where(segments > 0, 5, 0)),
           "encoder_segment_ids": jnp.asarray(segments),
           "encoder_positions": jnp.asarray(positions),
           "mlm_targets": jnp.asarray(rng.integers(1, vocab, (batch_size, length))),
           "mlm_weights": jnp.asarray((rng.random((batch_size, length)) > 0.5) * 1.0),
           "nsp_label": jnp.asarray(nsp_label)}
  outputs = {"mlm_logits": jnp.asarray(rng.normal(size=(batch_size, length, vocab))),
             "nsp_logits": jnp.asarray(rng.normal(size=(batch_size, length, 2)))}
  task = train_lib.mlm_task()
  counts = jax.jit(task.counts)(batch)
  terms, _ = jax.jit(task.terms)(outputs, batch)
  # Oracle: the three segment starts (0,0), (0,3), (1,0); padding position (0,5) excluded.
  starts = [(0, 0), (0, 3), (1, 0)]
  logp = _log_softmax(np.asarray(outputs["nsp_logits"]))
  expected_nsp = sum(-logp[b, t, nsp_label[b, t]] for b, t in starts)
  assert float(counts["nsp"]) == 3.0
  np.testing.assert_allclose(terms["nsp"], expected_nsp, rtol=1e-5)
  mlm_logp = _log_softmax(np.asarray(outputs["mlm_logits"]))
  targets, weights = np.asarray(batch["mlm_targets"]), np.asarray(batch["mlm_weights"])
  expected_mlm = (-np.take_along_axis(mlm_logp, targets[..., None], -1)[..., 0] * weights).sum()
  np.testing.assert_allclose(terms["mlm"], expected_mlm, rtol=1e-5)
  assert float(counts["mlm"]) == weights.sum()


def test_classification_task_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 5)
  task = train_lib.classification_task()
  batch = {"label": jnp.asarray(labels)}
  summary = task.summarise({k: float(v) for k, v in
                            jax.jit(task.eval_sums)(logits, batch).items()})
  nll = -_log_softmax(logits)[np.arange(5), labels]
  np.testing.assert_allclose(summary["loss"], nll.mean(), rtol=1e-5)
  assert summary["accuracy"] == np.mean(logits.argmax(-1) == labels)


def test_mae_task_is_mean_squared_error_over_removed_patches():
  from seqlab.data import images, sources  # pylint: disable=g-import-not-at-top
  cfg = models.get_preset("mae-tiny")
  batch = next(images.make_image_pipeline(
      sources.get_source("digits", split="train", image_size=8), batch_size=4, seed=0,
      mae_mask_ratio=cfg.mask_ratio, patch_size=cfg.patch_size))
  model = cfg.build()
  task = train_lib.mae_task()
  params = _helpers.random_params(models.param_shapes(cfg))

  @jax.jit
  def forward(params, batch):
    outputs = model.apply({"params": params}, batch)
    return outputs, task.terms(outputs, batch)[0]["mae"] / task.counts(batch)["mae"]

  outputs, loss = forward(params, batch)
  loss = float(loss)
  # NumPy oracle: patchify the image (row-major 2x2 patches), MSE per patch, mean over mask.
  image = np.asarray(batch["image"], np.float64)
  patches = image.reshape(4, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(4, 16, 4)
  per_patch = ((np.asarray(outputs["pred"], np.float64) - patches) ** 2).mean(-1)
  mask = np.asarray(batch["mask"], np.float64)
  np.testing.assert_allclose(loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(loss, float(outputs["loss"]), rtol=1e-6)  # the model's own loss
  with pytest.raises(ValueError, match="batch\\['mask'\\]"):
    task.counts({"image": batch["image"]})


# ─── Optimizers ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt", "constant"])
def test_learning_rate_schedules_match_formulas(schedule):
  cfg = train_lib.OptimizerConfig(learning_rate=2.0, schedule=schedule, warmup_steps=4,
                                  total_steps=12, end_learning_rate_fraction=0.25)
  fn = train_lib.learning_rate_schedule(cfg)
  for step in range(16):
    if schedule == "cosine":
      if step < 4:
        want = 2.0 * step / 4
      else:
        progress = min((step - 4) / 8, 1.0)
        want = 0.5 + (2.0 - 0.5) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "inverse_sqrt":
      want = 2.0 * min((step + 1) / 4, math.sqrt(4 / (step + 1)))
    else:
      want = 2.0 * min(step / 4, 1.0)
    np.testing.assert_allclose(float(fn(step)), want, rtol=1e-5, atol=1e-7, err_msg=str(step))


def test_adamw_with_clipping_matches_numpy():
  cfg = train_lib.OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=0,
                                  weight_decay=0.5, b1=0.9, b2=0.99, eps=1e-6, clip_norm=1.0)
  tx = train_lib.make_optimizer(cfg)
  rng = np.random.default_rng(4)
  params = {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) * 2 for k, v in params.items()}
               for _ in range(2)]
  state, current = tx.init(params), params
  for grads in grads_seq:
    updates, state = tx.update(grads, state, current)
    current = optax.apply_updates(current, updates)
  # Oracle: global-norm clipping, Adam with bias correction, decoupled decay on matrices only.
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: v.astype(np.float64) for k, v in grads.items()}
    norm = math.sqrt(sum((x**2).sum() for x in g.values()))
    g = {k: x * min(1.0, 1.0 / norm) for k, x in g.items()}
    for k in p:
      m[k] = 0.9 * m[k] + 0.1 * g[k]
      v2[k] = 0.99 * v2[k] + 0.01 * g[k]**2
      step = (m[k] / (1 - 0.9**t)) / (np.sqrt(v2[k] / (1 - 0.99**t)) + 1e-6)
      decay = 0.5 * p[k] if p[k].ndim >= 2 else 0.0
      p[k] = p[k] - 0.1 * (step + decay)
  for k in p:
    np.testing.assert_allclose(current[k], p[k], rtol=1e-5, atol=1e-6)


def test_optimizer_config_rejects_bad_values():
  with pytest.raises(ValueError, match="optimizer name='sgd'"):
    train_lib.OptimizerConfig(name="sgd")
  with pytest.raises(ValueError, match="schedule='linear'"):
    train_lib.OptimizerConfig(schedule="linear")


# ─── The train step ──────────────────────────────────────────────────────────────────────────


def _decoder_batch(seed: int, batch_size: int, length: int, vocab: int) -> dict:
  """Packed rows of two segments each, padding at the end of some rows, uneven loss weights."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch_size, length)).astype(np.int32)
  segments = np.zeros((batch_size, length), np.int32)
  positions = np.zeros((batch_size, length), np.int32)
  for row in range(batch_size):
    split = int(rng.integers(2, length - 2))
    end = int(rng.integers(split + 1, length + 1))
    segments[row, :split], segments[row, split:end] = 1, 2
    positions[row, :split] = np.arange(split)
    positions[row, split:end] = np.arange(end - split)
  tokens = np.where(segments > 0, tokens, 0)
  inputs = np.where(positions > 0, np.roll(tokens, 1, axis=1), 0)
  weights = ((segments > 0) & (rng.random((batch_size, length)) > 0.3)).astype(np.float32)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens,
          "decoder_segment_ids": segments, "decoder_positions": positions,
          "decoder_loss_weights": weights}


@functools.lru_cache(maxsize=None)
def _one_layer_setup(dtype: str = "float32"):
  cfg = models.get_preset("gpt-tiny", num_layers=1, dtype=dtype)
  model = cfg.build()
  params = _helpers.random_params(models.param_shapes(cfg))
  return cfg, model, params


def _step_once(model, params, batch, accum_steps, tx):
  state = _helpers.state_from_params(model, params, tx)
  step = train_lib.make_train_step(train_lib.lm_task(z_loss=1e-4), accum_steps=accum_steps)
  fn = jax.jit(functools.partial(step, axis_name=None))
  lowered = fn.lower(state, batch)
  new_state, metrics = lowered.compile()(state, batch)
  return new_state, jax.device_get(metrics), lowered.as_text()


@functools.lru_cache(maxsize=None)
def _full_batch_step():
  _, model, params = _one_layer_setup()
  batch = _decoder_batch(5, 8, 32, 512)
  # SGD with rate 1: the new parameters are exactly params - gradient, a direct comparison.
  return _step_once(model, params, batch, 1, optax.sgd(1.0))[:2]


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
  _, model, params = _one_layer_setup()
  batch = _decoder_batch(5, 8, 32, 512)
  full_state, full = _full_batch_step()
  accum_state, accum, _ = _step_once(model, params, batch, 4, optax.sgd(1.0))
  # The 4 micro-batches hold different numbers of weighted tokens: a mean of micro-batch
  # means would differ; the sum over the global count does not.
  counts = [batch["decoder_loss_weights"][2 * i:2 * i + 2].sum() for i in range(4)]
  assert len(set(counts)) > 1
  for key in ("loss", "loss/lm", "sum/nll", "sum/correct", "sum/weight", "grad_norm"):
    np.testing.assert_allclose(accum[key], full[key], rtol=1e-6, atol=1e-6, err_msg=key)
  diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                full_state.params, accum_state.params)
  assert max(jax.tree_util.tree_leaves(diff)) <= 1e-6
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 full_state.params, params)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # the step did change the parameters
  assert int(accum_state.step) == 1


def test_accum_steps_must_divide_the_batch():
  with pytest.raises(ValueError, match="accum_steps=0"):
    train_lib.make_train_step(train_lib.lm_task(), accum_steps=0)


def test_bfloat16_compute_keeps_float32_parameters():
  cfg, model, _ = _one_layer_setup("bfloat16")
  params = _one_layer_setup()[2]  # float32 parameters, as the float32 step below
  batch = _decoder_batch(5, 8, 32, 512)
  new_state, metrics, hlo = _step_once(model, params, batch, 1, optax.sgd(1.0))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(new_state.params))
  # The matmuls really run in bfloat16: the lowered step has bf16 dot_generals.
  assert "dot_general" in hlo and "bf16" in hlo
  _, full = _full_batch_step()  # the same model, parameters and batch in float32
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert metrics["loss"] != full["loss"]
  np.testing.assert_allclose(metrics["loss"], full["loss"], rtol=2e-2)
  np.testing.assert_allclose(metrics["grad_norm"], full["grad_norm"], rtol=1e-1)
  assert cfg.dtype == "bfloat16"


def test_adafactor_first_step_matches_numpy():
  # Unfactored (dims < 128) first step: the second-moment decay is 1 - 1^-0.8 = 0, so the
  # update direction is g / sqrt(g^2 + 1e-30) = sign(g) (RMS 1: no update clipping), scaled by
  # lr * max(RMS(param), 1e-3) (multiply_by_parameter_scale), after global-norm clipping.
  cfg = train_lib.OptimizerConfig(name="adafactor", learning_rate=0.5, schedule="constant",
                                  warmup_steps=0, clip_norm=1.0)
  tx = train_lib.make_optimizer(cfg)
  rng = np.random.default_rng(6)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32),
            "tiny": np.full((4,), 1e-5, np.float32)}
  grads = {"w": rng.normal(size=(3, 2)).astype(np.float32) * 5,
           "tiny": rng.normal(size=(4,)).astype(np.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  for k in params:
    scale = max(np.sqrt(np.mean(params[k].astype(np.float64) ** 2)), 1e-3)
    np.testing.assert_allclose(updates[k], -0.5 * scale * np.sign(grads[k]), rtol=1e-5)


def test_task_for_knows_every_architecture():
  assert train_lib.task_for("decoder").name == "lm"
  assert train_lib.task_for("encoder_decoder", z_loss=1e-4).name == "lm"
  assert train_lib.task_for("encoder").name == "mlm"
  assert train_lib.task_for("classifier").name == "classify"
  assert train_lib.task_for("mae").name == "mae"
  with pytest.raises(ValueError, match="architecture='moe'"):
    train_lib.task_for("moe")
