"""Run monitoring: metric writers (JSONL + TensorBoard), a console progress line, MFU.

MFU = achieved model FLOP/s ÷ the device's peak. The peak comes from a table for GPU / TPU kinds
(dense bfloat16, per chip) and is *measured* on CPU with a large float32 matmul, since CPU peaks
depend on the host.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import flops
from seqlab import workdir as workdir_lib

_measured_cpu_peak: float | None = None


def measure_matmul_peak(size: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of the best of `repeats` jitted size x size matmuls on the default device."""
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def device_peak_flops(device=None) -> float:
  """Peak FLOP/s of one device: the table for accelerators, a measured matmul peak on CPU."""
  global _measured_cpu_peak
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    if _measured_cpu_peak is None:
      _measured_cpu_peak = measure_matmul_peak()
    return _measured_cpu_peak
  try:
    return flops.peak_flops_per_second(device.device_kind)
  except ValueError:
    return float("nan")


def _summary_writer(logdir: str, purge_step: int | None = None):
  """A tensorboardX `SummaryWriter`, imported without pulling in torch.

  tensorboardX imports torch (when installed) only to recognise torch tensors, which seqlab
  never logs; that import costs seconds at every start, so it is masked while tensorboardX
  loads (a None entry in `sys.modules` makes `import torch` raise ImportError there).
  """
  masked = "torch" not in sys.modules and "tensorboardX" not in sys.modules
  if masked:
    sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if masked:
      del sys.modules["torch"]
  return SummaryWriter(logdir, purge_step=purge_step)


class MetricWriter:
  """Writes metrics to `metrics.jsonl` and TensorBoard event files under `workdir`.

  `resume_step` is the step a resumed run restarts from: rows logged after it by the earlier
  run (steps it replays now) are dropped, so the file holds each step once and in order after
  any number of resumes, and TensorBoard purges its events past that step. `None` (a fresh
  run) starts an empty file. `rows` holds what was kept. Only process 0 writes.

  A cloud-storage work directory (`gs://...`) cannot be appended to: the files are written in a
  local scratch directory and copied over their remote counterparts at most every
  `mirror_every_s` seconds and at `close()`.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool = True,
               mirror_every_s: float = 60.0):
    self.enabled = enabled and jax.process_index() == 0
    self._tb = None
    self._remote = workdir if workdir_lib.is_remote(workdir) else None
    self._mirror_every_s, self._mirrored_at = mirror_every_s, time.monotonic()
    self.rows: list[dict[str, float]] = []
    if resume_step is not None:
      previous = workdir_lib.join(workdir, "metrics.jsonl")
      if workdir_lib.isfile(previous):
        self.rows = [row for row in read_jsonl(workdir_lib.read_text(previous))
                     if row.get("step", math.inf) <= resume_step]
    if self.enabled:
      local = tempfile.mkdtemp(prefix="seqlab_metrics_") if self._remote else workdir
      self._local = local
      os.makedirs(local, exist_ok=True)
      path = os.path.join(local, "metrics.jsonl")
      with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in self.rows)
      os.replace(path + ".tmp", path)
      self._jsonl = open(path, "a")
      self._tb = _summary_writer(os.path.join(local, "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))
    if self._remote and time.monotonic() - self._mirrored_at >= self._mirror_every_s:
      self._mirror()

  def _mirror(self) -> None:
    """Copies every local file over its remote counterpart (same relative path)."""
    self._tb.flush()
    for root, _, names in os.walk(self._local):
      for name in names:
        source = os.path.join(root, name)
        relative = os.path.relpath(source, self._local)
        workdir_lib.copy(source, workdir_lib.join(self._remote, *relative.split(os.sep)))
    self._mirrored_at = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._remote:
        self._mirror()
        shutil.rmtree(self._local, ignore_errors=True)


class Progress:
  """One console line: step, loss, tokens/s, MFU and ETA."""

  def __init__(self, total_steps: int, *, stream=None, enabled: bool = True):
    self.total = total_steps
    self.stream = stream or sys.stderr
    self.enabled = enabled and jax.process_index() == 0
    self.start = time.perf_counter()

  def update(self, step: int, loss: float, items_per_s: float, mfu: float | None,
             start_step: int = 0, *, unit: str = "tokens"):
    """Redraws the line for `step`; `mfu` None when the model has no FLOP formula."""
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.start
    done = max(step - start_step, 1)
    eta = elapsed / done * max(self.total - step, 0)
    width = 24
    filled = int(width * step / max(self.total, 1))
    bar = "█" * filled + "·" * (width - filled)
    speed = f"{items_per_s:,.0f} {'tok' if unit == 'tokens' else unit}/s"
    utilisation = "" if mfu is None else f" MFU {100 * mfu:.1f}%"
    self.stream.write(f"\r[{bar}] {step}/{self.total} loss {loss:.4f} {speed}{utilisation} "
                      f"ETA {eta:.0f}s ")
    self.stream.flush()

  def close(self):
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()


def read_jsonl(text: str) -> list[dict[str, Any]]:
  """The rows of a `metrics.jsonl` text; a torn last line (a killed write) is ignored."""
  rows = []
  for line in text.splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def check_finite(step: int, metrics: dict[str, Any]) -> None:
  """Raises FloatingPointError naming the metric when a loss or a norm is NaN or Inf.

  Checks every "loss*" key plus "grad_norm" and "param_norm" (a finite loss can hide an update
  that already broke the parameters).
  """
  for k, v in metrics.items():
    if (k.startswith("loss") or k in ("grad_norm", "param_norm")) and not np.isfinite(float(v)):
      raise FloatingPointError(f"{k}={float(v)} at step {step}")
