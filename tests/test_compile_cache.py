"""seqlab.compile_cache: where the entry points keep compiled programs, and that a rerun reads them.

The directory rule is checked against hand-written paths for each setting of
SEQLAB_COMPILATION_CACHE / XDG_CACHE_HOME / HOME; `enable` against the JAX config it leaves
behind (restored after each test: this process never caches). A second run of an experiment's
entry point, in a subprocess, must report a hit from JAX's own cache-hit event. (`seqlab train`
turning on its default cache is checked in tests/test_cli.py, on run A.)
"""

import os
import subprocess
import sys

import jax
import pytest

import _helpers
from seqlab import compile_cache

SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


@pytest.fixture
def clean(monkeypatch, tmp_path):
  """No cache configured, no JAX_* cache variables, HOME and XDG_CACHE_HOME in tmp_path; the
  JAX config is restored afterwards."""
  saved = {name: getattr(jax.config, name) for name in SETTINGS}
  for name in SETTINGS:
    monkeypatch.delenv(name.upper(), raising=False)
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  jax.config.update("jax_compilation_cache_dir", None)
  yield tmp_path
  for name, value in saved.items():
    jax.config.update(name, value)


def test_the_directory_follows_the_variable_then_xdg_then_home(clean, monkeypatch):
  tmp = clean
  assert compile_cache.cache_dir() == str(tmp / "xdg" / "seqlab" / "jax")
  monkeypatch.setenv(compile_cache.ENV_VAR, "")  # empty is unset
  assert compile_cache.cache_dir() == str(tmp / "xdg" / "seqlab" / "jax")
  monkeypatch.setenv(compile_cache.ENV_VAR, "~/programs")
  assert compile_cache.cache_dir() == str(tmp / "home" / "programs")
  for off in ("off", "OFF", " 0", "false", "no"):
    monkeypatch.setenv(compile_cache.ENV_VAR, off)
    assert compile_cache.cache_dir() is None
  monkeypatch.delenv(compile_cache.ENV_VAR)
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert compile_cache.cache_dir() == str(tmp / "home" / ".cache" / "seqlab" / "jax")


def test_enable_configures_jax_and_leaves_its_own_settings_alone(clean, monkeypatch):
  tmp = clean
  path = str(tmp / "xdg" / "seqlab" / "jax")
  assert compile_cache.enable() == path and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path
  assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_TIME_S
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
  assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_SIZE_BYTES
  assert compile_cache.enable() == path  # a second call changes nothing
  # A cache JAX was given (JAX_COMPILATION_CACHE_DIR) wins, and so do JAX_* variables.
  jax.config.update("jax_compilation_cache_dir", str(tmp / "jax_own"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp / "elsewhere"))
  assert compile_cache.enable() == str(tmp / "jax_own")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3")
  assert compile_cache.enable() == str(tmp / "elsewhere")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0
  assert not os.path.exists(tmp / "home")  # nothing went to the user's home


def test_off_or_an_unusable_directory_leaves_the_cache_off(clean, monkeypatch, capsys):
  tmp = clean
  monkeypatch.setenv(compile_cache.ENV_VAR, "off")
  assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
  (tmp / "a_file").write_text("x")
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp / "a_file" / "cache"))
  assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
  assert "seqlab: no compilation cache: cannot create" in capsys.readouterr().err


RUN = """
import sys
sys.path.insert(0, "experiments")
import jax
import experiment_runs
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
experiment_runs.parse_command_line("test", ["--config", sys.argv[1], "--workdir", sys.argv[2]])
jax.jit(lambda x: jax.numpy.sin(x) @ x)(jax.numpy.ones((4, 4))).block_until_ready()
print(jax.config.jax_compilation_cache_dir, events.count("/jax/compilation_cache/cache_hits"))
"""


def test_an_experiment_turns_the_cache_on_and_its_second_run_hits_it(tmp_path):
  # As a user's: no JAX_COMPILATION_CACHE_DIR, seqlab's default under XDG_CACHE_HOME.
  env = _helpers.subprocess_env("experiment_home", seqlab_default_cache=True)
  cache = os.path.join(_helpers.session_dir(), "experiment_home", "seqlab", "jax")
  config = os.path.join(_helpers.ROOT, "experiments", "configs", "vision.py")
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", RUN, config, str(tmp_path)], cwd=_helpers.ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs.append(proc.stdout.split())
    if len(runs) == 1:
      assert any(name.endswith("-cache") for name in os.listdir(cache))
  assert runs[0] == [cache, "0"]  # the first run compiles everything and writes it
  assert runs[1][0] == cache and int(runs[1][1]) >= 1
