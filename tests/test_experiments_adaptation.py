"""experiments/adaptation.py: steps to reach a loss, the held-out loss, one smoke run end to end."""

import csv
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import adaptation  # pylint: disable=g-import-not-at-top,wrong-import-position
import experiment_runs as runs  # pylint: disable=g-import-not-at-top,wrong-import-position
import objective_cells as cells_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                      "adaptation.py")


def test_steps_to_reach_interpolates_between_measurements():
  curve = [(0, 5.0), (10, 4.0), (20, 3.0), (30, 3.2)]
  assert adaptation.steps_to_reach(curve, 3.5) == pytest.approx(15.0)
  assert adaptation.steps_to_reach(curve, 4.0) == pytest.approx(10.0)
  assert adaptation.steps_to_reach(curve, 5.5) == 0.0  # the source is already there
  assert adaptation.steps_to_reach(curve, 3.1) == pytest.approx(19.0)  # 10 + 10 * 0.9 / 1.0
  assert math.isnan(adaptation.steps_to_reach(curve, 2.9))


def _weighted_nll(logits, targets, weights) -> tuple[float, float]:
  """(summed cross-entropy, summed weight) of the weighted tokens, in float64 NumPy."""
  logits = np.asarray(logits, np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  weights = np.asarray(weights, np.float64)
  return float(-(picked * weights).sum()), float(weights.sum())


def test_smoke_run_end_to_end(tmp_path, monkeypatch):
  """One run of the smoke config (one test: the run is the expensive part): its speedup
  follows from its curves, the adapted run starts from the source and is scored on the
  target's held-out loss (recomputed in float64), and a rerun reads every training back."""
  argv = ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path)]
  rows = adaptation.main(argv)
  run_dir = os.path.join(tmp_path, "smoke")
  assert sorted(os.listdir(run_dir)) == ["config.json", "curves.csv", "results.csv",
                                         "results.md", "results.png", "trainings"]
  with open(os.path.join(run_dir, "curves.csv")) as f:
    curves = {}
    for r in csv.DictReader(f):
      curves.setdefault(r["training"], []).append((int(r["step"]), float(r["heldout_loss"])))

  def curve(name):  # the full-precision record; curves.csv holds it to 6 digits
    with open(os.path.join(run_dir, "trainings", name + ".json")) as f:
      points = [tuple(p) for p in json.load(f)["row"]["curve"]]
    assert [s for s, _ in points] == [s for s, _ in curves[name]]
    np.testing.assert_allclose([v for _, v in points], [v for _, v in curves[name]], rtol=1e-5)
    return points

  (row,) = rows
  scratch = curve("prefix_decoder__span_corruption__scratch__seed0")
  adapted = curve("prefix_decoder__span_corruption__from_causal_decoder__full_lm__seed0")
  assert [s for s, _ in scratch] == [2, 4] and [s for s, _ in adapted] == [0, 2, 4]
  goal = scratch[-1][1]
  assert row["scratch_final_loss"] == pytest.approx(goal, rel=1e-5)
  # The first measurement at or below the goal, interpolated with the one before (by hand).
  steps, losses = zip(*adapted)
  i = next(k for k, v in enumerate(losses) if v <= goal)
  want = 0.0 if i == 0 else steps[i - 1] + (steps[i] - steps[i - 1]) * (
      losses[i - 1] - goal) / (losses[i - 1] - losses[i])
  assert row["steps_to_reach"] == pytest.approx(want, rel=1e-5)
  assert row["tokens_to_reach"] == pytest.approx(want * 4 * 48, rel=1e-5)
  assert row["speedup"] == pytest.approx(4 / want, rel=1e-5)
  text = open(os.path.join(run_dir, "results.md")).read()
  assert "| nc_mlm | causal_decoder/full_lm → prefix_decoder/span_corruption |" in text
  assert "3.3x (Wang et al.)" in text

  # The adapted run's step-0 loss is the source model's loss on the target's held-out batches.
  config = config_lib.load_config(CONFIG + ":smoke")
  tokenizer = loop.make_tokenizer(config)
  cells = adaptation.plan(config, tokenizer.special_ids)
  runner = adaptation.Runner(config, run_dir, cells, tokenizer)
  source, target = (cells[c] for c in adaptation.ADAPTATIONS["nc_mlm"])
  params = runner.scratch_params(source, 0)  # retrained to the same values (scratch deleted)
  model = target.model_config.build()
  nll, weight = 0.0, 0.0
  for batch in runner.losses[target.name].batches:
    logits = model.apply({"params": params}, batch, train=False)
    n, w = _weighted_nll(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    nll, weight = nll + n, weight + w
  assert adapted[0][1] == pytest.approx(nll / weight, rel=1e-5)

  # A rerun reads every training back from its record.
  def must_not_train(*args, **kwargs):
    raise AssertionError("a finished training ran again")

  monkeypatch.setattr(cells_lib, "pretrain", must_not_train)
  assert adaptation.main(argv) == rows


@pytest.mark.parametrize("override,match", [
    ("--config.adaptation.names=nc_mlm,bogus", "adaptation.names: unknown name 'bogus'"),
    ("--config.adaptation.num_seeds=0", "adaptation.num_seeds=0"),
    ("--config.train.eval_every=0", "train.eval_every=0"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, override, match):
  status = runs.exit_on_bad_input(lambda: adaptation.main(
      ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path), override]), "adaptation")
  err = capsys.readouterr().err
  assert status == 2 and err.startswith("adaptation: error: ") and match in err
  assert err.count("\n") == 1
  assert not os.listdir(tmp_path)


def test_every_config_plans():
  for arg, cells in (("quick", 3), ("smoke", 2), ("gpu", 3)):
    config = config_lib.load_config(f"{CONFIG}:{arg}")
    special = loop.make_tokenizer(config).special_ids
    assert sorted(adaptation.plan(config, special)) == sorted(
        {c for name in adaptation.adaptation_names(config)
         for c in adaptation.ADAPTATIONS[name]})
    assert len(adaptation.plan(config, special)) == cells
