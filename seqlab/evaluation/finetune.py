"""Multitask fine-tuning on a task mixture (the T0 / FLAN recipe at small scale), on the engine.

A mixture's examples become training rows in the model's own format: exactly the rows the
scorer shows the model at evaluation (`scoring.pack_requests`), with context = the prompt,
continuation = `target_delimiter` + the answer (a choice task's correct choice), and the loss
on the continuation's tokens. So fine-tuning teaches the very likelihood that rank
classification later compares; eos is not trained (a continuation may go on), which suits
scored tasks and leaves generation to stop at `until` strings.

The rows are a fixed sample (`Mixture.sample(split, num_examples, seed)`), packed next-fit and
cycled in order; `MixtureBatches` keeps its position as iterator state, so a fine-tuning run
resumes exactly through `seqlab.trainer.run`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from seqlab import loop, parallel, trainer
from seqlab import train as train_lib
from seqlab.evaluation import harness, scoring
from seqlab.tasks import registry


class MixtureBatches:
  """Global batches of `batch_size` packed rows from a mixture, this process's share of each.

  Args:
    model: the `harness.LanguageModel` to fine-tune (its format, mode token and rows).
    mixture: a `seqlab.tasks.Mixture`.
    batch_size: rows per global batch.
    num_examples: examples drawn from the mixture (with replacement, by rate).
    seed: the mixture sample's seed.
    split: the tasks' split to train on.
    shard_index / shard_count: this process's slice of every global batch.
  """

  def __init__(self, model: harness.LanguageModel, mixture: registry.Mixture, *,
               batch_size: int, num_examples: int, seed: int = 0, split: str = "train",
               target_delimiter: str = harness.TARGET_DELIMITER, shard_index: int = 0,
               shard_count: int = 1):
    if batch_size < 1 or batch_size % shard_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                       f"{shard_count} processes")
    if num_examples < 1:
      raise ValueError(f"num_examples={num_examples} must be >= 1")
    requests = []
    for _, example in mixture.sample(split, num_examples, seed=seed):
      pair = registry.to_seq2seq(example)
      requests.append(model.encode_pair(pair["inputs"], target_delimiter + pair["targets"]))
    self.rows = [row for row, _, _ in scoring.pack_requests(
        requests, model.architecture, model.fmt, model.lengths, eos_id=model.tokenizer.eos_id,
        mode_id=model.mode_id)]
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.share = batch_size // shard_count
    self.offset = shard_index * self.share
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    start = self.step * self.batch_size + self.offset
    picks = [(start + k) % len(self.rows) for k in range(self.share)]
    self.step += 1
    return {name: np.stack([self.rows[i][name] for i in picks]) for name in self.rows[0]}

  def get_state(self) -> dict[str, int]:
    return {"step": self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.step = int(state["step"])


def finetune(model: harness.LanguageModel, mixture: registry.Mixture, *, steps: int,
             batch_size: int, optimizer: train_lib.OptimizerConfig, num_examples: int,
             seed: int = 0, workdir: str | None = None, mesh: Any = None,
             checkpoint_every: int = 0, label: str = "") -> tuple[harness.LanguageModel,
                                                                   trainer.Result]:
  """`steps` steps of fine-tuning `model` on `mixture` (module doc) with `seqlab.trainer`.

  With a `workdir` the run checkpoints there and resumes; `mesh` defaults to this process's
  first device. Returns the fine-tuned model (parameters on the host) and the engine's
  `Result`. The dropout key is `fold_in(key(seed), 1)`.
  """
  batches = MixtureBatches(model, mixture, batch_size=batch_size, num_examples=num_examples,
                           seed=seed, shard_index=jax.process_index(),
                           shard_count=jax.process_count())
  if mesh is None:
    mesh = parallel.make_mesh(1, 1, devices=jax.local_devices()[:1])
  job = dataclasses.replace(loop.model_job(model.model_cfg, optimizer, True),
                            init_args=(model.params, jax.random.key(seed)))
  recorded = {"mixture": dataclasses.asdict(mixture), "steps": steps, "seed": seed,
              "batch_size": batch_size, "num_examples": num_examples,
              "optimizer": dataclasses.asdict(optimizer), "fmt": model.fmt, "mode": model.mode,
              "lengths": model.lengths}
  result = trainer.run(job, batches, mesh,
                       trainer.Options(steps=steps, checkpoint_every=checkpoint_every,
                                       label=label or f"multitask {mixture.name}"),
                       workdir=workdir, config=recorded if workdir is not None else None,
                       resumable=("checkpoint_every",))
  params = loop.numpy_params(result.state.params)
  return dataclasses.replace(model, params=params), result
