"""`seqlab train / generate` end to end, exact resume after SIGKILL and SIGTERM, bad input.

Run A: `seqlab train` on experiments/configs/tiny.py (gpt-tiny with dropout 0.1, so the dropout
keys matter) from an empty workdir. Run B: the same command, SIGKILLed while it waits for its
25th batch (checkpoint 20 on disk), started again and SIGTERMed while it waits for its 3rd
batch, then started a third time to the end (tests/_paused_train.py makes those moments exact:
no timing). B's parameters, optimizer state, dropout key and data-iterator state at step 40
must equal A's bit for bit, every loss both logged must be identical, and B's metrics.jsonl
holds each step once, in order.
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
# A's own cache, empty when it starts: A pays for every compile. A finds it the way a user's
# `seqlab train` finds its cache, at seqlab's default under XDG_CACHE_HOME (here A_HOME).
A_HOME = "run_a_home"
A_CACHE = os.path.join(A_HOME, "seqlab", "jax")


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
  proc = _helpers.python(*_train_args(workdir), cache=A_HOME, seqlab_default_cache=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _helpers.publish_cache(A_CACHE)  # the restarts below reuse A's compiled programs
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1  # stdout holds the one JSON line and nothing else
  return workdir, json.loads(lines[0])


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, run_a):
  del run_a  # run after A, which fills the session's compilation cache
  base = tmp_path_factory.mktemp("run_b")
  workdir = base / "workdir"
  paused = os.path.join(_helpers.TESTS, "_paused_train.py")
  # Evaluation reads the parameters and changes nothing, so B skips it to save time.
  args = _train_args(workdir, "--config.train.eval_every=0")
  # 1. SIGKILL while the run waits for batch 25, once checkpoint 20 is on disk (orbax renames
  #    a finished save into place).
  killed = _popen([paused, "25", str(base / "paused1"), *args[2:]], base / "kill.err")
  _wait_for(lambda: (base / "paused1").exists() and (workdir / "checkpoints" / "20").is_dir(),
            killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait(timeout=60)
  steps_after_kill = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  # 2. Start again (it resumes at 20) and SIGTERM it while it waits for its 3rd batch.
  err = base / "term.err"
  termed = _popen([paused, "3", str(base / "paused2"), *args[2:]], err)
  _wait_for(lambda: (base / "paused2").exists(), termed)
  termed.send_signal(signal.SIGTERM)
  term_out, _ = termed.communicate(timeout=300)
  # 3. Start a third time and run to the end.
  final = _helpers.python(*args)
  assert final.returncode == 0, final.stderr[-3000:]
  return {"workdir": workdir, "kill_status": killed.returncode,
          "steps_after_kill": steps_after_kill, "term_status": termed.returncode,
          "term": json.loads(term_out.strip().splitlines()[-1]), "term_err": err.read_text(),
          "final": json.loads(final.stdout.strip().splitlines()[-1])}


def test_train_runs_end_to_end_from_an_empty_workdir(run_a):
  workdir, summary = run_a
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


def test_train_caches_its_compiled_programs_by_default(run_a):
  """Nothing told A about a cache: `seqlab train` turned on its default one itself."""
  del run_a
  names = os.listdir(os.path.join(_helpers.session_dir(), A_CACHE))
  assert any(n.startswith("jit_init-") and n.endswith("-cache") for n in names), names


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
  assert term["start_step"] == 20 and term["step"] == 23
  assert f"SIGTERM: saved step {term['step']}" in run_b["term_err"]
  assert run_b["final"]["start_step"] == term["step"] and run_b["final"]["step"] == 40
  a, b = _restore(run_a[0], 40), _restore(run_b["workdir"], 40)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)
  assert len(leaves_a) == len(leaves_b) > 30
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  assert a.data_state == b.data_state  # the data order continued exactly
  # Every loss both runs logged (B logged 10 and 20 before the kill, 30 and 40 after), each
  # step once and in order although steps 21-23 ran twice and 24 once before the last start.
  logged_a = {r["step"]: r for r in _jsonl(run_a[0]) if "loss" in r}
  logged_b = [r for r in _jsonl(run_b["workdir"]) if "loss" in r]
  assert [r["step"] for r in _jsonl(run_b["workdir"])] == [10, 20, 30, 40]
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


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "diverge"
  # Warmup gives step 1 a learning rate of 0; step 2's 1e29 breaks the parameters.
  proc = _helpers.python(*_train_args(workdir, "--config.optimizer.learning_rate=1e30",
                                      "--config.train.steps=20", "--config.train.eval_every=0",
                                      "--config.train.checkpoint_every=1"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "seqlab train: error: param_norm=inf at step 2; stopping: the last good checkpoint "
      f"(step 1) is kept in {workdir}")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  restored = _restore(workdir)
  assert restored.step == 1
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


# ─── Damage, locks, drift, meshes ────────────────────────────────────────────────────────────


def _largest_array_file(checkpoint_dir) -> pathlib.Path:
  files = [p for p in (checkpoint_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def test_a_flipped_bit_falls_back_and_the_rerun_ends_bitwise_equal(run_a, tmp_path):
  workdir = tmp_path / "flipped"
  shutil.copytree(run_a[0], workdir)
  target = _largest_array_file(workdir / "checkpoints" / "40")
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x10  # one bit, in the middle of the parameters' bytes
  target.write_bytes(bytes(data))
  proc = _helpers.python(*_train_args(workdir, "--config.train.eval_every=0"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint at step 40" in proc.stderr and "unreadable" in proc.stderr
  assert json.loads(proc.stdout)["start_step"] == 20  # fell back to checkpoint 20
  assert (workdir / "checkpoints" / "40.corrupt").is_dir()  # kept for inspection
  a, b = _restore(run_a[0], 40), _restore(workdir, 40)
  for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_a_second_run_on_a_busy_workdir_exits_2_and_touches_nothing(run_a, tmp_path, capsys):
  workdir = tmp_path / "busy"
  shutil.copytree(run_a[0], workdir)
  first = _popen([os.path.join(_helpers.TESTS, "_paused_train.py"), "2",
                  str(tmp_path / "paused"), *_train_args(workdir, "--config.train.steps=60",
                                                          "--config.train.eval_every=0")[2:]],
                 tmp_path / "first.err")
  try:
    _wait_for(lambda: (tmp_path / "paused").exists(), first)
    before = _snapshot(workdir)
    status = cli.main(_train_args(workdir, "--config.train.steps=60")[2:])
    err = capsys.readouterr().err
    assert status == 2 and "is in use by another run" in err and f"pid {first.pid}" in err
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(workdir) == before
  finally:
    first.kill()
    first.wait()
  # The killed run's lock is stale (its process is gone): the next run takes it over.
  assert json.loads((workdir / "run.lock").read_text())["pid"] == first.pid
  from seqlab import trainer  # pylint: disable=g-import-not-at-top
  lock = trainer.workdir_lock(str(workdir)).__enter__()
  assert lock.held and json.loads((workdir / "run.lock").read_text())["pid"] == os.getpid()
  lock.__exit__()
  assert not (workdir / "run.lock").exists()


def test_a_drifted_config_on_resume_exits_2_naming_the_field(run_a, tmp_path, capsys):
  workdir = tmp_path / "drift"
  shutil.copytree(run_a[0], workdir)
  before = _snapshot(workdir)
  status = cli.main(_train_args(workdir, "--config.model.overrides.dtype=bfloat16",
                                "--config.seed=3")[2:])
  err = capsys.readouterr().err
  assert status == 2 and len(err.strip().splitlines()) == 1
  assert "model.overrides.dtype: <absent> -> 'bfloat16'" in err and "seed: 0 -> 3" in err
  assert _snapshot(workdir) == before


def test_more_steps_on_resume_continue_with_the_schedule_stretched(run_a, tmp_path):
  workdir = tmp_path / "longer"
  shutil.copytree(run_a[0], workdir)
  proc = _helpers.python(*_train_args(workdir, "--config.train.steps=50",
                                      "--config.train.eval_every=0"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout)
  assert (summary["start_step"], summary["step"], summary["status"]) == (40, 50, "finished")
  # Adam's update size follows the learning rate: with the 40-step schedule the added steps
  # would sit at its floor (0.1 x peak); the 50-step cosine gives steps 41-50 more.
  from seqlab import loop, train as train_lib  # pylint: disable=g-import-not-at-top
  config = _helpers.tiny_config("", "train.steps=50")
  schedule = train_lib.learning_rate_schedule(loop.optimizer_config(config))
  peak = config.optimizer.learning_rate
  assert float(schedule(45)) > 0.1 * peak * 1.01
  fixed = _helpers.tiny_config("", "train.steps=50", "optimizer.total_steps=40")
  assert float(train_lib.learning_rate_schedule(loop.optimizer_config(fixed))(45)) == (
      pytest.approx(0.1 * peak))
  assert [r["step"] for r in _jsonl(workdir) if "loss" in r] == [10, 20, 30, 40, 50]


def test_fsdp_checkpoint_is_read_on_one_device_and_the_reverse(run_a, tmp_path, capsys):
  # Two devices, FSDP: parameters split over both.
  workdir = tmp_path / "fsdp"
  env = _helpers.subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, *_train_args(workdir, "--config.train.steps=10",
                                    "--config.train.eval_every=10",
                                    "--config.mesh.strategy=fsdp", "--config.mesh.fsdp=2")],
      cwd=_helpers.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # One device reads it: the same evaluation as the 2-device run logged.
  assert cli.main(["eval", "--workdir", str(workdir), "--batches", "2"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  logged = [r for r in _jsonl(workdir) if "eval/loss" in r][-1]
  assert result["step"] == 10 and result["loss"] == pytest.approx(logged["eval/loss"], abs=1e-4)
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", "def ",
                   "--max-new-tokens", "8"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 10
  # The reverse: run A's one-device checkpoint resumes on two devices with FSDP.
  reverse = tmp_path / "reverse"
  shutil.copytree(run_a[0], reverse)
  proc = subprocess.run(
      [sys.executable, *_train_args(reverse, "--config.train.steps=42",
                                    "--config.mesh.strategy=fsdp", "--config.mesh.fsdp=2",
                                    "--config.train.eval_every=0")],
      cwd=_helpers.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)["start_step"] == 40


def test_stdout_holds_only_the_json_lines(tmp_path):
  # What C++ libraries print on file descriptor 1 (gloo's "[Gloo] Rank 0 is connected ...")
  # lands on stderr once the command has taken stdout for its results.
  script = ("import os; from seqlab import cli; cli._results_to_real_stdout(); "
            "os.write(1, b'[Gloo] noise\\n'); print('library print'); cli._emit({'a': 1})")
  proc = _helpers.python("-c", script)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == '{"a": 1}\n'
  assert "[Gloo] noise" in proc.stderr and "library print" in proc.stderr


# ─── Bad input: exit status 2 and one line naming the field and the value ────────────────────


def _damaged_copy(run_a, tmp_path):
  workdir = tmp_path / "damaged"
  shutil.copytree(run_a[0], workdir)
  for path in (workdir / "checkpoints").rglob("*"):
    if path.is_file() and "/d/" in str(path):
      path.write_bytes(b"")
  return workdir


def _locked_copy(run_a, tmp_path):
  workdir = tmp_path / "locked"
  shutil.copytree(run_a[0], workdir)
  import socket  # pylint: disable=g-import-not-at-top
  (workdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                "pid": os.getpid()}))
  return workdir


def _copy(run_a, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(run_a[0], workdir)
  return workdir


def _a_file(run_a, tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  return path / "workdir"


TRAIN_CASES = [  # (extra arguments, what the message must contain)
    (["--config.train.steps=0"], "train.steps=0"),
    (["--config.train.steps=-5"], "train.steps=-5"),
    (["--config.optimizer.learning_rate=-1.0"], "optimizer.learning_rate=-1.0"),
    (["--config.optimizer.learning_rate=0.0"], "optimizer.learning_rate=0.0"),
    (["--config.optimizer.warmup_steps=100"], "optimizer.warmup_steps=100"),
    (["--config.data.batch_size=0"], "data.batch_size=0"),
    (["--config.train.accum_steps=3"], "train.accum_steps=3"),
    (["--config.train.log_every=0"], "train.log_every=0"),
    (["--config.train.checkpoint_every=-1"], "train.checkpoint_every=-1"),
    (["--config.train.max_to_keep=0"], "train.max_to_keep=0"),
    (["--config.train.eval_batches=0"], "train.eval_batches=0"),
    (["--config.train.stop_check_every=0"], "train.stop_check_every=0"),
    (["--config.train.profile_steps=5,2"], "train.profile_steps='5,2'"),
    (["--config.mesh.strategy=pmap"], "mesh.strategy='pmap'"),
    (["--config.mesh.data=3"], "mesh.data=3"),
    (["--config.model.preset=gpt-huge"], "gpt-huge"),
    (["--config.data.source=nope"], "'nope'"),
    (["--config.data.tokenizer=nope"], "'nope'"),
    (["--config.data.objective=nope"], "'nope'"),
    (["--config.data.source_kwargs.rooot=/x"], "data.source_kwargs"),
    (["--config.optimizer.name=sgd"], "'sgd'"),
    (["--config.optimizer.schedule=linear"], "'linear'"),
    (["--config.optimizer.learning_rat=0.1"], "optimizer.learning_rat"),
    (["--config.train.steps"], "--config.train.steps"),
    (["--config.train.steps=abc"], "'abc'"),
    (["--bogus=1"], "--bogus=1"),
    (["--config.distributed.initialize=True", "--config.distributed.num_processes=2"],
     "distributed.num_processes=2"),
]
WORKDIR_CASES = [  # (make the workdir, extra arguments, message)
    (_a_file, [], "Not a directory"),
    (_locked_copy, [], "is in use by another run"),
    (_copy, ["--config.model.overrides.dtype=bfloat16"], "model.overrides.dtype"),
    (_copy, ["--config.train.steps=30"], "train.steps=30 is below step 40"),
    (_copy, ["--config.data.seq_length=64"], "data.seq_length: 128 -> 64"),
    (_damaged_copy, [], "no readable checkpoint"),
]


def _one_line_exit_2(capsys, argv, expected):
  status = cli.main(argv)
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert status == 2, captured.err[-2000:]
  assert len(lines) == 1 and lines[0].startswith("seqlab "), captured.err[-2000:]
  assert expected in lines[0]
  return lines[0]


@pytest.mark.parametrize("extra,expected", TRAIN_CASES, ids=[c[1] for c in TRAIN_CASES])
def test_bad_train_input_exits_2_with_one_line(tmp_path, capsys, extra, expected):
  _one_line_exit_2(capsys, ["train", "--config", _helpers.TINY, "--workdir",
                            str(tmp_path / "w"), *extra], expected)
  assert not (tmp_path / "w").exists()


def test_bad_config_paths_exit_2_with_one_line(tmp_path, capsys):
  _one_line_exit_2(capsys, ["train", "--config", str(tmp_path), "--workdir",
                            str(tmp_path / "w")], "is a directory")
  _one_line_exit_2(capsys, ["train", "--config", str(tmp_path / "none.py"), "--workdir",
                            str(tmp_path / "w")], "does not exist")


@pytest.mark.parametrize("make,extra,expected", WORKDIR_CASES, ids=[c[2] for c in WORKDIR_CASES])
def test_bad_workdir_exits_2_with_one_line(run_a, tmp_path, capsys, make, extra, expected):
  workdir = make(run_a, tmp_path)
  before = _snapshot(workdir) if workdir.exists() else None
  _one_line_exit_2(capsys, _train_args(workdir, *extra)[2:], expected)
  if before is not None and make is not _damaged_copy:
    assert _snapshot(workdir) == before


EVAL_CASES = [
    (["eval", "--batches", "-1"], "--batches=-1"),
    (["eval", "--batches", "0"], "--batches=0"),
    (["generate", "--prompt", "def ", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["generate", "--prompt", "def ", "--temperature", "0"], "--temperature=0.0"),
    (["generate", "--prompt", "def ", "--top-p", "1.5"], "--top-p=1.5"),
    (["generate", "--prompt", "def ", "--top-k", "0"], "--top-k=0"),
    (["generate", "--prompt", "bad \udc80 text"], "--prompt="),
    (["eval", "--split", "validation", "--extra"], "--extra"),
]


@pytest.mark.parametrize("argv,expected", EVAL_CASES, ids=[c[1] for c in EVAL_CASES])
def test_bad_eval_and_generate_input_exits_2_with_one_line(run_a, capsys, argv, expected):
  _one_line_exit_2(capsys, [argv[0], "--workdir", str(run_a[0]), *argv[1:]], expected)


def test_lm_eval_of_a_workdir_agrees_with_rank_classification(run_a, tmp_path, capsys,
                                                              monkeypatch):
  pytest.importorskip("lm_eval")
  import _lm_eval_tasks  # pylint: disable=g-import-not-at-top
  from seqlab.evaluation import harness  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  folder = tmp_path / "tasks"
  folder.mkdir()
  _lm_eval_tasks.write_tasks(folder)
  workdir = str(run_a[0])
  assert cli.main(["lm-eval", "--workdir", workdir, "--tasks", "seqlab_choice",
                   "--include-path", str(folder), "--no-default-tasks"]) == 0
  [line] = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  # The same examples through seqlab's own rank classification (lm-eval's prompt layout).
  model = harness.LanguageModel.from_workdir(workdir)
  assert (model.fmt, model.mode) == ("lm", None)  # tiny.py's decoder trains as a full LM
  want = harness.rank_classification(model, _lm_eval_tasks.CHOICE)
  assert line["task"] == "seqlab_choice"
  assert line["acc,none"] == pytest.approx(want["acc"])
  assert line["acc_norm,none"] == pytest.approx(want["acc_norm"])
  _one_line_exit_2(capsys, ["lm-eval", "--workdir", workdir, "--tasks", "no_such_task",
                            "--include-path", str(folder), "--no-default-tasks"],
                   "no_such_task")


def test_zero_shot_scores_the_training_corpus_suite(run_a, capsys):
  from seqlab import tasks  # pylint: disable=g-import-not-at-top
  from seqlab.evaluation import harness  # pylint: disable=g-import-not-at-top
  workdir = str(run_a[0])
  assert cli.main(["zero-shot", "--workdir", workdir, "--tasks", "builtin/returns,builtin/cloze",
                   "--shots", "0,1", "--limit", "6", "--max-documents", "30"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert [(x["task"], x["shots"]) for x in lines] == [
      ("builtin/returns", 0), ("builtin/cloze", 0), ("mean", 0),
      ("builtin/returns", 1), ("builtin/cloze", 1), ("mean", 1)]
  model = harness.LanguageModel.from_workdir(workdir)
  for line in lines:
    if line["task"] == "mean":
      mine = [x for x in lines if x["shots"] == line["shots"] and x["task"] != "mean"]
      assert line["acc"] == pytest.approx(np.mean([x["acc"] for x in mine]), abs=1e-6)
      assert line["chance"] == pytest.approx(np.mean([x["chance"] for x in mine]), abs=1e-6)
      continue
    task = tasks.get(line["task"])  # the suite the command registered from tiny.py's corpus
    want = harness.rank_classification(model, task.examples("validation")[:6],
                                       num_shots=line["shots"],
                                       fewshot_pool=task.examples("train"), seed=1234)
    assert line["n"] == 6 and line["acc"] == pytest.approx(want["acc"], abs=1e-6)
    assert line["chance"] == pytest.approx(want["chance"], abs=1e-6)
  assert lines[0]["chance"] == 0.5 and lines[1]["chance"] == 0.25


ZERO_SHOT_CASES = [
    (["--shots", "x"], "--shots='x'"),
    (["--shots", "-1"], "--shots='-1'"),
    (["--limit", "0"], "--limit=0"),
    (["--tasks", "builtin/nope", "--max-documents", "30"], "builtin/nope"),
]


@pytest.mark.parametrize("argv,expected", ZERO_SHOT_CASES, ids=[c[1] for c in ZERO_SHOT_CASES])
def test_bad_zero_shot_input_exits_2_with_one_line(run_a, capsys, argv, expected):
  _one_line_exit_2(capsys, ["zero-shot", "--workdir", str(run_a[0]), *argv], expected)


LM_EVAL_CASES = [
    (["--tasks", ","], "names no task"),
    (["--tasks", "x", "--num-fewshot", "-1"], "--num-fewshot=-1"),
    (["--tasks", "x", "--batch-size", "0"], "--batch-size=0"),
    (["--tasks", "x", "--limit", "0"], "--limit=0.0"),
    (["--tasks", "x", "--mode", "xyz"], "--mode='xyz'"),
    (["--tasks", "x", "--include-path", "/no/such/dir"], "--include-path='/no/such/dir'"),
]


@pytest.mark.parametrize("argv,expected", LM_EVAL_CASES, ids=[c[1] for c in LM_EVAL_CASES])
def test_bad_lm_eval_input_exits_2_with_one_line(run_a, capsys, argv, expected):
  _one_line_exit_2(capsys, ["lm-eval", "--workdir", str(run_a[0]), *argv], expected)


def test_eval_of_an_empty_or_damaged_workdir_exits_2_with_one_line(run_a, tmp_path, capsys):
  _one_line_exit_2(capsys, ["eval", "--workdir", str(tmp_path)], "has no config.json")
  _one_line_exit_2(capsys, ["eval", "--workdir", str(_damaged_copy(run_a, tmp_path))],
                   "no readable checkpoint")
