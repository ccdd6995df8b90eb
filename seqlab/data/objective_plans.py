"""Objective plans: how each named objective runs in the grain pipeline (`seqlab.data.pipeline`).

`plan_objective` picks the objective function for an architecture and derives the chunk
length (raw tokens) that makes its examples fit the row lengths exactly (T5's
`span_corruption_lengths` / `denoiser_raw_length`): full LM fills a decoder row; prefix LM,
span corruption and UL2 budget the mode token, sentinels and eos; MLM reserves [CLS] and [SEP];
"mlm_nsp" runs of sentences reserve [CLS], [SEP] and [SEP].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from seqlab import objectives as obj
from seqlab.data import sentence_pairs

OBJECTIVES = ("full_lm", "prefix_lm", "mlm", "mlm_nsp", "span_corruption", "ul2")
ENCODER_OBJECTIVES = ("mlm", "mlm_nsp")
MLM_OPTIONS = ("selection_rate", "mask_token_rate", "random_token_rate", "max_predictions")


@dataclasses.dataclass(frozen=True)
class ObjectivePlan:
  """How one objective runs in the pipeline.

  Attributes:
    fn: (raw tokens int32[n], rng) -> example dict; with `sentence_pairs`,
      (sentences, random_sentences, rng) -> example dict, where `random_sentences` is a
      zero-argument function returning another document's sentences (`objectives.nsp_pair`).
    chunk_length: raw tokens per chunk (with `sentence_pairs`: the tokens a run of sentences
      reaches before it is cut).
    eos_id: what the converter appends (None: nothing, full LM).
    min_length: shortest chunk the objective accepts (shorter ones are counted and skipped).
    sentence_pairs: chunks are runs of whole sentences of one document (BERT's NSP).
  """

  fn: Callable[..., dict[str, np.ndarray]]
  chunk_length: int
  eos_id: int | None
  min_length: int = 1
  sentence_pairs: bool = False


def _budget(architecture: str, lengths: Mapping[str, int]) -> dict[str, int]:
  if architecture == "decoder":
    return {"total_length": lengths["decoder"]}
  return {"inputs_length": lengths["encoder"], "targets_length": lengths["decoder"]}


def plan_objective(objective: str, architecture: str, lengths: Mapping[str, int],
                   special: obj.SpecialIds, **kwargs: Any) -> ObjectivePlan:
  """The objective function and chunk length of a named objective for an architecture.

  `kwargs` go to the objective (`noise_density`, `mean_noise_span_length`, `random_roll`,
  `split`, `prefix_fraction`, `prefix_stddev`, `denoisers`, `s_trailing_sentinel`,
  `selection_rate`, ...; "mlm_nsp" takes `MLM_OPTIONS` and `is_next_prob`).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
  is_encoder = architecture == "encoder"
  if (objective in ENCODER_OBJECTIVES) != is_encoder:
    raise ValueError(f"objective={objective!r} does not fit architecture={architecture!r}: "
                     f"{' and '.join(ENCODER_OBJECTIVES)} need 'encoder' and the encoder "
                     f"trains only with them")
  vocab_size = special.vocab_size
  if objective == "mlm":
    _check_options(objective, kwargs, MLM_OPTIONS)
    cls, sep = np.int32([special.cls]), np.int32([special.sep])

    def mlm_fn(tokens, rng):
      return obj.mlm(np.concatenate([cls, tokens, sep]), rng, special=special, **kwargs)

    return ObjectivePlan(mlm_fn, lengths["encoder"] - 2, eos_id=None)
  if objective == "mlm_nsp":
    _check_options(objective, kwargs, MLM_OPTIONS + sentence_pairs.NSP_OPTIONS)
    length = lengths["encoder"]
    # A run of sentences aims at the row less [CLS], [SEP] and [SEP].
    return ObjectivePlan(sentence_pairs.make_mlm_nsp_fn(length, special, **kwargs), length - 3,
                         eos_id=None, min_length=2, sentence_pairs=True)
  if objective == "full_lm":
    if architecture != "decoder":
      raise ValueError(f"objective='full_lm' has no inputs; it needs architecture='decoder', "
                       f"not {architecture!r}")
    return ObjectivePlan(functools.partial(obj.full_lm, vocab_size=vocab_size, **kwargs),
                         lengths["decoder"], eos_id=None)
  budget = _budget(architecture, lengths)
  if objective == "prefix_lm":
    if architecture == "decoder":
      # inputs ‖ eos ‖ targets ‖ eos is always raw + 2 tokens, wherever the split falls.
      chunk = lengths["decoder"] - 2
    else:  # a random split can put all but one token on either side
      chunk = obj.denoiser_raw_length(obj.Denoiser.prefix(mode=None, **kwargs), **budget)
    return ObjectivePlan(functools.partial(obj.prefix_lm, vocab_size=vocab_size, **kwargs),
                         chunk, eos_id=special.eos, min_length=2)
  if objective == "span_corruption":
    kwargs = {"noise_density": 0.15, "mean_noise_span_length": 3.0, **kwargs}
    random_roll = kwargs.get("random_roll", False)
    denoiser = obj.Denoiser.span(kwargs["mean_noise_span_length"], kwargs["noise_density"],
                                 mode=None)
    chunk = obj.denoiser_raw_length(denoiser, random_roll=random_roll, **budget)
    spans = obj.noise_span_counts(chunk, kwargs["noise_density"],
                                  kwargs["mean_noise_span_length"])[1] + int(random_roll)
    if spans > special.num_sentinels:
      raise ValueError(f"span_corruption at chunk length {chunk} needs {spans} sentinels but "
                       f"the tokenizer reserves num_sentinels={special.num_sentinels}")
    fn = functools.partial(obj.span_corruption, sentinel_ids=special.sentinel_ids,
                           vocab_size=vocab_size, **kwargs)
    return ObjectivePlan(fn, chunk, eos_id=special.eos, min_length=2)
  # ul2
  options = {k: kwargs[k] for k in ("s_trailing_sentinel", "random_roll") if k in kwargs}
  denoisers = kwargs.get("denoisers", "ul2")
  chunk = obj.ul2_raw_length(denoisers, **options, **budget)
  needed = obj.sentinels_needed(denoisers, **options, **budget)
  if needed > special.num_sentinels:
    raise ValueError(f"ul2 with denoisers={denoisers!r} needs {needed} sentinels but the "
                     f"tokenizer reserves num_sentinels={special.num_sentinels}")
  fn = functools.partial(obj.ul2, special=special, **budget, **kwargs)
  return ObjectivePlan(fn, chunk, eos_id=special.eos, min_length=2)


def _check_options(objective: str, kwargs: Mapping[str, Any], options: tuple[str, ...]):
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(f"objective_kwargs {unknown} are not options of objective={objective!r}; "
                     f"its options are {options}")
