"""seqlab.host_memory: XLA:CPU's large temporary buffer is faulted in once, not on every call.

Oracle: the page count of the program's one large intermediate (a [4096, 4096] float32 product,
64 MiB), computed here. Without the setting, glibc maps and unmaps that buffer on every call, so
each call costs about that many minor page faults; with it, none. Each case runs in a fresh
process, since the setting must come before JAX's backend starts.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys

import pytest

from tests import _helpers

PROBE = """
import json, resource, sys, warnings
from seqlab import host_memory
applied = host_memory.keep_freed_host_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp

@jax.jit
def f(a, b):
  return ((a @ b) @ b.T).sum()   # a @ b: [4096, 4096] float32 in XLA's temporary buffer

a, b = jnp.ones((4096, 32), jnp.float32), jnp.ones((32, 4096), jnp.float32)
for _ in range(2):
  f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(a, b).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
late = host_memory.keep_freed_host_memory() if sys.argv[1] == "late" else None
print(json.dumps({"applied": applied, "late": late, "faults_per_call": faults}))
"""

BUFFER_PAGES = 4096 * 4096 * 4 // resource.getpagesize()

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the malloc settings are glibc's")


def _probe(mode: str, **env: str) -> tuple[dict, str]:
  result = subprocess.run(
      [sys.executable, "-c", PROBE, mode], cwd=_helpers.ROOT,
      env=_helpers.subprocess_env(cache="host_memory_cache", **env), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_large_temporary_buffer_is_not_faulted_in_again():
  plain, _ = _probe("none")
  kept, _ = _probe("keep")
  assert plain["faults_per_call"] >= 0.9 * BUFFER_PAGES, plain   # the problem it solves
  assert kept["applied"] is True
  assert kept["faults_per_call"] <= 0.02 * BUFFER_PAGES, kept


def test_after_the_backend_started_it_warns_and_changes_nothing():
  late, stderr = _probe("late")
  assert late["late"] is False
  assert late["faults_per_call"] >= 0.9 * BUFFER_PAGES, late
  assert "after JAX's backend started" in stderr


def test_environment_variable_turns_it_off():
  off, _ = _probe("keep", SEQLAB_KEEP_HOST_MEMORY="0")
  assert off["applied"] is False
  assert off["faults_per_call"] >= 0.9 * BUFFER_PAGES, off
