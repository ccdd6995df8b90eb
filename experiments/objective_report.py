"""Outputs of the objective comparison: results.csv, results.md (mean ± std), results.png.

`rows` are the per-(cell, seed) result dicts that `compare_objectives.py` writes, one per
finished cell; everything here is a pure function of them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# (column, header, lower is better) of the readouts, in table order.
READOUTS = (
    ("continuation_nll", "(a) continuation NLL ↓", True),
    ("infill_nll", "(b) infilling NLL, span tokens ↓", True),
    ("infill_nll_with_sentinels", "(b) infilling NLL, all targets ↓", True),
    ("exact_match", "(c) name exact match ↑", False),
    ("name_chrf", "(c) name chrF ↑", False),
    ("name_nll", "(c) name NLL ↓", True),
)
CSV_COLUMNS = ("architecture", "objective", "seed", "params", "train_flops_per_token",
               "train_tokens", "train_steps", "final_train_loss", "continuation_nll",
               "infill_nll", "infill_nll_with_sentinels", "name_nll", "exact_match",
               "name_chrf", "name_rouge_l", "name_bleu", "pretrain_seconds", "cell_seconds")


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """One row per (cell, seed), columns `CSV_COLUMNS`."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow(row)


def aggregate(rows: Sequence[Mapping[str, Any]], cells: Sequence[tuple[str, str]]
              ) -> list[dict[str, Any]]:
  """Per cell in `cells` order: params, FLOPs/token, seeds, and (mean, std) of each readout.

  std is the sample standard deviation (ddof=1) over seeds; 0 with a single seed. Cells
  without rows are left out.
  """
  out = []
  for architecture, objective in cells:
    mine = [r for r in rows if r["architecture"] == architecture and r["objective"] == objective]
    if not mine:
      continue
    entry = {"architecture": architecture, "objective": objective, "seeds": len(mine),
             "params": mine[0]["params"],
             "train_flops_per_token": mine[0]["train_flops_per_token"]}
    for column, _, _ in READOUTS:
      values = np.array([float(r[column]) for r in mine], np.float64)
      std = float(values.std(ddof=1)) if values.size > 1 else 0.0
      entry[column] = (float(values.mean()), std)
    out.append(entry)
  return out


def best_cells(summary: Sequence[Mapping[str, Any]]) -> dict[str, set[int]]:
  """For every readout, the indices of the summary entries with the best mean (ties kept)."""
  best = {}
  for column, _, lower in READOUTS:
    means = [entry[column][0] for entry in summary]
    finite = [m for m in means if math.isfinite(m)]
    if not finite:
      best[column] = set()
      continue
    target = min(finite) if lower else max(finite)
    best[column] = {i for i, m in enumerate(means) if m == target}
  return best


def _fmt(mean: float, std: float, column: str) -> str:
  if not math.isfinite(mean):
    return "—"  # a readout this corpus cannot give (module doc of objective_cells.run_cell)
  if column == "exact_match":
    return f"{100 * mean:.1f} ± {100 * std:.1f}"
  if column == "name_chrf":  # already 0-100
    return f"{mean:.1f} ± {std:.1f}"
  return f"{mean:.3f} ± {std:.3f}"


def markdown_table(summary: Sequence[Mapping[str, Any]]) -> str:
  """The summary as a markdown table; the best mean of each readout is **bold**."""
  best = best_cells(summary)
  header = ["architecture", "objective", "params", "train MFLOPs/token", "seeds"]
  header += [title for _, title, _ in READOUTS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, entry in enumerate(summary):
    cells = [entry["architecture"], entry["objective"], f"{entry['params']:,}",
             f"{entry['train_flops_per_token'] / 1e6:.2f}", str(entry["seeds"])]
    for column, _, _ in READOUTS:
      text = _fmt(*entry[column], column)
      cells.append(f"**{text}**" if i in best[column] else text)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_markdown(summary: Sequence[Mapping[str, Any]], path: str, *, title: str,
                   notes: str) -> None:
  """results.md: a title, the table, and `notes` (what the readouts are, how it was run)."""
  with open(path, "w") as f:
    f.write(f"# {title}\n\n")
    f.write(markdown_table(summary))
    f.write("\n" + notes.strip() + "\n")


def plot(summary: Sequence[Mapping[str, Any]], path: str, *, title: str) -> None:
  """Grouped bars per readout: objectives on the x axis, one bar per architecture, ±std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  objectives = list(dict.fromkeys(e["objective"] for e in summary))
  architectures = list(dict.fromkeys(e["architecture"] for e in summary))
  fig, axes = plt.subplots(1, len(READOUTS), figsize=(3.8 * len(READOUTS), 3.8))
  width = 0.8 / max(len(architectures), 1)
  x = np.arange(len(objectives))
  for ax, (column, label, _) in zip(axes, READOUTS):
    scale = 100.0 if column == "exact_match" else 1.0
    for k, architecture in enumerate(architectures):
      means, stds = [], []
      for objective in objectives:
        hit = [e for e in summary
               if e["architecture"] == architecture and e["objective"] == objective]
        means.append(hit[0][column][0] * scale if hit else np.nan)
        stds.append(hit[0][column][1] * scale if hit else 0.0)
      ax.bar(x + (k - (len(architectures) - 1) / 2) * width, means, width, yerr=stds,
             capsize=2, label=architecture)
    ax.set_xticks(x)
    ax.set_xticklabels(objectives, rotation=20, fontsize=8)
    ax.set_title(label + (" (%)" if column == "exact_match" else ""), fontsize=9)
    finite = [e[column][0] * scale for e in summary if math.isfinite(e[column][0])]
    if finite and "nll" in column:  # NLL bars differ in the last digits: zoom in
      low, high = min(finite), max(finite)
      ax.set_ylim(max(0.0, low - 0.25 * (high - low + 1e-3)), high + 0.25 * (high - low + 1e-3))
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
