"""Test configuration: strict rank promotion, float32 matmuls on every backend, and compiles
without XLA's optimisation passes."""

import uuid

import jax

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
