"""Running one cell of the objective comparison: pretrain, readouts, fine-tune, decode.

`run_cell(cell, seed, ctx)` returns one row of results.csv. A `Context` holds what every cell
shares (tokenizer, held-out data, mesh) and caches jitted functions per model config and
optimizer, so cells with the same shapes compile once.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import objective_grid as grid
import objective_readouts as readouts

from seqlab import checkpoint, decoding, models, parallel
from seqlab import metrics as metrics_lib
from seqlab import features as features_lib
from seqlab import train as train_lib
from seqlab.data import pipeline as pipeline_lib
from seqlab.data import sources as sources_lib

# ─── Runtime context: data, and one compilation per model and shape ─────────────────────────


# Jitted functions per (model config, optimizer, mesh): shared by every cell and every Context
# of the process, so each shape compiles once.
_CACHE: dict[Any, Any] = {}


def _spread(items, num: int) -> list:
  """`num` of `items` at evenly spaced indices (all of them if there are fewer)."""
  items = list(items)
  if len(items) <= num:
    return items
  return [items[i] for i in np.linspace(0, len(items) - 1, num).round().astype(int)]


class Context:
  """What every cell shares: tokenizer, held-out data, the mesh, and jitted functions."""

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
    ft = config.finetune
    sizes = dict(max_body_bytes=ft.max_body_bytes, max_name_bytes=ft.max_name_bytes)
    self.naming_eval = _spread(readouts.function_name_pairs(
        [heldout[i] for i in range(len(heldout))], **sizes), int(ft.num_eval))
    files = _spread(range(len(self.train_source)), int(ft.train_files) or len(self.train_source))
    self.naming_train = readouts.function_name_pairs([self.train_source[i] for i in files],
                                                     **sizes)
    if not self.naming_eval or not self.naming_train:
      raise ValueError(f"data.source={data.source!r} yields no Python functions for (c)")
    self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    self._mesh_key = (tuple(self.mesh.shape.items()), config.mesh.strategy)

  def trainer(self, model_cfg, opt_cfg: train_lib.OptimizerConfig):
    """(model, init_fn(key) -> state, step_fn, state sharding), cached per model and optimizer
    so that cells with the same shapes share one compilation."""
    key = ("trainer", model_cfg, opt_cfg, self._mesh_key)
    if key not in _CACHE:
      model = model_cfg.build()
      tx = train_lib.make_optimizer(opt_cfg)
      dummy = model_cfg.dummy_batch(1)

      def init(rng):
        params = model.init(rng, dummy)["params"]
        return train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                           rng=jax.random.fold_in(rng, 1))

      sharding = parallel.state_shardings(jax.eval_shape(init, jax.random.key(0)), self.mesh,
                                          self.config.mesh.strategy)
      step = parallel.distribute_step(train_lib.make_train_step(train_lib.lm_task()),
                                      self.mesh, self.config.mesh.strategy, sharding)
      _CACHE[key] = (model, jax.jit(init, out_shardings=sharding), step, sharding, tx)
    return _CACHE[key]

  def token_nll(self, model_cfg):
    """jit (params, batch) -> float32 [B, Ld]: -log p(decoder_target_tokens), no dropout."""
    key = ("nll", model_cfg)
    if key not in _CACHE:
      model = model_cfg.build()

      def fn(params, batch):
        logits = model.apply({"params": params}, batch).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]

      _CACHE[key] = jax.jit(fn)
    return _CACHE[key]

  def local_rows(self, batch_size: int) -> int:
    if batch_size % jax.process_count():
      raise ValueError(f"batch_size={batch_size} is not divisible by the "
                       f"{jax.process_count()} processes")
    return batch_size // jax.process_count()


def optimizer_config(section: ml_collections.ConfigDict, steps: int) -> train_lib.OptimizerConfig:
  return train_lib.OptimizerConfig(
      name="adamw", learning_rate=section.learning_rate, schedule=section.schedule,
      warmup_steps=section.warmup_steps, total_steps=steps,
      end_learning_rate_fraction=section.end_learning_rate_fraction,
      weight_decay=section.weight_decay, b1=0.9, b2=section.b2, eps=1e-9,
      clip_norm=section.clip_norm)


def host_params(params):
  """Parameters as host NumPy arrays: this process's copy (FSDP shards are gathered first)."""

  def fetch(x):
    if not x.is_fully_replicated:
      x = jax.jit(lambda y: y, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
    return np.asarray(x.addressable_data(0))

  return jax.tree_util.tree_map(fetch, params)


def _scalar(x) -> float:
  """A replicated scalar as a float; also on several hosts, where it is not fully addressable."""
  return float(np.asarray(x.addressable_data(0)))


# ─── One cell: pretrain, readouts (a) (b), fine-tune and readout (c) ─────────────────────────


def pretrain(cell: grid.Cell, seed: int, ctx: Context, *, checkpoint_dir: str | None = None,
             interrupt_after: int | None = None):
  """Trains a cell from scratch (or from its newest checkpoint); returns (state, info).

  `interrupt_after` stops after that many steps of this call, as a preempted run would (the
  checkpoint test uses it).
  """
  config = ctx.config
  steps = int(config.train.steps)
  model, init_fn, step_fn, sharding, _ = ctx.trainer(
      cell.model_config, optimizer_config(config.optimizer, steps))
  it = pipeline_lib.make_pipeline(
      ctx.train_source, ctx.tokenizer, cell.spec.pipeline_objective, cell.streams,
      seq_lengths=cell.lengths_dict, batch_size=ctx.local_rows(int(config.data.batch_size)),
      seed=seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
      packing=bool(config.data.packing),
      objective_kwargs=grid.objective_kwargs(config, cell.objective))
  every = int(config.train.checkpoint_every)
  ckpt = checkpoint.Checkpointer(checkpoint_dir, max_to_keep=1) if (
      checkpoint_dir and every > 0) else None
  state, start = None, 0
  if ckpt is not None:
    abstract = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init_fn, jax.random.key(seed)), sharding)
    restored = ckpt.restore(abstract)
    if restored is not None:
      state, data_state, _, start = restored
      it.set_state(data_state)
  if state is None:
    state = init_fn(jax.random.key(seed))
  losses = []
  try:
    for step in range(start, steps):
      state, metrics = step_fn(state, parallel.global_batch(next(it), ctx.mesh))
      losses.append(metrics["loss"])
      if (step + 1) % 50 == 0 and not np.isfinite(_scalar(losses[-1])):
        raise FloatingPointError(f"cell {cell.name} seed {seed}: loss is {_scalar(losses[-1])} "
                                 f"at step {step + 1}; lower optimizer.learning_rate")
      if ckpt is not None and (step + 1) % every == 0 and step + 1 < steps:
        ckpt.save(step + 1, state, data_state=it.get_state(), force=True)
      if interrupt_after is not None and step + 1 - start >= interrupt_after:
        break
  finally:
    if ckpt is not None:
      ckpt.close()
  losses = np.array([_scalar(x) for x in losses], np.float64)
  tail = losses[-max(1, len(losses) // 10):] if losses.size else np.array([np.nan])
  if not np.isfinite(tail).all():
    raise FloatingPointError(f"cell {cell.name} seed {seed}: non-finite training loss")
  return state, {"final_train_loss": float(tail.mean()), "steps_run": len(losses),
                 "data_stats": it.stats}


def _naming_examples(ctx: Context, cell: grid.Cell, pairs) -> list[readouts.Example]:
  return readouts.naming_examples(pairs, ctx.tokenizer, cell.spec.readout, ctx.special)


def finetune(cell: grid.Cell, seed: int, params, ctx: Context):
  """`finetune.steps` steps of body -> name (seq2seq format, [S2S] for UL2); returns params."""
  config, ft = ctx.config, ctx.config.finetune
  model, _, step_fn, sharding, tx = ctx.trainer(cell.model_config,
                                                optimizer_config(ft, int(ft.steps)))
  state = train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                      rng=jax.random.key(seed))
  state = jax.device_put(state, sharding)
  pairs = ctx.naming_train
  lengths = grid.finetune_lengths(cell, config)
  batch_size = int(ft.batch_size)
  rows = ctx.local_rows(batch_size)
  first_row = jax.process_index() * rows
  rng = np.random.default_rng([seed, 1])  # the same examples in the same order for every cell
  order = np.concatenate([rng.permutation(len(pairs))
                          for _ in range(-(-int(ft.steps) * batch_size // len(pairs)))])
  for step in range(int(ft.steps)):
    picks = order[step * batch_size + first_row: step * batch_size + first_row + rows]
    examples = _naming_examples(ctx, cell, [pairs[i] for i in picks])
    feats = [features_lib.pad(features_lib.convert_example(
        {"inputs": e.inputs, "targets": e.targets}, cell.streams, eos_id=ctx.special.eos),
        lengths) for e in examples]
    batch = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
    state, _ = step_fn(state, parallel.global_batch(batch, ctx.mesh))
  return state.params


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
  prompts = readouts.generation_prompts(examples, cell.streams, eos_id=ctx.special.eos,
                                        length=int(ft.max_body_bytes) + 2)
  model = cell.model_config.build()
  batch_size = int(ft.decode_batch_size)
  predictions = []
  for start in range(0, len(prompts), batch_size):
    block = prompts[start:start + batch_size]
    real = block.shape[0]
    if real < batch_size:  # repeat a row: one shape, one compilation
      block = np.concatenate([block, np.repeat(block[:1], batch_size - real, axis=0)])
    out = decoding.generate(model, params, block, max_new_tokens=int(ft.max_name_bytes) + 1,
                            strategy="greedy", eos_id=ctx.special.eos)
    tokens = np.asarray(out.tokens)[:real]
    predictions.extend(ctx.tokenizer.decode(row) for row in tokens)
  return score_names(predictions, [name for _, name in ctx.naming_eval])


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


def run_cell(cell: grid.Cell, seed: int, ctx: Context, *,
             checkpoint_dir: str | None = None) -> dict:
  """Pretrain, score (a) and (b), fine-tune, score (c): one row of results.csv."""
  config, special = ctx.config, ctx.special
  start = time.perf_counter()
  state, info = pretrain(cell, seed, ctx, checkpoint_dir=checkpoint_dir)
  pretrain_seconds = time.perf_counter() - start
  params = host_params(state.params)
  fmt = cell.spec.readout
  nll_fn = ctx.token_nll(cell.model_config)
  eval_rows = int(config.readouts.batch_size)

  def score(examples, form, lengths, p):
    return readouts.mean_nll(nll_fn, p, examples, cell.streams, form, lengths, eval_rows,
                             eos_id=special.eos)

  lengths = grid.readout_lengths(cell, config)
  continuation = score(readouts.continuation_examples(ctx.chunks, fmt, special), fmt.format,
                       lengths, params)
  infill_examples = readouts.infill_examples(ctx.chunks, fmt, special,
                                             seed=int(config.readouts.infill_seed))
  infill = score(infill_examples, fmt.format, lengths, params)
  # The literal T5 reading, sentinels scored too (eos still not): a format-knowledge check.
  infill_all = score([dataclasses.replace(e, scored=np.ones_like(e.scored))
                      for e in infill_examples], fmt.format, lengths, params)
  tuned = host_params(finetune(cell, seed, state.params, ctx))
  # The readout rows hold every fine-tuning example too; one shape, one compilation.
  name_nll = score(_naming_examples(ctx, cell, ctx.naming_eval), "seq2seq", lengths, tuned)
  generated = name_generation(cell, tuned, ctx)
  lengths_total = sum(cell.lengths_dict.values())
  return {
      "architecture": cell.architecture, "objective": cell.objective, "seed": seed,
      "params": models.num_params(cell.model_config),
      "train_flops_per_token": grid.flops_per_token(cell),
      "train_tokens": int(config.train.steps) * int(config.data.batch_size) * lengths_total,
      "train_steps": int(config.train.steps), "final_train_loss": info["final_train_loss"],
      "continuation_nll": continuation, "infill_nll": infill,
      "infill_nll_with_sentinels": infill_all, "name_nll": name_nll,
      **generated, "naming_eval_functions": len(ctx.naming_eval),
      "pretrain_seconds": pretrain_seconds,
      "cell_seconds": time.perf_counter() - start,
  }


