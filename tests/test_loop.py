"""seqlab.loop helpers, seqlab.config overrides and seqlab.monitor, against hand-made oracles.

Whole runs of the loop (through the `seqlab` command) are in test_cli.py.
"""

import io
import json
import math
import sys

import ml_collections
import numpy as np
import pytest

import _helpers
from seqlab import config as config_lib
from seqlab import loop, models, monitor


# ─── seqlab.config ───────────────────────────────────────────────────────────────────────────


def test_overrides_take_the_type_of_the_current_value():
  config = config_lib.apply_overrides(_helpers.tiny_config(), [
      "--config.optimizer.learning_rate=1e-4", "config.train.steps=7", "data.packing=false",
      "mesh.strategy=fsdp", "mesh.rules=(('embed', 'fsdp'),)",
      "model.overrides.dtype=bfloat16", "model.overrides.num_layers=1"])
  assert config.optimizer.learning_rate == 1e-4 and config.train.steps == 7
  assert config.data.packing is False and config.mesh.strategy == "fsdp"
  assert tuple(map(tuple, config.mesh.rules)) == (("embed", "fsdp"),)
  # `*overrides` dicts accept new keys, which the model preset then validates.
  assert loop.model_config(config) == models.get_preset("gpt-tiny", dtype="bfloat16",
                                                        num_layers=1)


def test_unknown_and_malformed_overrides():
  config = _helpers.tiny_config()
  with pytest.raises(ValueError, match=r"unknown config key 'train.stpes'.*'train.steps'"):
    config_lib.apply_overrides(config, ["train.stpes=3"])
  with pytest.raises(ValueError, match="unknown config key 'model'"):  # a dict, not a leaf
    config_lib.apply_overrides(config, ["model=3"])
  with pytest.raises(ValueError, match="not of the form"):
    config_lib.apply_overrides(config, ["train.steps"])
  with pytest.raises(ValueError, match="cannot read 'maybe' as a bool"):
    config_lib.apply_overrides(config, ["data.packing=maybe"])
  with pytest.raises(ValueError, match="unknown config field"):
    loop.model_config(config_lib.apply_overrides(config, ["model.overrides.d_modle=32"]))
  with pytest.raises(ValueError, match="config arg='gpt5'"):
    config_lib.load_config(_helpers.TINY + ":gpt5")
  with pytest.raises(ValueError, match="does not exist"):
    config_lib.load_config("no/such/config.py")


def test_flat_keys_lists_every_leaf():
  config = ml_collections.ConfigDict({"a": 1, "b": {"c": 2, "d": {"e": 3}}})
  assert config_lib.flat_keys(config) == ["a", "b.c", "b.d.e"]


# ─── seqlab.loop helpers ─────────────────────────────────────────────────────────────────────


def test_flops_per_batch_counts_six_n_plus_attention():
  cfg = models.get_preset("gpt-tiny")  # d 64, 4 heads x 16, d_ff 256, 2 layers, vocab 512
  length, batch = 128, 16
  per_layer = 2 * 64 * 192 + 2 * 64 * 64 + 2 * 2 * 64 * 256 + 2 * 2 * length * 64
  forward_per_token = 2 * per_layer + 2 * 64 * 512
  assert loop.flops_per_batch(cfg, "decoder", {"decoder": length}, batch) == (
      3 * forward_per_token * length * batch)
  assert math.isnan(loop.flops_per_batch(models.get_preset("mae-tiny"), "mae", {}, 4))


def test_architectures_and_lengths():
  assert loop.architecture_of(models.get_preset("t5-tiny")) == "encoder_decoder"
  assert loop.architecture_of(models.get_preset("mae-tiny")) == "mae"
  assert loop.architecture_of(models.get_preset("vit-tiny-digits")) == "classifier"
  with pytest.raises(ValueError, match="is not trainable here"):
    loop.architecture_of(object())
  config = _helpers.tiny_config("encoder_decoder")
  assert loop.seq_lengths(config, "encoder_decoder") == {"encoder": 128, "decoder": 32}
  assert loop.seq_lengths(config, "decoder") == {"decoder": 128}


def test_last_values_keeps_the_newest_finite_value():
  history = [{"step": 1, "loss": 3.0, "mfu": 0.1}, {"step": 2, "eval/loss": 2.5},
             {"step": 3, "loss": 2.0, "mfu": float("nan")}]
  assert loop.last_values(history) == {"loss": 2.0, "mfu": 0.1, "eval/loss": 2.5}


def test_mae_config_feeds_masked_digits():
  config = _helpers.tiny_config("mae")
  model_cfg = loop.model_config(config)
  batch = next(loop.make_input(config, "mae", "train", batch_size=4, shard_index=0,
                               shard_count=1, model_cfg=model_cfg))
  assert batch["image"].shape == (4, 8, 8, 1)
  # 16 patches of 2x2, 75% removed: exactly 12 ones per row, and ids_restore a permutation.
  np.testing.assert_array_equal(batch["mask"].sum(1), [12] * 4)
  np.testing.assert_array_equal(np.sort(batch["ids_restore"], 1), np.tile(np.arange(16), (4, 1)))


# ─── seqlab.monitor ──────────────────────────────────────────────────────────────────────────


def test_check_finite_names_the_bad_metric():
  monitor.check_finite(3, {"loss": 1.0, "grad_norm": 2.0, "sum/weight": float("nan")})
  with pytest.raises(FloatingPointError, match=r"loss/lm=nan at step 3"):
    monitor.check_finite(3, {"loss/lm": float("nan")})
  with pytest.raises(FloatingPointError, match=r"param_norm=inf at step 4"):
    monitor.check_finite(4, {"loss": 1.0, "param_norm": float("inf")})


def test_metric_writer_writes_jsonl_and_tensorboard_events(tmp_path):
  torch_before = "torch" in sys.modules
  writer = monitor.MetricWriter(str(tmp_path))
  writer.write(5, {"loss": 2.5, "eval/perplexity": np.float32(12.0)})
  writer.write(6, {"loss": 2.25})
  writer.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 5, "loss": 2.5, "eval/perplexity": 12.0}, {"step": 6, "loss": 2.25}]
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"eval/perplexity" in events[0].read_bytes()
  assert ("torch" in sys.modules) == torch_before  # tensorboardX did not import torch


def test_progress_line_and_eta(monkeypatch):
  clock = iter([100.0, 110.0])
  monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
  stream = io.StringIO()
  progress = monitor.Progress(40, stream=stream)
  progress.update(10, 2.5, 12345.0, 0.25)  # 10 steps in 10 s, 30 to go
  line = stream.getvalue()
  assert "10/40 loss 2.5000 12,345 tok/s MFU 25.0% ETA 30s" in line


def test_matmul_peak_is_a_plausible_rate():
  peak = monitor.measure_matmul_peak(size=256, repeats=3)
  assert 1e8 < peak < 1e14  # between a slow laptop core and a whole accelerator
  assert monitor.device_peak_flops() > 1e8


def test_automatic_and_explicit_distributed_setup_exclude_each_other(tmp_path):
  config = _helpers.tiny_config("", "distributed.initialize=True",
                                "distributed.num_processes=2")
  with pytest.raises(ValueError, match=r"distributed.initialize=True .*distributed.num_processes=2"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not list(tmp_path.iterdir())  # nothing written
