"""ViT vs Swin from scratch, MAE pre-training then fine-tuning, and attention cost vs image size.

    python experiments/vision.py --config experiments/configs/vision.py:quick \
        --workdir results/vision [--config.train.steps=800 ...]

Part 1, accuracy (scikit-learn's digits, bilinear-upsampled to `data.image_size`, a stable
80/20 split by a hash of the sample index, no augmentation). Rows, each trained on the same
batches for the same steps and scored on the held-out split, mean ± std over `seeds`:

  vit    ViT classifier from scratch (class token, MAE's fixed 2-D sin-cos positions)
  swin   Swin classifier from scratch (shifted windows, relative-position bias)
  mae    MAE (He et al. 2022) pre-trained on the training images (75% of patches removed,
         pixel loss on the removed ones), then its encoder fine-tuned as the `vit` row's model
         (`mae_to_vit_params`: same names, a fresh zero head) for the same steps

Part 2, attention cost as the image grows (one layer: q/k/v/out projections + attention over a
token grid of side `g`, width C, `scaling.num_heads` heads): ViT's global attention over all g²
tokens vs Swin's attention within M x M windows (`seqlab.attention.window_attention`), by

  * the analytic multiply-adds of the Swin paper (`seqlab.flops.global_attention_macs`,
    `window_attention_macs`: 4g²C² + 2g⁴C vs 4g²C² + 2M²g²C),
  * XLA's own count (`jax.jit(f).lower(...).compile().cost_analysis()["flops"]` / 2: XLA counts
    FLOPs, 2 per multiply-add, plus the softmax's elementwise work) of the same layers written
    without loops (`loop_free_layer_fns`: XLA counts a loop body once, and seqlab's attention
    runs long sequences in blocks under `lax.map`, so its own program is under-counted; the
    table shows that count too),
  * measured time, the best of `scaling.repeats` runs (timeit's rule: slower runs are other
    processes' doing).

Log-log slopes between the two largest grids show quadratic (~2) vs linear (~1) growth in the
token count.

Outputs in `<workdir>/<config.run>/`: results.csv (accuracy, one row per model and seed),
attention_cost.csv, results.md (both tables), accuracy.png, attention_cost.png, config.json, and
train/<row>_seed<k> (train/mae_pretrain_seed<k>) per training: `seqlab.trainer`'s work
directory, checkpoints every `train.checkpoint_every` steps and at the end. A rerun resumes a
killed training there and reads finished ones back; one with another model, optimizer, steps
or data is refused (use another --workdir). With a `distributed` section, launch the same
command on every host (TPU_SETUP.md); process 0 writes the files.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helper modules

import attention_cost as cost_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import experiment_runs as runs  # noqa: E402  pylint: disable=g-import-not-at-top

from seqlab import loop, models
from seqlab import train as train_lib
from seqlab.data import images, sources

MODELS = ("vit", "swin", "mae")
CSV_COLUMNS = ("model", "init", "seed", "params", "pretrain_steps", "train_steps",
               "val_accuracy", "val_nll", "pretrain_val_loss", "train_time_s")
COST_COLUMNS = ("attention", "grid", "image_size", "tokens", "analytic_macs", "xla_flops",
                "xla_macs_ratio", "xla_flops_seqlab", "time_ms")

# ─── MAE -> ViT ──────────────────────────────────────────────────────────────────────────────


def check_mae_vit(mae_cfg, vit_cfg) -> None:
  """ValueError unless a ViT of `vit_cfg` can take the encoder of an MAE of `mae_cfg`."""
  for name in ("image_size", "patch_size", "num_channels", "d_model", "num_layers", "num_heads",
               "d_ff", "layer_norm_eps", "posemb"):
    if getattr(mae_cfg, name) != getattr(vit_cfg, name):
      raise ValueError(f"the MAE encoder and the ViT differ in {name}: "
                       f"{getattr(mae_cfg, name)!r} vs {getattr(vit_cfg, name)!r}")
  if vit_cfg.pool != "cls":
    raise ValueError(f"vit pool={vit_cfg.pool!r}: fine-tuning the MAE encoder needs pool='cls' "
                     "(the encoder was trained with a class token)")


def mae_to_vit_params(mae_params: Mapping[str, Any], vit_params: Mapping[str, Any],
                      ) -> dict[str, Any]:
  """`vit_params` with every encoder parameter replaced by MAE's; the ViT keeps its head.

  The MAE encoder uses a ViT's names (patch_embed, cls_token, block_i, norm); its decoder
  (decoder_*, mask_token) is dropped. ValueError if a ViT parameter has no MAE counterpart of
  the same shape (e.g. a learned position table).
  """
  out = {}
  for name, value in vit_params.items():
    if name == "head":
      out[name] = value
      continue
    if name not in mae_params:
      raise ValueError(f"ViT parameter {name!r} has no counterpart in the MAE encoder "
                       f"(MAE has {sorted(mae_params)})")
    shapes = jax.tree_util.tree_map(np.shape, (value, mae_params[name]))
    if shapes[0] != shapes[1]:
      raise ValueError(f"ViT parameter {name!r} has shapes {shapes[0]}, MAE {shapes[1]}")
    out[name] = mae_params[name]
  return out


# ─── Training and evaluation ─────────────────────────────────────────────────────────────────


def image_batches(config: ml_collections.ConfigDict, split: str, *, seed: int,
                  mae_patch_size: int | None = None, **kwargs) -> Iterator[dict]:
  """Digits batches `{"image", "label"}` (+ MAE's mask when `mae_patch_size` is given)."""
  data = config.data
  source = _digits(split, int(data.image_size), float(data.validation_fraction))
  mask = {} if mae_patch_size is None else {"mae_mask_ratio": float(config.mae.mask_ratio),
                                            "patch_size": mae_patch_size}
  kwargs.setdefault("batch_size", int(data.batch_size))
  return images.make_image_pipeline(source, seed=seed, **mask, **kwargs)


@functools.lru_cache(maxsize=4)
def _digits(split: str, image_size: int, validation_fraction: float) -> sources.DigitsSource:
  return sources.DigitsSource(split, image_size=image_size,
                              validation_fraction=validation_fraction)


@functools.lru_cache(maxsize=None)
def _init_fn(model):
  return jax.jit(lambda key: model.init(key, model.config.dummy_batch(1))["params"])


def init_params(model, seed: int):
  """Fresh parameters of `model` from `jax.random.key(seed)` (one compiled init per model)."""
  return _init_fn(model)(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _eval_fn(model, task_name: str):
  task = train_lib.task_for({"classify": "classifier", "mae": "mae"}[task_name])
  step = train_lib.make_eval_step(task)
  return task, jax.jit(lambda params, batch: step(params, batch, model.apply))


def evaluate(model, params, task_name: str, batches: Sequence[dict]) -> dict[str, float]:
  """`task.summarise` of the summed eval sums over `batches` ("accuracy"/"loss" or "loss")."""
  task, fn = _eval_fn(model, task_name)
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in jax.device_get(fn(params, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return task.summarise(totals)


# ─── The experiment ──────────────────────────────────────────────────────────────────────────


def _ints(text: str | Sequence[int], name: str) -> list[int]:
  values = text.split(",") if isinstance(text, str) else list(text)
  try:
    out = [int(v) for v in values if str(v).strip()]
  except ValueError:
    raise ValueError(f"{name}={text!r} is not a comma-separated list of integers") from None
  if not out:
    raise ValueError(f"{name}={text!r} is empty")
  return out


def validate(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks the config before any training; returns the resolved plan."""
  names = [n.strip() for n in str(config.models).split(",") if n.strip()]
  unknown = [n for n in names if n not in MODELS]
  if unknown or not names:
    raise ValueError(f"models={config.models!r}: unknown model name(s) {unknown}; "
                     f"expected a comma-separated subset of {MODELS}")
  expected = {"vit": "ViTConfig", "swin": "SwinConfig", "mae": "MAEConfig"}
  image_size = int(config.data.image_size)
  cfgs = {}
  for name in [n for n in MODELS if n in names or (n == "vit" and "mae" in names)]:
    section = config[name]
    kind = type(models.get_preset(section.preset)).__name__
    if kind != expected[name]:
      raise ValueError(f"{name}.preset={section.preset!r} is a {kind}, expected a "
                       f"{expected[name]}")
    overrides = {k: tuple(v) if isinstance(v, list) else v  # JSON / CLI lists: hashable
                 for k, v in dict(section.overrides).items()}
    cfg = cfgs[name] = models.get_preset(section.preset, **overrides)
    if cfg.image_size != image_size or cfg.num_channels != 1:
      raise ValueError(f"{name}: image_size={cfg.image_size} / num_channels={cfg.num_channels} "
                       f"do not match the data (data.image_size={image_size}, 1 channel)")
    if name != "mae" and cfg.num_classes != 10:
      raise ValueError(f"{name}: num_classes={cfg.num_classes}, the digits have 10")
  if "mae" in cfgs:
    check_mae_vit(cfgs["mae"], cfgs["vit"])
  seeds = _ints(config.seeds, "seeds")
  scaling = config.scaling
  grids = _ints(scaling.grids, "scaling.grids")
  window, dim, heads = int(scaling.window), int(scaling.dim), int(scaling.num_heads)
  bad = [g for g in grids if g % window]
  if bad or len(grids) < 2:
    raise ValueError(f"scaling.grids={scaling.grids!r} needs two or more grid sides, each a "
                     f"multiple of scaling.window={window} (bad: {bad})")
  if dim % heads:
    raise ValueError(f"scaling.dim={dim} is not a multiple of scaling.num_heads={heads}")
  if int(config.train.steps) < 1:
    raise ValueError(f"train.steps={config.train.steps} must be >= 1")
  if "mae" in names and int(config.mae.pretrain_steps) < 1:
    raise ValueError(f"mae.pretrain_steps={config.mae.pretrain_steps} must be >= 1")
  return {"models": names, "configs": cfgs, "seeds": seeds, "grids": sorted(grids)}


def run(config: ml_collections.ConfigDict, out_dir: str) -> dict[str, Any]:
  """Runs both parts of `config`, writes the outputs to `out_dir`; returns the rows."""
  plan = validate(config)
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  started, cpu_started = time.perf_counter(), time.process_time()
  steps = int(config.train.steps)
  val_batches = list(image_batches(config, "validation", seed=0, num_epochs=1, shuffle=False))

  def train(name, cfg, seed, optimizer, steps, params=None, mae_patch_size=None):
    """{"params" (on the host), "time_s"} of one training in train/<name>_seed<seed>."""
    start = time.perf_counter()
    batches = image_batches(config, "train", seed=seed, mae_patch_size=mae_patch_size,
                            **runs.process_rows(int(config.data.batch_size)))
    optimizer = train_lib.OptimizerConfig(**{**optimizer.to_dict(), "total_steps": steps})
    inputs = {"seed": seed, "data": config.data.to_dict()}
    if mae_patch_size is not None:
      inputs["mae_mask_ratio"] = float(config.mae.mask_ratio)
    result = runs.train(cfg, optimizer, jax.random.key(seed), batches, config, steps=steps,
                        workdir=os.path.join(out_dir, "train", f"{name}_seed{seed}"),
                        inputs=inputs, params=params, label=name)
    return {"params": runs.host_params(result.state.params),
            "time_s": time.perf_counter() - start}

  rows = []
  for seed in plan["seeds"]:
    for name in plan["models"]:
      cfg = plan["configs"]["vit" if name == "mae" else name]
      params, pretrain_steps, pretrain_loss = None, 0, float("nan")
      if name == "mae":
        mae_cfg = plan["configs"]["mae"]
        runs.log(f"[mae pre-training, seed {seed}] params={models.num_params(mae_cfg):,}")
        pretrain_steps = int(config.mae.pretrain_steps)
        result = train("mae_pretrain", mae_cfg, seed, config.mae.optimizer, pretrain_steps,
                       mae_patch_size=mae_cfg.patch_size)
        mae_val = list(image_batches(config, "validation", seed=0, num_epochs=1, shuffle=False,
                                     mae_patch_size=mae_cfg.patch_size))
        pretrain_loss = evaluate(mae_cfg.build(), result["params"], "mae", mae_val)["loss"]
        params = mae_to_vit_params(result["params"], init_params(cfg.build(), seed))
      runs.log(f"[{name}, seed {seed}] params={models.num_params(cfg):,}")
      result = train(name, cfg, seed, config.optimizer, steps, params=params)
      scores = evaluate(cfg.build(), result["params"], "classify", val_batches)
      rows.append({"model": "vit" if name == "mae" else name,
                   "init": "mae pre-trained" if name == "mae" else "scratch", "seed": seed,
                   "params": models.num_params(cfg), "pretrain_steps": pretrain_steps,
                   "train_steps": steps, "val_accuracy": scores["accuracy"],
                   "val_nll": scores["loss"], "pretrain_val_loss": pretrain_loss,
                   "train_time_s": result["time_s"]})
      runs.log(f"[{name}, seed {seed}] val accuracy {scores['accuracy']:.4f}")

  scaling = config.scaling
  runs.log("attention cost vs image size")
  cost = cost_lib.attention_cost(plan["grids"], dim=int(scaling.dim),
                                 num_heads=int(scaling.num_heads), window=int(scaling.window),
                                 patch_size=int(scaling.patch_size),
                                 repeats=int(scaling.repeats))
  if is_writer:
    write_outputs(rows, cost, config, out_dir, total_time_s=time.perf_counter() - started,
                  cpu_time_s=time.process_time() - cpu_started, num_val=sum(
                      len(b["label"]) for b in val_batches))
    runs.log(f"wrote {out_dir}")
  return {"accuracy": rows, "cost": cost}



# ─── Outputs ─────────────────────────────────────────────────────────────────────────────────


def accuracy_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One entry per (model, init): mean and std over seeds of accuracy and NLL."""
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault((row["model"], row["init"]), []).append(row)
  out = []
  for (model, init), group in groups.items():
    acc = np.array([r["val_accuracy"] for r in group])
    nll = np.array([r["val_nll"] for r in group])
    out.append({"model": model, "init": init, "params": group[0]["params"],
                "pretrain_steps": group[0]["pretrain_steps"],
                "train_steps": group[0]["train_steps"], "seeds": len(group),
                "accuracy": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1))
                if len(acc) > 1 else 0.0, "nll": float(nll.mean()),
                "pretrain_val_loss": float(np.mean([r["pretrain_val_loss"] for r in group])),
                "train_time_s": float(np.mean([r["train_time_s"] for r in group]))})
  return out


def markdown_tables(rows, cost) -> str:
  """The accuracy table (best mean accuracy in bold) and the attention-cost table."""
  summary = accuracy_summary(rows)
  best = max(s["accuracy"] for s in summary)
  lines = ["| model | init | params | pre-train steps | train steps | seeds | val accuracy "
           "| val NLL | MAE val loss | train s |", "|---" * 10 + "|"]
  for s in summary:
    acc = f"{100 * s['accuracy']:.2f} ± {100 * s['accuracy_std']:.2f} %"
    acc = f"**{acc}**" if s["accuracy"] == best else acc
    mae = "" if math.isnan(s["pretrain_val_loss"]) else f"{s['pretrain_val_loss']:.4f}"
    lines.append(f"| {s['model']} | {s['init']} | {s['params']:,} | {s['pretrain_steps']} | "
                 f"{s['train_steps']} | {s['seeds']} | {acc} | {s['nll']:.4f} | {mae} | "
                 f"{s['train_time_s']:.0f} |")
  lines += ["", "| attention | image | tokens | analytic MACs | XLA FLOPs / 2 | ratio "
            "| XLA FLOPs / 2, seqlab program | time (ms) |", "|---" * 8 + "|"]
  for r in cost:
    lines.append(f"| {r['attention']} | {r['image_size']}² | {r['tokens']:,} | "
                 f"{r['analytic_macs']:,} | {r['xla_flops'] / 2:,.0f} | "
                 f"{r['xla_macs_ratio']:.3f} | {r['xla_flops_seqlab'] / 2:,.0f} | "
                 f"{r['time_ms']:.3f} |")
  slopes = cost_lib.cost_slopes(cost)
  lines += ["", "Log-log slope vs tokens over the two largest grids "
            "(2 = quadratic, 1 = linear):", "",
            "| attention | analytic | XLA | time |", "|---|---|---|---|"]
  for kind, s in slopes.items():
    lines.append(f"| {kind} | {s['analytic']:.2f} | {s['xla']:.2f} | {s['time']:.2f} |")
  return "\n".join(lines)


def write_outputs(rows, cost, config, out_dir: str, *, total_time_s: float, cpu_time_s: float,
                  num_val: int) -> None:
  runs.write_csv(rows, CSV_COLUMNS, os.path.join(out_dir, "results.csv"))
  runs.write_csv(cost, COST_COLUMNS, os.path.join(out_dir, "attention_cost.csv"))
  scaling = config.scaling
  text = [
      f"# Vision: {config.run}",
      "",
      f"Digits at {config.data.image_size}x{config.data.image_size} (1 channel), batch "
      f"{config.data.batch_size}, {config.train.steps} classification steps per model; "
      f"{num_val} held-out images; mean ± std over seeds {config.seeds}. MAE: "
      f"{config.mae.pretrain_steps} pre-training steps at mask ratio {config.mae.mask_ratio} on "
      "the training images, then the same fine-tuning as the scratch ViT.",
      f"Models: vit = `{config.vit.preset}` {dict(config.vit.overrides)}, swin = "
      f"`{config.swin.preset}` {dict(config.swin.overrides)}, mae = `{config.mae.preset}` "
      f"{dict(config.mae.overrides)}.",
      "",
      f"Attention cost: one layer (projections + attention), width {scaling.dim}, "
      f"{scaling.num_heads} heads, Swin window {scaling.window}, patch {scaling.patch_size}, "
      f"batch 1, float32, {jax.devices()[0].platform}; time = best of {scaling.repeats} runs "
      "of seqlab's `dot_product_attention` / `window_attention`. XLA FLOPs: the same layers "
      "written without loops; XLA's cost analysis counts a loop body once, so the program of "
      "seqlab's functions, which processes long sequences in blocks under `lax.map`, is "
      "under-counted there (last XLA column).",
      "",
      markdown_tables(rows, cost),
      "",
  ]
  runs.write_results_md(out_dir, text, total_time_s=total_time_s, cpu_time_s=cpu_time_s)
  plot_accuracy(rows, os.path.join(out_dir, "accuracy.png"))
  plot_cost(cost, os.path.join(out_dir, "attention_cost.png"))


def plot_accuracy(rows, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = accuracy_summary(rows)
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  labels = [f"{s['model']}\n{s['init']}" for s in summary]
  ax.bar(range(len(summary)), [100 * s["accuracy"] for s in summary],
         yerr=[100 * s["accuracy_std"] for s in summary], capsize=4,
         color=["C0", "C2", "C1", "C3"][:len(summary)])
  for i, row in enumerate(summary):
    seeds = [100 * r["val_accuracy"] for r in rows
             if (r["model"], r["init"]) == (row["model"], row["init"])]
    ax.plot([i] * len(seeds), seeds, "k.", markersize=4)
  lowest = min(100 * r["val_accuracy"] for r in rows)
  ax.set_ylim(max(0.0, lowest - 5), 100)
  ax.set_xticks(range(len(summary)), labels, fontsize=8)
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_title("digits: from scratch vs MAE pre-trained")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_cost(cost, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  slopes = cost_lib.cost_slopes(cost)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  panels = (("analytic_macs", "analytic", "multiply-adds (Swin eq. 1 / 2)", 1.0),
            ("xla_flops", "xla", "XLA cost analysis (FLOPs / 2)", 0.5),
            ("time_ms", "time", "measured time (ms, best of n)", 1.0))
  for ax, (column, slope_key, title, scale) in zip(axes, panels):
    for kind, label, color in (("global", "ViT global", "C3"), ("window", "Swin window", "C0")):
      mine = sorted((r for r in cost if r["attention"] == kind), key=lambda r: r["tokens"])
      ax.loglog([r["tokens"] for r in mine], [scale * r[column] for r in mine], "o-",
                color=color, label=f"{label} (slope {slopes[kind][slope_key]:.2f})")
      if column == "xla_flops" and kind == "global":
        ax.loglog([r["tokens"] for r in mine], [scale * r["xla_flops_seqlab"] for r in mine],
                  "x--", color=color, alpha=0.6,
                  label="ViT global, seqlab's blocked program\n(XLA counts its loop once)")
    ax.set_xlabel("tokens (h x w)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ─── Command line ────────────────────────────────────────────────────────────────────────────


def main(argv: Sequence[str] | None = None) -> int:
  config, out_dir = runs.parse_command_line(__doc__.split("\n")[0], argv)
  loop.join_processes(config)
  result = run(config, out_dir)
  print(markdown_tables(result["accuracy"], result["cost"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
