"""Zero- and few-shot evaluation of a language model on tasks, as lm-evaluation-harness does.

A task's examples are plain dicts:

  multiple choice  {"prompt": str, "choices": [str, ...], "label": int}
  generation       {"inputs": str, "targets": str}

Prompts follow lm-evaluation-harness's conventions: the context is
`description + fewshot_delimiter.join(shot prompt + target_delimiter + shot answer) +
fewshot_delimiter + prompt` (just the prompt at k = 0) and each choice is scored as the
continuation `target_delimiter + choice`. Trailing whitespace of a context moves to the front
of its continuation, and the pair is tokenised as one string and split after the context's
tokens (lm-evaluation-harness's `_encode_pair`).

Rank classification reports `acc` (argmax of the log-likelihoods), `acc_norm` (argmax of the
log-likelihood per character of the choice, lm-evaluation-harness's length normalisation),
optionally `acc_mutual_info` (argmax of log p(choice | context) - log p(choice | ""),
lm-evaluation-harness's metric of that name: it removes each choice's prior probability, the
bias that dominates small models), their standard errors (sample standard deviation /
sqrt(n)), the chance level (the mean of 1 / number of choices) and the majority baseline
(always the most common gold answer). Few-shot examples are drawn per evaluated example with
the generator
`numpy.random.default_rng([seed, index])` from the task's few-shot split (never the example
itself), so a result does not depend on the order or number of examples evaluated.
Generation tasks decode greedily and are scored with `seqlab.metrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from seqlab import decoding
from seqlab import metrics as metrics_lib
from seqlab.evaluation import scoring
from seqlab.tasks import registry

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclasses.dataclass
class LanguageModel:
  """A trained text model ready to score and generate: config, parameters, tokenizer, format.

  `fmt` and `mode` are `scoring`'s ("lm" for a full-LM decoder, "seq2seq" otherwise; the UL2
  mode token name or None); `lengths` the row length per stream.
  """
  model_cfg: Any
  params: Any
  tokenizer: Any
  fmt: str
  lengths: dict[str, int]
  mode: str | None = None

  @classmethod
  def from_workdir(cls, workdir: str, *, mode: str | None = "auto", fmt: str | None = None,
                   config=None) -> "LanguageModel":
    """The newest readable checkpoint of a `seqlab train` work directory, on one device.

    The format follows the objective the model was trained with ("lm" for a decoder trained
    as a full LM, "seq2seq" otherwise); `mode="auto"` uses "s2s" for a model trained on the
    UL2 mixture and no mode token otherwise (None: none). `config`: the run's saved config
    when the caller has already read it.
    """
    from seqlab import loop  # pylint: disable=g-import-not-at-top
    if config is None:
      config = loop.saved_config(workdir)
    experiment, params, _ = loop.restore_params(config, workdir)
    if experiment.architecture not in ("decoder", "encoder_decoder"):
      raise ValueError(f"workdir={workdir!r} holds a {experiment.architecture} model; "
                       "continuations are scored by a decoder or an encoder-decoder")
    objective = config.data.get("objective")
    if fmt is None:
      fmt = "lm" if objective == "full_lm" and experiment.architecture == "decoder" \
          else "seq2seq"
    if mode == "auto":
      mode = "s2s" if objective == "ul2" else None
    return cls(experiment.model_cfg, params, loop.make_tokenizer(config), fmt,
               loop.seq_lengths(config, experiment.architecture), mode)

  @property
  def architecture(self) -> str:
    return scoring.architecture_of(self.model_cfg)

  @property
  def mode_id(self) -> int | None:
    return None if self.mode is None else self.tokenizer.special_ids.mode_id(self.mode)

  def scorer(self, *, batch_size: int = 8, pack: bool = True) -> scoring.Scorer:
    return scoring.Scorer(self.model_cfg, self.params, fmt=self.fmt, lengths=self.lengths,
                          eos_id=self.tokenizer.eos_id, mode_id=self.mode_id,
                          batch_size=batch_size, pack=pack)

  def encode_pair(self, context: str, continuation: str) -> scoring.Request:
    """lm-evaluation-harness's `_encode_pair` (module doc)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      continuation = context[-spaces:] + continuation
      context = context[:-spaces]
    whole = np.asarray(self.tokenizer.encode(context + continuation), np.int32)
    context_ids = np.asarray(self.tokenizer.encode(context), np.int32)
    return scoring.Request(whole[:context_ids.size], whole[context_ids.size:])

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int,
               until: Sequence[str] = (), batch_size: int = 8) -> list[str]:
    """Greedy continuations of `prompts`, cut before the first of `until` (and at eos)."""
    special = self.tokenizer.special_ids
    rows = []
    for prompt in prompts:
      ids = np.asarray(self.tokenizer.encode(prompt), np.int32)
      if self.mode is not None:
        ids = np.concatenate([np.int32([self.mode_id]), ids])
      if self.fmt == "seq2seq" and ids.size:
        ids = np.concatenate([ids, np.int32([special.eos])])
      rows.append(ids)
    # The room a row leaves: a decoder holds start id + prompt + new tokens.
    room = (self.lengths["decoder"] - 1 - max_new_tokens if self.architecture == "decoder"
            else self.lengths["encoder"])
    if room < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                       f"rows of {self.lengths}")
    rows = [r[-room:] for r in rows]
    tokens = generate_ids(self.model_cfg, self.params, rows, max_new_tokens=max_new_tokens,
                          eos_id=special.eos, batch_size=batch_size)
    out = [self.tokenizer.decode(row) for row in tokens]
    return [cut_at(text, until) for text in out]


def prompt_batch(rows: Sequence[np.ndarray], architecture: str, width: int) -> np.ndarray:
  """int32 [len(rows), width] prompts for `seqlab.decoding.generate`: a decoder's rows
  LEFT-padded (generation continues from the last column), an encoder's RIGHT-padded."""
  out = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    if row.size > width:
      raise ValueError(f"a prompt of length {row.size} exceeds width={width}")
    if architecture == "decoder":
      out[i, width - row.size:] = row
    else:
      out[i, :row.size] = row
  return out


def generate_ids(model_cfg, params, rows: Sequence[np.ndarray], *, max_new_tokens: int,
                 eos_id: int, batch_size: int = 8, width: int | None = None) -> np.ndarray:
  """Greedy continuations (int32 [len(rows), max_new_tokens], eos-padded) of token rows.

  Rows are padded to `width` (default: the longest row) by `prompt_batch` and decoded
  `batch_size` at a time; a short last batch repeats its first row, so every batch has one
  shape and one compilation.
  """
  model = model_cfg.build()
  architecture = scoring.architecture_of(model_cfg)
  prompts = prompt_batch(rows, architecture, width or max((r.size for r in rows), default=1))
  out = []
  for start in range(0, len(prompts), batch_size):
    block = prompts[start:start + batch_size]
    real = block.shape[0]
    if real < batch_size:
      block = np.concatenate([block, np.repeat(block[:1], batch_size - real, axis=0)])
    out.append(np.asarray(decoding.generate(
        model, params, block, max_new_tokens=max_new_tokens, strategy="greedy",
        eos_id=eos_id).tokens)[:real])
  return np.concatenate(out) if out else np.zeros((0, max_new_tokens), np.int32)


def cut_at(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any string of `until`."""
  end = len(text)
  for stop in until:
    if stop:
      found = text.find(stop)
      if found >= 0:
        end = min(end, found)
  return text[:end]


# ─── Prompts ─────────────────────────────────────────────────────────────────────────────────


def answer(example: Mapping[str, Any]) -> str:
  """The gold continuation of an example (without the target delimiter)."""
  return registry.to_seq2seq(example)["targets"]


def question(example: Mapping[str, Any]) -> str:
  return registry.to_seq2seq(example)["inputs"]


def fewshot_context(example: Mapping[str, Any], shots: Sequence[Mapping[str, Any]], *,
                    description: str = "", target_delimiter: str = TARGET_DELIMITER,
                    fewshot_delimiter: str = FEWSHOT_DELIMITER) -> str:
  """The context of `example` behind `shots` (module doc)."""
  parts = [question(s) + target_delimiter + answer(s) for s in shots]
  return description + fewshot_delimiter.join([*parts, question(example)])


def draw_shots(pool: Sequence[Mapping[str, Any]], k: int, *, seed: int, index: int,
               exclude: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
  """`k` distinct examples of `pool` for example number `index` (never `exclude`)."""
  if k < 0:
    raise ValueError(f"num_shots={k} is negative")
  if k == 0:
    return []
  candidates = [e for e in pool if e != exclude]
  if len(candidates) < k:
    raise ValueError(f"num_shots={k} but the few-shot split has {len(candidates)} examples")
  picks = np.random.default_rng([seed, index]).choice(len(candidates), k, replace=False)
  return [candidates[i] for i in picks]


# ─── Scores ──────────────────────────────────────────────────────────────────────────────────


def _stderr(values: np.ndarray) -> float:
  return float(np.std(values, ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def majority_baseline(examples: Sequence[Mapping[str, Any]]) -> float:
  """The accuracy of always giving the most common gold answer (by its text): the bar a
  constant guess clears when labels are unbalanced (a yes/no task that is 60% "yes")."""
  answers = [answer(e) for e in examples]
  if not answers:
    return 0.0
  return max(answers.count(a) for a in set(answers)) / len(answers)


def rank_classification(model: LanguageModel, examples: Sequence[Mapping[str, Any]], *,
                        num_shots: int = 0, fewshot_pool: Sequence[Mapping[str, Any]] = (),
                        seed: int = 1234, description: str = "", batch_size: int = 8,
                        target_delimiter: str = TARGET_DELIMITER,
                        fewshot_delimiter: str = FEWSHOT_DELIMITER,
                        mutual_info: bool = False) -> dict[str, float]:
  """acc, acc_norm (and with `mutual_info` acc_mutual_info), their standard errors, chance,
  the majority baseline and n of multiple-choice `examples`."""
  requests, spans, lengths = [], [], []
  for index, example in enumerate(examples):
    choices = list(example["choices"])
    label = int(example["label"])
    if not 0 <= label < len(choices):
      raise ValueError(f"example {index}: label={label} is not an index of its "
                       f"{len(choices)} choices")
    shots = draw_shots(fewshot_pool, num_shots, seed=seed, index=index, exclude=example)
    context = fewshot_context(example, shots, description=description,
                              target_delimiter=target_delimiter,
                              fewshot_delimiter=fewshot_delimiter)
    spans.append((len(requests), len(choices), label))
    for choice in choices:
      requests.append(model.encode_pair(context, target_delimiter + choice))
      lengths.append(len(target_delimiter + choice))
  if not spans:
    raise ValueError("no examples to evaluate")
  num_conditional = len(requests)
  if mutual_info:
    # lm-evaluation-harness's unconditional requests: ("", delimiter + choice), each choice
    # text once (a yes/no task asks two).
    priors = {c: None for e in examples for c in e["choices"]}
    requests.extend(model.encode_pair("", target_delimiter + c) for c in priors)
  logprobs = np.asarray([s.logprob for s in model.scorer(batch_size=batch_size).score(requests)])
  if mutual_info:
    priors = dict(zip(priors, logprobs[num_conditional:]))
  lengths = np.asarray(lengths, np.float64)
  correct = {"acc": [], "acc_norm": [], "acc_mutual_info": []}
  chance = []
  for (start, n, label), example in zip(spans, examples):
    ll = logprobs[start:start + n]
    correct["acc"].append(float(np.argmax(ll) == label))
    correct["acc_norm"].append(float(np.argmax(ll / lengths[start:start + n]) == label))
    if mutual_info:
      prior = np.asarray([priors[c] for c in example["choices"]])
      correct["acc_mutual_info"].append(float(np.argmax(ll - prior) == label))
    chance.append(1.0 / n)
  out = {}
  for name, values in correct.items():
    if values:
      values = np.asarray(values)
      out.update({name: float(values.mean()), f"{name}_stderr": _stderr(values)})
  return {**out, "chance": float(np.mean(chance)), "majority": majority_baseline(examples),
          "n": float(len(spans))}


GENERATION_METRICS = ("exact_match", "chrf", "rouge_l", "bleu")


def score_generations(predictions: Sequence[str], references: Sequence[str],
                      metrics: Iterable[str] = GENERATION_METRICS) -> dict[str, float]:
  """`seqlab.metrics` of predictions against one reference each (stripped of whitespace)."""
  predictions = [p.strip() for p in predictions]
  references = [r.strip() for r in references]
  out = {}
  for name in metrics:
    if name == "exact_match":
      out[name] = metrics_lib.exact_match(predictions, references)
    elif name == "chrf":
      out[name] = metrics_lib.chrf(predictions, [[r] for r in references])
    elif name == "rouge_l":
      out[name] = float(np.mean(metrics_lib.rouge(
          predictions, references, rouge_types=("rougeL",))["rougeL"].fmeasure))
    elif name == "bleu":
      out[name] = metrics_lib.bleu(predictions, [[r] for r in references]).score
    else:
      raise ValueError(f"metric={name!r} is not one of {GENERATION_METRICS}")
  return out


def generation(model: LanguageModel, examples: Sequence[Mapping[str, Any]], *,
               max_new_tokens: int, num_shots: int = 0,
               fewshot_pool: Sequence[Mapping[str, Any]] = (), seed: int = 1234,
               description: str = "", until: Sequence[str] = ("\n\n",),
               metrics: Iterable[str] = GENERATION_METRICS, batch_size: int = 8,
               target_delimiter: str = TARGET_DELIMITER,
               fewshot_delimiter: str = FEWSHOT_DELIMITER) -> dict[str, float]:
  """Greedy generation for `examples` scored against their targets, plus n."""
  contexts = []
  for index, example in enumerate(examples):
    shots = draw_shots(fewshot_pool, num_shots, seed=seed, index=index, exclude=example)
    contexts.append(fewshot_context(example, shots, description=description,
                                    target_delimiter=target_delimiter,
                                    fewshot_delimiter=fewshot_delimiter) + target_delimiter)
  if not contexts:
    raise ValueError("no examples to evaluate")
  predictions = model.generate(contexts, max_new_tokens=max_new_tokens, until=until,
                               batch_size=batch_size)
  return {**score_generations(predictions, [e["targets"] for e in examples], metrics),
          "n": float(len(examples))}


def evaluate_tasks(model: LanguageModel, names: Sequence[str], *, shots: Sequence[int] = (0,),
                   limit: int | None = None, seed: int = 1234, batch_size: int = 8,
                   max_new_tokens: int | None = None,
                   mutual_info: bool = False) -> list[dict[str, Any]]:
  """Registered tasks (`seqlab.tasks`) scored on their validation split, shots from train.

  One row per (task, number of shots): the task's metrics (rank classification for a choice
  task, `generation` for a generation task) with "task", "shots"; then per number of shots a
  row with task "mean" averaging the accuracies, chance and majority over the choice tasks.
  `limit` keeps the first examples of each validation split; `mutual_info` adds
  acc_mutual_info (`rank_classification`).
  """
  from seqlab import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for k in shots:
    mine = []
    for name in names:
      task = tasks_lib.get(name)
      examples = task.examples("validation")[:limit]
      common = dict(num_shots=k, fewshot_pool=task.examples("train"), seed=seed,
                    description=task.description, batch_size=batch_size,
                    target_delimiter=task.target_delimiter)
      if task.kind == "choice":
        values = rank_classification(model, examples, mutual_info=mutual_info, **common)
      else:
        values = generation(model, examples, max_new_tokens=max_new_tokens or
                            task.max_new_tokens, **common)
      mine.append({"task": name, "shots": k, **values})
    choice = [r for r in mine if "acc" in r]
    rows.extend(mine)
    if choice:
      averaged = ("acc", "acc_norm", *(("acc_mutual_info",) if mutual_info else ()),
                  "chance", "majority")
      rows.append({"task": "mean", "shots": k,
                   **{m: float(np.mean([r[m] for r in choice])) for m in averaged},
                   "tasks": float(len(choice))})
  return rows
