"""seqlab.checkpoint: exact round trips, retention, corrupted-newest fallback, shape mismatch."""

import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqlab import checkpoint


def _state(seed: float, width: int = 4) -> dict:
  rng = np.random.default_rng(int(seed))
  return {"params": {"w": jnp.asarray(rng.normal(size=(width, 3)).astype(np.float32)),
                     "b": jnp.asarray(rng.normal(size=(3,)).astype(np.float32))},
          "step": jnp.asarray(int(seed), jnp.int32),
          "rng": jnp.asarray([7, int(seed)], jnp.uint32)}


def _template(width: int = 4) -> dict:
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0, width))


def _snapshot(directory) -> dict[str, str]:
  """Every file under `directory` -> sha256 of its bytes."""
  out = {}
  for path in sorted(pathlib.Path(directory).rglob("*")):
    if path.is_file():
      out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def _save_steps(directory, steps, **kwargs):
  ckpt = checkpoint.Checkpointer(str(directory), **kwargs)
  for step in steps:
    ckpt.save(step, _state(step), data_state={"next_index": step, "name": "shard0",
                                              "nested": [1, {"k": step}]},
              config={"model": {"d_model": 64}, "seed": 0},
              metrics=kwargs.get("best_metric") and {"eval/loss": float(10 - step % 3)})
  ckpt.close()


def test_round_trip_is_exact(tmp_path):
  _save_steps(tmp_path, [1, 2])
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  restored = ckpt.restore(_template())
  ckpt.close()
  assert restored.step == 2
  expected = _state(2)
  for got, want in zip(jax.tree_util.tree_leaves(restored.state),
                       jax.tree_util.tree_leaves(expected)):
    assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
  assert restored.data_state == {"next_index": 2, "name": "shard0", "nested": [1, {"k": 2}]}
  assert restored.config == {"model": {"d_model": 64}, "seed": 0}
  assert checkpoint.read_config(str(tmp_path)) == {"model": {"d_model": 64}, "seed": 0}


def test_keeps_the_last_n_and_the_best(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, best_metric="eval/loss")
  for step, loss in zip([1, 2, 3, 4, 5], [3.0, 1.0, 2.0, 4.0, 5.0]):
    ckpt.save(step, _state(step), metrics={"eval/loss": loss})
  ckpt.close()
  # Last two (4, 5) plus the lowest eval/loss (step 2).
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [2, 4, 5]


# orbax's failed read leaves a tensorstore callback aimed at its closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["every_file", "array_data_only"])
def test_truncated_newest_falls_back_to_the_previous_with_a_warning(tmp_path, damage):
  _save_steps(tmp_path, [1, 2, 3])
  newest = tmp_path / "3"
  for path in newest.rglob("*"):
    if path.is_file() and (damage == "every_file" or "/d/" in str(path)):
      with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.warns(RuntimeWarning, match="checkpoint at step 3 .* unreadable"):
    restored = ckpt.restore(_template())
  assert restored.step == 2 and ckpt.skipped_steps == [3]
  assert np.array_equal(restored.state["params"]["w"], _state(2)["params"]["w"])
  # Moving the damaged one aside lets the run write step 3 again.
  assert ckpt.discard_skipped() == [str(tmp_path / "3.corrupt")]
  assert ckpt.all_steps() == [1, 2]
  ckpt.save(3, _state(30), data_state={"next_index": 3})
  ckpt.close()
  again = checkpoint.Checkpointer(str(tmp_path)).restore(_template())
  assert again.step == 3 and np.array_equal(again.state["params"]["w"], _state(30)["params"]["w"])


def test_a_different_model_shape_is_a_clear_error_and_nothing_is_written(tmp_path):
  _save_steps(tmp_path, [1])
  before = _snapshot(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"\['params'\]\['w'\]: checkpoint \[4, 3\] vs this config \[5, 3\]"):
    ckpt.restore(_template(width=5))
  ckpt.close()
  assert _snapshot(tmp_path) == before


def test_empty_directory_and_non_finite_metrics(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "empty"))
  assert ckpt.restore(_template()) is None
  with pytest.raises(ValueError, match="non-finite metrics"):
    ckpt.save(1, _state(1), metrics={"eval/loss": float("nan")})
  ckpt.close()
  assert checkpoint.Checkpointer(str(tmp_path / "empty")).all_steps() == []
  with pytest.raises(ValueError, match="max_to_keep=0"):
    checkpoint.Checkpointer(str(tmp_path / "x"), max_to_keep=0)
  assert not os.path.exists(tmp_path / "x")


def test_dumps_makes_configs_and_data_states_json():
  text = checkpoint.dumps({"b": b"\x00\xff", "n": np.int64(3), "x": np.float32(0.5),
                           "a": np.arange(2)})
  assert json.loads(text) == {"a": [0, 1], "b": {"__bytes__": "\x00\xff"}, "n": 3, "x": 0.5}


def _fingerprint_oracle(x: np.ndarray) -> int:
  """sum_i bits_i * (((i * 2654435761) mod 2^32) | 1) mod 2^32 with Python integers."""
  x = np.asarray(x)
  bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).ravel()
  return sum(int(b) * (((i * 2654435761) % 2**32) | 1) for i, b in enumerate(bits)) % 2**32


def test_fingerprints_match_the_formula_and_change_with_any_single_bit():
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(3, 5)).astype(np.float32),
          "h": rng.normal(size=(4,)).astype(jnp.bfloat16),
          "n": rng.integers(0, 9, size=(2, 2, 2)).astype(np.int32),
          "s": np.asarray(7, np.uint32)}
  got = checkpoint.fingerprints(jax.tree_util.tree_map(jnp.asarray, tree))
  assert got == {f"['{k}']": _fingerprint_oracle(v) for k, v in tree.items()}
  flipped = tree["w"].copy()
  for index in range(flipped.size):
    for bit in (0, 13, 31):
      flipped.view(np.uint32).ravel()[index] ^= np.uint32(1 << bit)
      assert checkpoint.fingerprints({"w": jnp.asarray(flipped)})["['w']"] != got["['w']"]
      flipped.view(np.uint32).ravel()[index] ^= np.uint32(1 << bit)


def test_fingerprints_do_not_depend_on_the_sharding():
  x = jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * 1e-3
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "fsdp")))
  assert checkpoint.fingerprints({"x": sharded}) == checkpoint.fingerprints({"x": x})
  assert checkpoint.fingerprints({"x": x})["['x']"] == _fingerprint_oracle(np.asarray(x))


def test_a_flipped_bit_is_damage_and_restore_falls_back(tmp_path):
  big = lambda seed: {"w": jnp.asarray(np.random.default_rng(seed).normal(
      size=(64, 64)).astype(np.float32))}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(step, big(step))
  ckpt.close()
  files = [p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x04
  target.write_bytes(bytes(data))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.warns(RuntimeWarning, match="step 2 .* unreadable .*fingerprint mismatch"):
    restored = ckpt.restore({"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)})
  assert restored.step == 1 and ckpt.skipped_steps == [2]
  assert np.array_equal(np.asarray(restored.state["w"]), np.asarray(big(1)["w"]))
  ckpt.close()


def test_a_failure_that_is_not_damage_names_its_cause_and_renames_nothing(tmp_path,
                                                                        monkeypatch):
  _save_steps(tmp_path, [1, 2])
  before = _snapshot(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path))

  def restore(*args, **kwargs):
    raise RuntimeError("Topology mismatch: 8 devices in the checkpoint, 1 here")

  monkeypatch.setattr(ckpt._manager, "restore", restore)  # pylint: disable=protected-access
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match="step 2 .*RuntimeError: Topology mismatch"):
    ckpt.restore(_template())
  assert ckpt.skipped_steps == [] and ckpt.discard_skipped() == []
  ckpt.close()
  assert _snapshot(tmp_path) == before


def test_all_damaged_is_an_error_naming_the_steps(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for path in tmp_path.rglob("*"):
    if path.is_file() and "/d/" in str(path):
      path.write_bytes(b"")
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.warns(RuntimeWarning), pytest.raises(checkpoint.CheckpointRestoreError,
                                                   match=r"no readable checkpoint among steps \[1, 2\]"):
    ckpt.restore(_template())
  ckpt.close()
