"""Test configuration: strict rank promotion, float32 matmuls on every backend, compiles
without XLA's optimisation passes, and no compilation cache in the user's home."""

import os
import uuid

import jax

from seqlab import compile_cache

# The entry points the tests call in this process (`cli.main`, the experiments' `main`) would
# otherwise turn on the cache under ~/.cache; the suite keeps off the user's cache. Its
# subprocesses inherit this, and use the session's own cache that `_helpers.subprocess_env`
# gives JAX directly (JAX_COMPILATION_CACHE_DIR wins over seqlab's setting).
os.environ[compile_cache.ENV_VAR] = "off"

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


# The tests' models are tiny: XLA's optimisation passes cost more compile time than they save
# run time, so the suite runs without them (its subprocesses too: `_helpers.subprocess_env`
# sets JAX_DISABLE_MOST_OPTIMIZATIONS, so they also compute bitwise what this process does).
jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
  """A pytest-xdist run gets a known id, so its workers' shared folder can be removed."""
  if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
    if not getattr(config.option, "testrunuid", None):
      config.option.testrunuid = uuid.uuid4().hex


def pytest_sessionfinish(session):
  config = session.config
  uid = getattr(config.option, "testrunuid", None)
  if uid and not hasattr(config, "workerinput"):
    import _helpers  # pylint: disable=g-import-not-at-top
    _helpers.end_run(uid)
