"""experiments/attention_variants.py: variant names, K/V mean-pooling, readouts, a smoke run."""

import csv
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import _helpers

from seqlab import config as config_lib
from seqlab import decoding, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "configs" / "attention_variants.py")


av = _helpers.load_script("experiments/attention_variants.py", "experiments_attention_variants")
decode_cost = _helpers.load_script("experiments/decode_cost.py", "experiments_decode_cost")

def _tiny(num_kv_heads: int, **kw):
  fields = dict(vocab_size=512, d_model=32, num_heads=8, num_kv_heads=num_kv_heads, head_dim=4,
                d_ff=64, num_layers=2, position_embedding="rope", dropout_rate=0.0)
  fields.update(kw)
  return models.get_preset("gpt-tiny", **fields)


# ─── Variant names ───────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name,num_heads,expected", [
    ("mha", 16, 16), ("mqa", 16, 1), ("gqa_n4", 16, 4), ("gqa_n8", 16, 2), ("gqa_k2", 16, 2),
    ("gqa_n8", 8, 1), ("gqa_k8", 8, 8)])
def test_num_kv_heads_for(name, num_heads, expected):
  assert av.num_kv_heads_for(name, num_heads) == expected


@pytest.mark.parametrize("name,num_heads,message", [
    ("gqa", 16, "unknown variant"), ("MHA", 16, "unknown variant"), ("gqa_n3", 16, "divisible"),
    ("gqa_n32", 16, "divisible"), ("gqa_k3", 16, "multiple"), ("gqa_k0", 16, "multiple")])
def test_num_kv_heads_for_rejects(name, num_heads, message):
  with pytest.raises(ValueError, match=message):
    av.num_kv_heads_for(name, num_heads)


def test_resolve_variants():
  assert av.resolve_variants("mha, gqa_n4,gqa_n8 ,mqa", 16) == {
      "mha": 16, "gqa_n4": 4, "gqa_n8": 2, "mqa": 1}
  with pytest.raises(ValueError, match="both give num_kv_heads=1"):
    av.resolve_variants("mha,gqa_n8,mqa", 8)     # N = 8: N/8 is MQA
  with pytest.raises(ValueError, match="listed twice"):
    av.resolve_variants("mha,mha", 8)
  with pytest.raises(ValueError, match="names no variant"):
    av.resolve_variants(" , ", 8)


# ─── Uptraining conversion ───────────────────────────────────────────────────────────────────


_INITS = {}


def _random_params(cfg, seed=0):
  if cfg not in _INITS:  # one compiled init per config
    _INITS[cfg] = jax.jit(lambda key: cfg.build().init(key, cfg.dummy_batch(1))["params"])
  return _INITS[cfg](jax.random.key(seed))


def test_mean_pool_matches_numpy_group_means():
  params = _random_params(_tiny(8))
  pooled = av.mean_pool_kv_heads(params, 2)
  for layer in ("blocks_0", "blocks_1"):
    for proj in ("key", "value"):
      kernel = np.asarray(params[layer]["self_attention"][proj]["kernel"], np.float64)  # [D,8,H]
      bias = np.asarray(params[layer]["self_attention"][proj]["bias"], np.float64)      # [8,H]
      want_kernel = np.stack([kernel[:, 0:4].mean(axis=1), kernel[:, 4:8].mean(axis=1)], axis=1)
      want_bias = np.stack([bias[0:4].mean(axis=0), bias[4:8].mean(axis=0)], axis=0)
      got = pooled[layer]["self_attention"][proj]
      np.testing.assert_allclose(got["kernel"], want_kernel, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(got["bias"], want_bias, rtol=1e-6, atol=1e-7)
    for name in ("query", "out"):  # untouched
      np.testing.assert_array_equal(pooled[layer]["self_attention"][name]["kernel"],
                                    params[layer]["self_attention"][name]["kernel"])
  np.testing.assert_array_equal(pooled["token_embed"]["embedding"],
                                params["token_embed"]["embedding"])


def test_mean_pool_of_identical_group_heads_gives_the_same_model():
  """If the kv heads of each group are equal, MHA and the pooled GQA compute the same function."""
  mha, gqa = _tiny(8), _tiny(2)
  params = jax.tree_util.tree_map(np.asarray, _random_params(mha, seed=1))
  for layer in ("blocks_0", "blocks_1"):
    for proj in ("key", "value"):
      p = params[layer]["self_attention"][proj]
      p["kernel"] = np.repeat(p["kernel"][:, ::4], 4, axis=1)  # heads 0-3 = head 0, 4-7 = head 4
      p["bias"] = np.repeat(p["bias"][::4] + 0.1, 4, axis=0)
  pooled = av.mean_pool_kv_heads(params, 2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 12)), jnp.int32)
  batch = {"decoder_input_tokens": tokens}
  want = jax.jit(mha.build().apply)({"params": params}, batch)
  got = jax.jit(gqa.build().apply)({"params": pooled}, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # And the converted tree has exactly the GQA model's shapes.
  assert jax.tree_util.tree_map(np.shape, pooled) == jax.tree_util.tree_map(
      lambda s: tuple(s.shape), models.param_shapes(gqa))


def test_mean_pool_rejects_indivisible():
  params = _random_params(_tiny(8))
  with pytest.raises(ValueError, match="not a multiple of 3"):
    av.mean_pool_kv_heads(params, 3)
  with pytest.raises(ValueError, match="positive integer"):
    av.mean_pool_kv_heads(params, 0)


# ─── Readouts ────────────────────────────────────────────────────────────────────────────────


def test_continuation_weights_hand_matrix():
  weights = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
  got = av.continuation_weights({"decoder_loss_weights": weights})
  np.testing.assert_array_equal(got, [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]])


def test_continuation_nll_matches_numpy_float64():
  cfg = _tiny(2)
  model = cfg.build()
  params = _random_params(cfg, seed=2)
  rng = np.random.default_rng(1)
  batches = []
  for _ in range(3):
    targets = rng.integers(3, 259, (2, 8)).astype(np.int32)
    inputs = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], axis=1)
    batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
             "decoder_loss_weights": np.ones((2, 8), np.int32)}
    batch["continuation_weights"] = av.continuation_weights(batch)
    batches.append(batch)
  got = av.continuation_nll(model, params, batches)
  forward = jax.jit(model.apply)
  per_batch = []
  for batch in batches:
    logits = np.asarray(forward({"params": params}, batch), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    per_batch.append(nll[:, 4:].mean())  # positions 4..7 of 8: the continuation
  np.testing.assert_allclose(got["per_batch"], per_batch, rtol=1e-5)
  assert got["nll"] == pytest.approx(np.mean(per_batch), rel=1e-5)
  assert got["tokens"] == 3 * 2 * 4
  assert got["stderr"] == pytest.approx(np.std(per_batch, ddof=1) / math.sqrt(3), rel=1e-4)


def test_paired_difference_hand_numbers():
  mean, stderr = av.paired_difference(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.5, 2.0]))
  assert mean == pytest.approx(2.0 / 3.0)
  assert stderr == pytest.approx(math.sqrt(1.0 / 12.0) / math.sqrt(3.0))  # std([.5,.5,1]) ddof 1


def test_kv_cache_bytes_hand_number():
  cfg = _tiny(2)
  model = cfg.build()
  measured, formula = decode_cost.kv_cache_bytes(model, _random_params(cfg), batch_size=3, length=10)
  want = 2 * 2 * 10 * 2 * 4 * 4 * 3   # k and v, layers, slots, K, head_dim, float32, batch
  assert measured == formula == want


def test_greedy_steps_match_generate():
  cfg = _tiny(2)
  model = cfg.build()
  params = _random_params(cfg, seed=3)
  prompts = np.random.default_rng(2).integers(3, 259, (2, 5)).astype(np.int32)
  new_tokens = 6
  cache, first = decode_cost.prefill(model, params, jnp.asarray(prompts), cache_length=5 + new_tokens)
  _, rest = decode_cost.greedy_steps(model, params, cache, first, steps=new_tokens - 1)
  got = np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], axis=1)
  want = decoding.generate(model, params, prompts, max_new_tokens=new_tokens, eos_id=None).tokens
  np.testing.assert_array_equal(got, want)


# ─── The experiment ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("override,message", [
    ("--config.variants=mha,gqa,mqa", "unknown variant='gqa'"),
    ("--config.variants=mha,gqa_n3", "not divisible by 3"),
    ("--config.model.overrides.num_heads=6", "num_heads=6 is not divisible by 4"),
    ("--config.uptrain.variants=mha", "nothing to pool"),
    ("--config.variants=gqa_n4,mqa", "needs 'mha'"),
    ("--config.variants=mha,mqa", "'gqa_n4' \\(num_kv_heads=4\\) has no from-scratch"),
    ("--config.model.preset=t5-tiny", "not a decoder-only model"),
])
def test_bad_config_fails_before_training(tmp_path, override, message):
  argv = ["--config", CONFIG + ":quick", "--workdir", str(tmp_path), override]
  with pytest.raises(ValueError, match=message):
    av.main(argv)
  assert not (tmp_path / "quick").exists()  # nothing written, nothing trained


def test_smoke_run_writes_well_formed_outputs_and_a_rerun_retrains_nothing(tmp_path,
                                                                           monkeypatch):
  argv = ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path)]
  assert av.main(argv) == 0
  out = tmp_path / "smoke"
  config = config_lib.load_config(CONFIG + ":smoke")

  with open(out / "results.csv") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == av.CSV_COLUMNS
    rows = list(reader)
  assert [(r["variant"], r["init"].split(" ")[0]) for r in rows] == [
      ("mha", "scratch"), ("mqa", "scratch"), ("mqa", "mean-pooled"), ("mqa", "uptrained")]
  heads = {r["variant"]: int(r["num_kv_heads"]) for r in rows}
  assert heads == {"mha": 8, "mqa": 1}
  steps = int(config.train.steps)
  assert [int(r["train_steps"]) for r in rows] == [steps, steps, steps, steps + 1]  # 5% of 20
  for r in rows:
    for column in ("continuation_nll", "bits_per_byte", "decode_tokens_per_s",
                   "decode_ms_per_step", "kv_cache_bytes"):
      assert math.isfinite(float(r[column])) and float(r[column]) > 0, (column, r)
    assert float(r["continuation_nll"]) < math.log(512) + 1.0  # not worse than ~uniform
    assert r["kv_cache_bytes"] == r["kv_cache_bytes_formula"]
  kv = {r["variant"]: int(r["kv_cache_bytes"]) for r in rows}
  assert kv["mha"] == 8 * kv["mqa"]
  assert float(rows[0]["nll_delta_vs_mha"]) == 0.0

  markdown = (out / "results.md").read_text()
  table = [line for line in markdown.splitlines() if line.startswith("|")]
  assert len(table) == 2 + len(rows)
  assert all(line.count("|") == table[0].count("|") for line in table)

  png = (out / "results.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

  with open(out / "config.json") as f:
    saved = ml_collections.ConfigDict(json.load(f))
  assert json.loads(saved.to_json(sort_keys=True)) == json.loads(config.to_json(sort_keys=True))

  # Every training has its engine work directory; a rerun reads each back at its last step
  # (nothing is trained again) and gives the same numbers, all but the timings.
  assert sorted(p.name for p in (out / "train").iterdir()) == ["mha", "mqa", "mqa_uptrain"]
  runs = _helpers.spy_on_trainings(monkeypatch)
  assert av.main(argv) == 0
  assert len(runs) == 3 and all(r.start_step == r.step for r in runs)
  with open(out / "results.csv") as f:
    again = list(csv.DictReader(f))
  timings = ("train_time_s", "decode_tokens_per_s", "decode_ms_per_step")
  assert [{k: v for k, v in r.items() if k not in timings} for r in again] == [
      {k: v for k, v in r.items() if k not in timings} for r in rows]
  # Another optimizer in the same work directory is refused, not resumed.
  with pytest.raises(ValueError, match="optimizer.learning_rate"):
    av.main(argv + ["--config.optimizer.learning_rate=0.01"])
