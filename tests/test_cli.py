"""`seqlab train / generate` end to end, exact resume after SIGKILL and SIGTERM, bad input.

Run A: `seqlab train` on experiments/configs/tiny.py (gpt-tiny with dropout 0.1, so the dropout
keys matter) from an empty workdir, timed. Run B: the same command, SIGKILLed once checkpoint
20 is on disk, started again and SIGTERMed a few steps later, then started a third time to the
end. B's parameters, optimizer state, dropout key and data-iterator state at step 40 must equal
A's bit for bit, and every loss both logged must be identical.
"""

import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _helpers
from seqlab import checkpoint, cli, loop

DROPOUT = "--config.model.overrides.dropout_rate=0.1"
A_CACHE = "run_a_cache"  # A's own, empty when it starts: A pays for every compile


def _train_args(workdir, *extra):
  return ["-m", "seqlab", "train", "--config", _helpers.TINY, "--workdir", str(workdir),
          DROPOUT, *extra]


def _popen(args, stderr_path):
  return subprocess.Popen([sys.executable, *args], cwd=_helpers.ROOT,
                          env=_helpers.subprocess_env(), stdout=subprocess.PIPE,
                          stderr=open(stderr_path, "w"), text=True)


def _wait_for(predicate, proc, timeout=300.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended early with status {proc.returncode}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.02)


def _jsonl(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _snapshot(directory) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def _restore(workdir, step=None):
  config = _helpers.tiny_config("", DROPOUT.removeprefix("--"))
  template = jax.eval_shape(loop.build(config).init)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return ckpt.restore(template, step)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_a") / "workdir"  # does not exist yet
  start = time.perf_counter()
  proc = _helpers.python(*_train_args(workdir), cache=A_CACHE)
  wall = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  _helpers.publish_cache(A_CACHE)  # the restarts below reuse A's compiled programs
  return workdir, wall, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, run_a):
  del run_a  # run after A, which fills the session's compilation cache
  base = tmp_path_factory.mktemp("run_b")
  workdir = base / "workdir"
  slow = [os.path.join(_helpers.TESTS, "_slow_train.py"), "0.1"]
  # Evaluation reads the parameters and changes nothing, so B skips it to save time.
  args = _train_args(workdir, "--config.train.eval_every=0")
  # 1. SIGKILL as soon as checkpoint 20 is on disk (orbax renames a finished save into place).
  killed = _popen([*slow, *args[2:]], base / "kill.err")
  _wait_for(lambda: (workdir / "checkpoints" / "20").is_dir(), killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait(timeout=60)
  steps_after_kill = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  # 2. Start again (it resumes), SIGTERM a second after it says so.
  err = base / "term.err"
  termed = _popen([*slow, *args[2:]], err)
  _wait_for(lambda: "resuming from step 20" in err.read_text(), termed)
  time.sleep(1.0)
  termed.send_signal(signal.SIGTERM)
  term_out, _ = termed.communicate(timeout=300)
  # 3. Start a third time and run to the end.
  final = _helpers.python(*args)
  assert final.returncode == 0, final.stderr[-3000:]
  return {"workdir": workdir, "kill_status": killed.returncode,
          "steps_after_kill": steps_after_kill, "term_status": termed.returncode,
          "term": json.loads(term_out.strip().splitlines()[-1]), "term_err": err.read_text(),
          "final": json.loads(final.stdout.strip().splitlines()[-1])}


def test_train_runs_end_to_end_from_an_empty_workdir_in_under_a_minute(run_a):
  workdir, wall, summary = run_a
  assert wall < 60, f"seqlab train took {wall:.1f} s"
  assert summary["status"] == "finished" and summary["step"] == 40
  assert summary["start_step"] == 0
  assert summary["loss"] < math.log(512) - 2  # it learns (uniform over 512 bytes is 6.24)
  records = _jsonl(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [10, 20, 30, 40]
  assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [20, 40]
  for r in evals:  # the seqlab.metrics summary: perplexity = exp(mean NLL)
    assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-6)
    assert r["eval/bits_per_token"] == pytest.approx(r["eval/loss"] / math.log(2), rel=1e-6)
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and b"eval/perplexity" in events[0].read_bytes()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "40"]
  assert json.loads((workdir / "config.json").read_text())["model"]["preset"] == "gpt-tiny"


def test_eval_reproduces_the_logged_evaluation(run_a, capsys):
  workdir = run_a[0]
  assert cli.main(["eval", "--workdir", str(workdir), "--batches", "2"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  logged = [r for r in _jsonl(workdir) if r["step"] == 40 and "eval/loss" in r][0]
  assert result["step"] == 40
  # Same parameters, same two validation batches (train.eval_batches=2): the same numbers.
  assert result["loss"] == pytest.approx(logged["eval/loss"], abs=1e-4)
  assert result["perplexity"] == pytest.approx(logged["eval/perplexity"], rel=1e-3)


def test_sigkill_then_sigterm_then_resume_is_bitwise_the_uninterrupted_run(run_a, run_b):
  assert run_b["kill_status"] == -signal.SIGKILL
  assert run_b["steps_after_kill"] == ["20"]  # killed between the two checkpoints
  term = run_b["term"]
  assert run_b["term_status"] == 0 and term["status"] == "preempted"
  assert term["start_step"] == 20 and 20 < term["step"] < 40
  assert f"SIGTERM: saved step {term['step']}" in run_b["term_err"]
  assert run_b["final"]["start_step"] == term["step"] and run_b["final"]["step"] == 40
  a, b = _restore(run_a[0], 40), _restore(run_b["workdir"], 40)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)
  assert len(leaves_a) == len(leaves_b) > 30
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  assert a.data_state == b.data_state  # the data order continued exactly
  # Every loss both runs logged (B logged 10 and 20 before the kill, 30 and 40 after).
  logged_a = {r["step"]: r for r in _jsonl(run_a[0]) if "loss" in r}
  logged_b = [r for r in _jsonl(run_b["workdir"]) if "loss" in r]
  assert {10, 20, 30, 40} <= {r["step"] for r in logged_b}
  for r in logged_b:
    if r["step"] in logged_a:
      for key in ("loss", "grad_norm", "param_norm"):
        assert r[key] == logged_a[r["step"]][key], (r["step"], key)


def test_same_seed_gives_bitwise_identical_losses(run_a, run_b):
  # B's first start is a second run from scratch with the same seed (dropout 0.1).
  first_b = [r for r in _jsonl(run_b["workdir"]) if "loss" in r][:2]
  logged_a = {r["step"]: r for r in _jsonl(run_a[0]) if "loss" in r}
  assert [r["step"] for r in first_b] == [10, 20]
  for r in first_b:
    assert r["loss"] == logged_a[r["step"]]["loss"]
    assert r["param_norm"] == logged_a[r["step"]]["param_norm"]


def test_generate_falls_back_past_a_truncated_newest_checkpoint(run_b):
  workdir = run_b["workdir"]
  for path in (workdir / "checkpoints" / "40").rglob("*"):
    if path.is_file():
      with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
  proc = _helpers.python("-m", "seqlab", "generate", "--workdir", str(workdir), "--prompt",
                         "def ", "--prompt", "import ", "--max-new-tokens", "24")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint at step 40" in proc.stderr and "unreadable" in proc.stderr
  lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [line["prompt"] for line in lines] == ["def ", "import "]
  assert all(line["step"] == run_b["term"]["step"] for line in lines)
  assert all(isinstance(line["completion"], str) and line["completion"] for line in lines)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(run_a, tmp_path):
  workdir = tmp_path / "diverge"
  shutil.copytree(run_a[0], workdir)
  before = _snapshot(workdir / "checkpoints")
  # A learning rate of 1e30 breaks the parameters on the first step after resuming.
  proc = _helpers.python(*_train_args(workdir, "--config.optimizer.learning_rate=1e30",
                                      "--config.train.steps=60"))
  assert proc.returncode == 2
  assert "param_norm=inf at step 41" in proc.stderr
  assert "the last good checkpoint (step 40) is kept" in proc.stderr
  assert _snapshot(workdir / "checkpoints") == before
  restored = _restore(workdir)
  assert restored.step == 40
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(restored.state.params))


def test_workdir_of_another_model_is_a_clear_error_and_nothing_is_written(run_a, tmp_path,
                                                                          capsys):
  workdir = tmp_path / "other"
  shutil.copytree(run_a[0], workdir)
  before = _snapshot(workdir)
  status = cli.main(["train", "--config", _helpers.TINY, "--workdir", str(workdir), DROPOUT,
                     "--config.model.overrides.d_model=32"])
  err = capsys.readouterr().err
  assert status == 2
  assert "belongs to a different model or optimizer" in err
  assert ("params['blocks_0']['mlp']['wi']['kernel']: checkpoint [64, 256] vs this config "
          "[32, 256]") in err
  assert _snapshot(workdir) == before


def test_unknown_override_key_suggests_near_matches(tmp_path, capsys):
  status = cli.main(["train", "--config", _helpers.TINY, "--workdir", str(tmp_path / "w"),
                     "--config.optimizer.learning_rat=0.1"])
  err = capsys.readouterr().err
  assert status == 2
  assert "unknown config key 'optimizer.learning_rat'" in err
  assert "did you mean 'optimizer.learning_rate'" in err
  assert not (tmp_path / "w").exists()
