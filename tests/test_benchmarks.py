"""The benchmarks' seqlab train steps (the engine's) and the throughput benchmark's matmul floor."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from seqlab import flops
from tests import _helpers

def _throughput_benchmark():
  return _helpers.load_script("experiments/benchmarks/train_throughput.py", "bench_throughput")


def test_matmul_floor_covers_the_dense_matmuls_of_a_step():
  bench = _throughput_benchmark()
  cfg = bench._model_config(16, 2, 2, 24, 8, "float32")
  shapes = bench.dense_matmul_shapes(cfg, 12)
  dense = sum(m.flops for m in flops.config_matmuls(cfg, 8) if not m.name.startswith("attn_"))
  # q 16x16, k+v 16x32, out 16x16, MLP 16x64 and 64x16 per layer; the LM head 16x24.
  assert sorted(shapes) == sorted([(12, 16, 16), (12, 16, 32), (12, 16, 16), (12, 16, 64),
                                   (12, 64, 16)] * 2 + [(12, 16, 24)])
  fns, floor_flops = bench.matmul_floor_fns(shapes, with_torch=True)
  assert floor_flops == 3 * 12 * dense   # forward + two gradients, 12 tokens
  # The XLA program's products against NumPy float64 on the same operands.
  rng = np.random.default_rng(0)
  operands = [tuple(rng.standard_normal(s, np.float32) for s in ((m, k), (k, n), (m, n)))
              for m, k, n in shapes]
  for (a, w, dy), got in zip(operands, fns["xla matmuls"]()):
    a, w, dy = (x.astype(np.float64) for x in (a, w, dy))
    for want, value in zip((a @ w, dy @ w.T, a.T @ dy), got):
      np.testing.assert_allclose(np.asarray(value), want, rtol=1e-4, atol=1e-4)
  assert fns["torch matmuls"]() is None


def test_seqlab_step_is_the_engines_step_on_the_initial_parameters():
  """The first loss is the NumPy float64 cross-entropy of the key-0 model; the state carries."""
  bench = _throughput_benchmark()
  cfg = bench._model_config(16, 2, 2, 24, 8, "float32")
  tokens = bench._tokens(2, 8, 24)
  step = bench.seqlab_step(cfg, tokens)
  first, second = float(step()), float(step())
  model = cfg.build()
  params = jax.jit(model.init)(jax.random.key(0), cfg.dummy_batch(1))["params"]
  logits = np.asarray(jax.jit(model.apply)({"params": params},
                                           {"decoder_input_tokens": tokens[:, :-1]}), np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_p, tokens[:, 1:, None], -1).mean()
  assert first == pytest.approx(want, rel=1e-5)
  assert second < first  # one AdamW step on the same batch, carried into the next call


def test_data_pipeline_train_step_rows_run_the_engines_step():
  bench = _helpers.load_script("experiments/benchmarks/data_pipeline.py", "bench_data_pipeline")
  rows = bench.train_step_rows(batch_size=2, rounds=1, steps=1, wait_steps=2,
                               cases=bench.CASES[:1])
  (label, row), = rows.items()
  assert label == "full LM"
  assert row["examples_per_s"] == pytest.approx(2 / row["step_s"])
  assert 0.0 <= row["data_wait"] < 1.0


def _accelerator_check():
  return _helpers.load_script("experiments/benchmarks/accelerator_check.py", "bench_accelerator")


def test_accelerator_check_on_a_cpu_checks_attention_and_trains(tmp_path):
  bench = _accelerator_check()
  results = bench.main(["--out", str(tmp_path), "--parts", "attention,training"])
  assert results["small"] and results["platform"] == "cpu"
  paths = results["attention"]["paths"]
  assert set(paths) == {"xla", "pallas"}  # Pallas in interpret mode on a CPU
  for entry in paths.values():
    # bfloat16 inputs against the float32 reference: rounding-sized errors, not wrong math.
    assert 0 < entry["max_grad_error"] < 0.1 and entry["loss_error"] < 1.0, entry
  training = results["training"]
  # The first step's loss is the initial model's cross-entropy, recomputed here in float64.
  from seqlab import models  # pylint: disable=g-import-not-at-top
  cfg = models.get_preset("gpt-tiny", num_layers=4, scan_layers=True, remat="dots",
                          max_length=128, dropout_rate=0.0)
  tokens = np.asarray(training["batch_tokens"])
  params = jax.jit(cfg.build().init)(jax.random.key(0), cfg.dummy_batch(1))["params"]
  logits = np.asarray(jax.jit(cfg.build().apply)({"params": params},
                                                 {"decoder_input_tokens": tokens[:, :-1]}),
                      np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_p, tokens[:, 1:, None], -1).mean()
  assert training["first_loss"] == pytest.approx(want, rel=1e-5)
  assert training["loss"] < training["first_loss"]  # the steps train on the same batch
  assert 0 < training["mfu"] < 1 and training["tokens_per_s"] > 0
  summary = (tmp_path / "summary.md").read_text()
  assert "| pallas |" in summary and "MFU" in summary


@pytest.mark.slow
def test_accelerator_check_runs_every_part_on_a_cpu(tmp_path):
  results = _accelerator_check().main(["--out", str(tmp_path)])
  assert all("error" not in results[p] for p in ("attention", "training", "objective_cell"))
  assert 2.0 < results["objective_cell"]["continuation_nll"][0] < 9.0
