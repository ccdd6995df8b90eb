"""experiments/vision.py (MAE -> ViT transfer, evaluation, a smoke run) and its attention-cost
pieces (experiments/attention_cost.py)."""

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
from seqlab import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "configs" / "vision.py")


vision = _helpers.load_script("experiments/vision.py", "experiments_vision")
cost = _helpers.load_script("experiments/attention_cost.py", "experiments_attention_cost")

# ─── MAE -> ViT ──────────────────────────────────────────────────────────────────────────────

_SMALL = dict(d_model=16, num_layers=1, num_heads=2, d_ff=32)


def test_mae_encoder_transfers_exactly_to_vit():
  """ViT.encode with the MAE's weights = MAE.encode with every patch kept, in order."""
  mae_cfg = models.get_preset("mae-tiny", **_SMALL)
  vit_cfg = models.get_preset("vit-tiny-digits", posemb="sincos2d", **_SMALL)
  vision.check_mae_vit(mae_cfg, vit_cfg)
  mae, vit = mae_cfg.build(), vit_cfg.build()
  mae_params = vision.init_params(mae, 0)
  vit_params = vision.init_params(vit, 1)
  params = vision.mae_to_vit_params(mae_params, vit_params)
  np.testing.assert_array_equal(params["head"]["kernel"], vit_params["head"]["kernel"])
  image = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 1)), jnp.float32)
  keep_all = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  want = jax.jit(lambda p, x, ids: mae.apply({"params": p}, x, ids, method="encode"))(
      mae_params, image, keep_all)
  got = jax.jit(lambda p, x: vit.apply({"params": p}, x, method="encode"))(params, image)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mae_to_vit_rejects_mismatches():
  mae_cfg = models.get_preset("mae-tiny", **_SMALL)
  with pytest.raises(ValueError, match="differ in posemb"):
    vision.check_mae_vit(mae_cfg, models.get_preset("vit-tiny-digits", **_SMALL))
  with pytest.raises(ValueError, match="differ in d_model"):
    vision.check_mae_vit(mae_cfg, models.get_preset(
        "vit-tiny-digits", posemb="sincos2d", **{**_SMALL, "d_model": 32}))
  with pytest.raises(ValueError, match="pool='cls'"):
    vision.check_mae_vit(mae_cfg, models.get_preset("vit-tiny-digits", posemb="sincos2d",
                                                    pool="mean", **_SMALL))
  learned = models.get_preset("vit-tiny-digits", **_SMALL)  # has a pos_embedding parameter
  mae_params = jax.tree_util.tree_map(np.zeros_like, models.param_shapes(mae_cfg))
  vit_params = jax.tree_util.tree_map(np.zeros_like, models.param_shapes(learned))
  with pytest.raises(ValueError, match="'pos_embedding' has no counterpart"):
    vision.mae_to_vit_params(mae_params, vit_params)


# ─── Attention cost ──────────────────────────────────────────────────────────────────────────


def _numpy_attention(x_TC, w, allowed_TT):
  """float64 reference: projections, softmax over allowed keys, output projection."""
  x = np.asarray(x_TC, np.float64)
  q, k, v = (np.einsum("tc,cnd->ntd", x, np.asarray(w[n], np.float64)) for n in "qkv")
  logits = np.einsum("ntd,nsd->nts", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(allowed_TT[None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("nts,nsd->ntd", probs, v)
  return np.einsum("ntd,ndc->tc", out, np.asarray(w["o"], np.float64))


def test_attention_layers_match_numpy():
  grid, dim, heads, window = 4, 8, 2, 2
  rng = np.random.default_rng(0)
  w = {n: jnp.asarray(rng.normal(size=(dim, heads, dim // heads)), jnp.float32) for n in "qkv"}
  w["o"] = jnp.asarray(rng.normal(size=(heads, dim // heads, dim)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(1, grid, grid, dim)), jnp.float32)
  fns = cost.attention_layer_fns(heads, window)
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  same_window = ((rows[:, None] // window == rows[None, :] // window)
                 & (cols[:, None] // window == cols[None, :] // window))
  x_TC = np.asarray(x).reshape(grid * grid, dim)
  want_global = _numpy_attention(x_TC, w, np.ones((16, 16), bool)).reshape(x.shape)
  want_window = _numpy_attention(x_TC, w, same_window).reshape(x.shape)
  loop_free = cost.loop_free_layer_fns(heads, window)
  for layers in (fns, loop_free):
    np.testing.assert_allclose(layers["global"](x, w), want_global, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layers["window"](x, w), want_window, rtol=1e-4, atol=1e-4)
  # One window covering the grid is global attention.
  whole = cost.attention_layer_fns(heads, grid)["window"](x, w)
  np.testing.assert_allclose(whole, want_global, rtol=1e-4, atol=1e-4)


def test_analytic_macs_hand_numbers():
  # g = 2 (4 tokens), C = 4: projections 4·4·16 = 256; global scores + values 2·16·4 = 128;
  # windows of 1x1: 2·1·4·4 = 32.
  assert cost.analytic_macs("global", 2, 4, 1) == 384
  assert cost.analytic_macs("window", 2, 4, 1) == 288
  assert cost.analytic_macs("window", 2, 4, 2) == cost.analytic_macs("global", 2, 4, 2)


def test_xla_flops_of_a_matmul():
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  compiled = cost.compile_fn(lambda x, y: x @ y, a, b)
  assert cost.xla_flops(compiled) == 2 * 8 * 16 * 4
  assert cost.best_time(compiled, a, b, repeats=2) > 0


def test_loglog_slope():
  x = [16, 64, 256, 1024]
  assert cost.loglog_slope(x, [3 * t * t for t in x]) == pytest.approx(2.0)
  assert cost.loglog_slope(x, [5 * t for t in x]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="two or more"):
    cost.loglog_slope([1], [1])


def test_evaluate_matches_numpy_accuracy():
  cfg = models.get_preset("vit-tiny-digits", **_SMALL)
  model = cfg.build()
  params = vision.init_params(model, 0)
  rng = np.random.default_rng(3)
  batches = [{"image": rng.random((5, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, 10, 5).astype(np.int32)} for _ in range(2)]
  # A non-zero head, so that predictions differ between images.
  params = {**params, "head": {"kernel": jnp.asarray(rng.normal(size=(16, 10)), jnp.float32),
                               "bias": jnp.zeros((10,), jnp.float32)}}
  got = vision.evaluate(model, params, "classify", batches)
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
  logits = [np.asarray(forward(params, b), np.float64) for b in batches]
  labels = np.concatenate([b["label"] for b in batches])
  logits = np.concatenate(logits)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels))
  assert got["loss"] == pytest.approx(-np.mean(log_p[np.arange(10), labels]), rel=1e-5)


# ─── The experiment ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("override,message", [
    ("--config.models=vit,resnet", "unknown model name"),
    ("--config.scaling.grids=8,12", "multiple of scaling.window"),
    ("--config.scaling.grids=8", "two or more"),
    ("--config.vit.overrides.d_model=32", "differ in d_model"),
    ("--config.swin.preset=vit-tiny-digits", "expected a SwinConfig"),
    ("--config.vit.overrides.patch_size=5", "not a multiple of patch_size=5"),
    ("--config.data.image_size=64", "do not match the data"),
    ("--config.seeds=0,x", "comma-separated list of integers"),
])
def test_bad_config_fails_before_training(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    vision.main(["--config", CONFIG + ":quick", "--workdir", str(tmp_path), override])
  assert not (tmp_path / "quick").exists()  # nothing written, nothing trained


def test_smoke_run_writes_well_formed_outputs_and_a_rerun_retrains_nothing(tmp_path,
                                                                           monkeypatch):
  argv = ["--config", CONFIG + ":smoke", "--workdir", str(tmp_path)]
  assert vision.main(argv) == 0
  out = tmp_path / "smoke"
  config = config_lib.load_config(CONFIG + ":smoke")

  with open(out / "results.csv") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == vision.CSV_COLUMNS
    rows = list(reader)
  assert [(r["model"], r["init"]) for r in rows] == [
      ("vit", "scratch"), ("swin", "scratch"), ("vit", "mae pre-trained")]
  for r in rows:
    assert 0.0 <= float(r["val_accuracy"]) <= 1.0
    assert math.isfinite(float(r["val_nll"])) and int(r["params"]) > 0
  assert int(rows[2]["pretrain_steps"]) == config.mae.pretrain_steps
  assert math.isfinite(float(rows[2]["pretrain_val_loss"]))

  with open(out / "attention_cost.csv") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == vision.COST_COLUMNS
    cost = list(reader)
  assert [(r["attention"], int(r["grid"])) for r in cost] == [
      ("global", 4), ("window", 4), ("global", 8), ("window", 8)]
  for r in cost:
    assert float(r["time_ms"]) > 0 and float(r["xla_flops_seqlab"]) > 0
    # XLA's count = the multiply-adds of the formula, plus a little softmax work.
    assert 1.0 <= float(r["xla_macs_ratio"]) < 1.3, r
  assert int(cost[0]["analytic_macs"]) == int(cost[1]["analytic_macs"])  # one window = global

  markdown = (out / "results.md").read_text()
  tables = [[line for line in block.splitlines() if line.startswith("|")]
            for block in markdown.split("\n\n")]
  tables = [t for t in tables if t]
  assert [len(t) for t in tables] == [2 + 3, 2 + 4, 2 + 2]
  for table in tables:
    assert all(line.count("|") == table[0].count("|") for line in table)

  for name in ("accuracy.png", "attention_cost.png"):
    png = (out / name).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

  with open(out / "config.json") as f:
    saved = ml_collections.ConfigDict(json.load(f))
  assert json.loads(saved.to_json(sort_keys=True)) == json.loads(config.to_json(sort_keys=True))

  # Every training has its engine work directory; a rerun reads each back at its last step
  # (nothing is trained again) and gives the same accuracies.
  assert sorted(p.name for p in (out / "train").iterdir()) == [
      "mae_pretrain_seed0", "mae_seed0", "swin_seed0", "vit_seed0"]
  runs = _helpers.spy_on_trainings(monkeypatch)
  assert vision.main(argv) == 0
  assert len(runs) == 4 and all(r.start_step == r.step for r in runs)
  with open(out / "results.csv") as f:
    again = list(csv.DictReader(f))
  assert [{k: v for k, v in r.items() if k != "train_time_s"} for r in again] == [
      {k: v for k, v in r.items() if k != "train_time_s"} for r in rows]
