"""Shared by the tests: subprocess environment, the 8-device run, config and script loading.

Subprocesses share one persistent XLA compilation cache, fresh for each test session (so the
first compile of every program is still paid), which spares recompiling the same train step in
every restarted run; its size limit turns on jax's file locking, so concurrent processes can
share it. Nothing reaches the user's own cache (~/.cache/seqlab/jax): the tests' process has
SEQLAB_COMPILATION_CACHE=off (conftest), and JAX_COMPILATION_CACHE_DIR, which seqlab's entry
points leave alone, points the subprocesses at the session's. The 8-device worker starts in the background when a test module that needs it is
imported (collection), once per test run even with several pytest-xdist workers, and runs
while the other tests do.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TINY = os.path.join(ROOT, "experiments", "configs", "tiny.py")
SHARED_CACHE = "xla_cache"
# tests/_multihost_worker.py's two-process run; the single-process reference
# (tests/_multidevice_worker.py) and the checks in tests/test_multihost.py use the same. The
# schedule keeps the 40 steps of tiny.py's full run, as the reference's optimizer does.
MULTIHOST_OVERRIDES = ("data.seq_length=64", "optimizer.eps=1e-6", "optimizer.total_steps=40",
                       "train.steps=4", "train.log_every=1", "train.eval_every=0",
                       "train.checkpoint_every=4", "train.progress=False", "mesh.strategy=fsdp",
                       "mesh.data=2", "mesh.fsdp=2")


def load_script(relative_path: str, name: str):
  """The script `ROOT/relative_path` (an experiment or benchmark) imported as module `name`."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses (Flax modules) look their module up there
  spec.loader.exec_module(module)
  return module


@functools.lru_cache(maxsize=None)
def session_dir() -> str:
  return tempfile.mkdtemp(prefix="seqlab_train_tests_")


def subprocess_env(cache: str = SHARED_CACHE, *, seqlab_default_cache: bool = False,
                   **extra: str) -> dict[str, str]:
  """The environment of a test subprocess: repo on the path, a compile cache of this session.

  With `seqlab_default_cache`, JAX is not told the cache: a seqlab entry point finds it where
  it finds a user's, under XDG_CACHE_HOME, which is then this session's `cache` folder (the
  cache itself is `<cache>/seqlab/jax`).
  """
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if seqlab_default_cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("SEQLAB_COMPILATION_CACHE", None)  # conftest's "off"
    env["XDG_CACHE_HOME"] = os.path.join(session_dir(), cache)
  else:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(session_dir(), cache)
  env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2**30)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["JAX_PLATFORMS"] = "cpu"
  # As in this process (conftest): tiny models compile faster than the passes would save.
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
  env.update(extra)
  return env


def publish_cache(private: str) -> None:
  """Copies the entries of a private cache of this session into the shared one."""
  source = os.path.join(session_dir(), private)
  target = os.path.join(session_dir(), SHARED_CACHE)
  os.makedirs(target, exist_ok=True)
  for name in os.listdir(source):
    if name.endswith("-cache") and not os.path.exists(os.path.join(target, name)):
      # Its access-time file first: JAX's size check reads one for every entry it sees, and
      # one missing makes every later write to the cache fail.
      atime = name.removesuffix("-cache") + "-atime"
      if os.path.exists(os.path.join(source, atime)):
        shutil.copy(os.path.join(source, atime), os.path.join(target, atime))
      shutil.copy(os.path.join(source, name), os.path.join(target, name + ".tmp"))
      os.replace(os.path.join(target, name + ".tmp"), os.path.join(target, name))


def python(*args: str, timeout: float = 300, cache: str = SHARED_CACHE,
           seqlab_default_cache: bool = False, **popen) -> subprocess.CompletedProcess:
  """Runs `python args...` in the repository root with `subprocess_env(cache, ...)`."""
  env = subprocess_env(cache, seqlab_default_cache=seqlab_default_cache)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, **popen)


def _shared_dir(uid: str) -> str:
  return os.path.join(tempfile.gettempdir(), f"seqlab_tests_{uid}")


def run_dir() -> str:
  """A directory shared by every process of this test run: pytest-xdist's workers share one
  (named by the run's id; `end_run` removes it), a plain run uses `session_dir`."""
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if uid is None:
    return session_dir()
  path = _shared_dir(uid)
  os.makedirs(path, exist_ok=True)
  return path


def _multidevice_dir() -> str:
  return os.path.join(run_dir(), "multidevice")


def start_multidevice() -> None:
  """Starts tests/_multidevice_worker.py (8 CPU devices) in the background, once per test run
  (the process that creates its folder starts it; it writes `status` when it ends)."""
  scratch = _multidevice_dir()
  try:
    os.mkdir(scratch)
  except FileExistsError:
    return  # started by this or another process of the run
  worker = os.path.join(TESTS, "_multidevice_worker.py")
  command = (f"{shlex.quote(sys.executable)} {shlex.quote(worker)} {shlex.quote(scratch)} "
             f"> {shlex.quote(os.path.join(scratch, 'out'))} "
             f"2> {shlex.quote(os.path.join(scratch, 'err'))}; "
             f"echo $? > {shlex.quote(os.path.join(scratch, 'status.tmp'))}; "
             f"mv {shlex.quote(os.path.join(scratch, 'status.tmp'))} "
             f"{shlex.quote(os.path.join(scratch, 'status'))}")
  proc = subprocess.Popen(["sh", "-c", command], cwd=ROOT, env=subprocess_env(),
                          start_new_session=True)
  with open(os.path.join(scratch, "pid"), "w") as f:
    f.write(str(proc.pid))


def _stop_multidevice(scratch: str) -> None:
  """Kills the 8-device worker of `scratch` if it still runs (its tests were deselected)."""
  if not os.path.isdir(scratch) or os.path.exists(os.path.join(scratch, "status")):
    return
  try:
    os.killpg(int(open(os.path.join(scratch, "pid")).read()), signal.SIGKILL)
  except (OSError, ValueError):
    pass


def end_run(uid: str) -> None:
  """After a pytest-xdist run (conftest, in the controlling process): stops the run's 8-device
  worker if it still runs and removes the run's shared folder."""
  path = _shared_dir(uid)
  _stop_multidevice(os.path.join(path, "multidevice"))
  shutil.rmtree(path, ignore_errors=True)


@atexit.register
def _clean_up() -> None:
  """Removes this process's caches; a plain run also stops a worker nobody waited for."""
  if not session_dir.cache_info().currsize:
    return
  if os.environ.get("PYTEST_XDIST_TESTRUNUID") is None:
    _stop_multidevice(_multidevice_dir())
  shutil.rmtree(session_dir(), ignore_errors=True)


@functools.lru_cache(maxsize=None)
def multidevice_results() -> dict:
  """The JSON the 8-device worker prints (waits for it, starting it if needed)."""
  start_multidevice()
  scratch = _multidevice_dir()
  status = os.path.join(scratch, "status")
  deadline = time.monotonic() + 900
  while not os.path.exists(status):
    if time.monotonic() > deadline:
      raise RuntimeError("the 8-device worker did not finish within 900 s")
    time.sleep(0.1)
  if open(status).read().strip() != "0":
    err = open(os.path.join(scratch, "err")).read()
    raise RuntimeError(f"8-device worker failed:\n{err[-4000:]}")
  return json.loads(open(os.path.join(scratch, "out")).read().strip().splitlines()[-1])


def spy_on_trainings(monkeypatch) -> list:
  """The `seqlab.trainer.Result` of every `trainer.run` from now on, in call order."""
  from seqlab import trainer  # pylint: disable=g-import-not-at-top
  results, run = [], trainer.run

  def spy(*args, **kwargs):
    results.append(run(*args, **kwargs))
    return results[-1]

  monkeypatch.setattr(trainer, "run", spy)
  return results


def tiny_config(arg: str = "", *overrides: str):
  """experiments/configs/tiny.py[:arg] with `key=value` overrides applied."""
  from seqlab import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY + (f":{arg}" if arg else ""))
  return config_lib.apply_overrides(config, overrides)


def random_params(shapes, seed: int = 0):
  """Parameters for `jax.eval_shape` shapes, laid out as the initialisers do: N(0, 0.05^2)
  weights from a seeded NumPy generator, zero biases, unit norm scales.

  Tests that compare two computations need some parameters, not the model's initialiser, whose
  per-parameter threefry loops take seconds to compile on CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(shape.shape, shape.dtype)
    if name == "bias":
      return np.zeros(shape.shape, shape.dtype)
    return np.asarray(0.05 * rng.standard_normal(shape.shape), dtype=shape.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def state_from_params(model, params, tx, seed: int = 0):
  """A `TrainState` holding `params` with a fresh optimizer state (one small compile)."""
  import jax  # pylint: disable=g-import-not-at-top
  from seqlab import train as train_lib  # pylint: disable=g-import-not-at-top
  return train_lib.TrainState(step=np.zeros((), np.int32), params=params,
                              opt_state=jax.jit(tx.init)(params),
                              rng=np.asarray(jax.random.key_data(jax.random.key(seed))),
                              apply_fn=model.apply, tx=tx)
