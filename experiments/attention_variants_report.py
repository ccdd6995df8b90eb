"""The attention-variants experiment's outputs: results.csv, results.md and results.png."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

import experiment_runs as runs


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The results as a markdown table; the best continuation NLL and decode speed in bold."""
  header = ("| variant | K | init | params | steps | continuation NLL (nats/byte) "
            "| Δ vs mha (paired) | KV cache KiB (measured / formula) | decode tok/s | ms/step |")
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  best_nll = min(r["continuation_nll"] for r in rows)
  speeds = [r["decode_tokens_per_s"] for r in rows if math.isfinite(r["decode_tokens_per_s"])]
  best_speed = max(speeds) if speeds else float("nan")
  bold = lambda text, on: f"**{text}**" if on else text
  for r in rows:
    kv = f"{r['kv_cache_bytes'] / 1024:,.0f} / {r['kv_cache_bytes_formula'] / 1024:,.0f}"
    nll = f"{r['continuation_nll']:.4f} ± {r['continuation_nll_stderr']:.4f}"
    delta = ("—" if r["variant"] == "mha" and r["init"] == "scratch" else
             f"{r['nll_delta_vs_mha']:+.4f} ± {r['nll_delta_stderr']:.4f}")
    speed = f"{r['decode_tokens_per_s']:,.0f}"
    lines.append(
        f"| {r['variant']} | {r['num_kv_heads']} | {r['init']} | {r['params']:,} | "
        f"{r['train_steps']} | {bold(nll, r['continuation_nll'] == best_nll)} | {delta} | "
        f"{kv} | {bold(speed, r['decode_tokens_per_s'] == best_speed)} | "
        f"{r['decode_ms_per_step']:.2f} |")
  return "\n".join(lines)


def write_outputs(rows, columns, config, out_dir: str, *, total_time_s: float,
                  cpu_time_s: float, decode_len: int, prompts_shape) -> None:
  """results.csv (`columns`), results.md and results.png in `out_dir`."""
  runs.write_csv(rows, columns, os.path.join(out_dir, "results.csv"))
  model = config.model
  text = [
      f"# Attention variants: {config.run}",
      "",
      f"Model: `{model.preset}` with {json.dumps(model.overrides.to_dict(), sort_keys=True)}; "
      f"{config.train.steps} steps x {config.data.batch_size} x {config.data.seq_length} bytes "
      f"of the stdlib corpus per variant (same batches, same order, seed {config.seed}).",
      f"Continuation NLL: {config.eval.batches} held-out batches of {config.eval.batch_size} x "
      f"{config.data.seq_length} bytes, second half scored; ± = standard error over batches; "
      "Δ = mean per-batch difference to the mha model on the same batches, ± its standard "
      "error.",
      f"KV cache: batch 1, {decode_len} slots, {model.overrides.get('dtype', 'float32')}."
      f" Decode: greedy, batch {prompts_shape[0]}, {prompts_shape[1]}-byte prompts, "
      f"{config.decode.new_tokens} new tokens (best of {config.decode.repeats} rounds, "
      f"{jax.devices()[0].platform}).",
      f"Uptraining: mean-pooled K/V heads of the mha model, then "
      f"{config.uptrain.fraction:.0%} of its steps at learning rate "
      f"{config.uptrain.learning_rate} on the continuation of its data stream.",
      "",
      markdown_table(rows),
      "",
  ]
  runs.write_results_md(out_dir, text, total_time_s=total_time_s, cpu_time_s=cpu_time_s)
  plot(rows, os.path.join(out_dir, "results.png"))


def plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Three panels: NLL difference to mha per row, KV-cache size and decode speed per K."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

  kinds = {"scratch": ("C0", "from scratch"), "pooled": ("C7", "mean-pooled mha, 0 steps"),
           "uptrained": ("C1", "uptrained from mha")}
  colors = [kinds[_kind(r["init"])][0] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.6, 1, 1]})
  axes[0].bar(range(len(rows)), [r["nll_delta_vs_mha"] for r in rows],
              yerr=[r["nll_delta_stderr"] for r in rows], color=colors, capsize=3)
  axes[0].axhline(0.0, color="k", linewidth=0.8)
  axes[0].set_xticks(range(len(rows)), [f"{r['variant']} (K={r['num_kv_heads']})" for r in rows],
                     rotation=30, ha="right", fontsize=8)
  axes[0].set_ylabel("Δ continuation NLL vs mha (nats / byte)")
  axes[0].set_title("held-out continuation, paired with mha (lower is better)")
  axes[0].legend(handles=[Patch(color=c, label=label) for c, label in kinds.values()],
                 fontsize=8)
  scratch = [r for r in rows if r["init"] == "scratch"]
  names = [f"{r['variant']}\nK={r['num_kv_heads']}" for r in scratch]
  axes[1].bar(range(len(scratch)), [r["kv_cache_bytes"] / 2**20 for r in scratch], color="C2")
  axes[1].set_xticks(range(len(scratch)), names, fontsize=8)
  axes[1].set_ylabel("MiB per sequence")
  axes[1].set_title("KV cache at the decode length")
  axes[2].bar(range(len(scratch)), [r["decode_tokens_per_s"] for r in scratch], color="C3")
  axes[2].set_xticks(range(len(scratch)), names, fontsize=8)
  axes[2].set_ylabel("tokens / s")
  axes[2].set_title("cached greedy decoding at long context")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _kind(init: str) -> str:
  if init == "scratch":
    return "scratch"
  return "uptrained" if init.startswith("uptrained") else "pooled"
