"""The objective-comparison experiment: smoke run, outputs, resume, readouts, validation."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import _helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
import experiment_runs as runs  # pylint: disable=g-import-not-at-top,wrong-import-position
import compare_objectives  # pylint: disable=g-import-not-at-top,wrong-import-position
import objective_cells as cells_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import objective_grid as grid  # pylint: disable=g-import-not-at-top,wrong-import-position
import objective_readouts as readouts  # pylint: disable=g-import-not-at-top,wrong-import-position
import objective_report as report  # pylint: disable=g-import-not-at-top,wrong-import-position

from seqlab import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab import objectives as obj  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab.evaluation import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab.evaluation import scoring  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab.data import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = os.path.join(ROOT, "experiments", "configs", "compare_objectives.py")
BYTE_SPECIAL = tokenizers.ByteTokenizer().special_ids


def smoke_config(*overrides):
  return config_lib.apply_overrides(config_lib.load_config(CONFIG + ":smoke"), overrides)


# ─── The smoke run: every output written and well-formed; a rerun recomputes nothing ────────


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke grid run once in this process: (argv, summary, out dir, scratch dir)."""
  base = tmp_path_factory.mktemp("smoke")
  workdir, scratch = str(base / "results"), str(base / "scratch")
  argv = ["--config", CONFIG + ":smoke", "--workdir", workdir, "--scratch", scratch,
          "--config.readouts.num_sequences=5"]
  summary = compare_objectives.main(argv)
  return argv, summary, os.path.join(workdir, "smoke"), scratch


def test_smoke_run_writes_every_output_and_resumes(smoke_run, monkeypatch):
  argv, summary, run_dir, scratch = smoke_run
  config = smoke_config("--config.readouts.num_sequences=5")
  expected_cells = grid.grid_names(config)
  assert [(e["architecture"], e["objective"]) for e in summary] == expected_cells

  # results.csv: the columns, one row per cell x seed, finite numbers, params and FLOPs match.
  with open(os.path.join(run_dir, "results.csv")) as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == report.CSV_COLUMNS
    rows = list(reader)
  seeds = config.grid.num_seeds
  assert sorted((r["architecture"], r["objective"], int(r["seed"])) for r in rows) == sorted(
      (a, o, s) for a, o in expected_cells for s in range(seeds))
  for row in rows:
    for column in ("continuation_nll", "infill_nll", "name_nll", "final_train_loss"):
      # An untrained byte model sits near log(512) = 6.24 nats; a broken readout would not.
      assert 3.0 < float(row[column]) < 9.0, (column, row[column])
    assert 0.0 <= float(row["exact_match"]) <= 1.0
    assert 0.0 <= float(row["name_rouge_l"]) <= 1.0
    assert 0.0 <= float(row["name_chrf"]) <= 100.0 and 0.0 <= float(row["name_bleu"]) <= 100.0
    assert int(row["train_tokens"]) == (config.train.steps * config.data.batch_size
                                        * config.data.seq_length)
  cells = {c.name: c for c in grid.plan(config, BYTE_SPECIAL)}
  for row in rows:
    cell = cells[f"{row['architecture']}/{row['objective']}"]
    assert float(row["train_flops_per_token"]) == pytest.approx(grid.flops_per_token(cell))

  # (d) and (e): accuracies, and the chance level of the held-out examples recomputed here.
  heldout = cells_lib.suite_names(config)["heldout"]
  assert heldout
  limit = config.zero_shot.limit
  chance = np.mean([np.mean([1 / len(e["choices"])
                             for e in tasks.get(n).examples("validation")[:limit]])
                    for n in heldout])
  majority = np.mean([harness.majority_baseline(tasks.get(n).examples("validation")[:limit])
                      for n in heldout])
  for row in rows:
    assert float(row["suite_chance"]) == pytest.approx(chance, rel=1e-5)
    assert float(row["suite_majority"]) == pytest.approx(majority, rel=1e-5)
    for column in ("zero_shot_acc", "few_shot_acc", "multitask_acc"):
      # A mean over tasks of correct / examples: a multiple of 1 / (tasks x limit) here.
      value = float(row[column]) * len(heldout) * limit
      assert 0 <= value <= len(heldout) * limit and value == pytest.approx(round(value)), (
          column, row[column])

  # results.md: header, separator, one row per cell with every column, means from the csv.
  with open(os.path.join(run_dir, "results.md")) as f:
    text = f.read()
  main_table, _, rest = text.partition("## Zero-shot and few-shot on the held-out task types")
  suite_part, _, task_part = rest.partition("### Per held-out task type")
  suite_table = [line for line in suite_part.splitlines() if line.startswith("|")]
  assert len(suite_table) == 2 + len(expected_cells)
  # Per type: the counts in the cell files average to the row's accuracy; one table line per
  # cell and readout (zero-shot, few-shot, multitask), pooled over seeds.
  cell_rows = [json.load(open(os.path.join(run_dir, "cells", name)))["row"]
               for name in sorted(os.listdir(os.path.join(run_dir, "cells")))]
  for row in cell_rows:
    for key, column in (("zero_shot", "zero_shot_acc"), ("few_shot", "few_shot_acc"),
                        ("multitask", "multitask_acc")):
      counts = row["suite_tasks"][key]
      assert sorted(counts) == sorted(n.split("/")[-1] for n in heldout)
      assert np.mean([c / n for c, n, _ in counts.values()]) == pytest.approx(row[column])
  task_table = [line for line in task_part.splitlines() if line.startswith("|")]
  assert len(task_table) == 2 + 3 * len(expected_cells)
  assert f"chance is {100 * chance:.1f}%" in rest
  assert "Which orderings are significant" in rest
  table = [line for line in main_table.splitlines() if line.startswith("|")]
  assert len(table) == 2 + len(expected_cells)
  width = 5 + len(report.READOUTS)
  assert all(line.count("|") == width + 1 for line in table)
  for (architecture, objective), line in zip(expected_cells, table[2:]):
    mine = [r for r in rows if (r["architecture"], r["objective"]) == (architecture, objective)]
    mean = np.mean([float(r["continuation_nll"]) for r in mine])
    assert f"{mean:.3f} ±" in line and line.startswith(f"| {architecture} | {objective} |")
  assert text.count("**") >= 2 * len(report.READOUTS)  # a best entry per readout column

  # results.png: a non-empty PNG.
  with open(os.path.join(run_dir, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(os.path.join(run_dir, "results.png")) > 5000

  # config.json: the exact config, round-tripping to the same ConfigDict.
  with open(os.path.join(run_dir, "config.json")) as f:
    restored = ml_collections.ConfigDict(json.load(f))
  assert restored.to_dict() == config.to_dict()

  # No mid-cell checkpoint is left behind.
  assert not any(files for _, _, files in os.walk(scratch))

  # A rerun resumes: no cell is computed again, and the outputs come out the same.
  def must_not_run(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")

  monkeypatch.setattr(cells_lib, "run_cell", must_not_run)
  with open(os.path.join(run_dir, "results.csv")) as f:
    before = f.read()
  again = compare_objectives.main(argv)
  assert again == summary
  with open(os.path.join(run_dir, "results.csv")) as f:
    assert f.read() == before

  # A finished cell computed under another config is refused, not silently mixed in.
  with pytest.raises(ValueError, match="different config"):
    compare_objectives.main(argv + ["--config.train.steps=4"])


@pytest.mark.slow
def test_smoke_run_every_architecture(tmp_path):
  summary = compare_objectives.main([
      "--config", CONFIG + ":smoke", "--workdir", str(tmp_path), "--scratch", str(tmp_path / "s"),
      "--config.grid.architectures=causal_decoder,prefix_decoder,encoder_decoder",
      "--config.grid.objectives=full_lm,prefix_lm,span_corruption,ul2,span_prefix_lm",
      "--config.grid.skip=prefix_decoder/full_lm,encoder_decoder/full_lm",
      # A 9-token encoder-decoder span-corruption decoder row holds a 7-token continuation.
      "--config.readouts.chunk_length=14"])
  assert len(summary) == 13
  for entry in summary:
    assert all(np.isfinite(entry[c][0]) for c, _, _ in report.READOUTS)


# The command with its input paused for good at the third pretraining batch: a SIGKILL then
# lands between steps 2 and 3, whatever the machine's speed. Only the data iterator is wrapped
# (its batches and state pass through), so the numbers are those of the plain command.
_PAUSED_AT_BATCH_3 = """
import sys, threading
sys.path.insert(0, "experiments")
import compare_objectives
from seqlab.data import pipeline

class Paused:
  def __init__(self, it):
    self.it, self.drawn = it, 0
  def __next__(self):
    self.drawn += 1
    if self.drawn == 3:
      threading.Event().wait()
    return next(self.it)
  def __getattr__(self, name):
    return getattr(self.it, name)

make_pipeline = pipeline.make_pipeline
pipeline.make_pipeline = lambda *args, **kwargs: Paused(make_pipeline(*args, **kwargs))
compare_objectives.main(sys.argv[1:])
"""
WALL_TIME_FIELDS = ("pretrain_seconds", "cell_seconds")


def test_a_cell_killed_mid_pretraining_resumes_to_the_same_row(smoke_run, tmp_path, capsys):
  """SIGKILL after pretraining checkpoint 2 of 3, rerun: the smoke run's (uninterrupted) row."""
  cell = "causal_decoder__span_corruption__seed0"  # span corruption: the data state matters
  argv = ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path), "--scratch",
          str(tmp_path / "scratch"), "--config.grid.objectives=span_corruption",
          "--config.readouts.num_sequences=5"]
  checkpoints = tmp_path / "scratch" / "smoke" / cell / "pretrain" / "checkpoints"
  # The killed process compiles as this process does (conftest), so its steps are the ones the
  # in-process rerun and the smoke run compute.
  env = _helpers.subprocess_env(JAX_DEFAULT_MATMUL_PRECISION="highest")
  with open(tmp_path / "killed.err", "w") as err:
    paused = subprocess.Popen([sys.executable, "-c", _PAUSED_AT_BATCH_3, *argv],
                              cwd=_helpers.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
      deadline = time.monotonic() + 300
      while not (checkpoints / "2").is_dir():  # orbax renames a finished save into place
        assert paused.poll() is None, (tmp_path / "killed.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint 2 within 300 s"
        time.sleep(0.05)  # the polling interval; the pause, not a delay, fixes the moment
    finally:
      paused.send_signal(signal.SIGKILL)
      paused.wait(timeout=60)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]
  capsys.readouterr()
  compare_objectives.main(argv)
  assert "resuming from step 2" in capsys.readouterr().err

  def row(run_dir):
    with open(os.path.join(run_dir, "cells", f"{cell}.json")) as f:
      return json.load(f)["row"]

  want, got = row(smoke_run[2]), row(tmp_path / "smoke")
  assert set(got) == set(want)
  for field in sorted(set(want) - set(WALL_TIME_FIELDS)):
    assert got[field] == want[field], field


def test_a_sigterm_stops_the_grid_with_143_and_the_rerun_resumes_to_the_same_row(
    smoke_run, tmp_path, monkeypatch, capsys):
  """SIGTERM while the second pretraining batch is drawn: the engine saves step 2, the grid
  exits 143 without writing the cell, and the rerun continues to the uninterrupted row."""
  cell = "causal_decoder__span_corruption__seed0"
  argv = ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path), "--scratch",
          str(tmp_path / "scratch"), "--config.grid.objectives=span_corruption",
          "--config.readouts.num_sequences=5"]
  make_pipeline = pipeline_lib.make_pipeline

  class TermAtBatch2:
    def __init__(self, it):
      self.it, self.drawn = it, 0

    def __next__(self):
      self.drawn += 1
      if self.drawn == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      return next(self.it)

    def __getattr__(self, name):
      return getattr(self.it, name)

  monkeypatch.setattr(pipeline_lib, "make_pipeline",
                      lambda *a, **k: TermAtBatch2(make_pipeline(*a, **k)))
  with pytest.raises(SystemExit) as stopped:
    compare_objectives.main(argv)
  assert stopped.value.code == runs.PREEMPTED_EXIT == 143
  assert "preempted (causal_decoder/span_corruption seed 0) at step 2" in capsys.readouterr().err
  checkpoints = tmp_path / "scratch" / "smoke" / cell / "pretrain" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]
  assert not (tmp_path / "smoke" / "cells" / f"{cell}.json").exists()
  monkeypatch.setattr(pipeline_lib, "make_pipeline", make_pipeline)
  compare_objectives.main(argv)
  assert "resuming from step 2" in capsys.readouterr().err
  with open(os.path.join(smoke_run[2], "cells", f"{cell}.json")) as f:
    want = json.load(f)["row"]
  with open(tmp_path / "smoke" / "cells" / f"{cell}.json") as f:
    got = json.load(f)["row"]
  for field in sorted(set(want) - set(WALL_TIME_FIELDS)):
    assert got[field] == want[field], field


_WORDS = ("the river keeps a quiet garden near the old harbor while morning light "
          "moves over silver hills and children carry bright yellow kites toward the "
          "forest where thunder rolls softly beyond the castle walls").split()


def test_the_grid_runs_on_a_plain_english_corpus_and_skips_naming(smoke_run, tmp_path):
  del smoke_run  # compiles the smoke models first; this run reuses them
  rng = np.random.default_rng(0)
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(24):
    sentences = [" ".join(rng.choice(_WORDS, 12)).capitalize() + "." for _ in range(20)]
    (corpus / f"doc{i}.txt").write_text(" ".join(sentences) + "\n")
  config = smoke_config("--config.readouts.num_sequences=5")
  config.data.source = "text"
  config.data.source_kwargs = ml_collections.ConfigDict(
      {"pattern": str(corpus / "*.txt"), "validation_fraction": 0.25})
  summary = compare_objectives.run(config, str(tmp_path / "out"), spec="english",
                                   scratch=str(tmp_path / "scratch"))
  assert len(summary) == len(grid.grid_names(config))
  with open(tmp_path / "out" / "smoke" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    assert 0.5 < float(row["continuation_nll"]) < 9.0 and 0.5 < float(row["infill_nll"]) < 9.0
    for column in ("exact_match", "name_chrf", "name_nll", "name_bleu"):
      assert row[column] == "nan", (column, row[column])
  text = (tmp_path / "out" / "smoke" / "results.md").read_text()
  assert "(c) skipped: the text corpus yields no Python functions" in text
  assert "| — |" in text and "nan" not in text


# ─── Bad input: clear errors before any training ────────────────────────────────────────────


@pytest.mark.parametrize("overrides, match", [
    (["--config.grid.architectures=causal_decoder,transformer_xl"], "grid.architectures"),
    (["--config.grid.objectives=full_lm,electra"], "grid.objectives"),
    (["--config.grid.skip=causal_decoder/nope"], "grid.skip"),
    (["--config.grid.skip="], "does not fit architecture='encoder_decoder'"),
    (["--config.data.seq_length=40"], r"\(a\) continuation example needs decoder length"),
    (["--config.data.seq_length=6", "--config.grid.objectives=ul2"],
     "grid cell causal_decoder/ul2 cannot be built with data.seq_length=6"),
    (["--config.finetune.max_body_bytes=126"], r"\(c\) fine-tuning"),
    (["--config.train.steps=0"], "train.steps=0"),
])
def test_bad_grid_raises_before_training(tmp_path, monkeypatch, overrides, match):
  def must_not_run(*args, **kwargs):
    raise AssertionError("training started")

  monkeypatch.setattr(cells_lib, "run_cell", must_not_run)
  monkeypatch.setattr(cells_lib, "Context", must_not_run)
  argv = ["--config", CONFIG + ":quick", "--workdir", str(tmp_path), *overrides]
  with pytest.raises(ValueError, match=match):
    compare_objectives.main(argv)
  assert not os.path.exists(os.path.join(tmp_path, "quick"))


def test_bad_command_line_is_rejected():
  with pytest.raises(SystemExit):
    compare_objectives.main(["--config", CONFIG, "--steps=3"])
  with pytest.raises(ValueError, match="unknown config key"):
    compare_objectives.main(["--config", CONFIG, "--config.train.stepz=3"])
  with pytest.raises(ValueError, match="config arg"):
    compare_objectives.main(["--config", CONFIG + ":tpu"])


def test_every_config_builds_and_validates():
  for arg, num_cells in (("quick", 10), ("smoke", 3), ("gpu", 13), ("pod", 10)):
    config = config_lib.load_config(f"{CONFIG}:{arg}")
    assert config.output.run_name == arg
    if arg == "pod":  # SentencePiece layout (tokenizers module doc), without training one
      special = obj.SpecialIds(vocab_size=config.data.tokenizer_kwargs.vocab_size, mask=3,
                               cls=4, sep=5, nlu=6, nlg=7, s2s=8,
                               num_sentinels=config.data.tokenizer_kwargs.num_sentinels)
    else:
      special = BYTE_SPECIAL
    cells = grid.plan(config, special)
    assert len(cells) == num_cells, arg
    for cell in cells:
      assert sum(cell.lengths_dict.values()) == config.data.seq_length
  assert config_lib.load_config(CONFIG).output.run_name == "quick"  # the default


# ─── Compute matching ───────────────────────────────────────────────────────────────────────


def test_encoder_decoder_span_split_is_t5s():
  # Raffel et al.: 512 input tokens give 114 targets (568 raw) at density 0.15, span 3.
  assert grid.encoder_decoder_lengths("span_corruption", 626) == {"encoder": 512, "decoder": 114}
  assert grid.encoder_decoder_lengths("prefix_lm", 127) == {"encoder": 64, "decoder": 63}


def test_encoder_decoder_has_twice_the_parameters_at_matched_flops():
  config = config_lib.load_config(CONFIG + ":quick")
  cells = {c.name: c for c in grid.plan(config, BYTE_SPECIAL)}
  m = config.model
  # Hand count: per layer attention 4 d^2 (q, k, v, out: 4 heads x 32 = d), gated MLP 3 d f.
  d, f, v, layers = m.d_model, m.d_ff, BYTE_SPECIAL.vocab_size, m.num_layers
  block = 4 * d * d + 3 * d * f + 2 * d  # + two RMSNorm scales
  decoder = layers * block + 2 * v * d + d  # embedding, untied head, final norm
  from seqlab import models  # pylint: disable=g-import-not-at-top
  assert models.num_params(cells["causal_decoder/full_lm"].model_config) == decoder
  # The encoder-decoder: the same blocks in each stack, cross-attention (4 d^2 and a norm) in
  # the decoder's, one shared embedding, two final norms, two relative-bias tables (32 x heads).
  encoder_decoder = (layers * (2 * block + 4 * d * d + d) + 2 * v * d + 2 * d
                     + 2 * 32 * m.num_heads)
  assert models.num_params(cells["encoder_decoder/ul2"].model_config) == encoder_decoder
  assert 1.9 < encoder_decoder / decoder < 2.1
  dec, enc_dec = (grid.flops_per_token(cells["causal_decoder/ul2"]),
                  grid.flops_per_token(cells["encoder_decoder/ul2"]))
  assert abs(enc_dec / dec - 1) < 0.15  # cross-attention is the only extra work


# ─── Readout formats, against hand-written examples ─────────────────────────────────────────


CHUNK = np.arange(10, 18, dtype=np.int32)[None]  # one chunk: prefix 10..13, target 14..17


def test_continuation_formats():
  s = BYTE_SPECIAL
  lm, = readouts.continuation_examples(CHUNK, readouts.ReadoutFormat(format="lm"), s)
  feats, weights = scoring.request_features(lm, "decoder", "lm", eos_id=1)
  np.testing.assert_array_equal(feats["decoder_target_tokens"], np.arange(10, 18))
  np.testing.assert_array_equal(feats["decoder_input_tokens"], [0, *range(10, 17)])
  np.testing.assert_array_equal(weights, [0, 0, 0, 0, 1, 1, 1, 1])

  ul2, = readouts.continuation_examples(
      CHUNK, grid.OBJECTIVES["ul2"].readout, s)
  feats, weights = scoring.request_features(ul2, "decoder", "seq2seq", eos_id=1)
  np.testing.assert_array_equal(feats["decoder_target_tokens"],
                                [s.s2s, 10, 11, 12, 13, 1, 14, 15, 16, 17, 1])
  np.testing.assert_array_equal(weights, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(feats["decoder_causal_attention"], [1] * 7 + [0] * 4)

  span, = readouts.continuation_examples(CHUNK, grid.OBJECTIVES["span_corruption"].readout, s)
  s0 = s.vocab_size - 1
  feats, weights = scoring.request_features(span, "encoder_decoder", "seq2seq", eos_id=1)
  np.testing.assert_array_equal(feats["encoder_input_tokens"], [10, 11, 12, 13, s0, 1])
  np.testing.assert_array_equal(feats["decoder_target_tokens"], [s0, 14, 15, 16, 17, 1])
  np.testing.assert_array_equal(feats["decoder_input_tokens"], [0, s0, 14, 15, 16, 17])
  np.testing.assert_array_equal(weights, [0, 1, 1, 1, 1, 0])


def test_infill_examples_hide_exactly_the_noise_tokens():
  chunk = (np.arange(40, dtype=np.int32) % 200 + 3)[None]
  ul2_fmt = grid.OBJECTIVES["ul2"].readout
  example, = readouts.infill_examples(chunk, ul2_fmt, BYTE_SPECIAL, seed=5)
  again, = readouts.infill_examples(chunk, ul2_fmt, BYTE_SPECIAL, seed=5)
  np.testing.assert_array_equal(example.continuation, again.continuation)  # a fixed seed
  assert example.context[0] == BYTE_SPECIAL.nlu
  # Oracle: replacing each sentinel of the inputs by its span restores the chunk.
  spans, current = {}, None
  for token in example.continuation:
    if token in BYTE_SPECIAL.sentinel_ids:
      current = int(token)
      spans[current] = []
    else:
      spans[current].append(int(token))
  restored = []
  for token in example.context[1:]:
    restored.extend(spans[int(token)] if int(token) in spans else [int(token)])
  np.testing.assert_array_equal(restored, chunk[0])
  assert example.scored.sum() == round(0.15 * 40)  # T5's noise count: scored = noise tokens
  np.testing.assert_array_equal(example.scored, ~np.isin(example.continuation,
                                                         BYTE_SPECIAL.sentinel_ids))


def test_mean_nll_weights_only_scored_targets():
  examples = readouts.continuation_examples(
      np.stack([np.arange(10, 18), np.arange(20, 28)]).astype(np.int32),
      readouts.ReadoutFormat(), BYTE_SPECIAL)

  class FakeScorer:  # the "log-likelihood" of a scored token is minus its id
    truncated, lengths = 0, {"decoder": 12}

    def score(self, requests):
      return [scoring.Score(-float(r.continuation[r.scored].sum()), False,
                            int(r.scored.sum())) for r in requests]

  # Scored targets: 14..17 and 24..27 (the targets, not the inputs).
  value = readouts.mean_nll(FakeScorer(), examples)
  assert value == pytest.approx(np.mean([14, 15, 16, 17, 24, 25, 26, 27]))
  FakeScorer.truncated = 1
  with pytest.raises(ValueError, match="do not fit the rows"):
    readouts.mean_nll(FakeScorer(), examples)


def test_function_name_pairs_from_source():
  source = '''
class A:
    def __init__(self):
        self.x = 1

    @property
    def value(self,
              other=None):
        """Doc."""
        return self.x

def short(): return 1

def a_name_that_is_far_too_long_for_the_budget():
    pass

def twice():
    return 2
'''
  duplicate = "def twice():\n    return 2\n"
  pairs = readouts.function_name_pairs([source, duplicate, "def broken(:\n"],
                                       max_body_bytes=20, max_name_bytes=16)
  assert pairs == [('"""Doc."""\nreturn se', "value"), ("return 2", "twice")]


def test_heldout_chunks_stay_inside_documents_and_spread_out():
  class Source(list):
    pass

  class Tokenizer:
    def encode(self, text):
      return np.frombuffer(text.encode(), np.uint8).astype(np.int32)

  source = Source(["abcdefgh", "", "ijklmnopqrstu"])  # chunks of 4: abcd efgh | ijkl mnop qrst
  chunks = readouts.heldout_chunks(source, Tokenizer(), 4, 3)
  text = ["".join(map(chr, row)) for row in chunks]
  assert text == ["abcd", "ijkl", "qrst"]  # indices 0, 2, 4 of the five pieces
  with pytest.raises(ValueError, match="only 5 chunks"):
    readouts.heldout_chunks(source, Tokenizer(), 4, 6)


# ─── The table ──────────────────────────────────────────────────────────────────────────────


def test_aggregate_and_markdown_mark_the_best_per_column():
  def row(arch, objective, seed, cont, infill, em, name):
    return {"architecture": arch, "objective": objective, "seed": seed, "params": 1000,
            "train_flops_per_token": 2e6, "continuation_nll": cont, "infill_nll": infill,
            "infill_nll_with_sentinels": infill + 1, "exact_match": em, "name_nll": name,
            "name_chrf": 100 * em}

  rows = [row("a", "x", 0, 1.0, 5.0, 0.10, 2.0), row("a", "x", 1, 3.0, 5.0, 0.30, 2.0),
          row("b", "y", 0, 2.5, 4.0, 0.05, 1.0)]
  summary = report.aggregate(rows, [("a", "x"), ("b", "y"), ("c", "z")])
  assert len(summary) == 2  # no rows for (c, z)
  assert summary[0]["continuation_nll"] == pytest.approx((2.0, np.sqrt(2.0)))  # sample std
  assert summary[0]["exact_match"] == pytest.approx((0.2, np.sqrt(0.02)))
  assert summary[1]["infill_nll"] == (4.0, 0.0)
  table = report.markdown_table(summary).splitlines()
  assert "**2.000 ± 1.414**" in table[2]  # lower continuation NLL is better
  assert "**20.0 ± 14.1**" in table[2]  # higher exact match is better (in %)
  assert table[2].count("**20.0 ± 14.1**") == 2  # chrF: already 0-100
  assert "**4.000 ± 0.000**" in table[3] and "**1.000 ± 0.000**" in table[3]
  assert "**5.000 ± 0.000**" in table[3]  # all targets: infill + 1
  assert table[3].count("**") == 6


def test_t_interval_and_welch_test_by_hand():
  mean, half = report.t_interval([0.4, 0.5, 0.6])
  # sd 0.1, n 3: 4.302653 (Student t, 2 dof, 97.5%, from a printed table) * 0.1 / sqrt(3)
  assert mean == pytest.approx(0.5) and half == pytest.approx(4.302653 * 0.1 / np.sqrt(3))
  assert np.isnan(report.t_interval([0.4])[1])
  a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.5, 7.0])
  va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
  t = (a.mean() - b.mean()) / np.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)  # Welch-Satterthwaite
  import scipy.stats  # pylint: disable=g-import-not-at-top
  assert report.welch_p(a, b) == pytest.approx(2 * scipy.stats.t.sf(abs(t), dof))
  assert np.isnan(report.welch_p([1.0, 1.0], [2.0, 2.0]))  # no spread: undefined
  assert np.isnan(report.welch_p([1.0], [2.0, 3.0]))


def test_significance_names_the_orderings_that_hold():
  def rows(arch, accs):
    return [{"architecture": arch, "objective": "o", "seed": i, "params": 1,
             "train_flops_per_token": 1.0, "zero_shot_acc": acc, "suite_chance": 0.25}
            for i, acc in enumerate(accs)]

  data = rows("a", [0.50, 0.52, 0.51]) + rows("b", [0.30, 0.31, 0.29]) + rows(
      "c", [0.20, 0.60, 0.40]) + rows("d", [0.24, 0.26, 0.25])
  summary = report.aggregate(data, [("a", "o"), ("b", "o"), ("c", "o"), ("d", "o")])
  (line,) = report.significance(data, summary)
  p_b = report.welch_p([0.50, 0.52, 0.51], [0.30, 0.31, 0.29])
  p_c = report.welch_p([0.50, 0.52, 0.51], [0.20, 0.60, 0.40])
  assert p_b < 0.05 < p_c
  assert line.startswith("* (d) zero-shot acc ↑: best a/o; significantly better than b/o (p=")
  assert f"not significantly better than c/o (p={p_c:.2g})" in line
  # Above chance (one-sided t over seeds): a and b; c's spread and d's mean keep them out.
  assert line.endswith("above chance (25.0%) significantly: a/o, b/o.")
  tied = rows("a", [0.3, 0.3]) + rows("b", [0.3, 0.3])
  assert report.significance(tied, report.aggregate(tied, [("a", "o"), ("b", "o")])) == [
      "* (d) zero-shot acc ↑: every cell has the same mean (30.0 ± 0.0); no ordering."]


def test_task_table_pools_seeds_and_tests_each_type_against_its_chance():
  def row(arch, seed, docstring, returns):
    return {"architecture": arch, "objective": "o", "seed": seed, "params": 1,
            "train_flops_per_token": 1.0, "zero_shot_acc": 0.0,
            "suite_tasks": {"zero_shot": {"docstring": [docstring, 40, 0.25],
                                          "returns": [returns, 40, 0.5]},
                            "multitask": {"docstring": [10, 40, 0.25],
                                          "returns": [20, 40, 0.5]}}}

  data = [row("a", 0, 16, 21), row("a", 1, 18, 19), row("b", 0, 10, 30), row("b", 1, 9, 31)]
  summary = report.aggregate(data, [("a", "o"), ("b", "o")])
  lines = [l for l in report.task_table(data, summary).splitlines() if l.startswith("|")]
  assert lines[0] == "| architecture | objective | readout | docstring | returns |"
  assert len(lines) == 2 + 2 * 2  # header, separator, (d) and (e) per cell

  def tail(k, n, p):  # P(X >= k), X ~ Binomial(n, p), summed by hand
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))

  # a: docstring 16 and 18 of 40 per seed, tested as 17 of 40 against 1/4 (significant);
  # returns 21 and 19: 20 of 40 against 1/2 (not). The seeds answer the same 40 examples.
  p_doc, p_ret = tail(17, 40, 0.25), tail(20, 40, 0.5)
  assert p_doc < 0.05 < p_ret
  assert lines[2] == (f"| a | o | (d) zero-shot | **42.5 (p={p_doc:.2g})** | "
                      f"50.0 (p={p_ret:.2g}) |")
  assert lines[4].startswith("| b | o | (d) zero-shot | 23.8 (p=")
  assert f"**76.2 (p={tail(30, 40, 0.5):.2g})**" in lines[4]  # 61 of 80: 30.5 -> 30
  assert lines[3].startswith("| a | o | (e) after multitask | 25.0 (p=")
  assert report.task_table([{k: v for k, v in data[0].items() if k != "suite_tasks"}],
                           summary[:1]) == ""  # rows from before per-type counts


def test_names_are_scored_with_seqlab_metrics():
  predictions = ["get_value", "foo", "", "parseHTTPHeader"]
  references = ["get_value", "foo_bar", "baz", "parse_http_header"]
  scores = cells_lib.score_names(predictions, references)
  assert scores["exact_match"] == 0.25
  # ROUGE-L F1 by hand over rouge-score's tokens (lower-cased, split at non-alphanumerics):
  # 1; "foo" vs "foo bar": P 1, R 1/2, F 2/3; "" vs "baz": 0; "parsehttpheader" vs
  # "parse http header": 0.
  assert scores["name_rouge_l"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
  import sacrebleu  # pylint: disable=g-import-not-at-top
  assert scores["name_chrf"] == pytest.approx(
      sacrebleu.corpus_chrf(predictions, [references]).score)
  assert cells_lib.name_parts("parseHTTPHeader_2") == "parse HTTP Header 2"
  assert cells_lib.name_parts("__init__") == "init"
  assert scores["name_bleu"] == pytest.approx(sacrebleu.corpus_bleu(
      ["get value", "foo", "", "parse HTTP Header"],
      [["get value", "foo bar", "baz", "parse http header"]]).score)


def test_fingerprint_ignores_how_a_run_is_observed_but_not_its_numbers():
  base = grid.fingerprint(smoke_config())
  observed = smoke_config("--config.train.profile_steps=1,2", "--config.train.checkpoint_every=1",
                          "--config.grid.num_seeds=3")
  assert grid.fingerprint(observed) == base
  for override in ("--config.train.steps=4", "--config.optimizer.learning_rate=0.1",
                   "--config.data.seq_length=64"):
    assert grid.fingerprint(smoke_config(override)) != base, override
