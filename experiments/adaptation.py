"""Objective adaptation: how much faster does a pretrained model reach a new objective's loss?

    python experiments/adaptation.py \
        --config experiments/configs/adaptation.py:quick --workdir results/adaptation

Wang et al. (2022, section 5) adapt a model pretrained with one architecture and objective to
another and compare it with the target trained from scratch: a causal decoder pretrained as a
full LM, continued as a non-causal (prefix) decoder on span corruption ("non-causal MLM
adaptation"), reaches the from-scratch model's loss about 3.3x faster; the reverse ("FLM
adaptation", MLM -> FLM) about 1.6x. UL2R (Tay et al. 2022, U-PaLM) continues a causal LM on
the UL2 mixture of denoisers. The adaptations are `ADAPTATIONS` below; the models, data and readouts are the objective grid's cells (`objective_grid.py`).

Protocol, per seed s:
* every cell involved is trained from scratch for `train.steps` steps (init key s, data
  stream s); a source model is its cell's from-scratch run;
* every adaptation trains its target cell for the same `train.steps` steps with the same
  optimizer and schedule from the source's parameters (the two decoders share every
  parameter: only the attention mask differs), on data stream s + 1000, documents in another
  order than the source saw (one pass over a corpus far larger than a run reads);
* the held-out loss of the target objective is measured every `train.eval_every` steps on
  `train.eval_batches` fixed batches made from excerpts spread over the whole validation split
  (and before the first step of an adaptation): "steps to reach" is the first step (linearly interpolated between
  measurements) where the adapted model's held-out loss is at or below the from-scratch
  model's final one, "speedup" `train.steps` / steps to reach; both per seed, then mean ± std.
  Steps and tokens count the adaptation only (the source's pretraining is spent already, as
  in Wang et al.);
* readouts (a) continuation NLL and (b) span-infilling NLL (`objective_cells.heldout_readouts`)
  of every final target model, adapted and from scratch.

Output in `<workdir>/<output.run_name>/`: results.md (speedups beside the papers', readouts),
results.csv (one row per adaptation and seed), curves.csv (every held-out measurement),
results.png (loss curves), config.json, and trainings/<name>.json, one per finished training:
a rerun skips them. Trainings run on `seqlab.trainer` under `<run dir>/scratch` (deleted when
everything has finished), so a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helper modules
# pylint: disable=g-import-not-at-top,wrong-import-position
import experiment_runs as runs
import objective_cells as cells_lib
import objective_grid as grid
import objective_readouts as readouts

from seqlab import loop, parallel
from seqlab import metrics as metrics_lib
from seqlab import train as train_lib
from seqlab.data import pipeline as pipeline_lib
from seqlab.data import sources as sources_lib
from seqlab.validation import check_int
# pylint: enable=g-import-not-at-top,wrong-import-position

# The papers' speedups: Wang et al. 2022 (tokens to the from-scratch loss); U-PaLM reaches
# PaLM 540B's final few-shot scores at about half its compute (a downstream, not a loss, ratio).
PAPER_SPEEDUP = {"nc_mlm": "3.3x (Wang et al.)", "flm": "1.6x (Wang et al.)",
                 "ul2r": "~2x compute (U-PaLM, few-shot)"}
ADAPTED_DATA_SEED = 1000  # an adaptation's data stream: seed + this

# name -> (source cell, target cell); a cell is "architecture/objective" of the objective grid.
ADAPTATIONS = {
    # Wang et al. 2022, section 5: a causal decoder pretrained as a full LM, continued as a
    # non-causal (prefix) decoder on span corruption ("MLM").
    "nc_mlm": ("causal_decoder/full_lm", "prefix_decoder/span_corruption"),
    # The reverse ("language modeling adaptation"): non-causal MLM continued as a causal FLM.
    "flm": ("prefix_decoder/span_corruption", "causal_decoder/full_lm"),
    # UL2R (Tay et al. 2022, U-PaLM): a causal LM continued on the UL2 mixture of denoisers,
    # with their mode tokens.
    "ul2r": ("causal_decoder/full_lm", "causal_decoder/ul2"),
}
READOUTS = ("continuation_nll", "infill_nll", "infill_nll_with_sentinels")


@dataclasses.dataclass(frozen=True)
class Training:
  """One training: `cell` from scratch (`source` None) or adapted from `source`'s scratch run."""
  cell: grid.Cell
  seed: int
  source: grid.Cell | None = None

  @property
  def name(self) -> str:
    origin = ("scratch" if self.source is None else
              f"from_{self.source.architecture}__{self.source.objective}")
    return f"{self.cell.architecture}__{self.cell.objective}__{origin}__seed{self.seed}"


def adaptation_names(config: ml_collections.ConfigDict) -> list[str]:
  return grid.parse_names(config.adaptation.names, ADAPTATIONS, "adaptation.names")


def plan(config: ml_collections.ConfigDict, special) -> dict[str, grid.Cell]:
  """Every cell the adaptations involve, by name, validated before anything trains."""
  check_int("adaptation.num_seeds", config.adaptation.num_seeds)
  for field in ("steps", "eval_every", "eval_batches"):
    check_int(f"train.{field}", config.train[field])
  names = []
  for adaptation in adaptation_names(config):
    for cell in ADAPTATIONS[adaptation]:
      pair = tuple(cell.split("/"))
      if pair not in names:
        names.append(pair)
  return {c.name: c for c in grid.plan(config, special, names)}


class HeldoutLoss:
  """`evaluate(state)` for the engine: a cell's objective loss on fixed held-out batches."""

  def __init__(self, cell: grid.Cell, ctx: cells_lib.Context, heldout, mesh):
    config = ctx.config
    rows = runs.process_rows(int(config.data.batch_size))
    num_batches = int(config.train.eval_batches)
    # Excerpts of one example's raw length spread over the whole split (a few consecutive
    # batches would cover one or two files), twice as many as the rows, in case some pack two.
    excerpts = [ctx.tokenizer.decode(chunk) for chunk in readouts.heldout_chunks(
        heldout, ctx.tokenizer, cell.chunk_length,
        2 * num_batches * int(config.data.batch_size))]
    it = pipeline_lib.make_pipeline(
        excerpts, ctx.tokenizer, cell.spec.pipeline_objective, cell.streams,
        seq_lengths=cell.lengths_dict, seed=int(config.train.eval_seed),
        packing=bool(config.data.packing), shuffle=False, num_epochs=1,
        objective_kwargs=grid.objective_kwargs(config, cell.objective), **rows)
    self.batches = [next(it) for _ in range(num_batches)]
    self.mesh = mesh
    self.task = train_lib.task_for(cell.streams)
    step = train_lib.make_eval_step(self.task)
    model = cell.model_config.build()
    self.eval_fn = jax.jit(lambda params, batch: step(params, batch, model.apply))

  def __call__(self, state) -> dict[str, float]:
    return {"loss": self.loss(state.params)}

  def loss(self, params) -> float:
    sums = [self.eval_fn(params, parallel.global_batch(b, self.mesh)) for b in self.batches]
    return float(self.task.summarise(metrics_lib.sum_metrics(jax.device_get(sums)))["loss"])


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float:
  """The first step at which `curve` (step, loss) is at or below `target`, linearly
  interpolated between measurements; NaN if it never is."""
  for i, (step, loss) in enumerate(curve):
    if loss <= target:
      if i == 0:
        return float(step)
      step0, loss0 = curve[i - 1]
      return step0 + (step - step0) * (loss0 - target) / (loss0 - loss)
  return math.nan


class Runner:
  """Runs (or reads back) the trainings of one experiment."""

  def __init__(self, config: ml_collections.ConfigDict, run_dir: str, cells, tokenizer):
    self.config, self.run_dir, self.cells = config, run_dir, cells
    self.scratch = os.path.join(run_dir, "scratch")
    self.fingerprint = grid.fingerprint(config, extent="adaptation")
    self.ctx = cells_lib.Context(config, tokenizer)
    self.mesh = loop.make_mesh(config)
    heldout = sources_lib.get_source(config.data.source, split="validation",
                                     **dict(config.data.source_kwargs))
    self.losses = {name: HeldoutLoss(cell, self.ctx, heldout, self.mesh)
                   for name, cell in cells.items()}
    self.params: dict[tuple[str, int], object] = {}  # finished scratch runs' parameters

  def record_path(self, training: Training) -> str:
    return os.path.join(self.run_dir, "trainings", training.name + ".json")

  def record(self, training: Training) -> dict:
    """The training's record (step-0 and periodic held-out losses, final train loss, readouts),
    trained now unless a record of this config exists."""
    path = self.record_path(training)
    record = runs.load_finished(path, self.fingerprint)
    if record is not None:
      return record
    cell, seed = training.cell, training.seed
    curve = []
    if training.source is not None:
      start = self.scratch_params(training.source, seed)
      replicated = jax.device_put(start, NamedSharding(self.mesh, P()))
      curve.append((0, self.losses[cell.name].loss(replicated)))
    result, params = self._train(training)
    curve += [(int(h["step"]), float(h["eval/loss"])) for h in result.history
              if "eval/loss" in h]
    record = {"curve": curve, "final_train_loss": result.final_loss(),
              **cells_lib.heldout_readouts(cell, params, self.ctx)}
    runs.save_finished(path, self.fingerprint, record)
    return record

  def _train(self, training: Training):
    """(engine result, host parameters) of `training`, trained in its work directory (or read
    back from it); a from-scratch run's parameters are kept for the adaptations from it."""
    cell, seed = training.cell, training.seed
    workdir = os.path.join(self.scratch, training.name)
    if training.source is None:
      result = cells_lib.pretrain(cell, seed, self.ctx, workdir, evaluate=self.losses[cell.name])
    else:
      result = cells_lib.pretrain(
          cell, seed, self.ctx, workdir, params=self.scratch_params(training.source, seed),
          data_seed=seed + ADAPTED_DATA_SEED, evaluate=self.losses[cell.name],
          inputs={"source": training.source.name})
    params = runs.host_params(result.state.params)
    if training.source is None:
      self.params[(cell.name, seed)] = params
    return result, params

  def scratch_params(self, cell: grid.Cell, seed: int):
    """A from-scratch run's final parameters (read back from its work directory, or retrained
    there to the same values when a finished record's work directory is gone)."""
    if (cell.name, seed) not in self.params:
      self._train(Training(cell, seed))
    return self.params[(cell.name, seed)]


def rows_of(config, cells, records: dict[str, dict]) -> list[dict]:
  """One row per adaptation and seed: losses, steps and tokens to reach, speedup, readouts."""
  steps = int(config.train.steps)
  tokens_per_step = int(config.data.batch_size) * int(config.data.seq_length)
  rows = []
  for name in adaptation_names(config):
    source, target = (cells[c] for c in ADAPTATIONS[name])
    for seed in range(int(config.adaptation.num_seeds)):
      scratch = records[Training(target, seed).name]
      adapted = records[Training(target, seed, source).name]
      goal = scratch["curve"][-1][1]
      reach = steps_to_reach(adapted["curve"], goal)
      rows.append({
          "adaptation": name, "source": source.name, "target": target.name, "seed": seed,
          "scratch_final_loss": goal, "adapted_start_loss": adapted["curve"][0][1],
          "adapted_final_loss": adapted["curve"][-1][1], "steps_to_reach": reach,
          "tokens_to_reach": reach * tokens_per_step,
          "speedup": steps / reach if reach > 0 else math.inf if reach == 0 else math.nan,
          **{f"scratch_{k}": scratch[k] for k in READOUTS},
          **{f"adapted_{k}": adapted[k] for k in READOUTS}})
  return rows


def _mean_std(values: Sequence[float]) -> str:
  """mean ± sample std over seeds; NaN (never reached) seeds are left out and counted."""
  values = np.asarray(values, float)
  reached = values[~np.isnan(values)]
  missing = values.size - reached.size
  if not reached.size:
    return f"not reached in {missing} of {values.size} seeds"
  text = f"{reached.mean():.3g}"
  if reached.size > 1:
    text += f" ± {reached.std(ddof=1):.2g}"
  if missing:
    text += f" (not reached in {missing} of {values.size} seeds)"
  return text


def markdown(config, rows: list[dict], spec: str) -> list[str]:
  steps = int(config.train.steps)
  tokens = steps * int(config.data.batch_size) * int(config.data.seq_length)
  seeds = int(config.adaptation.num_seeds)
  lines = [f"# Objective adaptation: {config.output.run_name}", "",
           f"Every training runs {steps} steps ({tokens:,} tokens); held-out loss of the "
           f"target objective, mean ± std over {seeds} seed(s). Steps and tokens to reach count "
           "the adaptation only.", "",
           "| adaptation | source → target | from-scratch final loss | adapted: loss at step 0 "
           "| adapted final loss | steps to the from-scratch final loss | tokens | speedup "
           "| paper |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name in adaptation_names(config):
    group = [r for r in rows if r["adaptation"] == name]
    col = lambda k: [r[k] for r in group]  # pylint: disable=cell-var-from-loop
    lines.append(
        f"| {name} | {group[0]['source']} → {group[0]['target']} "
        f"| {_mean_std(col('scratch_final_loss'))} | {_mean_std(col('adapted_start_loss'))} "
        f"| {_mean_std(col('adapted_final_loss'))} | {_mean_std(col('steps_to_reach'))} "
        f"| {_mean_std(col('tokens_to_reach'))} | {_mean_std(col('speedup'))} "
        f"| {PAPER_SPEEDUP[name]} |")
  lines += ["", "Readouts of the final target models (nats per token, lower is better): "
            "(a) continuation, (b) infilling on the span tokens and on every target token.", "",
            "| adaptation | target | (a) scratch | (a) adapted | (b) scratch | (b) adapted "
            "| (b, all targets) scratch | (b, all targets) adapted |",
            "|---|---|---|---|---|---|---|---|"]
  for name in adaptation_names(config):
    group = [r for r in rows if r["adaptation"] == name]
    cells = [_mean_std([r[f"{who}_{k}"] for r in group]) for k in READOUTS
             for who in ("scratch", "adapted")]
    lines.append(f"| {name} | {group[0]['target']} | " + " | ".join(cells) + " |")
  lines += ["", f"Generated by `python experiments/adaptation.py --config {spec} --workdir "
            "<dir>` (config.json holds the exact config).", ""]
  return lines


def plot(config, cells, records: dict[str, dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = adaptation_names(config)
  seeds = range(int(config.adaptation.num_seeds))
  fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    source, target = (cells[c] for c in ADAPTATIONS[name])
    for label, origin, color in (("from scratch", None, "tab:gray"),
                                 (f"adapted from {source.name}", source, "tab:blue")):
      curves = [records[Training(target, s, origin).name]["curve"] for s in seeds]
      steps = [st for st, _ in curves[0]]
      losses = np.array([[loss for _, loss in c] for c in curves])
      ax.plot(steps, losses.mean(0), color=color, label=label)
      if losses.shape[0] > 1:
        ax.fill_between(steps, losses.min(0), losses.max(0), color=color, alpha=0.2)
    goal = np.mean([records[Training(target, s).name]["curve"][-1][1] for s in seeds])
    ax.axhline(goal, color="tab:gray", linestyle="--", linewidth=0.8)
    ax.set_title(f"{name}: {target.name}", fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_ylim(top=min(ax.get_ylim()[1], goal * 2))
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, run_dir: str, *, spec: str = "") -> list[dict]:
  """Runs (or resumes) every training; writes every output; returns results.csv's rows."""
  tokenizer = loop.make_tokenizer(config)
  cells = plan(config, tokenizer.special_ids)  # every ValueError before any training
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2, sort_keys=True))
  runner = Runner(config, run_dir, cells, tokenizer)
  trainings = []
  for seed in range(int(config.adaptation.num_seeds)):
    for name in adaptation_names(config):
      source, target = (cells[c] for c in ADAPTATIONS[name])
      for training in (Training(source, seed), Training(target, seed),
                       Training(target, seed, source)):
        if training not in trainings:
          trainings.append(training)
  records = {}
  for i, training in enumerate(trainings):
    records[training.name] = runner.record(training)
    curve = records[training.name]["curve"]
    runs.log(f"[{i + 1}/{len(trainings)}] {training.name}: held-out loss "
             f"{curve[0][1]:.3f} (step {curve[0][0]}) -> {curve[-1][1]:.3f} (step {curve[-1][0]})")
  rows = rows_of(config, cells, records)
  if is_writer:
    columns = list(rows[0])
    runs.write_csv(rows, columns, os.path.join(run_dir, "results.csv"))
    runs.write_csv([{"training": t.name, "step": step, "heldout_loss": loss}
                    for t in trainings for step, loss in records[t.name]["curve"]],
                   ("training", "step", "heldout_loss"), os.path.join(run_dir, "curves.csv"))
    lines = markdown(config, rows, spec)
    with open(os.path.join(run_dir, "results.md"), "w") as f:
      f.write("\n".join(lines))
    plot(config, cells, records, os.path.join(run_dir, "results.png"))
    print("\n".join(lines[:6 + len(adaptation_names(config))]), flush=True)
    shutil.rmtree(runner.scratch, ignore_errors=True)
  return rows


def main(argv: list[str] | None = None) -> list[dict]:
  config, run_dir, spec, _ = runs.grid_command_line(
      __doc__.split("\n")[0], default_config="experiments/configs/adaptation.py:quick",
      default_workdir="results/adaptation", argv=argv)
  return run(config, run_dir, spec=spec)


if __name__ == "__main__":
  sys.exit(runs.exit_on_bad_input(main, "adaptation"))
