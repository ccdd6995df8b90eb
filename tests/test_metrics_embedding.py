"""BERTScore and MoverScore against brute-force NumPy loops and scipy's linprog."""

import math
import zlib

import numpy as np
import pytest
from scipy.optimize import linprog

from seqlab import metrics

DIM = 12


def toy_embed(texts):
  """Deterministic contextual-looking embeddings: a seeded vector per word + a position term."""
  out = []
  for text in texts:
    tokens = text.split()
    rows = [np.random.default_rng(zlib.crc32(w.encode())).normal(size=DIM) +
            0.3 * np.sin((p + 1) * np.arange(1, DIM + 1) / DIM) for p, w in enumerate(tokens)]
    out.append((tokens, np.array(rows).reshape(len(tokens), DIM)))
  return out


def one_hot_embed(texts, vocab=("a", "b", "c", "d", "x")):
  out = []
  for text in texts:
    tokens = text.split()
    out.append((tokens, np.eye(len(vocab))[[vocab.index(t) for t in tokens]]))
  return out


def _brute_idf(corpus):
  docs = [set(t.split()) for t in corpus]
  idf = {}
  for w in set().union(*docs):
    df = sum(w in d for d in docs)
    idf[w] = math.log((len(docs) + 1) / (df + 1))
  return idf, math.log(len(docs) + 1)


def _brute_bertscore(hyp, ref, idf=None):
  (htok, h), = toy_embed([hyp])
  (rtok, r), = toy_embed([ref])

  def cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))

  def weight(w):
    return 1.0 if idf is None else idf[0].get(w, idf[1])

  p_num = p_den = r_num = r_den = 0.0
  for i in range(len(htok)):
    best = max(cos(h[i], r[j]) for j in range(len(rtok)))
    p_num, p_den = p_num + weight(htok[i]) * best, p_den + weight(htok[i])
  for j in range(len(rtok)):
    best = max(cos(h[i], r[j]) for i in range(len(htok)))
    r_num, r_den = r_num + weight(rtok[j]) * best, r_den + weight(rtok[j])
  p, rec = p_num / p_den, r_num / r_den
  return p, rec, 2 * p * rec / (p + rec)


HYPS = ["the cat sat on the mat", "a dog ran", "the cat is here now", "birds fly south"]
REFS = ["the cat is on the mat", "the dog ran away", "a cat is here", "birds fly north again"]


def test_identical_sentences_score_one():
  s = metrics.bert_score(REFS, REFS, toy_embed)
  np.testing.assert_allclose(np.stack(s), 1.0, atol=1e-12)
  np.testing.assert_allclose(metrics.mover_score(REFS, REFS, toy_embed, idf=False), 1.0,
                             atol=1e-9)


@pytest.mark.parametrize("use_idf", [False, True])
def test_bert_score_equals_brute_force(use_idf):
  s = metrics.bert_score(HYPS, REFS, toy_embed, idf=use_idf)
  idf = _brute_idf(REFS) if use_idf else None  # idf comes from the reference corpus
  for i, (h, r) in enumerate(zip(HYPS, REFS)):
    np.testing.assert_allclose([s.precision[i], s.recall[i], s.f1[i]],
                               _brute_bertscore(h, r, idf), rtol=1e-12)


def test_idf_weighting_by_hand():
  refs = ["a b", "a c", "a b d"]
  # M = 3; df: a 3, b 2, c 1, d 1 -> idf = log(4/4) = 0, log(4/3), log(4/2), log(4/2).
  table = metrics.idf_from_corpus([r.split() for r in refs])
  assert table.table == pytest.approx({"a": 0.0, "b": math.log(4 / 3), "c": math.log(2),
                                       "d": math.log(2)})
  assert table.default == pytest.approx(math.log(4))  # unseen: log(M + 1)
  s = metrics.bert_score(["b c", "a c", "x"], refs, one_hot_embed, idf=True)
  # One-hot words: cos = 1 for the same word, else 0.
  # Pair 0, "b c" vs "a b": P = idf(b) / (idf(b) + idf(c)); R = (0 * 0 + idf(b) * 1) / idf(b).
  p0 = math.log(4 / 3) / (math.log(4 / 3) + math.log(2))
  assert s.precision[0] == pytest.approx(p0) and s.recall[0] == pytest.approx(1.0)
  assert s.f1[0] == pytest.approx(2 * p0 / (p0 + 1))
  # Pair 1 is identical, pair 2 shares nothing.
  assert (s.precision[1], s.recall[1], s.f1[1]) == pytest.approx((1, 1, 1))
  assert (s.precision[2], s.recall[2], s.f1[2]) == pytest.approx((0, 0, 0))
  # Ignored tokens get weight 0: ignoring "c" leaves P = 1 for pair 0.
  s_ign = metrics.bert_score(["b c"], ["a b"], one_hot_embed, idf=table, ignore={"c"})
  assert s_ign.precision[0] == pytest.approx(1.0)


def cls_sep_embed(texts):
  """toy_embed with [CLS] / [SEP] around every text, as a BERT tokenizer, "" included."""
  out = []
  for text in texts:
    (tokens, rows), = toy_embed(["[CLS] " + text + " [SEP]"])
    out.append((tokens, rows))
  return out


def test_empty_hypothesis_or_reference_scores_zero():
  # bert_score: a side with only [CLS] / [SEP] gets P = R = 0, and F = 0 (its NaN zeroed).
  special = {"[CLS]", "[SEP]"}
  for hyps, refs in ((["", "a dog ran"], ["the cat", "a dog ran"]),
                     (["the cat", "a dog ran"], ["   ", "a dog ran"])):
    for ignore in (special, None):  # empty text scores 0 whatever embed makes of it
      s = metrics.bert_score(hyps, refs, cls_sep_embed, ignore=ignore)
      assert (s.precision[0], s.recall[0], s.f1[0]) == (0.0, 0.0, 0.0)
      assert s.f1[1] == pytest.approx(1.0)
  # Zero total weight on one side (all tokens ignored) zeroes both P and R.
  h, r = np.eye(3)[:2], np.eye(3)[1:]
  assert metrics.bert_score_from_embeddings(h, r, hyp_weights=[0.0, 0.0]) == (0.0, 0.0, 0.0)
  assert metrics.bert_score_from_embeddings(h, r, ref_weights=[0.0, 0.0]) == (0.0, 0.0, 0.0)
  assert metrics.bert_score_from_embeddings(h, np.zeros((0, 3))) == (0.0, 0.0, 0.0)


MULTI_REFS = [["the cat", "a dog sat on the mat and the cat ran away"],
              ["a dog ran", "", "the dog ran away"],
              "a cat is here",
              ["birds fly north again"]]


@pytest.mark.parametrize("use_idf", [False, True])
def test_bert_score_several_references_takes_each_max(use_idf):
  s = metrics.bert_score(HYPS, MULTI_REFS, toy_embed, idf=use_idf)
  flat = [r for refs in MULTI_REFS for r in ([refs] if isinstance(refs, str) else refs)]
  # bert_score's idf corpus is every reference of every hypothesis, the empty one included.
  idf = _brute_idf(flat) if use_idf else None
  for i, (hyp, refs) in enumerate(zip(HYPS, MULTI_REFS)):
    refs = [refs] if isinstance(refs, str) else refs
    # bert_score/score.py: all_preds[beg:end].max(dim=0), rows (P, R, F) per reference.
    rows = [_brute_bertscore(hyp, r, idf) if r else (0.0, 0.0, 0.0) for r in refs]
    np.testing.assert_allclose([s.precision[i], s.recall[i], s.f1[i]], np.max(rows, axis=0),
                               rtol=1e-12)
  # Hypothesis 0: P peaks on the long reference, R on "the cat": F1 is not 2PR/(P+R).
  p0 = _brute_bertscore(HYPS[0], MULTI_REFS[0][1], idf)[0]
  r0 = _brute_bertscore(HYPS[0], MULTI_REFS[0][0], idf)[1]
  assert (s.precision[0], s.recall[0]) == pytest.approx((p0, r0), rel=1e-12)
  assert s.f1[0] < 2 * p0 * r0 / (p0 + r0) - 1e-3
  # One reference, as a string or a list of one, is the single-reference score.
  single = metrics.bert_score(HYPS, REFS, toy_embed, idf=use_idf)
  listed = metrics.bert_score(HYPS, [[r] for r in REFS], toy_embed, idf=use_idf)
  np.testing.assert_array_equal(np.stack(single), np.stack(listed))


def test_baseline_rescaling():
  raw = metrics.bert_score(HYPS, REFS, toy_embed)
  b = (0.2, 0.3, 0.25)
  scaled = metrics.bert_score(HYPS, REFS, toy_embed, baseline=b)
  for x, y, bb in zip(raw, scaled, b):
    np.testing.assert_allclose(y, (x - bb) / (1 - bb), rtol=1e-12)


def _linprog_emd(a, b, cost):
  """Transport LP: min <cost, T> s.t. T 1 = a, T^T 1 = b, T >= 0."""
  n, m = cost.shape
  a_eq = np.zeros((n + m, n * m))
  for i in range(n):
    a_eq[i, i * m:(i + 1) * m] = 1
  for j in range(m):
    a_eq[n + j, j::m] = 1
  res = linprog(cost.reshape(-1), A_eq=a_eq, b_eq=np.concatenate([a, b]), bounds=(0, None),
                method="highs")
  assert res.success
  return res.fun


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_word_mover_distance_equals_linprog():
  rng = np.random.default_rng(0)
  for n, m in [(1, 1), (2, 3), (4, 4), (5, 3)]:
    h, r = rng.normal(size=(n, DIM)), rng.normal(size=(m, DIM))
    w, v = rng.random(n) + 0.1, rng.random(m) + 0.1
    cost = np.array([[np.linalg.norm(hi - rj) for rj in _unit(r)] for hi in _unit(h)])
    expected = _linprog_emd(w / w.sum(), v / v.sum(), cost)
    got = metrics.word_mover_distance(h, r, hyp_weights=w, ref_weights=v)
    assert got == pytest.approx(expected, abs=1e-9)


def test_mover_score_equals_linprog_with_idf():
  hyp_idf, ref_idf = _brute_idf(HYPS), _brute_idf(REFS)  # separate corpora, as moverscore
  scores = metrics.mover_score(HYPS, REFS, toy_embed, idf=True)
  for i, (hyp, ref) in enumerate(zip(HYPS, REFS)):
    (htok, h), = toy_embed([hyp])
    (rtok, r), = toy_embed([ref])
    a = np.array([hyp_idf[0][t] for t in htok])
    b = np.array([ref_idf[0][t] for t in rtok])
    keep_a, keep_b = a > 0, b > 0  # zero-idf tokens carry no mass
    cost = np.array([[np.linalg.norm(hi - rj) for rj in _unit(r)[keep_b]]
                     for hi in _unit(h)[keep_a]])
    expected = 1 - _linprog_emd(a[keep_a] / a.sum(), b[keep_b] / b.sum(), cost)
    assert scores[i] == pytest.approx(expected, abs=1e-9)


def test_embedding_metrics_bad_input():
  with pytest.raises(ValueError, match="hypotheses is empty"):
    metrics.bert_score([], [], toy_embed)
  with pytest.raises(ValueError, match=r"len\(hypotheses\)=2 != len\(references\)=1"):
    metrics.mover_score(["a", "b"], ["a"], toy_embed)
  with pytest.raises(ValueError, match="idf=True needs tokens"):
    metrics.bert_score(["a"], ["a"], lambda ts: [np.ones((1, 3)) for _ in ts], idf=True)
  with pytest.raises(ValueError, match="zero vector"):
    metrics.bert_score(["a"], ["a"], lambda ts: [np.zeros((1, 3)) for _ in ts])
  with pytest.raises(ValueError, match="returned 0 items for 1 texts"):
    metrics.bert_score(["a"], ["a"], lambda ts: [])
  with pytest.raises(ValueError, match="baseline"):
    metrics.bert_score(["a"], ["a"], toy_embed, baseline=(0.1, 1.0, 0.2))
  with pytest.raises(ValueError, match=r"hyp_weights\[0\]=nan"):
    metrics.word_mover_distance(np.ones((1, 2)), np.ones((1, 2)), hyp_weights=[float("nan")])
