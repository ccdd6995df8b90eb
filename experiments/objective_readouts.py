"""Readouts of the objective comparison: held-out data, per-cell formats, scoring.

Every cell of `compare_objectives.py` is scored on the same held-out tokens; only the *format*
that presents them to a model follows how that model was pretrained (its natural way):

  format      used by                         an example {inputs, targets} becomes
  "lm"        full-LM pretraining             one stream, inputs ‖ targets, no separator (a full
                                              LM saw raw text only; eos means a new document)
  "seq2seq"   every other objective           seqio's features: decoder inputs ‖ eos ‖ targets ‖
                                              eos (prefix bidirectional in a prefix decoder);
                                              encoder-decoder inputs ‖ eos -> targets ‖ eos

Readouts (NLL in nats per scored token):

  (a) continuation: a held-out chunk of `2k` tokens; the first half is the prefix, the second
      the target. UL2 gets [S2S] in front of the prefix; a span-corruption model gets the
      target as its one noise span (inputs = prefix ‖ S0, targets = S0 ‖ target), T5's way of
      asking a span model to continue. Scored: the `k` target tokens.
  (b) span infilling: the R-denoiser (mean span 3, noise density 0.15) corrupts each chunk with
      a fixed seed; inputs = the corrupted chunk ([NLU] first for UL2), targets = sentinels and
      spans. Scored two ways: the corrupted-out (span) tokens only, where sentinels are
      teacher-forced format, which measures how well the hidden text is predicted; and every
      target token but eos (T5's targets), where predicting each next sentinel also asks *where a
      span ends*, i.e. how well a model knows this corruption's span lengths.
  (c) function naming, built with `ast` from the corpus: inputs = a function's body without
      its `def` line, targets = its name (see `function_name_pairs`).
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from seqlab import features as features_lib
from seqlab import objectives as obj
from seqlab.evaluation import scoring

FORMATS = ("lm", "seq2seq")


@dataclasses.dataclass(frozen=True)
class ReadoutFormat:
  """How one pretraining objective is presented at readout time.

  Attributes:
    format: "lm" or "seq2seq" (module doc).
    continuation_mode / infill_mode / finetune_mode: mode token name ("s2s", "nlu", "nlg") put
      in front of the inputs, or None.
    continuation_sentinel: continue as a span-corruption model (the target is noise span 0).
  """
  format: str = "seq2seq"
  continuation_mode: str | None = None
  infill_mode: str | None = None
  finetune_mode: str | None = None
  continuation_sentinel: bool = False


# ─── Held-out chunks ─────────────────────────────────────────────────────────────────────────


def heldout_chunks(source: Any, tokenizer: Any, length: int, num: int) -> np.ndarray:
  """int32 [num, length]: chunks spread evenly over the documents of `source`.

  Each document is cut into consecutive `length`-token pieces (no chunk crosses a document
  boundary, so no eos inside); `num` of all pieces are taken at evenly spaced indices, so the
  readout covers the whole split, not its first file.
  """
  if length < 2 or num < 1:
    raise ValueError(f"length={length} must be >= 2 and num={num} >= 1")
  pieces = []
  for index in range(len(source)):
    document = source[index]
    if not isinstance(document, str) or not document:
      continue
    tokens = np.asarray(tokenizer.encode(document), np.int32)
    for start in range(0, tokens.size - length + 1, length):
      pieces.append(tokens[start:start + length])
  if len(pieces) < num:
    raise ValueError(f"the held-out split has only {len(pieces)} chunks of length {length}; "
                     f"readouts.num_sequences={num} is too many")
  picks = np.linspace(0, len(pieces) - 1, num).round().astype(int)
  return np.stack([pieces[i] for i in picks])


def _with_mode(tokens: np.ndarray, mode: str | None, special: obj.SpecialIds) -> np.ndarray:
  if mode is None:
    return tokens
  return np.concatenate([np.int32([special.mode_id(mode)]), tokens]).astype(np.int32)


def continuation_examples(chunks: np.ndarray, fmt: ReadoutFormat,
                          special: obj.SpecialIds) -> list[scoring.Request]:
  """(a): prefix = first half, target = second half of every chunk (module doc)."""
  half = chunks.shape[1] // 2
  out = []
  for chunk in chunks:
    prefix, target = chunk[:half], chunk[half:]
    scored = np.ones(target.size, bool)
    if fmt.continuation_sentinel:
      sentinel = np.int32([special.sentinel(0)])
      prefix = np.concatenate([prefix, sentinel])
      target = np.concatenate([sentinel, target])
      scored = np.concatenate([[False], scored])
    out.append(scoring.Request(_with_mode(prefix, fmt.continuation_mode, special), target, scored))
  return out


def infill_examples(chunks: np.ndarray, fmt: ReadoutFormat, special: obj.SpecialIds, *,
                    seed: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> list[scoring.Request]:
  """(b): R-denoiser span corruption of every chunk; the mask of chunk i uses seed [seed, i]."""
  out = []
  for i, chunk in enumerate(chunks):
    rng = np.random.default_rng([seed, i])
    mask = obj.random_spans_noise_mask(chunk.size, noise_density, mean_noise_span_length, rng)
    example = obj.corrupt_spans(chunk, mask, special.sentinel_ids)
    targets = example["targets"]
    scored = ~np.isin(targets, special.sentinel_ids)
    out.append(scoring.Request(_with_mode(example["inputs"], fmt.infill_mode, special), targets, scored))
  return out


# ─── Function naming (c) ─────────────────────────────────────────────────────────────────────


def function_name_pairs(texts: Sequence[str], *, max_body_bytes: int,
                        max_name_bytes: int) -> list[tuple[str, str]]:
  """(body, name) pairs of the functions in Python `texts`, deduplicated, in source order.

  body: the source lines from the first statement of the body to the function's end,
  dedented and cut to its first `max_body_bytes` UTF-8 bytes (at a character boundary), so
  the `def` line (name and signature) is never shown. Skipped: dunder methods (`__init__`
  and friends would make a constant guess score), one-line functions (body on the `def`
  line), names longer than `max_name_bytes` bytes, files that do not parse.
  """
  pairs, seen = [], set()
  for text in texts:
    try:
      tree = ast.parse(text)
    except (SyntaxError, ValueError):
      continue
    lines = text.splitlines()
    functions = [node for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(functions, key=lambda n: (n.lineno, n.col_offset)):  # source order
      name = node.name
      if name.startswith("__") and name.endswith("__"):
        continue
      if len(name.encode("utf-8")) > max_name_bytes:
        continue
      first = node.body[0]
      if first.lineno <= node.lineno or node.end_lineno is None:
        continue
      # The first body line may sit behind decorators or a multi-line signature; start at
      # the statement's own line.
      body = textwrap.dedent("\n".join(lines[first.lineno - 1:node.end_lineno]))
      body = body.encode("utf-8")[:max_body_bytes].decode("utf-8", errors="ignore").strip()
      if not body or (body, name) in seen:
        continue
      seen.add((body, name))
      pairs.append((body, name))
  return pairs


def naming_examples(pairs: Sequence[tuple[str, str]], tokenizer: Any, fmt: ReadoutFormat,
                    special: obj.SpecialIds) -> list[scoring.Request]:
  """(c) as seq2seq examples: inputs = [mode] body, targets = name (all scored)."""
  out = []
  for body, name in pairs:
    inputs = np.asarray(tokenizer.encode(body), np.int32)
    targets = np.asarray(tokenizer.encode(name), np.int32)
    out.append(scoring.Request(_with_mode(inputs, fmt.finetune_mode, special), targets,
                       np.ones(targets.size, bool)))
  return out


# ─── Features ────────────────────────────────────────────────────────────────────────────────


def feature_lengths(examples: Sequence[scoring.Request], architecture: str, fmt: str,
                    eos_id: int) -> dict[str, int]:
  """The longest stream lengths the examples need (to check them against a budget)."""
  longest: dict[str, int] = {}
  for example in examples:
    feats, _ = scoring.request_features(example, architecture, fmt, eos_id=eos_id)
    for stream, n in features_lib.feature_lengths(feats).items():
      longest[stream] = max(longest.get(stream, 0), n)
  return longest


def mean_nll(scorer: scoring.Scorer, examples: Sequence[scoring.Request]) -> float:
  """Mean NLL (nats) over the scored targets of `examples`, which must fit the scorer's rows
  whole (a readout never drops context)."""
  scores = scorer.score(examples)
  if scorer.truncated:
    raise ValueError(f"{scorer.truncated} readout examples do not fit the rows "
                     f"{scorer.lengths}")
  count = sum(s.num_tokens for s in scores)
  if count == 0:
    raise ValueError("no scored tokens in the readout")
  return -sum(s.logprob for s in scores) / count
