"""JAX's persistent compilation cache for seqlab's entry points: a rerun loads its programs.

`seqlab train` (and the other `seqlab` commands) and the experiment scripts call `enable()`
first; a second run of the same model then reads its compiled train step, initialiser and
evaluation from disk instead of compiling them again (`experiments/benchmarks/compile_cache.py`
measures what that saves). Importing `seqlab` as a library never turns the cache on: that is
the caller's choice, made at its own entry point.

Where (`cache_dir`): `$SEQLAB_COMPILATION_CACHE` when it names a directory; `off` (or `0`,
`false`, `no`) turns it off; unset or empty means the default, `$XDG_CACHE_HOME/seqlab/jax`
(`~/.cache/seqlab/jax` without XDG_CACHE_HOME). A cache JAX was given itself
(`JAX_COMPILATION_CACHE_DIR`, or `jax.config.update("jax_compilation_cache_dir", ...)` before
the call) wins and is left alone, with all its settings; so does any `JAX_*` variable of the
settings below. The cache is trusted code: keep it in a directory only you can write.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ENV_VAR = "SEQLAB_COMPILATION_CACHE"
OFF = ("0", "false", "no", "off")

# Written when a program compiled for at least this long. Reading an entry back from a local
# disk costs far less than any such compile; below it are mostly the one-op programs that eager
# calls compile, many per run, each a file that would save next to nothing.
MIN_COMPILE_TIME_S = 0.1
# No size floor (-1, which also stops JAX from substituting its own): compile time is what an
# entry saves, and a small executable can stand for a long compile.
MIN_ENTRY_SIZE_BYTES = -1
# A bound keeps a cache in the user's home from growing without end: JAX evicts the least
# recently used entries past it, and the bound turns on JAX's file lock, which lets the
# processes of a run on one host share the directory. The lock needs the `filelock` package;
# without it the cache is unbounded and unlocked.
MAX_SIZE_BYTES = 4 * 2**30


def cache_dir() -> str | None:
  """The directory seqlab's entry points cache compiled programs in; None when turned off.

  `$SEQLAB_COMPILATION_CACHE` (a path, `~` expanded), None for `off` / `0` / `false` / `no`,
  else `$XDG_CACHE_HOME/seqlab/jax` or `~/.cache/seqlab/jax`.
  """
  setting = os.environ.get(ENV_VAR, "").strip()
  if setting.lower() in OFF:
    return None
  if setting:
    return os.path.abspath(os.path.expanduser(setting))
  base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
  return os.path.abspath(os.path.join(os.path.expanduser(base), "seqlab", "jax"))


def enable() -> str | None:
  """Turns on JAX's persistent compilation cache at `cache_dir()`; returns the directory in use.

  For entry points, before their first compile. Returns JAX's own directory, untouched, when
  JAX already has one; None when off, or when the directory cannot be created (a warning on
  stderr: the run goes on without a cache).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = cache_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f"seqlab: no compilation cache: cannot create {path!r} ({e.strerror or e}); set "
          f"{ENV_VAR} to a writable directory or to off", file=sys.stderr, flush=True)
    return None
  settings = {"jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_TIME_S,
              "jax_persistent_cache_min_entry_size_bytes": MIN_ENTRY_SIZE_BYTES}
  if importlib.util.find_spec("filelock") is not None:
    settings["jax_compilation_cache_max_size"] = MAX_SIZE_BYTES
  for name, value in settings.items():
    if name.upper() not in os.environ:
      jax.config.update(name, value)
  jax.config.update("jax_compilation_cache_dir", path)
  return path
