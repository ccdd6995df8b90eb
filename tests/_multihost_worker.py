"""One process of a two-process run joined with `jax.distributed.initialize` on 127.0.0.1.

Usage: _multihost_worker.py COORDINATOR_ADDRESS PROCESS_ID WORKDIR OUT_JSON
           [PAUSE_AT MARKER] [key=value ...]
Trains the tiny decoder for a few steps through `seqlab.loop.train_and_evaluate` with the
config's `distributed.*` fields; each process feeds its own rows of the global batch. With
COORDINATOR_ADDRESS "auto" the config sets `distributed.initialize=True` and JAX finds the
processes itself, from the SLURM variables the test puts in the environment. Process 0
writes the logged losses to OUT_JSON (with its status). With PAUSE_AT > 0 this process's input
pauses at that batch, creating MARKER, until a signal arrives (tests/_paused_train.py); the
key=value overrides follow the fixed ones. Used by tests/test_multihost.py.
"""

import json
import os
import sys

if __name__ == "__main__":  # two devices per process; importing this file changes nothing
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

from seqlab import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from seqlab import loop  # noqa: E402  pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _helpers  # noqa: E402  pylint: disable=wrong-import-position

OVERRIDES = _helpers.MULTIHOST_OVERRIDES


def main():
  address, process_id, workdir, out = sys.argv[1:5]
  extra = sys.argv[5:]
  if len(extra) >= 2 and "=" not in extra[0]:
    import _paused_train  # pylint: disable=g-import-not-at-top
    if int(extra[0]) > 0:
      _paused_train.pause_input(int(extra[0]), extra[1])
    extra = extra[2:]
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "configs", "tiny.py"))
  if address == "auto":
    joining = ["distributed.initialize=True"]
  else:
    joining = [f"distributed.coordinator_address={address}", "distributed.num_processes=2",
               f"distributed.process_id={process_id}"]
  config = config_lib.apply_overrides(config, [*OVERRIDES, *joining, *extra])
  result = loop.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump({"status": result["status"], "step": result["step"],
                 "start_step": result["start_step"], "process_count": jax.process_count(), "device_count": jax.device_count(),
                 "local_device_count": jax.local_device_count(),
                 "losses": [h["loss"] for h in result["history"] if "loss" in h],
                 "steps": [h["step"] for h in result["history"] if "loss" in h]}, f)


if __name__ == "__main__":
  main()
