"""seqlab.parallel: sharding rules (hand-written expectations) and the 8-device equivalence.

The multi-device checks run once per session in a subprocess with 8 host CPU devices
(tests/_multidevice_worker.py): 5 steps of the gpt-tiny and t5-tiny presets on one device,
on 8 devices with "data" (shard_map + psum), on a 2x4 mesh with "fsdp" and on a
data 2 x fsdp 2 x model 2 mesh with "fsdp" plus tensor parallelism ("tensor").
"""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import _helpers
from seqlab import cli, loop, parallel

MESH_2x4 = AbstractMesh((2, 4), ("data", "fsdp"))
MESH_2x2x2 = AbstractMesh((2, 2, 2), parallel.MESH_AXES)
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


def test_tensor_parallel_splits_heads_mlp_and_vocabulary_megatron_style():
  shapes = jax.eval_shape(loop.build(_helpers.tiny_config()).init)
  for rules in (None, [("embed", "fsdp")]):  # FSDP by the heuristic or by the rule, the same
    ruled = parallel.state_shardings(shapes, MESH_2x2x2, "fsdp", rules)
    block = ruled.params["blocks_0"]
    # Column-parallel: query / key / value [embed, heads, kv], wi [embed, mlp].
    assert block["self_attention"]["query"]["kernel"].spec == P("fsdp", "model", None)
    assert block["self_attention"]["value"]["kernel"].spec == P("fsdp", "model", None)
    assert block["self_attention"]["key"]["bias"].spec == P("model", None)   # under 1,024
    assert block["mlp"]["wi"]["kernel"].spec == P("fsdp", "model")
    # Row-parallel: out [heads, kv, embed], wo [mlp, embed]; vocabulary-parallel embedding.
    assert block["self_attention"]["out"]["kernel"].spec == P("model", None, "fsdp")
    assert block["mlp"]["wo"]["kernel"].spec == P("model", "fsdp")
    assert ruled.params["token_embed"]["embedding"].spec == P("model", "fsdp")
    adam = ruled.opt_state[1][0]
    assert adam.nu["blocks_0"]["mlp"]["wi"]["kernel"].spec == P("fsdp", "model")
  # A rule the config gives wins over the default for its logical name.
  whole_vocab = parallel.state_shardings(shapes, MESH_2x2x2, "fsdp", [("vocab", None)])
  assert whole_vocab.params["token_embed"]["embedding"].spec == P("fsdp", None)  # heuristic
  assert whole_vocab.params["blocks_0"]["mlp"]["wo"]["kernel"].spec == P("model", "fsdp")
  # A scanned stack's leading "layers" axis is never split.
  stacked = jax.eval_shape(loop.build(_helpers.tiny_config(
      "", "model.overrides.scan_layers=True")).init)
  query = parallel.state_shardings(stacked, MESH_2x2x2, "fsdp").params["blocks"][
      "self_attention"]["query"]["kernel"]
  assert query.spec == P(None, "fsdp", "model", None)


@pytest.mark.parametrize("override,message", [
    ("model.overrides.num_kv_heads=1", "mesh.model=2 does not divide num_kv_heads=1 "),
    ("model.overrides.d_ff=99", "mesh.model=2 does not divide d_ff=99 "),
    ("model.overrides.vocab_size=515", "mesh.model=2 does not divide vocab_size=515 "),
])
def test_tensor_parallel_refuses_what_it_cannot_split(override, message):
  shapes = jax.eval_shape(loop.build(_helpers.tiny_config("", override)).init)
  with pytest.raises(ValueError, match=f"^{message}"):
    parallel.state_shardings(shapes, MESH_2x2x2, "fsdp")
  if "vocab" in override:  # unless the config's rules keep that logical axis whole
    kept = parallel.state_shardings(shapes, MESH_2x2x2, "fsdp", [("vocab", None)])
    assert kept.params["token_embed"]["embedding"].spec == P(None, "fsdp")


def test_tensor_parallel_needs_the_fsdp_strategy(tmp_path, capsys):
  message = "mesh.model=2 needs mesh.strategy=fsdp "
  assert cli.main(["train", "--config", _helpers.TINY, "--workdir", str(tmp_path / "w"),
                   "--config.mesh.model=2"]) == 2
  assert capsys.readouterr().err.strip() == (
      f"seqlab train: error: {message}(strategy 'data' replicates every parameter on every "
      "device)")
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match=f"^{message}"):
    loop.make_mesh(_helpers.tiny_config("", "mesh.model=2"))   # before any device is asked
  shapes = jax.eval_shape(loop.build(_helpers.tiny_config()).init)
  with pytest.raises(ValueError, match=f"^{message}"):
    parallel.state_shardings(shapes, MESH_2x2x2, "data")
  with pytest.raises(ValueError, match=r"^mesh.model=0 must be an integer >= 1"):
    loop.make_mesh(_helpers.tiny_config("", "mesh.model=0", "mesh.strategy=fsdp"))
  with pytest.raises(ValueError, match=r"does not divide the device count .*mesh.model=3\)$"):
    loop.make_mesh(_helpers.tiny_config("", "mesh.model=3", "mesh.strategy=fsdp"))
  config = _helpers.tiny_config()
  del config.mesh["model"]  # a config without the field: no tensor parallelism
  mesh = loop.make_mesh(config)
  assert mesh.axis_names == parallel.MESH_AXES and parallel.model_size(mesh) == 1
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_tree_max_abs_diff():
  a = {"x": np.array([1.0, 2.0]), "y": np.array([[3.0]])}
  b = {"x": np.array([1.5, 2.0]), "y": np.array([[1.0]])}
  assert parallel.tree_max_abs_diff(a, b) == 2.0


# ─── 8 devices (subprocess) ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
@pytest.mark.parametrize("strategy", ["data", "fsdp", "tensor"])
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
  # Tensor parallelism: wo is row-parallel (d_ff over "model"), FSDP takes d_model.
  assert results["tensor"]["layout"] == {"spec": "P('model', 'fsdp')", "mu_spec":
                                         "P('model', 'fsdp')",
                                         "shard_shape": [full[0] // 2, full[1] // 2]}


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_tensor_parallel_run_from_the_config_and_its_checkpoint_on_one_device(arch):
  tensor = _helpers.multidevice_results()[arch]["tensor"]
  assert tensor["mesh"] == {"data": 2, "fsdp": 2, "model": 2}  # loop.make_mesh of the config
  assert tensor["specs"] == {"query": "P('fsdp', 'model', None)",
                             "key": "P('fsdp', 'model', None)",
                             "out": "P('model', None, 'fsdp')", "wi": "P('fsdp', 'model')",
                             "wo": "P('model', 'fsdp')", "token_embed": "P('model', 'fsdp')"}
  # loop.restore_params (seqlab eval / generate) reads it onto one device, unchanged.
  assert tensor["restored"] == {"step": 5, "devices": 1, "param_diff": 0.0}


def test_train_refuses_heads_that_the_model_axis_does_not_divide():
  refused = _helpers.multidevice_results()["indivisible_heads"]
  assert refused["message"].startswith(
      "mesh.model=2 does not divide num_kv_heads=1 (logical axis 'heads' of ")
  assert not refused["workdir_created"]  # refused before anything was written


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
