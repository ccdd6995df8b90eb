"""Running one cell of the objective comparison: pretrain, readouts, fine-tune, decode.

`run_cell(cell, seed, ctx)` returns one row of results.csv. A `Context` holds what every cell
shares (tokenizer, held-out data, jitted readouts). Pretraining and fine-tuning run on
`seqlab.trainer` (`experiment_runs.train`), each in its own work directory under the cell's
scratch directory, so a killed cell resumes from its checkpoints to the same row; the engine
compiles once per model shape and optimizer, for every cell and seed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np

import experiment_runs as runs
import objective_grid as grid
import objective_readouts as readouts

from seqlab import loop, models, trainer
from seqlab import tasks as tasks_lib
from seqlab import metrics as metrics_lib
from seqlab import features as features_lib
from seqlab import train as train_lib
from seqlab.data import pipeline as pipeline_lib
from seqlab.data import sources as sources_lib
from seqlab.evaluation import finetune as finetune_lib
from seqlab.evaluation import harness, scoring

# ─── Runtime context: the data every cell shares ─────────────────────────────────────────────


def _spread(items, num: int) -> list:
  """`num` of `items` at evenly spaced indices (all of them if there are fewer)."""
  items = list(items)
  if len(items) <= num:
    return items
  return [items[i] for i in np.linspace(0, len(items) - 1, num).round().astype(int)]


class Context:
  """What every cell shares: tokenizer and held-out data."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.config = config
    self.tokenizer = tokenizer
    self.special = tokenizer.special_ids
    data = config.data
    source_kwargs = dict(data.source_kwargs)
    self.train_source = sources_lib.get_source(data.source, split="train", **source_kwargs)
    heldout = sources_lib.get_source(data.source, split="validation", **source_kwargs)
    self.chunks = readouts.heldout_chunks(heldout, tokenizer, int(config.readouts.chunk_length),
                                          int(config.readouts.num_sequences))
    # Readout (c) needs Python functions: none for a config without fine-tuning or a corpus
    # without them (prose, another language).
    self.naming_eval, self.naming_train = [], []
    if "finetune" in config:
      ft = config.finetune
      sizes = dict(max_body_bytes=ft.max_body_bytes, max_name_bytes=ft.max_name_bytes)
      self.naming_eval = _spread(readouts.function_name_pairs(
          [heldout[i] for i in range(len(heldout))], **sizes), int(ft.num_eval))
      files = _spread(range(len(self.train_source)),
                      int(ft.train_files) or len(self.train_source))
      self.naming_train = readouts.function_name_pairs(
          [self.train_source[i] for i in files], **sizes)
    self.has_naming = bool(self.naming_eval and self.naming_train)
    # Readouts (d) and (e): the corpus's built-in task suite (`seqlab.tasks.register_suite`).
    self.suite = suite_names(config)
    self.has_suite = bool(self.suite["train"] and self.suite["heldout"])


def suite_names(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """Registers the corpus's built-in task suite (`seqlab.tasks.register_suite`) once per
  setting and returns its "train" and "heldout" task names; none without a `zero_shot`
  section."""
  if "zero_shot" not in config:
    return {"train": [], "heldout": []}
  data, zs = config.data, config.zero_shot
  return _registered_suite(
      data.source, json.dumps(data.source_kwargs.to_dict(), sort_keys=True),
      int(zs.max_documents), int(zs.max_examples), int(zs.max_choice_chars))


@functools.lru_cache(maxsize=None)
def _registered_suite(source: str, source_kwargs: str, max_documents: int, max_examples: int,
                      max_choice_chars: int) -> dict[str, list[str]]:
  # The prefix names the setting: tasks registered under another setting never shadow these.
  key = json.dumps([source, source_kwargs, max_documents, max_examples, max_choice_chars])
  return tasks_lib.register_suite(
      source, json.loads(source_kwargs), prefix=f"{source}_{zlib.crc32(key.encode()):08x}",
      max_documents=max_documents, max_examples=max_examples, max_choice_chars=max_choice_chars)


def optimizer_config(section: ml_collections.ConfigDict, steps: int) -> train_lib.OptimizerConfig:
  return train_lib.OptimizerConfig(
      name="adamw", learning_rate=section.learning_rate, schedule=section.schedule,
      warmup_steps=section.warmup_steps, total_steps=steps,
      end_learning_rate_fraction=section.end_learning_rate_fraction,
      weight_decay=section.weight_decay, b1=0.9, b2=section.b2, eps=1e-9,
      clip_norm=section.clip_norm)


# ─── One cell: pretrain, readouts (a) (b), fine-tune and readout (c) ─────────────────────────


def _train_config(config: ml_collections.ConfigDict, cell: grid.Cell, seed: int) -> dict:
  """What a cell's trainings record as their inputs: the config sections its numbers depend
  on (not the grid's extent, the output options, the layout or the checkpoint interval)."""
  skip = ("grid", "adaptation", "output", "mesh", "distributed", "train")
  relevant = {k: v for k, v in config.to_dict().items() if k not in skip}
  return {**relevant, "pretrain_steps": int(config.train.steps), "cell": cell.name, "seed": seed}


def pretrain(cell: grid.Cell, seed: int, ctx: Context, workdir: str, *, params=None,
             data_seed: int | None = None, evaluate=None, inputs: dict | None = None
             ) -> trainer.Result:
  """Trains a cell in `workdir` (or resumes it there) for `train.steps` steps.

  From scratch (init key `seed`) or, given `params`, from them; on the cell's objective over
  the data stream `data_seed` (default `seed`). `evaluate(state)` runs every
  `train.eval_every` steps (config default 0: at the end). `inputs` adds to what the training
  records (a rerun that changes any of it is refused instead of resumed).
  """
  config = ctx.config
  steps = int(config.train.steps)
  data_seed = seed if data_seed is None else data_seed
  it = pipeline_lib.make_pipeline(
      ctx.train_source, ctx.tokenizer, cell.spec.pipeline_objective, cell.streams,
      seq_lengths=cell.lengths_dict, seed=data_seed, packing=bool(config.data.packing),
      objective_kwargs=grid.objective_kwargs(config, cell.objective),
      **runs.process_rows(int(config.data.batch_size)))
  recorded = _train_config(config, cell, seed)
  if data_seed != seed:
    recorded["data_seed"] = data_seed
  return runs.train(cell.model_config, optimizer_config(config.optimizer, steps),
                    jax.random.key(seed), it, config, steps=steps, workdir=workdir,
                    inputs={**recorded, **(inputs or {})}, params=params, evaluate=evaluate,
                    label=f"{cell.name} seed {seed}")


def _naming_examples(ctx: Context, cell: grid.Cell, pairs) -> list[scoring.Request]:
  return readouts.naming_examples(pairs, ctx.tokenizer, cell.spec.readout, ctx.special)


class NamingBatches:
  """Fine-tuning batches of (c): this process's rows of a fixed permutation of the pairs.

  Every cell sees the same examples in the same order (the permutation depends on the seed
  only). State: the index of the next step, so a resumed fine-tuning continues exactly.
  """

  def __init__(self, ctx: Context, cell: grid.Cell, seed: int):
    ft = ctx.config.finetune
    self.ctx, self.cell, self.step = ctx, cell, 0
    self.batch_size = int(ft.batch_size)
    self.share = runs.process_rows(self.batch_size)
    self.lengths = grid.finetune_lengths(cell, ctx.config)
    rng = np.random.default_rng([seed, 1])
    pairs = len(ctx.naming_train)
    self.order = np.concatenate([rng.permutation(pairs) for _ in range(
        -(-int(ft.steps) * self.batch_size // pairs))])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self.share["batch_size"]
    first = self.step * self.batch_size + self.share["shard_index"] * rows
    self.step += 1
    examples = _naming_examples(self.ctx, self.cell,
                                [self.ctx.naming_train[i] for i in self.order[first:first + rows]])
    feats = [features_lib.pad(features_lib.convert_example(
        {"inputs": e.context, "targets": e.continuation}, self.cell.streams,
        eos_id=self.ctx.special.eos), self.lengths) for e in examples]
    return {k: np.stack([f[k] for f in feats]) for k in feats[0]}

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])


def finetune(cell: grid.Cell, seed: int, params, ctx: Context, workdir: str) -> trainer.Result:
  """`finetune.steps` steps of body -> name from `params` (seq2seq format, [S2S] for UL2) in
  `workdir` (or resumed there)."""
  config, ft = ctx.config, ctx.config.finetune
  return runs.train(cell.model_config, optimizer_config(ft, int(ft.steps)), jax.random.key(seed),
                    NamingBatches(ctx, cell, seed), config, steps=int(ft.steps),
                    workdir=workdir, inputs=_train_config(config, cell, seed), params=params,
                    label=f"{cell.name} seed {seed} fine-tuning")


def name_parts(name: str) -> str:
  """A function name as space-separated words: `getHTTPValue_2` -> "get HTTP Value 2"."""
  spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
  return " ".join(w for w in re.split(r"[\W_]+", spaced) if w)


def name_generation(cell: grid.Cell, params, ctx: Context) -> dict[str, float]:
  """Greedy-decoded names of the held-out functions scored against the true names.

  `seqlab.metrics`: exact match; chrF (characters, so `get_value` for `get_values` earns
  credit); ROUGE-L F1 (rouge-score splits names at `_` and other non-alphanumerics); corpus
  BLEU over the names' words (`name_parts`), whose 4-grams rarely exist in 1-3 word names, so
  it stays near 0 until names are long and right.
  """
  ft = ctx.config.finetune
  examples = _naming_examples(ctx, cell, ctx.naming_eval)
  tokens = harness.generate_ids(
      cell.model_config, params,
      [np.concatenate([e.context, np.int32([ctx.special.eos])]) for e in examples],
      max_new_tokens=int(ft.max_name_bytes) + 1, eos_id=ctx.special.eos,
      batch_size=int(ft.decode_batch_size), width=int(ft.max_body_bytes) + 2)
  predictions = [ctx.tokenizer.decode(row) for row in tokens]
  return score_names(predictions, [name for _, name in ctx.naming_eval])


NAMING_COLUMNS = ("exact_match", "name_chrf", "name_rouge_l", "name_bleu")


def score_names(predictions: list[str], references: list[str]) -> dict[str, float]:
  """Exact match (0-1), chrF (0-100), ROUGE-L F1 (0-1) and word BLEU (0-100) of names."""
  return {
      "exact_match": metrics_lib.exact_match(predictions, references),
      "name_chrf": metrics_lib.chrf(predictions, [[r] for r in references]),
      "name_rouge_l": float(np.mean(metrics_lib.rouge(
          predictions, references, rouge_types=("rougeL",))["rougeL"].fmeasure)),
      "name_bleu": metrics_lib.bleu([name_parts(p) for p in predictions],
                                    [[name_parts(r)] for r in references]).score,
  }


def _mean_nll(cell: grid.Cell, params, ctx: Context, examples, fmt: str) -> float:
  """Mean NLL per scored token, one example per row (every readout of a cell has one shape)."""
  return readouts.mean_nll(scoring.Scorer(
      cell.model_config, params, fmt=fmt, lengths=grid.readout_lengths(cell, ctx.config),
      eos_id=ctx.special.eos, batch_size=int(ctx.config.readouts.batch_size), pack=False),
      examples)


def heldout_readouts(cell: grid.Cell, params, ctx: Context) -> dict[str, float]:
  """Readouts (a) and (b) on the held-out chunks in the cell's natural format: continuation
  NLL, infilling NLL on the span tokens, and on every target token (sentinels too)."""
  fmt, special = cell.spec.readout, ctx.special
  continuation = _mean_nll(cell, params, ctx,
                           readouts.continuation_examples(ctx.chunks, fmt, special), fmt.format)
  infill_examples = readouts.infill_examples(ctx.chunks, fmt, special,
                                             seed=int(ctx.config.readouts.infill_seed))
  infill = _mean_nll(cell, params, ctx, infill_examples, fmt.format)
  # The literal T5 reading, sentinels scored too (eos still not): a format-knowledge check.
  infill_all = _mean_nll(cell, params, ctx, [dataclasses.replace(e, scored=np.ones_like(e.scored))
                                             for e in infill_examples], fmt.format)
  return {"continuation_nll": continuation, "infill_nll": infill,
          "infill_nll_with_sentinels": infill_all}


ZERO_SHOT_COLUMNS = ("zero_shot_acc", "few_shot_acc", "multitask_acc", "suite_chance",
                     "suite_majority")


def language_model(cell: grid.Cell, params, ctx: Context) -> harness.LanguageModel:
  """The cell's model for `seqlab.evaluation`: its readout format and mode token, rows of L
  per stream (a longer prompt loses its oldest tokens, as in lm-evaluation-harness)."""
  fmt = cell.spec.readout
  return harness.LanguageModel(cell.model_config, params, ctx.tokenizer, fmt.format,
                               grid.readout_lengths(cell, ctx.config), fmt.finetune_mode)


def suite_accuracy(model: harness.LanguageModel, ctx: Context, shots
                   ) -> tuple[dict[int, float], dict[str, float], dict[int, dict[str, list]]]:
  """Mean rank-classification accuracy over the held-out task types per number of shots, the
  baselines (chance: the mean of 1 / number of choices; majority: always the most common gold
  answer) and per number of shots each type's [correct, examples, chance] (the counts pool
  over seeds)."""
  zs = ctx.config.zero_shot
  rows = harness.evaluate_tasks(model, ctx.suite["heldout"], shots=shots, limit=int(zs.limit),
                                seed=int(zs.seed), batch_size=int(zs.batch_size))
  per_task: dict[int, dict[str, list]] = {}
  for r in rows:
    if r["task"] != "mean":
      per_task.setdefault(r["shots"], {})[r["task"].split("/")[-1]] = [
          int(round(r["acc"] * r["n"])), int(r["n"]), r["chance"]]
  return ({r["shots"]: r["acc"] for r in rows if r["task"] == "mean"},
          {"suite_chance": rows[-1]["chance"], "suite_majority": rows[-1]["majority"]},
          per_task)


def zero_shot_readouts(cell: grid.Cell, seed: int, params, ctx: Context) -> dict[str, Any]:
  """(d) zero- and few-shot accuracy on the held-out task types of the pretrained model;
  (e) zero-shot accuracy on them after multitask fine-tuning on the training types (every
  type at an equal rate, `zero_shot.multitask_steps` steps, the fine-tuning optimizer of (c)).
  `zero_shot.shots` 0 skips the few-shot column (NaN). "suite_tasks" holds each held-out
  type's [correct, examples, chance] per readout ("zero_shot", "few_shot", "multitask")."""
  if not ctx.has_suite:  # no zero_shot section, or a corpus without a suite
    return dict.fromkeys(ZERO_SHOT_COLUMNS, math.nan)
  zs, ft = ctx.config.zero_shot, ctx.config.finetune
  model = language_model(cell, params, ctx)
  shots = int(zs.shots)
  accuracy, baselines, per_task = suite_accuracy(model, ctx, (0, shots) if shots else (0,))
  mixture = tasks_lib.Mixture("suite_train", tuple(ctx.suite["train"]),
                              (1.0,) * len(ctx.suite["train"]))
  steps = int(zs.multitask_steps)
  # In memory, without a work directory: a few steps, redone exactly if the cell is rerun.
  tuned, result = finetune_lib.finetune(
      model, mixture, steps=steps, batch_size=int(zs.multitask_batch_size),
      optimizer=optimizer_config(ft, steps), num_examples=int(zs.max_examples), seed=seed,
      mesh=loop.make_mesh(ctx.config), label=f"{cell.name} seed {seed} multitask")
  runs.stop_if_preempted(result, f"{cell.name} seed {seed} multitask")
  multitask, _, tuned_tasks = suite_accuracy(tuned, ctx, (0,))
  tasks = {"zero_shot": per_task[0], "multitask": tuned_tasks[0]}
  if shots:
    tasks["few_shot"] = per_task[shots]
  return {"zero_shot_acc": accuracy[0], "few_shot_acc": accuracy[shots] if shots else math.nan,
          "multitask_acc": multitask[0], **baselines, "suite_tasks": tasks}


def run_cell(cell: grid.Cell, seed: int, ctx: Context, scratch: str) -> dict:
  """Pretrain, score (a) and (b), fine-tune, score (c): one row of results.csv.

  (c) needs Python functions in the corpus; without them its columns are NaN. The trainings'
  work directories are `scratch/pretrain` and `scratch/finetune`: a cell rerun
  after a kill resumes there and gives the same row (but for the wall times).
  """
  config = ctx.config
  start = time.perf_counter()
  pretrained = pretrain(cell, seed, ctx, os.path.join(scratch, "pretrain"))
  pretrain_seconds = time.perf_counter() - start
  params = runs.host_params(pretrained.state.params)
  heldout = heldout_readouts(cell, params, ctx)
  name_nll, generated = math.nan, dict.fromkeys(NAMING_COLUMNS, math.nan)
  if ctx.has_naming:
    tuned = runs.host_params(finetune(cell, seed, params, ctx,
                                      os.path.join(scratch, "finetune")).state.params)
    # The readout rows hold every fine-tuning example too; one shape, one compilation.
    name_nll = _mean_nll(cell, tuned, ctx, _naming_examples(ctx, cell, ctx.naming_eval),
                         "seq2seq")
    generated = name_generation(cell, tuned, ctx)
  suite = zero_shot_readouts(cell, seed, params, ctx)
  lengths_total = sum(cell.lengths_dict.values())
  return {
      "architecture": cell.architecture, "objective": cell.objective, "seed": seed,
      "params": models.num_params(cell.model_config),
      "train_flops_per_token": grid.flops_per_token(cell),
      "train_tokens": int(config.train.steps) * int(config.data.batch_size) * lengths_total,
      "train_steps": int(config.train.steps), "final_train_loss": pretrained.final_loss(),
      **heldout, "name_nll": name_nll,
      **generated, "naming_eval_functions": len(ctx.naming_eval) if ctx.has_naming else 0,
      **suite,
      "pretrain_seconds": pretrain_seconds,
      "cell_seconds": time.perf_counter() - start,
  }


