"""Keep freed host memory for reuse, so XLA:CPU's per-step temporary buffer is not faulted in
again on every step.

XLA:CPU allocates one temporary buffer for each execution of a compiled program (hundreds of MB
for a real model's train step) with `malloc`, from one of its worker threads. glibc serves any
request over 32 MB with a fresh `mmap` and gives the pages back to the kernel at `free`, so
every step page-faults the whole buffer in again, in kernel time that grows with the buffer
(`tests/test_host_memory.py` counts the faults; `experiments/benchmarks/train_throughput.py`
shows the step time).

`keep_freed_host_memory()` switches glibc to keep what it frees: no `mmap` for large blocks
(`M_MMAP_MAX = 0`), no trimming of the heap (`M_TRIM_THRESHOLD`), and one arena
(`M_ARENA_MAX = 1`), since a worker thread's own arena cannot hold a block that large and falls
back to `mmap`. The cost is that the process keeps its peak heap until it exits, as an
accelerator's caching allocator does. `seqlab train` / `eval` / `generate`, the experiments and
the benchmarks call it first; a script of your own can too.

It must run before JAX's CPU backend starts (before the first computation, not just the first
`import jax`): XLA's threads keep the arenas they got at their first `malloc`. Later it returns
False (with a warning, once). Set SEQLAB_KEEP_HOST_MEMORY=0 to leave malloc alone. A C library
other than glibc (macOS, musl) is left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1
ENV_VAR = "SEQLAB_KEEP_HOST_MEMORY"

_applied = False
_warned = False


def _jax_backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return xla_bridge.backends_are_initialized()


def keep_freed_host_memory() -> bool:
  """Makes glibc keep freed memory (see the module docstring); True when it is in effect."""
  global _applied, _warned
  if _applied:
    return True
  if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if _jax_backend_started():
    if not _warned:
      _warned = True
      logging.warning(
          "seqlab.host_memory.keep_freed_host_memory() was called after JAX's backend "
          "started; XLA's threads already have their malloc arenas, so each step's temporary "
          "buffer will still be page-faulted in again. Call it before the first JAX "
          "computation.")
    return False
  libc = ctypes.CDLL("libc.so.6")
  ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
        and libc.mallopt(_M_ARENA_MAX, 1) == 1)
  if not ok:
    logging.warning("seqlab.host_memory: glibc refused mallopt; host memory is left as it was.")
    return False
  _applied = True
  return True
