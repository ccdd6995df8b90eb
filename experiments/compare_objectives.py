"""Which architecture and pretraining objective? A compute-matched grid (UL2; Wang et al. 2022).

    python experiments/compare_objectives.py \
        --config experiments/configs/compare_objectives.py:quick \
        --workdir results/compare_objectives [--config.train.steps=400 ...]

Grid: architectures {causal_decoder, prefix_decoder, encoder_decoder} x objectives {full_lm,
prefix_lm, span_corruption, ul2} (and the extra row span_prefix_lm: 50/50 span corruption and
prefix LM, no mode tokens), several seeds. A full LM has no inputs, so it fits only the causal
decoder (on a prefix decoder it trains exactly the causal decoder); the configs skip those two
cells and asking for encoder_decoder/full_lm is an error.

Compute matching (UL2's rule): every cell processes `data.seq_length` tokens per row (decoder:
one stream of L; encoder-decoder: encoder + decoder = L, split to suit the objective) and
`train.steps * data.batch_size * L` tokens in all; the encoder-decoder has the decoder's depth
in EACH stack, so about twice the parameters at about the same FLOPs per token. Parameters and
FLOPs per token are printed per cell and written to results.csv.

Readouts (`objective_readouts.py`), identical for every cell up to its natural format: (a)
continuation NLL and (b) span-infilling NLL (span tokens only, and all target tokens) on the
held-out split, and (c) exact match and NLL of function names from their bodies after
fine-tuning every pretrained cell for `finetune.steps` steps; (d) zero- and few-shot
rank-classification accuracy on the held-out task types of the corpus's built-in suite
(`seqlab.tasks.register_suite`) and (e) the same zero-shot after multitask fine-tuning on its
training types (T0's recipe at small scale). Readouts (a)-(c) fit the rows their cell trained on
(`objective_grid.plan` checks it): an encoder-decoder trained on 64-token inputs is never scored
on 100-token ones; a (d)/(e) prompt longer than a row loses its oldest tokens, as in
lm-evaluation-harness. results.md gives 95% Student-t intervals over seeds for (d) and (e), the
chance level, and for every readout which orderings are significant (Welch's t-test over seeds).

Output in `<workdir>/<output.run_name>/`: results.csv (one row per cell and seed), results.md
(mean ± std over seeds, best per column in bold), results.png (grouped bars), config.json, and
cells/<architecture>__<objective>__seed<k>.json, one per finished cell: a rerun skips them.
A cell trains on `seqlab.trainer` under `--scratch` (checkpoints every `train.checkpoint_every`
steps and at the end; deleted when the cell finishes): a killed cell resumes to the same row.
On several hosts run the same command on each (TPU_SETUP.md); process 0 writes the files.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile

import jax
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helper modules
# pylint: disable=g-import-not-at-top,wrong-import-position
import experiment_runs as runs
import objective_cells as cells_lib
import objective_grid as grid
import objective_report as report

from seqlab import loop, models
from seqlab.validation import check_int
# pylint: enable=g-import-not-at-top,wrong-import-position

# ─── The grid ────────────────────────────────────────────────────────────────────────────────


def cell_path(run_dir: str, cell: grid.Cell, seed: int) -> str:
  return os.path.join(run_dir, "cells", f"{cell.architecture}__{cell.objective}__seed{seed}.json")


def describe(cells: list[grid.Cell], config: ml_collections.ConfigDict) -> str:
  """The per-cell compute table printed before training."""
  tokens = int(config.train.steps) * int(config.data.batch_size) * int(config.data.seq_length)
  lines = [f"{'cell':34s} {'rows (enc/dec)':>15s} {'raw/example':>11s} {'params':>10s} "
           f"{'MFLOPs/token':>12s} {'train tokens':>12s}"]
  for cell in cells:
    lengths = cell.lengths_dict
    rows = "/".join(str(lengths[s]) for s in ("encoder", "decoder") if s in lengths)
    lines.append(f"{cell.name:34s} {rows:>15s} {cell.chunk_length:>11d} "
                 f"{models.num_params(cell.model_config):>10,d} "
                 f"{grid.flops_per_token(cell) / 1e6:>12.2f} {tokens:>12,d}")
  return "\n".join(lines)


def ctx_names(config: ml_collections.ConfigDict, group: str) -> list[str]:
  """The suite's task types of `group` ("train" or "heldout") that the corpus yields."""
  return [n.split("/")[-1] for n in cells_lib.suite_names(config)[group]]


def notes(config: ml_collections.ConfigDict, rows: list[dict], spec: str) -> str:
  m, d = config.model, config.data
  total = sum(r["cell_seconds"] for r in rows)
  functions = rows[0]["naming_eval_functions"] if rows else 0
  if functions:
    naming = f"""(c) function name from its body: {config.finetune.steps} fine-tuning steps
  of batch {config.finetune.batch_size}, greedy decoding; exact match (%), chrF (0-100, character
  n-grams: partial credit) and teacher-forced NLL per name token (results.csv adds ROUGE-L F1
  and word BLEU, all through `seqlab.metrics`) on {functions} held-out functions."""
  else:
    naming = f"""(c) skipped: the {d.source} corpus yields no Python functions to name
  (its columns show —)."""
  if "zero_shot" in config and rows and math.isfinite(rows[0]["zero_shot_acc"]):
    zs = config.zero_shot
    few_shot = (f" and with {zs.shots} in-context examples" if zs.shots else
                " only (zero_shot.shots=0: the rows hold no in-context example beside a prompt)")
    suite = f"""(d) rank-classification accuracy on the held-out task types of the corpus's
  built-in suite (`seqlab.tasks.register_suite`: {', '.join(ctx_names(config, 'heldout'))}),
  {zs.limit} validation examples each, zero-shot{few_shot}; (e)
  the same zero-shot after {zs.multitask_steps} steps (batch {zs.multitask_batch_size}) of
  multitask fine-tuning on the training types ({', '.join(ctx_names(config, 'train'))}).
  A prompt longer than the cell's {d.seq_length}-token rows loses its oldest tokens."""
  else:
    why = ("the config has no zero_shot section" if "zero_shot" not in config
           else f"the {d.source} corpus yields no task suite")
    suite = f"(d) and (e) skipped: {why} (their columns show —)."
  return f"""
Generated by `python experiments/compare_objectives.py --config {spec} --workdir <dir>`
(config.json holds the exact config).

* Models: d_model {m.d_model}, {m.num_heads} heads x {m.head_dim}, d_ff {m.d_ff}, {m.num_layers}
  layers per stack (the encoder-decoder has {m.num_layers} in each). Rows of {d.seq_length}
  tokens ({d.tokenizer} tokenizer, {d.source} corpus), batch {d.batch_size},
  {config.train.steps} steps: {config.train.steps * d.batch_size * d.seq_length:,} training
  tokens per cell.
* (a) continuation NLL: nats per target token; a held-out chunk of {config.readouts.chunk_length}
  tokens, first half the prefix, second half the target ([S2S] for UL2; a span model gets the
  target as noise span 0). (b) infilling NLL under the R-denoiser (mean span 3, density 0.15,
  seed {config.readouts.infill_seed}; [NLU] for UL2), nats per token: "span tokens" scores the
  corrupted-out tokens only (sentinels teacher-forced), "all targets" also the sentinels (T5's
  targets, eos excluded). Both on {config.readouts.num_sequences} held-out chunks. {naming}
  {suite}
* Mean ± sample std over seeds; best mean per column in bold. Sum of the cells' wall times on
  the machine that ran them: {total:.0f} s.
"""


def run(config: ml_collections.ConfigDict, workdir: str, *, spec: str = "",
        scratch: str | None = None) -> list[dict]:
  """Runs (or resumes) the grid; writes every output; returns the per-cell summary."""
  tokenizer = loop.make_tokenizer(config)
  cells = grid.plan(config, tokenizer.special_ids)  # every ValueError before any training
  run_dir = os.path.join(workdir, config.output.run_name)
  scratch = scratch or os.path.join(tempfile.gettempdir(), "seqlab_compare_objectives")
  seeds = range(check_int("grid.num_seeds", config.grid.num_seeds))
  expected = grid.fingerprint(config)
  finished = {(c.name, s): runs.load_finished(cell_path(run_dir, c, s), expected)
              for c in cells for s in seeds}
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(os.path.join(run_dir, "cells"), exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2, sort_keys=True))
  print(describe(cells, config), flush=True)
  todo = [(c, s) for c in cells for s in seeds if finished[(c.name, s)] is None]
  ctx = cells_lib.Context(config, tokenizer) if todo else None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=len(finished), initial=len(finished) - len(todo), desc="grid",
             disable=not (is_writer and config.output.progress), file=sys.stdout)
  for cell, seed in todo:
    bar.set_postfix_str(f"{cell.name} seed {seed}")
    cell_scratch = os.path.join(scratch, config.output.run_name,
                                f"{cell.architecture}__{cell.objective}__seed{seed}")
    row = cells_lib.run_cell(cell, seed, ctx, cell_scratch)
    finished[(cell.name, seed)] = row
    if is_writer:
      runs.save_finished(cell_path(run_dir, cell, seed), expected, row)
      shutil.rmtree(cell_scratch, ignore_errors=True)
    bar.write(f"{cell.name} seed {seed}: continuation {row['continuation_nll']:.3f}  "
              f"infill {row['infill_nll']:.3f}  name EM {100 * row['exact_match']:.1f}% "
              f"chrF {row['name_chrf']:.1f}  zero-shot {100 * row['zero_shot_acc']:.1f}% "
              f"multitask {100 * row['multitask_acc']:.1f}%  "
              f"({row['cell_seconds']:.0f} s)")
    bar.update(1)
  bar.close()
  rows = [finished[(c.name, s)] for c in cells for s in seeds]
  summary = report.aggregate(rows, [(c.architecture, c.objective) for c in cells])
  if is_writer:
    title = f"Objective comparison: {config.output.run_name}"
    report.write_csv(rows, os.path.join(run_dir, "results.csv"))
    report.write_markdown(summary, os.path.join(run_dir, "results.md"), title=title,
                          notes=notes(config, rows, spec),
                          significance_lines=report.significance(rows, summary),
                          suite=report.suite_table(rows, summary),
                          tasks=report.task_table(rows, summary))
    report.plot(summary, os.path.join(run_dir, "results.png"), title=title)
    print(report.markdown_table(summary), flush=True)
  return summary


def main(argv: list[str] | None = None) -> list[dict]:
  config, run_dir, spec, scratch = runs.grid_command_line(
      __doc__.split("\n")[0], default_config="experiments/configs/compare_objectives.py:quick",
      default_workdir="results/compare_objectives", argv=argv, scratch=True)
  return run(config, os.path.dirname(run_dir), spec=spec, scratch=scratch)


if __name__ == "__main__":
  sys.exit(runs.exit_on_bad_input(main, "compare_objectives"))
