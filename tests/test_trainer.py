"""seqlab.trainer, the one training engine, on a softmax regression small enough to check by hand.

The oracle is plain SGD on softmax regression in NumPy float64. The engine's guarantees are
checked one by one: exact resume after a crash and after SIGTERM (bitwise), `metrics.jsonl`
with each step once, the work-directory lock and its stale rule, the config-drift check, the
NaN stop; and the profile of chosen steps.
"""

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from seqlab import parallel, trainer
from seqlab import train as train_lib

FEATURES, CLASSES, ROWS, LR = 5, 3, 8, 0.5


class Softmax(nn.Module):

  @nn.compact
  def __call__(self, batch, train=False):
    del train
    return nn.Dense(CLASSES, use_bias=False,
                    kernel_init=nn.initializers.normal(0.5))(batch["x"])


MODEL = Softmax()
TX = optax.sgd(LR)


def _init(key):
  params = MODEL.init(key, {"x": np.zeros((1, FEATURES), np.float32)})["params"]
  return train_lib.TrainState.create(apply_fn=MODEL.apply, params=params, tx=TX,
                                     rng=jax.random.fold_in(key, 1))


JOB = trainer.Job(train_lib.classification_task(), _init, init_args=(jax.random.key(0),))


class Batches:
  """Batch i is drawn from a generator seeded with i: the state is the next index."""

  def __init__(self, fail_at=None, on_draw=None):
    self.index, self.fail_at, self.on_draw = 0, fail_at, on_draw

  def __next__(self):
    self.index += 1
    if self.index == self.fail_at:
      raise RuntimeError("crash")
    if self.on_draw is not None:
      self.on_draw(self.index)
    rng = np.random.default_rng(self.index)
    return {"x": rng.normal(size=(ROWS, FEATURES)).astype(np.float32),
            "label": rng.integers(0, CLASSES, ROWS).astype(np.int32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def _mesh():
  return parallel.make_mesh(1, 1, devices=jax.devices()[:1])


def _run(steps, workdir=None, batches=None, config=None, **options):
  return trainer.run(JOB, batches or Batches(), _mesh(), trainer.Options(steps=steps, **options),
                     workdir=None if workdir is None else str(workdir), config=config)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


def _assert_bitwise(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def _jsonl_steps(workdir):
  return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_steps_are_sgd_on_the_batches_in_order():
  result = _run(7)
  w = np.asarray(jax.device_get(_init(jax.random.key(0)).params["Dense_0"]["kernel"]),
                 np.float64)
  batches = Batches()
  losses = []
  for _ in range(7):
    batch = next(batches)
    x, y = batch["x"].astype(np.float64), batch["label"]
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    losses.append(float(np.mean(-np.log(p[np.arange(ROWS), y]))))
    w -= LR * x.T @ (p - np.eye(CLASSES)[y]) / ROWS
  got = np.asarray(jax.device_get(result.state.params["Dense_0"]["kernel"]), np.float64)
  np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.losses(), losses, rtol=1e-5)
  assert result.status == "finished" and result.step == 7 and result.start_step == 0
  assert result.final_loss(fraction=0.3) == pytest.approx(np.mean(losses[-2:]), rel=1e-5)


def test_a_crashed_run_resumes_bitwise_and_logs_each_step_once(tmp_path):
  full = _run(8, tmp_path / "a", checkpoint_every=3)
  with pytest.raises(RuntimeError, match="crash"):
    _run(8, tmp_path / "b", Batches(fail_at=6), checkpoint_every=3)  # steps 1-5 ran
  # Step 5's metrics were still in flight (fetched after the next step is dispatched).
  assert _jsonl_steps(tmp_path / "b") == [1, 2, 3, 4]
  resumed = _run(8, tmp_path / "b", checkpoint_every=3)
  assert resumed.start_step == 3 and resumed.step == 8
  _assert_bitwise(full.state, resumed.state)
  assert _jsonl_steps(tmp_path / "b") == list(range(1, 9))  # 4 and 5 replayed, logged once
  assert resumed.losses() == full.losses()  # the history includes the rows before the crash
  # A finished run has nothing left to do and returns its final state.
  again = _run(8, tmp_path / "b", checkpoint_every=3)
  assert again.start_step == again.step == 8
  _assert_bitwise(full.state, again.state)


def test_sigterm_saves_at_the_next_step_and_the_rerun_is_bitwise(tmp_path):
  full = _run(6)
  send = lambda index: os.kill(os.getpid(), signal.SIGTERM) if index == 3 else None
  stopped = _run(6, tmp_path, Batches(on_draw=send))
  assert stopped.status == "preempted" and stopped.step == 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  resumed = _run(6, tmp_path)
  assert resumed.start_step == 3 and resumed.status == "finished"
  _assert_bitwise(full.state, resumed.state)


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
  (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                 "pid": os.getpid()}))
  with pytest.raises(ValueError, match=f"in use by another run .*pid {os.getpid()}"):
    _run(2, tmp_path)
  assert not (tmp_path / "checkpoints").exists()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                 "pid": int(dead.stdout)}))
  assert _run(2, tmp_path).step == 2
  assert not (tmp_path / "run.lock").exists()
  # Another host's lock is stale once it has not been refreshed for `stale_after_s`.
  (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(ValueError, match="host elsewhere"):
    trainer.workdir_lock(str(tmp_path)).__enter__()
  os.utime(tmp_path / "run.lock", (0, 0))
  lock = trainer.workdir_lock(str(tmp_path), stale_after_s=60).__enter__()
  assert lock.held and json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  lock.__exit__()


def test_config_drift_is_refused_and_more_steps_are_allowed(tmp_path):
  config = {"seed": 0, "model": {"width": 5}, "train": {"steps": 4, "log_every": 1},
            "mesh": {"data": 1}}
  _run(4, tmp_path, config=config)
  drifted = {**config, "seed": 1, "model": {"width": 6}}
  with pytest.raises(ValueError, match=r"model.width: 5 -> 6; seed: 0 -> 1"):
    _run(4, tmp_path, config=drifted)
  longer = {**config, "train": {"steps": 6, "log_every": 2}, "mesh": {"data": -1}}
  result = _run(6, tmp_path, config=longer)
  assert (result.start_step, result.step) == (4, 6)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["train"] == {"steps": 6, "log_every": 2}
  assert trainer.config_drift({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == [
      "a.c: <absent> -> 2"]


def test_a_diverging_run_stops_and_names_the_metric(tmp_path):
  _run(2, tmp_path)
  huge = trainer.Job(JOB.task, lambda key: _init(key).replace(
      tx=optax.sgd(1e38)), init_args=JOB.init_args)
  with pytest.raises(FloatingPointError, match=r"at step 3.*last good checkpoint \(step 2\)"):
    trainer.run(huge, Batches(), _mesh(), trainer.Options(steps=6), workdir=str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_bad_options_name_the_field():
  for field, value in [("steps", 0), ("log_every", 0), ("checkpoint_every", -1),
                       ("accum_steps", 0), ("max_to_keep", 0), ("stop_check_every", 0)]:
    kwargs = {"steps": 1, field: value}
    with pytest.raises(ValueError, match=f"train.{field}={value}"):
      trainer.Options(**kwargs)
  with pytest.raises(ValueError, match="mesh.strategy='pmap'"):
    trainer.Options(steps=1, strategy="pmap")
  for value in ("3,2", "0,1", "2,5", "two", "1,2,3", ",", (2, 1), (1.0, 2), 3):
    with pytest.raises(ValueError, match=re.escape(f"train.profile_steps={value!r}")):
      trainer.Options(steps=4, profile_steps=value)
  assert [trainer.profile_range(v, 4) for v in ("", "2, 4", "3", (1, 2), ())] == [
      None, (2, 4), (3, 3), (1, 2), None]


def test_profile_steps_trace_those_steps_into_the_workdir(tmp_path):
  _run(3, tmp_path, config={"train": {"steps": 3, "profile_steps": "2,3"}}, profile_steps="2,3")
  (trace,) = (tmp_path / "profile" / "plugins" / "profile").iterdir()  # TensorBoard's layout
  assert [p.stat().st_size > 0 for p in trace.glob("*.xplane.pb")] == [True]
  with gzip.open(trace / "perfetto_trace.json.gz") as f:
    events = json.load(f)["traceEvents"]
  assert sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train") == [2, 3]
  # Profiling changes no number: a resumed run may drop (or add) it.
  resumed = _run(4, tmp_path, config={"train": {"steps": 4}})
  assert (resumed.start_step, resumed.step) == (3, 4)
  with pytest.raises(ValueError, match=r"train.profile_steps='1,1' needs a workdir"):
    _run(2, profile_steps="1,1")
