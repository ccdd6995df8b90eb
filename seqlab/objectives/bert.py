"""BERT's pretraining data: masked-LM corruption (15%, 80/10/10) and next-sentence pairs.

Follows Google's `create_pretraining_data.py`: the number of selected positions is exact,
`max(1, round(selection_rate * num_candidates))` (capped by `max_predictions`), drawn without
replacement among the non-reserved positions, rather than a Bernoulli draw per token as in
Hugging Face's collator; the candidates exclude every reserved id (pad, eos, unk, [MASK],
[CLS], [SEP], mode tokens, sentinels), where Google excludes only [CLS] and [SEP]. Random
replacements are drawn uniformly from `SpecialIds.regular_ids`, never a special id.

`nsp_pair` builds one next-sentence pair from sentence-split documents; the grain pipeline's
"mlm_nsp" objective (`seqlab.data.pipeline`) runs it, then `mlm`, on every run of sentences.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from seqlab.objectives.special_ids import SpecialIds, as_tokens


def mlm(tokens: Any, rng: np.random.Generator, *, special: SpecialIds,
        selection_rate: float = 0.15, mask_token_rate: float = 0.8,
        random_token_rate: float = 0.1,
        max_predictions: int | None = None) -> dict[str, np.ndarray]:
  """BERT masked LM: {"inputs": int32[L], "targets": int32[L], "weights": int32[L]}.

  Selects k = min(max(1, round(selection_rate * n)), n, max_predictions) of the n
  non-reserved positions uniformly without replacement. Each selected position independently
  becomes `special.mask` with probability `mask_token_rate`, a uniformly random regular id
  with probability `random_token_rate` (which may equal the original, as in BERT), and stays
  unchanged otherwise. `targets` holds the original id at selected positions and `special.pad`
  elsewhere; `weights` is 1 exactly at selected positions (the feature converter's
  `mlm_targets` / `mlm_weights`). Reserved ids ([CLS], [SEP], pad, ...) pass through and are
  never selected. ValueError if no position can be selected.
  """
  if special.mask is None:
    raise ValueError("special.mask is None; mlm needs a [MASK] id")
  if not 0.0 < selection_rate <= 1.0:
    raise ValueError(f"selection_rate={selection_rate!r} must be in (0, 1]")
  if not (0.0 <= mask_token_rate and 0.0 <= random_token_rate
          and mask_token_rate + random_token_rate <= 1.0):
    raise ValueError(
        f"mask_token_rate={mask_token_rate!r} and random_token_rate={random_token_rate!r} must "
        "be non-negative with a sum <= 1")
  if max_predictions is not None and max_predictions < 1:
    raise ValueError(f"max_predictions={max_predictions!r} must be >= 1 or None")
  tokens = as_tokens(tokens, min_length=1, vocab_size=special.vocab_size, objective="mlm")

  candidates = np.flatnonzero(~special.reserved_table[tokens])
  if candidates.size == 0:
    raise ValueError(
        f"tokens (length {tokens.size}) holds only reserved ids; mlm needs at least one "
        "maskable position")
  num_selected = min(max(1, int(round(selection_rate * candidates.size))), candidates.size)
  if max_predictions is not None:
    num_selected = min(num_selected, max_predictions)
  selected = rng.choice(candidates, num_selected, replace=False)

  # One uniform per selected position splits it three ways: [MASK] / random / unchanged.
  u = rng.random(num_selected)
  to_mask = u < mask_token_rate
  to_random = (u >= mask_token_rate) & (u < mask_token_rate + random_token_rate)
  random_ids = special.regular_ids[rng.integers(special.regular_ids.size, size=num_selected)]

  inputs = tokens.copy()
  inputs[selected[to_mask]] = special.mask
  inputs[selected[to_random]] = random_ids[to_random]
  targets = np.full_like(tokens, special.pad)
  targets[selected] = tokens[selected]
  weights = np.zeros_like(tokens)
  weights[selected] = 1
  return {"inputs": inputs, "targets": targets, "weights": weights}


def _truncation_counts(length_a: int, length_b: int, max_tokens: int) -> tuple[int, int]:
  """Tokens Google's `truncate_seq_pair` removes from (A, B): the longer loses one at a time,
  B on ties, until the pair fits in max_tokens."""
  excess = length_a + length_b - max_tokens
  if excess <= 0:
    return 0, 0
  gap = abs(length_a - length_b)
  if excess <= gap:
    return (excess, 0) if length_a > length_b else (0, excess)
  rest = excess - gap  # both now equal: B, A, B, A, ...
  from_a = (gap if length_a > length_b else 0) + rest // 2
  from_b = (gap if length_b > length_a else 0) + (rest + 1) // 2
  return from_a, from_b


def _truncate(tokens: np.ndarray, remove: int, rng: np.random.Generator) -> np.ndarray:
  # Google drops each token from the front or the back with probability 1/2: the number taken
  # from the front is Binomial(remove, 1/2).
  if remove == 0:
    return tokens
  front = int(rng.binomial(remove, 0.5))
  return tokens[front:tokens.size - (remove - front)]


def _check_random_sentences(random_sentences: Sequence[Any]) -> None:
  if len(random_sentences) == 0:
    raise ValueError("random_sentences is empty; nsp_pair needs a document to draw NotNext from")


def nsp_pair(sentences: Sequence[Any],
             random_sentences: Sequence[Any] | Callable[[], Sequence[Any]],
             rng: np.random.Generator, *, special: SpecialIds, max_length: int,
             is_next_prob: float = 0.5) -> dict[str, np.ndarray]:
  """BERT next-sentence pair: {"inputs", "token_type_ids": int32[L], "nsp_label": int32[]}.

  `sentences` are consecutive sentences (token arrays) of one document, `random_sentences`
  those of another document. As Google's `create_instances_from_document`: A is
  `sentences[:a_end]` with a_end uniform in [1, n - 1]; with probability `is_next_prob` (and
  only if n >= 2) B is the rest of `sentences` (IsNext, nsp_label 0), otherwise B is read from
  a uniformly random start in `random_sentences` until it reaches
  `max_length - 3 - len(A)` tokens (NotNext, nsp_label 1). The pair is then truncated to
  `max_length - 3` tokens (the longer side loses a token from a random end, B on ties).
  inputs = [CLS] A [SEP] B [SEP]; token_type_ids are 0 on [CLS] A [SEP] and 1 on B [SEP].
  Run `mlm` on `inputs` next: [CLS] and [SEP] are reserved and never selected.

  `random_sentences` may also be a zero-argument function returning them, called only for a
  NotNext pair (so a pipeline reads a random document only when it needs one); of the random
  document, only the sentences B reads are converted and checked.
  """
  if special.cls is None or special.sep is None:
    raise ValueError("special.cls and special.sep must be set for nsp_pair")
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or (
      max_length < 5):
    raise ValueError(f"max_length={max_length!r} must be an integer >= 5 ([CLS] A [SEP] B [SEP])")
  if not 0.0 <= is_next_prob <= 1.0:
    raise ValueError(f"is_next_prob={is_next_prob!r} must be in [0, 1]")
  if len(sentences) == 0:
    raise ValueError("sentences is empty; nsp_pair needs at least one sentence")
  if not callable(random_sentences):
    _check_random_sentences(random_sentences)
  sentences = [
      as_tokens(s, name=f"sentences[{i}]", vocab_size=special.vocab_size, objective="nsp_pair")
      for i, s in enumerate(sentences)
  ]
  max_tokens = max_length - 3

  a_end = int(rng.integers(1, len(sentences))) if len(sentences) >= 2 else 1
  tokens_a = np.concatenate(sentences[:a_end])
  is_next = len(sentences) >= 2 and rng.random() < is_next_prob
  if is_next:
    tokens_b = np.concatenate(sentences[a_end:])
  else:
    if callable(random_sentences):
      random_sentences = random_sentences()
      _check_random_sentences(random_sentences)
    target_b_length = max_tokens - tokens_a.size
    start = int(rng.integers(len(random_sentences)))
    pieces, total = [], 0
    for j in range(start, len(random_sentences)):
      sentence = as_tokens(random_sentences[j], name=f"random_sentences[{j}]",
                           vocab_size=special.vocab_size, objective="nsp_pair")
      pieces.append(sentence)
      total += sentence.size
      if total >= target_b_length:
        break
    tokens_b = np.concatenate(pieces)

  remove_a, remove_b = _truncation_counts(tokens_a.size, tokens_b.size, max_tokens)
  tokens_a = _truncate(tokens_a, remove_a, rng)
  tokens_b = _truncate(tokens_b, remove_b, rng)
  cls, sep = np.int32([special.cls]), np.int32([special.sep])
  inputs = np.concatenate([cls, tokens_a, sep, tokens_b, sep]).astype(np.int32)
  token_type_ids = np.concatenate(
      [np.zeros(tokens_a.size + 2, np.int32), np.ones(tokens_b.size + 1, np.int32)])
  return {"inputs": inputs, "token_type_ids": token_type_ids,
          "nsp_label": np.int32(0 if is_next else 1)}
