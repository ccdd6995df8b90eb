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
from scipy import stats

# (column, header, lower is better) of the readouts, in table order.
READOUTS = (
    ("continuation_nll", "(a) continuation NLL ↓", True),
    ("infill_nll", "(b) infilling NLL, span tokens ↓", True),
    ("infill_nll_with_sentinels", "(b) infilling NLL, all targets ↓", True),
    ("exact_match", "(c) name exact match ↑", False),
    ("name_chrf", "(c) name chrF ↑", False),
    ("name_nll", "(c) name NLL ↓", True),
    ("zero_shot_acc", "(d) zero-shot acc ↑", False),
    ("few_shot_acc", "(d) few-shot acc ↑", False),
    ("multitask_acc", "(e) multitask zero-shot acc ↑", False),
)
ACCURACIES = ("exact_match", "zero_shot_acc", "few_shot_acc", "multitask_acc")  # shown in %
CSV_COLUMNS = ("architecture", "objective", "seed", "params", "train_flops_per_token",
               "train_tokens", "train_steps", "final_train_loss", "continuation_nll",
               "infill_nll", "infill_nll_with_sentinels", "name_nll", "exact_match",
               "name_chrf", "name_rouge_l", "name_bleu", "zero_shot_acc", "few_shot_acc",
               "multitask_acc", "suite_chance", "suite_majority", "pretrain_seconds",
               "cell_seconds")


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
  without rows are left out; a readout a row lacks is NaN.
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
      values = np.array([float(r.get(column, math.nan)) for r in mine], np.float64)
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
  if column in ACCURACIES:
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


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """(mean, half-width of the two-sided Student-t interval) over seeds; NaN width for one."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float(values.mean()), math.nan
  sem = values.std(ddof=1) / math.sqrt(values.size)
  return float(values.mean()), float(stats.t.ppf(0.5 + level / 2, values.size - 1) * sem)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
  """Two-sided p-value of Welch's t-test between two cells' per-seed values (NaN when it is
  undefined: fewer than two seeds, or no spread in either cell)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if min(a.size, b.size) < 2 or (a.std() == 0 and b.std() == 0):
    return math.nan
  return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def above_chance_p(values: Sequence[float], chance: float) -> float:
  """One-sided p-value of a one-sample t-test that the mean over seeds exceeds `chance`."""
  values = np.asarray(values, np.float64)
  if values.size < 2 or values.std() == 0:
    return math.nan
  return float(stats.ttest_1samp(values, chance, alternative="greater").pvalue)


def _per_seed(rows, architecture: str, objective: str, column: str) -> list[float]:
  return [float(r[column]) for r in rows
          if r["architecture"] == architecture and r["objective"] == objective]


def significance(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]],
                 alpha: float = 0.05) -> list[str]:
  """For every readout, which cells the best one beats significantly (Welch's t-test over
  seeds, two-sided, level `alpha`) and which it does not; for (d) and (e) also which cells are
  significantly above the chance level (one-sided one-sample t-test)."""
  lines = []
  best = best_cells(summary)
  for column, title, _ in READOUTS:
    if not best[column]:
      continue
    top = summary[min(best[column])]
    finite = [e for e in summary if math.isfinite(e[column][0])]
    if len(best[column]) == len(finite) > 1:
      lines.append(f"* {title}: every cell has the same mean ({_fmt(*top[column], column)}); "
                   "no ordering.")
      continue
    name = lambda e: f"{e['architecture']}/{e['objective']}"  # pylint: disable=unnecessary-lambda-assignment
    mine = _per_seed(rows, top["architecture"], top["objective"], column)
    beaten, tied, untested = [], [], []
    for entry in summary:
      if entry is top or not math.isfinite(entry[column][0]):
        continue
      p = welch_p(mine, _per_seed(rows, entry["architecture"], entry["objective"], column))
      (untested if math.isnan(p) else beaten if p < alpha else tied).append(
          name(entry) + ("" if math.isnan(p) else f" (p={p:.2g})"))
    line = f"* {title}: best {name(top)}"
    if beaten:
      line += f"; significantly better than {', '.join(beaten)}"
    if tied:
      line += f"; not significantly better than {', '.join(tied)}"
    if untested:
      line += f"; not testable against {', '.join(untested)} (one seed or no spread)"
    if column in ("zero_shot_acc", "few_shot_acc", "multitask_acc"):
      for baseline, what in (("suite_chance", "chance"), ("suite_majority", "the majority "
                                                                          "baseline")):
        if baseline not in rows[0]:
          continue
        level = float(np.mean([float(r[baseline]) for r in rows]))
        above = [name(e) for e in summary if above_chance_p(_per_seed(
            rows, e["architecture"], e["objective"], column), level) < alpha]
        line += (f"; above {what} ({100 * level:.1f}%) significantly: "
                 f"{', '.join(above) if above else 'none'}")
    lines.append(line + ".")
  return lines


SUITE = (("zero_shot_acc", "(d) zero-shot"), ("few_shot_acc", "(d) few-shot"),
         ("multitask_acc", "(e) zero-shot after multitask fine-tuning"))


def suite_table(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]]) -> str:
  """(d) and (e) per cell: mean accuracy (%) with its 95% Student-t interval over seeds, and
  the chance level; empty when the corpus gave no task suite."""
  if not any(math.isfinite(e["zero_shot_acc"][0]) for e in summary):
    return ""
  header = ["architecture", "objective", *[title for _, title in SUITE]]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for entry in summary:
    cells = [entry["architecture"], entry["objective"]]
    for column, _ in SUITE:
      mean, half = t_interval(_per_seed(rows, entry["architecture"], entry["objective"], column))
      if not math.isfinite(mean):
        cells.append("—")  # a column the config skips (module doc of objective_cells)
        continue
      cells.append(f"{100 * mean:.1f}" + (f" [{100 * (mean - half):.1f}, "
                                          f"{100 * (mean + half):.1f}]"
                                          if math.isfinite(half) else ""))
    lines.append("| " + " | ".join(cells) + " |")
  chance = float(np.mean([float(r["suite_chance"]) for r in rows]))
  majority = float(np.mean([float(r["suite_majority"]) for r in rows]))
  return ("\n".join(lines) + f"\n\nAccuracy in %, mean over seeds [95% Student-t interval]; "
          f"chance is {100 * chance:.1f}%, always giving the most common answer of each task "
          f"{100 * majority:.1f}%.\n")


def binomial_p(correct: int, n: int, chance: float) -> float:
  """One-sided exact binomial p-value of at least `correct` right answers out of `n` when
  each is right with probability `chance`."""
  return float(stats.binomtest(correct, n, chance, alternative="greater").pvalue) if n else math.nan


TASK_READOUTS = (("zero_shot", "(d) zero-shot"), ("few_shot", "(d) few-shot"),
                 ("multitask", "(e) after multitask"))


def task_table(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]],
               alpha: float = 0.05) -> str:
  """Each held-out task type per cell: accuracy (%) over every seed's answers and the one-sided
  exact binomial p-value against the type's chance level; accuracies significantly above chance
  at `alpha` are **bold**. Every seed answers the same examples, so the test counts them once:
  the mean number right over seeds (rounded) out of one seed's examples. Empty when the rows
  hold no per-type counts."""
  if not all(isinstance(r.get("suite_tasks"), Mapping) for r in rows) or not rows:
    return ""
  readouts = [(k, t) for k, t in TASK_READOUTS if k in rows[0]["suite_tasks"]]
  types = list(rows[0]["suite_tasks"]["zero_shot"])
  header = ["architecture", "objective", "readout", *types]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  chance = {}
  for entry in summary:
    mine = [r for r in rows
            if (r["architecture"], r["objective"]) == (entry["architecture"], entry["objective"])]
    for key, title in readouts:
      cells = [entry["architecture"], entry["objective"], title]
      for t in types:
        counts = [r["suite_tasks"][key][t] for r in mine]
        correct, n = sum(c[0] for c in counts), sum(c[1] for c in counts)
        chance[t] = counts[0][2]
        p = binomial_p(int(round(correct / len(counts))), counts[0][1], chance[t])
        text = f"{100 * correct / n:.1f} (p={p:.2g})"
        cells.append(f"**{text}**" if p < alpha else text)
      lines.append("| " + " | ".join(cells) + " |")
  n_per_seed = {t: rows[0]["suite_tasks"]["zero_shot"][t][1] for t in types}
  levels = ", ".join(f"{t} {100 * chance[t]:.1f}% ({n_per_seed[t]} examples per seed)"
                     for t in types)
  return ("\n".join(lines) + "\n\nAccuracy in % over every seed's answers; p: one-sided exact "
          "binomial test against chance of the mean number right over seeds out of one seed's "
          f"examples (the seeds answer the same examples), **bold** below {alpha:g}. Chance: "
          f"{levels}.\n")


def write_markdown(summary: Sequence[Mapping[str, Any]], path: str, *, title: str,
                   notes: str, significance_lines: Sequence[str] = (), suite: str = "",
                   tasks: str = "") -> None:
  """results.md: a title, the table, and `notes` (what the readouts are, how it was run)."""
  with open(path, "w") as f:
    f.write(f"# {title}\n\n")
    f.write(markdown_table(summary))
    if suite:
      f.write("\n## Zero-shot and few-shot on the held-out task types\n\n" + suite)
    if tasks:
      f.write("\n### Per held-out task type\n\n" + tasks)
    f.write("\n" + notes.strip() + "\n")
    if significance_lines:
      f.write("\nWhich orderings are significant (Welch's t-test over seeds, two-sided, 5%):\n\n")
      f.write("\n".join(significance_lines) + "\n")


def plot(summary: Sequence[Mapping[str, Any]], path: str, *, title: str) -> None:
  """Grouped bars per readout: objectives on the x axis, one bar per architecture, ±std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  objectives = list(dict.fromkeys(e["objective"] for e in summary))
  architectures = list(dict.fromkeys(e["architecture"] for e in summary))
  columns = 3
  grid_rows = -(-len(READOUTS) // columns)
  fig, axes = plt.subplots(grid_rows, columns, figsize=(3.8 * columns, 3.4 * grid_rows),
                           squeeze=False)
  axes = axes.ravel()
  width = 0.8 / max(len(architectures), 1)
  x = np.arange(len(objectives))
  for ax, (column, label, _) in zip(axes, READOUTS):
    scale = 100.0 if column in ACCURACIES else 1.0
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
    ax.set_title(label + (" (%)" if column in ACCURACIES else ""), fontsize=9)
    finite = [e[column][0] * scale for e in summary if math.isfinite(e[column][0])]
    if finite and "nll" in column:  # NLL bars differ in the last digits: zoom in
      low, high = min(finite), max(finite)
      ax.set_ylim(max(0.0, low - 0.25 * (high - low + 1e-3)), high + 0.25 * (high - low + 1e-3))
  for ax in axes[len(READOUTS):]:
    ax.axis("off")
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
