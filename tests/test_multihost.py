"""Two processes joined with `jax.distributed.initialize` on 127.0.0.1 train like one.

Each process (tests/_multihost_worker.py) has 2 CPU devices and runs
`seqlab.loop.train_and_evaluate` with `distributed.*` set, feeding only its own rows of the
global batch (`jax.make_array_from_process_local_data`) on an FSDP 2x2 mesh spanning both
processes. The reference is one device stepping through the same global batches (process 0's
rows, then process 1's), computed by the 8-device worker.
"""

import json
import os
import subprocess
import sys

import portpicker
import pytest

import _helpers

_helpers.start_multidevice()  # the single-process reference; runs in the background


def _free_slurm_port() -> int:
  """A free port in SLURM's range [61440, 65535], where JAX puts a SLURM job's coordinator."""
  for _ in range(100):
    port = portpicker.pick_unused_port()
    if port >= 61440:
      return port
  for port in range(61440, 65536):
    if portpicker.is_port_free(port):
      return port
  raise RuntimeError("no free port in [61440, 65535]")


@pytest.mark.parametrize("joining", ["explicit", "auto"])
def test_two_processes_match_the_single_process_losses(tmp_path, joining):
  worker = os.path.join(_helpers.TESTS, "_multihost_worker.py")
  out = tmp_path / "losses.json"
  envs = [_helpers.subprocess_env() for _ in range(2)]
  if joining == "explicit":
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  else:
    # `distributed.initialize=True` calls jax.distributed.initialize() with no arguments, which
    # reads a SLURM job's variables (as on a cluster); the job id chooses the port.
    address = "auto"
    job_id = _free_slurm_port() - 61440
    for i, env in enumerate(envs):
      env.update(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                 SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1")
  procs = [subprocess.Popen(
      [sys.executable, worker, address, str(i), str(tmp_path / "workdir"), str(out)],
      cwd=_helpers.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i, env in enumerate(envs)]
  logs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, logs):
    assert p.returncode == 0, err[-3000:]
  result = json.loads(out.read_text())
  assert result["process_count"] == 2
  assert result["device_count"] == 4 and result["local_device_count"] == 2
  assert result["steps"] == [1, 2, 3, 4]
  reference = _helpers.multidevice_results()["multihost_reference"]
  assert len(reference) == 4
  assert max(abs(a - b) for a, b in zip(result["losses"], reference)) <= 1e-5
  # The run left one checkpoint, holding both processes' data-iterator states.
  data = json.loads((tmp_path / "workdir" / "checkpoints" / "4" / "data" / "metadata")
                    .read_text())
  assert len(data["per_process"]) == 2 and data["per_process"][0] != data["per_process"][1]
