"""Two processes joined with `jax.distributed.initialize` on 127.0.0.1 train like one.

Each process (tests/_multihost_worker.py) has 2 CPU devices and runs
`seqlab.loop.train_and_evaluate` with `distributed.*` set, feeding only its own rows of the
global batch (`jax.make_array_from_process_local_data`) on an FSDP 2x2 mesh spanning both
processes. The reference is one device stepping through the same global batches (process 0's
rows, then process 1's), computed by the 8-device worker.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker

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


def _joining(mode: str) -> tuple[str, list[dict[str, str]]]:
  """(coordinator address argument, the two processes' environments) for a joining mode.

  "explicit": `distributed.coordinator_address` on a free port. "auto":
  `distributed.initialize=True` calls jax.distributed.initialize() with no arguments, which
  reads a SLURM job's variables (as on a cluster); the job id chooses the port.
  """
  envs = [_helpers.subprocess_env() for _ in range(2)]
  if mode == "explicit":
    return f"127.0.0.1:{portpicker.pick_unused_port()}", envs
  job_id = _free_slurm_port() - 61440
  for i, env in enumerate(envs):
    env.update(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1")
  return "auto", envs


def test_two_processes_match_the_single_process_losses(tmp_path):
  worker = os.path.join(_helpers.TESTS, "_multihost_worker.py")
  out = tmp_path / "losses.json"
  address, envs = _joining("explicit")
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
  _UNINTERRUPTED["workdir"] = tmp_path / "workdir"


# The run above is the uninterrupted reference of the preemption test below.
_UNINTERRUPTED: dict[str, pathlib.Path] = {}


# ─── Preemption and a dead process ───────────────────────────────────────────────────────────


def _start(tmp_path, name, pauses=("0", "0"), extra=(), joining="explicit"):
  """Two workers joining as `joining` says; `pauses[i]` is process i's PAUSE_AT (0: never)."""
  address, envs = _joining(joining)
  worker = os.path.join(_helpers.TESTS, "_multihost_worker.py")
  procs = []
  for i in range(2):
    marker = str(tmp_path / f"{name}.paused{i}")
    procs.append(subprocess.Popen(
        [sys.executable, worker, address, str(i), str(tmp_path / name),
         str(tmp_path / f"{name}.json"), pauses[i], marker, *extra],
        cwd=_helpers.ROOT, env=envs[i], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True))
  return procs


def _wait_for_file(path, procs, timeout=300.0):
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    assert all(p.poll() is None for p in procs), "a worker ended before pausing"
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


def _final_state(workdir, step):
  from seqlab import checkpoint, loop  # pylint: disable=g-import-not-at-top
  config = _helpers.tiny_config("", *_helpers.MULTIHOST_OVERRIDES)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore(jax.eval_shape(loop.build(config).init), step, data=False)
  finally:
    ckpt.close()
  data = json.loads((pathlib.Path(workdir) / "checkpoints" / str(step) / "data" / "metadata")
                    .read_text())
  return restored.state, data


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bitwise(tmp_path, capsys):
  reference = _UNINTERRUPTED.get("workdir")
  if reference is None:  # run on its own: make the reference
    procs = _start(tmp_path, "uninterrupted")
    for p in procs:
      assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    reference = tmp_path / "uninterrupted"
  # SIGTERM reaches process 0 only, while it waits for its 2nd batch; process 1 keeps going
  # until the next agreement on the stop flag, and both stop after step 2.
  procs = _start(tmp_path, "preempted", pauses=("2", "0"))
  _wait_for_file(tmp_path / "preempted.paused0", procs)
  procs[0].send_signal(signal.SIGTERM)
  for p in procs:
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
  stopped = json.loads((tmp_path / "preempted.json").read_text())
  assert stopped["status"] == "preempted" and stopped["step"] == 2
  assert sorted(os.listdir(tmp_path / "preempted" / "checkpoints")) == ["2"]
  # The resumed pair joins as SLURM tasks do (jax.distributed.initialize() with no arguments).
  resumed = _start(tmp_path, "preempted", joining="auto")
  for p in resumed:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  final = json.loads((tmp_path / "preempted.json").read_text())
  assert final["status"] == "finished" and final["start_step"] == 2 and final["step"] == 4
  a, data_a = _final_state(reference, 4)
  b, data_b = _final_state(tmp_path / "preempted", 4)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 30
  for x, y in zip(leaves_a, leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  assert data_a == data_b  # both processes' data-iterator states
  # `seqlab eval` on one device reads what two processes wrote.
  from seqlab import cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["eval", "--workdir", str(tmp_path / "preempted"), "--batches", "1"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4


def test_a_killed_process_stops_the_other_with_an_error_instead_of_a_hang(tmp_path):
  procs = _start(tmp_path, "killed", pauses=("0", "3"),
                 extra=("distributed.heartbeat_timeout_s=5",))
  _wait_for_file(tmp_path / "killed.paused1", procs)
  procs[1].kill()
  start = time.monotonic()
  _, err = procs[0].communicate(timeout=120)
  assert procs[0].returncode != 0
  assert time.monotonic() - start < 90
  assert "another task died" in err
