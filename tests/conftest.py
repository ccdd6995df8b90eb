"""Test configuration: strict rank promotion and float32 matmuls on every backend."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def fast_compile():
  """Tiny models: XLA's optimisation passes cost more than they save; restore afterwards.

  Modules opt in with `pytestmark = pytest.mark.usefixtures("fast_compile")`.
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
