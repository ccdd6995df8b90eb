"""Embedding-based text metrics: BERTScore and MoverScore over any contextual embedder.

The embedder is a callable `embed(texts: list[str]) -> list[item]` with one item per text:
either an array [L_i, D] of token embeddings, or a tuple `(tokens, embeddings)` with
`len(tokens) == L_i`. Tokens (strings or ids, anything hashable) are needed for idf weights
and for `ignore`. For a seqlab encoder whose hidden states for ids [L] are `hidden(ids)`
[L, D]: `lambda texts: [(ids, np.asarray(hidden(ids))) for ids in map(tok.encode, texts)]`.

idf follows the BERTScore paper (and the bert_score / moverscore code): over a corpus of M
token lists, idf(t) = log((M + 1) / (df(t) + 1)), where df(t) is the number of lists that
contain t; a token never seen gets log(M + 1). A token in every list gets weight 0, so idf
needs a corpus of many sentences to be informative.
"""

import dataclasses
import math
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from seqlab.metrics import _inputs

EmbedFn = Callable[[list[str]], Sequence[Any]]
Ignore = Callable[[Hashable], bool] | Collection[Hashable] | None


@dataclasses.dataclass(frozen=True)
class Idf:
  """Inverse document frequencies: `table[token]`, `default` for tokens never seen."""
  table: Mapping[Hashable, float]
  default: float

  def weights(self, tokens: Sequence[Hashable]) -> np.ndarray:
    """idf of each token, float64 [len(tokens)]."""
    return np.array([self.table.get(t, self.default) for t in tokens], dtype=np.float64)


def idf_from_corpus(token_lists: Sequence[Sequence[Hashable]]) -> Idf:
  """idf(t) = log((M + 1) / (df(t) + 1)) over M token lists; unseen tokens log(M + 1)."""
  token_lists = _inputs.check_corpus(token_lists, "token_lists")
  num_docs = len(token_lists)
  df: dict[Hashable, int] = {}
  for tokens in token_lists:
    for t in set(tokens):
      df[t] = df.get(t, 0) + 1
  return Idf(table={t: math.log((num_docs + 1) / (c + 1)) for t, c in df.items()},
             default=math.log(num_docs + 1))


class PRF(NamedTuple):
  """Precision, recall and F1 arrays [N] (or floats for a single pair)."""
  precision: Any
  recall: Any
  f1: Any


@dataclasses.dataclass(frozen=True)
class _Embedded:
  tokens: list[Hashable] | None
  unit_LD: np.ndarray  # rows L2-normalized, float64


def _embed(embed: EmbedFn, texts: list[str], name: str) -> list[_Embedded]:
  items = list(embed(list(texts)))
  if len(items) != len(texts):
    raise ValueError(f"embed({name}) returned {len(items)} items for {len(texts)} texts")
  out = []
  for i, item in enumerate(items):
    tokens = None
    if isinstance(item, tuple):
      if len(item) != 2:
        raise ValueError(f"embed({name})[{i}] must be an array or a (tokens, embeddings) pair")
      tokens, item = list(item[0]), item[1]
    emb_LD = np.asarray(item, dtype=np.float64)
    if emb_LD.ndim != 2:
      raise ValueError(f"embed({name})[{i}] has shape {emb_LD.shape}; expected [L, D]")
    if tokens is not None and len(tokens) != emb_LD.shape[0]:
      raise ValueError(f"embed({name})[{i}]: {len(tokens)} tokens but {emb_LD.shape[0]} "
                       "embedding rows")
    out.append(_Embedded(tokens, _unit_rows(emb_LD, f"embed({name})[{i}]")))
  dims = {e.unit_LD.shape[1] for e in out}
  if len(dims) > 1:
    raise ValueError(f"embed({name}) returned embeddings of different widths {sorted(dims)}")
  return out


def _unit_rows(emb_LD: np.ndarray, name: str) -> np.ndarray:
  if not np.all(np.isfinite(emb_LD)):
    raise ValueError(f"{name} contains non-finite values")
  norms_L = np.linalg.norm(emb_LD, axis=-1)
  zero = np.flatnonzero(norms_L == 0)
  if zero.size:
    raise ValueError(f"{name}[{zero[0]}] is a zero vector; cosine similarity is undefined")
  return emb_LD / norms_L[:, None]


def _weights(e: _Embedded, idf: Idf | None, ignore: Ignore, name: str) -> np.ndarray:
  length = e.unit_LD.shape[0]
  if idf is None and ignore is None:
    return np.ones(length)
  if e.tokens is None:
    raise ValueError(f"{name}: idf weights or ignore need tokens; make embed return "
                     "(tokens, embeddings) pairs")
  w = idf.weights(e.tokens) if idf is not None else np.ones(length)
  if ignore is not None:
    is_ignored = ignore if callable(ignore) else (lambda t: t in ignore)
    w = np.where([bool(is_ignored(t)) for t in e.tokens], 0.0, w) if length else w
  return w


def _check_weights(w: np.ndarray | None, length: int, name: str) -> np.ndarray:
  if w is None:
    return np.ones(length)
  w = np.asarray(w, dtype=np.float64)
  if w.shape != (length,):
    raise ValueError(f"{name}.shape={w.shape} != ({length},)")
  bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}]={w[bad[0]]} must be finite and >= 0")
  return w


def bert_score_from_embeddings(hyp_LD: Any, ref_SD: Any, *, hyp_weights: Any = None,
                               ref_weights: Any = None) -> PRF:
  """BERTScore of one pair from token embeddings (greedy cosine matching, Zhang et al. 2020).

  P = sum_i w_i max_j cos(h_i, r_j) / sum_i w_i over hypothesis tokens i,
  R = sum_j v_j max_i cos(h_i, r_j) / sum_j v_j over reference tokens j, F1 = 2PR/(P+R).
  Weights default to 1. When either side has no tokens or zero total weight, (P, R, F1) =
  (0, 0, 0), as bert_score gives an empty candidate or reference; F1 = 0 when P + R = 0.
  """
  h_LD = _unit_rows(np.asarray(hyp_LD, dtype=np.float64), "hyp_LD")
  r_SD = _unit_rows(np.asarray(ref_SD, dtype=np.float64), "ref_SD")
  return _greedy_match(h_LD, r_SD, _check_weights(hyp_weights, h_LD.shape[0], "hyp_weights"),
                       _check_weights(ref_weights, r_SD.shape[0], "ref_weights"))


def _greedy_match(h_LD: np.ndarray, r_SD: np.ndarray, w_L: np.ndarray, v_S: np.ndarray) -> PRF:
  # An empty side (bert_score: nothing but [CLS] / [SEP], both weight 0) zeroes P and R.
  if not (w_L.sum() > 0 and v_S.sum() > 0):
    return PRF(0.0, 0.0, 0.0)
  if h_LD.shape[1] != r_SD.shape[1]:
    raise ValueError(f"embedding widths differ: {h_LD.shape[1]} != {r_SD.shape[1]}")
  cos_LS = h_LD @ r_SD.T
  p = float(w_L @ cos_LS.max(axis=1) / w_L.sum())
  r = float(v_S @ cos_LS.max(axis=0) / v_S.sum())
  f = 2 * p * r / (p + r) if p + r != 0 else 0.0
  return PRF(p, r, f)


def bert_score(hypotheses: Sequence[Any], references: Sequence[Any], embed: EmbedFn, *,
               idf: bool | Idf = False, baseline: tuple[float, float, float] | None = None,
               ignore: Ignore = None, decode: _inputs.Decode | None = None) -> PRF:
  """BERTScore P / R / F1 per hypothesis, arrays [N].

  references[i] is one reference (a text or token ids) or a list of them. With several,
  P, R and F1 are each the maximum over the references, taken separately (bert_score's
  `max(dim=0)` over the (P, R, F) rows of one candidate), so the three may come from
  different references and F1 need not be 2PR/(P+R).
  An empty (or whitespace-only) hypothesis or reference scores (0, 0, 0) whatever `embed`
  returns for it, as bert_score, whose tokenizer leaves only [CLS] / [SEP]; so does a side
  with no tokens or zero total weight.
  idf: False = uniform weights; True = `idf_from_corpus` over the tokens of all references
    (as bert_score does; hypothesis tokens use the same table); or a precomputed `Idf`.
  baseline: (b_P, b_R, b_F) for rescaling, x -> (x - b) / (1 - b), each b < 1 (bert_score's
    published baselines are per model and layer).
  ignore: tokens (a collection or a predicate) given weight 0, e.g. [CLS] / [SEP] as
    bert_score does; they stay available as matches.
  Rescaling, when asked, comes after the maximum and applies to empty pairs too, as in
  bert_score.
  """
  hypotheses, references = _inputs.check_pairs(hypotheses, references)
  hyps = [_inputs.as_text(h, decode, f"hypotheses[{i}]") for i, h in enumerate(hypotheses)]
  ref_sets = [_inputs.as_reference_set(r, decode, f"references[{i}]")
              for i, r in enumerate(references)]
  refs = [r for ref_set in ref_sets for r in ref_set]
  if baseline is not None:
    baseline = tuple(float(b) for b in baseline)
    if len(baseline) != 3 or not all(math.isfinite(b) and b < 1 for b in baseline):
      raise ValueError(f"baseline={baseline} must be three finite values < 1 (P, R, F)")
  hyp_emb = _embed(embed, hyps, "hypotheses")
  ref_emb = _embed(embed, refs, "references")
  table = _resolve_idf(idf, ref_emb, "references")
  scores = np.zeros((3, len(hyps)))
  first = 0
  for i, (hyp, h, ref_set) in enumerate(zip(hyps, hyp_emb, ref_sets)):
    h_weights = _weights(h, table, ignore, f"hypotheses[{i}]")
    per_ref = np.zeros((len(ref_set), 3))
    for j, (ref, r) in enumerate(zip(ref_set, ref_emb[first:first + len(ref_set)])):
      if hyp.strip() and ref.strip():
        per_ref[j] = _greedy_match(h.unit_LD, r.unit_LD, h_weights,
                                   _weights(r, table, ignore, f"references[{i}][{j}]"))
    scores[:, i] = per_ref.max(axis=0)
    first += len(ref_set)
  if baseline is not None:
    b = np.asarray(baseline)[:, None]
    scores = (scores - b) / (1 - b)
  return PRF(*scores)


def _resolve_idf(idf: bool | Idf, embedded: list[_Embedded], name: str) -> Idf | None:
  if isinstance(idf, Idf):
    return idf
  if idf is False:
    return None
  if idf is True:
    if any(e.tokens is None for e in embedded):
      raise ValueError(f"idf=True needs tokens for {name}; make embed return "
                       "(tokens, embeddings) pairs")
    return idf_from_corpus([e.tokens for e in embedded])
  raise ValueError(f"idf={idf!r} must be True, False or an Idf")


def word_mover_distance(hyp_LD: Any, ref_SD: Any, *, hyp_weights: Any = None,
                        ref_weights: Any = None) -> float:
  """Exact Word Mover's Distance (earth mover's distance, POT `ot.emd2`) between two bags.

  Token embeddings are L2-normalized; the ground cost is the Euclidean distance between
  them (in [0, 2]); the masses are the weights normalized to sum 1 (uniform by default).
  A side with zero total weight has no distribution: returns NaN.
  """
  h_LD = _unit_rows(np.asarray(hyp_LD, dtype=np.float64), "hyp_LD")
  r_SD = _unit_rows(np.asarray(ref_SD, dtype=np.float64), "ref_SD")
  return _wmd(h_LD, r_SD, _check_weights(hyp_weights, h_LD.shape[0], "hyp_weights"),
              _check_weights(ref_weights, r_SD.shape[0], "ref_weights"))


def _wmd(h_LD: np.ndarray, r_SD: np.ndarray, w_L: np.ndarray, v_S: np.ndarray) -> float:
  keep_h, keep_r = w_L > 0, v_S > 0  # zero-mass tokens do not enter the transport problem
  if not keep_h.any() or not keep_r.any():
    return math.nan
  if h_LD.shape[1] != r_SD.shape[1]:
    raise ValueError(f"embedding widths differ: {h_LD.shape[1]} != {r_SD.shape[1]}")
  h_LD, r_SD = h_LD[keep_h], r_SD[keep_r]
  a, b = w_L[keep_h] / w_L[keep_h].sum(), v_S[keep_r] / v_S[keep_r].sum()
  # Euclidean distances from differences, one hypothesis row at a time: sqrt(2 - 2 cos)
  # cancels catastrophically for near-identical tokens (errors ~1e-8 instead of ~1e-16).
  cost_LS = np.stack([np.linalg.norm(r_SD - h_D, axis=-1) for h_D in h_LD])
  # Imported here: POT loads its torch / jax / sklearn backends at import (seconds).
  import ot  # pylint: disable=g-import-not-at-top
  return float(ot.emd2(a, b, np.ascontiguousarray(cost_LS)))


def mover_score(hypotheses: Sequence[Any], references: Sequence[Any], embed: EmbedFn, *,
                idf: bool | Idf | tuple[Idf, Idf] = True, ignore: Ignore = None,
                decode: _inputs.Decode | None = None) -> np.ndarray:
  """MoverScore per pair, [N]: 1 - WMD(hypothesis, reference) (Zhao et al. 2019).

  Follows the reference moverscore_v2 code with n_gram=1: unigram (token) embeddings,
  L2-normalized, Euclidean ground cost, idf masses normalized per sentence, exact EMD,
  score = 1 - distance (1 for identical bags of embeddings with equal masses).
  idf: True = separate tables from the hypothesis corpus and from the reference corpus (as
    the reference code's usage); False = uniform masses; an `Idf` for both sides; or a pair
    (hypothesis Idf, reference Idf).
  ignore: tokens (collection or predicate) given mass 0, e.g. stop words, punctuation,
    "##" word pieces, as the reference code does.
  A sentence whose total mass is 0 (no tokens, all ignored, or all idf 0) scores 0.
  """
  hypotheses, references = _inputs.check_pairs(hypotheses, references)
  hyps = [_inputs.as_text(h, decode, f"hypotheses[{i}]") for i, h in enumerate(hypotheses)]
  refs = [_inputs.as_text(r, decode, f"references[{i}]") for i, r in enumerate(references)]
  hyp_emb = _embed(embed, hyps, "hypotheses")
  ref_emb = _embed(embed, refs, "references")
  if isinstance(idf, tuple):
    if len(idf) != 2 or not all(isinstance(t, Idf) for t in idf):
      raise ValueError(f"idf={idf!r}: a tuple must be (hypothesis Idf, reference Idf)")
    hyp_idf, ref_idf = idf
  else:
    hyp_idf = _resolve_idf(idf, hyp_emb, "hypotheses")
    ref_idf = _resolve_idf(idf, ref_emb, "references")
  scores = np.zeros(len(hyps))
  for i, (h, r) in enumerate(zip(hyp_emb, ref_emb)):
    distance = _wmd(h.unit_LD, r.unit_LD, _weights(h, hyp_idf, ignore, f"hypotheses[{i}]"),
                    _weights(r, ref_idf, ignore, f"references[{i}]"))
    scores[i] = 0.0 if math.isnan(distance) else 1.0 - distance
  return scores
