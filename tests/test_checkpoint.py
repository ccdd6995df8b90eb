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
