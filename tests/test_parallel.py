"""seqlab.parallel: sharding rules (hand-written expectations) and the 8-device equivalence.

The multi-device checks run once per session in a subprocess with 8 host CPU devices
(tests/_multidevice_worker.py): 5 steps of the gpt-tiny and t5-tiny presets on one device,
on 8 devices with "data" (shard_map + psum) and on a 2x4 mesh with "fsdp".
"""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import _helpers
from seqlab import loop, parallel

MESH_2x4 = AbstractMesh((2, 4), ("data", "fsdp"))
_helpers.start_multidevice()  # runs in the background while the other tests do


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert parallel.fsdp_spec((64, 4, 16), 4) == P("fsdp", None, None)
  assert parallel.fsdp_spec((256, 64), 4) == P("fsdp", None)
  assert parallel.fsdp_spec((30, 64), 4) == P(None, "fsdp")    # 30 does not divide
  assert parallel.fsdp_spec((30, 66), 4) == P()                # nothing divides
  assert parallel.fsdp_spec((64,), 4) == P()                   # under 1,024 elements
  assert parallel.fsdp_spec((4096,), 1) == P()                 # no fsdp axis


def test_logical_spec_follows_the_first_fitting_rule():
  rules = [("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "data")]
  assert parallel.logical_spec(("embed", "mlp"), (64, 256), MESH_2x4, rules) == P("fsdp", None)
  # "fsdp" is taken by the first axis, so "mlp" stays whole; "heads" goes to "data".
  assert parallel.logical_spec(("heads", "kv", "embed"), (4, 16, 64), MESH_2x4,
                               rules) == P("data", None, "fsdp")
  assert parallel.logical_spec(("embed",), (30,), MESH_2x4, rules) is None  # 4 does not divide
  assert parallel.logical_spec((None, None), (8, 8), MESH_2x4, rules) is None


def test_state_shardings_rules_cover_parameters_and_their_optimizer_state():
  shapes = jax.eval_shape(loop.build(_helpers.tiny_config()).init)
  ruled = parallel.state_shardings(shapes, MESH_2x4, "fsdp", [("embed", "fsdp")])
  block = ruled.params["blocks_0"]
  assert block["self_attention"]["query"]["kernel"].spec == P("fsdp", None, None)
  assert block["self_attention"]["out"]["kernel"].spec == P(None, None, "fsdp")
  assert block["mlp"]["wo"]["kernel"].spec == P(None, "fsdp")
  assert block["mlp_norm"]["scale"].spec == P("fsdp")
  assert block["self_attention"]["key"]["bias"].spec == P()   # (heads, kv): no rule, small
  assert ruled.params["token_embed"]["embedding"].spec == P(None, "fsdp")
  adam = ruled.opt_state[1][0]
  assert adam.mu["blocks_0"]["self_attention"]["out"]["kernel"].spec == P(None, None, "fsdp")
  assert adam.nu["token_embed"]["embedding"].spec == P(None, "fsdp")
  assert ruled.step.spec == P() and ruled.rng.spec == P()
  heuristic = parallel.state_shardings(shapes, MESH_2x4, "fsdp")
  assert heuristic.params["blocks_0"]["mlp"]["wo"]["kernel"].spec == P("fsdp", None)
  assert heuristic.params["blocks_0"]["mlp_norm"]["scale"].spec == P()
  data = parallel.state_shardings(shapes, MESH_2x4, "data")
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(data))


def test_bad_mesh_and_strategy_arguments():
  with pytest.raises(ValueError, match="does not match the device count"):
    parallel.make_mesh(2 * jax.device_count(), 1)
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.make_mesh(-1, -1)
  with pytest.raises(ValueError, match="strategy='pmap'"):
    parallel.state_shardings({}, MESH_2x4, "pmap")
  with pytest.raises(ValueError, match="logical axis rule"):
    parallel.state_shardings(jax.eval_shape(loop.build(_helpers.tiny_config()).init),
                             MESH_2x4, "fsdp", [("embed", "model")])


def test_tree_max_abs_diff():
  a = {"x": np.array([1.0, 2.0]), "y": np.array([[3.0]])}
  b = {"x": np.array([1.5, 2.0]), "y": np.array([[1.0]])}
  assert parallel.tree_max_abs_diff(a, b) == 2.0


# ─── 8 devices (subprocess) ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
@pytest.mark.parametrize("strategy", ["data", "fsdp"])
def test_strategies_give_the_single_device_numbers(arch, strategy):
  results = _helpers.multidevice_results()
  assert results["device_count"] == 8
  run = results[arch][strategy]
  assert len(results[arch]["losses"]) == 5
  assert results[arch]["losses"][-1] < results[arch]["losses"][0]  # it trains
  assert run["loss_diff"] <= 1e-5
  assert run["param_diff"] <= 1e-5


@pytest.mark.parametrize("arch,full,fsdp_spec,fsdp_shard", [
    # gpt-tiny's FSDP follows the rule ("embed", "fsdp"): wo is (mlp, embed) = [256, 64].
    ("decoder", [256, 64], "P(None, 'fsdp')", [256, 16]),
    # t5-tiny's follows the heuristic: the largest divisible dimension of wo = [128, 64].
    ("encoder_decoder", [128, 64], "P('fsdp', None)", [32, 64]),
])
def test_parameters_are_replicated_or_sharded_as_the_strategy_says(arch, full, fsdp_spec,
                                                                    fsdp_shard):
  results = _helpers.multidevice_results()[arch]
  assert results["data"]["layout"] == {"spec": "P()", "shard_shape": full, "mu_spec": "P()"}
  assert results["fsdp"]["layout"] == {"spec": fsdp_spec, "shard_shape": fsdp_shard,
                                       "mu_spec": fsdp_spec}


def test_batch_size_must_divide_over_the_devices():
  message = _helpers.multidevice_results()["bad_batch_size"]
  assert message == ("data.batch_size=12 is not divisible by the 8 devices of the mesh "
                     "(data=8 x fsdp=1)")


def test_force_host_devices_only_adds_a_missing_flag(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  parallel.force_host_devices(8)
  assert parallel.os.environ["XLA_FLAGS"] == (
      "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8")
  parallel.force_host_devices(4)  # an explicit count already there wins
  assert parallel.os.environ["XLA_FLAGS"].endswith("device_count=8")
