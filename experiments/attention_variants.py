"""MHA vs GQA vs MQA decoders at an equal budget, and GQA "uptraining" from an MHA checkpoint.

    python experiments/attention_variants.py \
        --config experiments/configs/attention_variants.py:quick \
        --workdir results/attention_variants [--config.train.steps=600 ...]

Every variant is the same causal decoder except for its number of key/value heads K
(N query heads, query head n reads kv head n // (N / K)): "mha" (K = N), "gqa_n<d>" (K = N / d),
"gqa_k<K>" (K given), "mqa" (K = 1). All train on the same batches in the same order (full LM
on the Python standard library, byte tokenizer) for the same steps; only their parameter counts
differ (the key/value projections shrink with K), and the table reports them.

Readouts, identical for every row:

* continuation NLL (nats per byte) on held-out chunks: the first half of each chunk is the
  prefix, the second half is scored (teacher-forced, so the prefix conditions every target);
  ± is the standard error over evaluation batches;
* KV-cache bytes at the decode length, measured on the arrays of `init_cache` and by
  `seqlab.flops.kv_cache_bytes`;
* decode tokens/s at long context: greedy decoding through the model's KV cache (`init_cache`,
  `extend`; the loop of `seqlab.decoding.generate`) after held-out prompts of `decode.context`
  bytes; only the decoding steps are timed, the best of rounds that alternate the variants
  (timeit's rule: slower rounds are other processes' doing).

Uptraining (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints"): the MHA model's key and value projections are mean-pooled within
each group of N / K heads (`mean_pool_kv_heads`), then training continues on the next batches
of the MHA run's data stream for `uptrain.fraction` of its steps. Rows: the converted model
before fine-tuning, after it, the same K from scratch, and the MHA parent.

Outputs in `<workdir>/<config.run>/`: results.csv, results.md, results.png, config.json, and
train/<variant> (train/<variant>_uptrain) per training: `seqlab.trainer`'s work directory,
checkpoints every `train.checkpoint_every` steps and at the end. A rerun resumes a killed
training there and reads finished ones back; one with another model, optimizer, steps or data
is refused (use another --workdir). With a `distributed` section, launch the same command on
every host (TPU_SETUP.md); process 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helper modules

import decode_cost  # noqa: E402  pylint: disable=g-import-not-at-top
import attention_variants_report as report  # noqa: E402  pylint: disable=g-import-not-at-top
import experiment_runs as runs  # noqa: E402  pylint: disable=g-import-not-at-top

from seqlab import loop, metrics, models
from seqlab import train as train_lib
from seqlab.data import pipeline as pipeline_lib
from seqlab.data import sources, tokenizers

CSV_COLUMNS = ("variant", "num_kv_heads", "init", "params", "train_steps", "train_tokens",
               "final_train_loss", "continuation_nll", "continuation_nll_stderr",
               "nll_delta_vs_mha", "nll_delta_stderr", "bits_per_byte", "kv_cache_bytes",
               "kv_cache_bytes_formula",
               "decode_tokens_per_s", "decode_ms_per_step", "train_time_s")

_VARIANT = re.compile(r"(mha|mqa|gqa_n(\d+)|gqa_k(\d+))")

# ─── Variants ────────────────────────────────────────────────────────────────────────────────


def num_kv_heads_for(variant: str, num_heads: int) -> int:
  """K of a variant name: "mha" -> N, "mqa" -> 1, "gqa_n<d>" -> N / d, "gqa_k<K>" -> K."""
  match = _VARIANT.fullmatch(variant)
  if match is None:
    raise ValueError(f"unknown variant={variant!r}; expected 'mha', 'mqa', 'gqa_n<d>' "
                     "(K = num_heads / d) or 'gqa_k<K>'")
  if variant == "mha":
    return num_heads
  if variant == "mqa":
    return 1
  if match.group(2) is not None:
    divisor = int(match.group(2))
    if divisor < 1 or num_heads % divisor:
      raise ValueError(f"variant={variant!r}: num_heads={num_heads} is not divisible by "
                       f"{divisor}")
    return num_heads // divisor
  num_kv_heads = int(match.group(3))
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f"variant={variant!r}: num_heads={num_heads} is not a multiple of "
                     f"num_kv_heads={num_kv_heads}")
  return num_kv_heads


def split_names(names: str | Sequence[str]) -> list[str]:
  """"a, b,c" or ["a", "b"] -> ["a", "b", "c"] (empty entries dropped)."""
  if isinstance(names, str):
    names = names.split(",")
  return [n.strip() for n in names if n.strip()]


def resolve_variants(names: str | Sequence[str], num_heads: int) -> dict[str, int]:
  """Variant name -> K, in order; ValueError on an unknown name or two names with one K."""
  names = split_names(names)
  if not names:
    raise ValueError("variants='' names no variant")
  out: dict[str, int] = {}
  for name in names:
    if name in out:
      raise ValueError(f"variant {name!r} is listed twice in variants={','.join(names)!r}")
    num_kv_heads = num_kv_heads_for(name, num_heads)
    same = [other for other, k in out.items() if k == num_kv_heads]
    if same:
      raise ValueError(f"variants {same[0]!r} and {name!r} both give num_kv_heads="
                       f"{num_kv_heads} with num_heads={num_heads}")
    out[name] = num_kv_heads
  return out


# ─── Uptraining: mean-pool key/value heads ───────────────────────────────────────────────────


def mean_pool_kv_heads(params: Mapping[str, Any], num_kv_heads: int) -> dict[str, Any]:
  """Converts attention parameters to `num_kv_heads` kv heads by averaging within each group.

  Every attention module (a dict with "query", "key" and "value" projections) with K_old kv
  heads, K_old a multiple of `num_kv_heads`, gets key and value kernels `[D, K_old, H]` ->
  `[D, num_kv_heads, H]` and biases `[K_old, H]` -> `[num_kv_heads, H]`, new head j being the
  mean of old heads `j * g ... (j + 1) * g - 1` with g = K_old / num_kv_heads. Contiguous
  groups keep the repeat convention: query head n read old head n // (N / K_old) and now reads
  the mean of its group, n // (N / num_kv_heads). Everything else is returned unchanged.
  """
  if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
    raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive integer")

  def pool(x, axis: int):
    old = x.shape[axis]
    if old % num_kv_heads:
      raise ValueError(f"cannot mean-pool {old} kv heads into num_kv_heads={num_kv_heads}: "
                       f"{old} is not a multiple of {num_kv_heads}")
    shape = x.shape[:axis] + (num_kv_heads, old // num_kv_heads) + x.shape[axis + 1:]
    return jnp.mean(jnp.reshape(x, shape), axis=axis + 1).astype(x.dtype)

  def convert(tree):
    if not isinstance(tree, Mapping):
      return tree
    if {"query", "key", "value"} <= set(tree):
      out = dict(tree)
      for name in ("key", "value"):
        projection = dict(tree[name])
        projection["kernel"] = pool(projection["kernel"], 1)       # [D, K, H]
        if "bias" in projection:
          projection["bias"] = pool(projection["bias"], 0)         # [K, H]
        out[name] = projection
      return out
    return {k: convert(v) for k, v in tree.items()}

  return convert(params)


# ─── Data ────────────────────────────────────────────────────────────────────────────────────


def make_batches(config: ml_collections.ConfigDict, split: str, *, seq_length: int,
                 batch_size: int, seed: int, **kwargs) -> pipeline_lib.PipelineIterator:
  """Full-LM decoder batches of byte-tokenized stdlib (or `data.source`) text."""
  data = config.data
  source = sources.get_source(data.source, split=split, **dict(data.source_kwargs))
  tokenizer = tokenizers.get_tokenizer(data.tokenizer, **dict(data.tokenizer_kwargs))
  return pipeline_lib.make_pipeline(source, tokenizer, "full_lm", "decoder",
                                    seq_lengths=seq_length, batch_size=batch_size, seed=seed,
                                    **kwargs)


def continuation_weights(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """float32 [B, T]: the loss weights on the second half of each row (the continuation).

  Target t of a full-LM row is token t of the chunk, predicted from tokens < t; the second half
  (t >= T // 2) is the continuation of the first.
  """
  weights_BT = np.asarray(batch["decoder_loss_weights"], np.float32)
  length = weights_BT.shape[1]
  second_half_T = (np.arange(length) >= length // 2).astype(np.float32)
  return weights_BT * second_half_T[None, :]


def heldout_batches(config: ml_collections.ConfigDict) -> list[dict[str, np.ndarray]]:
  """The first `eval.batches` full batches of the validation split, in file order."""
  it = make_batches(config, "validation", seq_length=int(config.data.seq_length),
                    batch_size=int(config.eval.batch_size), seed=int(config.seed), num_epochs=1,
                    shuffle=False, drop_remainder=True)
  out = []
  for batch in it:
    out.append({**batch, "continuation_weights": continuation_weights(batch)})
    if len(out) == int(config.eval.batches):
      break
  if not out:
    raise ValueError("the validation split gives no full batch of eval.batch_size="
                     f"{config.eval.batch_size} rows of data.seq_length={config.data.seq_length}")
  return out


@functools.lru_cache(maxsize=None)
def _continuation_sums_fn(model):
  """One jitted evaluation per model (equal modules hash equal, so equal configs share it)."""

  @jax.jit
  def sums(params, batch):
    logits = model.apply({"params": params}, batch, train=False)
    return metrics.lm_metrics(logits, batch["decoder_target_tokens"],
                              batch["continuation_weights"])

  return sums


def continuation_nll(model, params, batches: Sequence[Mapping[str, np.ndarray]],
                     ) -> dict[str, float]:
  """Continuation NLL in nats per token of `model` over `batches` (with "continuation_weights").

  Returns {"nll": total NLL / total weight, "stderr": standard error of the per-batch NLLs,
  "tokens": total weight, "per_batch": NLL per token of each batch}.
  """
  sums = _continuation_sums_fn(model)
  per_batch = [jax.device_get(sums(params, b)) for b in batches]
  nll = np.array([float(s["nll_sum"]) for s in per_batch])
  count = np.array([float(s["token_count"]) for s in per_batch])
  means = nll / np.maximum(count, 1.0)
  stderr = float(np.std(means, ddof=1) / math.sqrt(len(means))) if len(means) > 1 else 0.0
  return {"nll": float(nll.sum() / max(count.sum(), 1.0)), "stderr": stderr,
          "tokens": float(count.sum()), "per_batch": means}


def paired_difference(per_batch: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
  """Mean and standard error of `per_batch - reference` (NLLs of the same eval batches).

  Both models see the same batches, so the batch-to-batch spread of the data cancels and the
  difference is known far better than either NLL alone.
  """
  diff = np.asarray(per_batch, np.float64) - np.asarray(reference, np.float64)
  stderr = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
  return float(np.mean(diff)), stderr


# ─── Inference cost (the rest in experiments/decode_cost.py) ───────────────────────────────


def decode_prompts(config: ml_collections.ConfigDict) -> np.ndarray:
  """int32 [decode.batch_size, decode.context] held-out bytes (the tokens of full chunks)."""
  decode = config.decode
  it = make_batches(config, "validation", seq_length=int(decode.context),
                    batch_size=int(decode.batch_size), seed=int(config.seed), num_epochs=1,
                    shuffle=False, drop_remainder=True)
  try:
    batch = next(iter(it))
  except StopIteration:
    raise ValueError(f"the validation split is too small for decode.batch_size="
                     f"{decode.batch_size} prompts of decode.context={decode.context}") from None
  return np.asarray(batch["decoder_target_tokens"], np.int32)


# ─── The experiment ──────────────────────────────────────────────────────────────────────────


def validate(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks the whole config before any training; returns the resolved plan."""
  if type(models.get_preset(config.model.preset)).__name__ != "DecoderConfig":
    raise ValueError(f"model.preset={config.model.preset!r} is not a decoder-only model")
  # K = 1 divides any N: the variants' own K are checked against N below, by name.
  base = models.get_preset(config.model.preset, **{**dict(config.model.overrides),
                                                   "num_kv_heads": 1})
  if base.attention != "causal":
    raise ValueError(f"model attention={base.attention!r}: the experiment trains causal decoders")
  variants = resolve_variants(config.variants, base.num_heads)
  uptrain = split_names(config.uptrain.variants)
  if uptrain and "mha" not in variants:
    raise ValueError(f"uptrain.variants={config.uptrain.variants!r} needs 'mha' (the parent) in "
                     f"variants={config.variants!r}")
  for name in uptrain:
    num_kv_heads = num_kv_heads_for(name, base.num_heads)
    if num_kv_heads == base.num_heads:
      raise ValueError(f"uptrain variant {name!r} has num_kv_heads == num_heads: nothing to pool")
    if num_kv_heads not in variants.values():
      raise ValueError(f"uptrain variant {name!r} (num_kv_heads={num_kv_heads}) has no "
                       f"from-scratch counterpart in variants={config.variants!r}")
  if not 0.0 < float(config.uptrain.fraction) <= 1.0:
    raise ValueError(f"uptrain.fraction={config.uptrain.fraction} must be in (0, 1]")
  cfgs = {name: models.get_preset(config.model.preset,
                                  **{**dict(config.model.overrides), "num_kv_heads": k})
          for name, k in variants.items()}
  seq_length, context = int(config.data.seq_length), int(config.decode.context)
  new_tokens = int(config.decode.new_tokens)
  if seq_length < 2 or seq_length % 2:
    raise ValueError(f"data.seq_length={seq_length} must be even and >= 2 (prefix + continuation)")
  if new_tokens < 2:
    raise ValueError(f"decode.new_tokens={new_tokens} must be >= 2")
  for length, what in ((seq_length, "data.seq_length"), (context + new_tokens, "decode.context "
                                                         "+ decode.new_tokens")):
    if base.position_embedding == "learned" and length > base.max_length:
      raise ValueError(f"{what}={length} exceeds the model's max_length={base.max_length}; "
                       "use position_embedding='rope' or a longer table")
  if int(config.train.steps) < 1:
    raise ValueError(f"train.steps={config.train.steps} must be >= 1")
  up_steps = max(1, round(float(config.uptrain.fraction) * int(config.train.steps)))
  return {"variants": variants, "uptrain": uptrain, "configs": cfgs, "uptrain_steps": up_steps}


def run(config: ml_collections.ConfigDict, out_dir: str) -> list[dict[str, Any]]:
  """Runs the experiment of `config` and writes its outputs to `out_dir`; returns the rows."""
  plan = validate(config)
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  steps, seed = int(config.train.steps), int(config.seed)
  batch_size, seq_length = int(config.data.batch_size), int(config.data.seq_length)
  optimizer = train_lib.OptimizerConfig(**{**config.optimizer.to_dict(), "total_steps": steps})
  inputs = {"seed": seed, "data": config.data.to_dict()}
  heldout = heldout_batches(config)
  started, cpu_started = time.perf_counter(), time.process_time()

  def train(name, cfg, batches, opt, params=None, key_seed=seed):
    """{"params" (on the host), "final_loss", "time_s"} of one training in train/<name>."""
    start = time.perf_counter()
    result = runs.train(cfg, opt, jax.random.key(key_seed), batches, config,
                        steps=opt.total_steps, workdir=os.path.join(out_dir, "train", name),
                        inputs=inputs, params=params, label=name)
    return {"params": runs.host_params(result.state.params), "final_loss": result.final_loss(),
            "time_s": time.perf_counter() - start}

  def train_batches():
    return make_batches(config, "train", seq_length=seq_length, seed=seed,
                        **runs.process_rows(batch_size))

  rows: list[dict[str, Any]] = []
  trained: dict[str, dict[str, Any]] = {}
  parent_data_state = None
  for name, num_kv_heads in plan["variants"].items():
    cfg = plan["configs"][name]
    runs.log(f"[{name}] num_kv_heads={num_kv_heads} params={models.num_params(cfg):,}")
    batches = train_batches()
    trained[name] = result = train(name, cfg, batches, optimizer)
    if name == "mha":
      parent_data_state = batches.get_state()
    rows.append({"variant": name, "num_kv_heads": num_kv_heads, "init": "scratch",
                 "train_steps": steps, "_cfg": cfg, "_result": result})

  up_steps = plan["uptrain_steps"]
  if plan["uptrain"]:
    up_optimizer = dataclasses.replace(
        optimizer, learning_rate=float(config.uptrain.learning_rate), total_steps=up_steps,
        warmup_steps=round(float(config.uptrain.warmup_fraction) * up_steps))
    parent = trained["mha"]
    for name in plan["uptrain"]:
      num_kv_heads = num_kv_heads_for(name, plan["configs"]["mha"].num_heads)
      cfg = next(c for c in plan["configs"].values() if c.num_kv_heads == num_kv_heads)
      pooled = jax.device_get(mean_pool_kv_heads(parent["params"], cfg.num_kv_heads))
      rows.append({"variant": name, "num_kv_heads": cfg.num_kv_heads,
                   "init": "mean-pooled mha, no fine-tuning", "train_steps": steps,
                   "_cfg": cfg, "_result": {"params": pooled, "final_loss": float("nan"),
                                            "time_s": 0.0}})
      batches = train_batches()
      batches.set_state(parent_data_state)  # continue the parent's data stream
      result = train(f"{name}_uptrain", cfg, batches, up_optimizer, params=pooled,
                     key_seed=seed + 1)
      rows.append({"variant": name, "num_kv_heads": cfg.num_kv_heads,
                   "init": f"uptrained from mha ({up_steps} steps)",
                   "train_steps": steps + up_steps, "_cfg": cfg, "_result": result})

  runs.log("evaluating continuation NLL")
  for row in rows:
    cfg, result = row["_cfg"], row["_result"]
    model = cfg.build()
    scores = continuation_nll(model, result["params"], heldout)
    row.update(params=models.num_params(cfg), train_tokens=row["train_steps"] * batch_size *
               seq_length, final_train_loss=result["final_loss"], continuation_nll=scores["nll"],
               continuation_nll_stderr=scores["stderr"], bits_per_byte=scores["nll"] / math.log(2),
               train_time_s=result["time_s"], _per_batch=scores["per_batch"])
  reference = next((r["_per_batch"] for r in rows if r["variant"] == "mha"), None)
  for row in rows:
    delta, delta_stderr = (float("nan"), float("nan")) if reference is None else (
        paired_difference(row["_per_batch"], reference))
    row.update(nll_delta_vs_mha=delta, nll_delta_stderr=delta_stderr)

  runs.log("timing cached decoding")
  prompts = decode_prompts(config)
  decode_len = prompts.shape[1] + int(config.decode.new_tokens)
  by_heads = {}
  for name in plan["variants"]:
    cfg, params = plan["configs"][name], trained[name]["params"]
    by_heads[cfg.num_kv_heads] = (cfg.build(), params)
  speeds = decode_cost.time_decoding(by_heads, prompts,
                                     new_tokens=int(config.decode.new_tokens),
                                     repeats=int(config.decode.repeats))
  for row in rows:  # every row's K has a from-scratch model of the same shapes
    model, params = by_heads[row["num_kv_heads"]]
    measured, formula = decode_cost.kv_cache_bytes(model, params, batch_size=1,
                                                   length=decode_len)
    speed = speeds[row["num_kv_heads"]]
    row.update(kv_cache_bytes=measured, kv_cache_bytes_formula=formula,
               decode_tokens_per_s=speed["tokens_per_s"], decode_ms_per_step=speed["ms_per_step"])

  rows = [{k: row[k] for k in CSV_COLUMNS} for row in rows]
  if is_writer:
    report.write_outputs(rows, CSV_COLUMNS, config, out_dir,
                         total_time_s=time.perf_counter() - started,
                         cpu_time_s=time.process_time() - cpu_started, decode_len=decode_len,
                         prompts_shape=prompts.shape)
    runs.log(f"wrote {out_dir}")
  return rows


# ─── Command line ────────────────────────────────────────────────────────────────────────────


def main(argv: Sequence[str] | None = None) -> int:
  config, out_dir = runs.parse_command_line(__doc__.split("\n")[0], argv)
  loop.join_processes(config)
  rows = run(config, out_dir)
  print(report.markdown_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
