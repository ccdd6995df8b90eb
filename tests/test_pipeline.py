"""The grain pipeline: determinism, exact mid-epoch restore, disjoint covering shards, bad input,
BERT next-sentence pairs."""

import bisect
import collections
import functools
import json
import re

import numpy as np
import pytest

from seqlab import objectives
from seqlab.data import ByteTokenizer, StdlibSource
from seqlab.data.pipeline import make_pipeline

TOK = ByteTokenizer()
# Distinct short documents of varied lengths (3 to 40 bytes).
DOCS = [f"doc{i:03d} " + "abcdefghij"[i % 10] * (i * 7 % 31) for i in range(60)]
# Documents of 2 to 6 lines (5 to 11 bytes each, some followed by a blank line) for NSP.
NSP_DOCS = ["".join(f"d{i:02d}s{k}" + "xyz"[k % 3] * (i * k % 7) + "\n" + "\n" * (i * k % 4 == 1)
                    for k in range(2 + i % 5)) for i in range(60)]

CONFIGS = {
    "full_lm/decoder": ("full_lm", "decoder", 24, {}),
    "prefix_lm/decoder": ("prefix_lm", "decoder", 24, {}),
    "span/enc-dec": ("span_corruption", "encoder_decoder", {"encoder": 24, "decoder": 12}, {}),
    "ul2/decoder": ("ul2", "decoder", 40, {}),
    "mlm/encoder": ("mlm", "encoder", 24, {}),
    "mlm_nsp/encoder": ("mlm_nsp", "encoder", 24, {}),
}


def _pipeline(config, **kwargs):
  objective, arch, lengths, objective_kwargs = CONFIGS[config]
  args = dict(seq_lengths=lengths, batch_size=3, seed=7, objective_kwargs=objective_kwargs)
  args.update(kwargs)
  docs = NSP_DOCS if objective == "mlm_nsp" else DOCS
  return make_pipeline(docs, TOK, objective, arch, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_same_seed_same_batches_other_seed_differs(config):
  _assert_same_batches(_take(_pipeline(config), 6), _take(_pipeline(config), 6))
  a, b = _take(_pipeline(config), 3), _take(_pipeline(config, seed=8), 3)
  assert any(not np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_restore_mid_epoch_gives_the_next_batches(config):
  # Short rows, packing groups of 2 rows and batches of 3 put saved states mid-document,
  # mid-packing-group, just before and after the epoch boundary (2 epochs of 60 documents),
  # and near the end; the restored iterator must then give exactly the rest of the run.
  reference = list(_pipeline(config, num_epochs=2, packing_bins=2))
  n = len(reference)
  assert n > 20
  for stop in (1, 3, n // 2 - 1, n // 2 + 2, n - 1):
    it = _pipeline(config, num_epochs=2, packing_bins=2)
    _take(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    stats = it.stats
    restored = _pipeline(config, num_epochs=2, packing_bins=2)
    restored.set_state(state)
    assert restored.stats == stats
    _assert_same_batches(list(restored), reference[stop:])


def test_restore_on_the_real_stdlib_source():
  src = StdlibSource("validation")
  kwargs = dict(seq_lengths={"encoder": 64, "decoder": 16}, batch_size=4, seed=3)
  reference = _take(make_pipeline(src, TOK, "span_corruption", "encoder_decoder", **kwargs), 8)
  it = make_pipeline(src, TOK, "span_corruption", "encoder_decoder", **kwargs)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  restored = make_pipeline(src, TOK, "span_corruption", "encoder_decoder", **kwargs)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 3), reference[5:])


def _documents_in(batches):
  """Documents of full-LM decoder batches: target tokens of each segment, split at eos."""
  docs = []
  for batch in batches:
    for tokens, segments in zip(batch["decoder_target_tokens"], batch["decoder_segment_ids"]):
      for s in range(1, segments.max() + 1):
        seq = tokens[segments == s]
        assert seq[-1] == TOK.eos_id
        docs.append(TOK.decode(seq))
  return docs


def test_two_shards_are_disjoint_and_cover_the_data():
  shards = []
  for index in range(2):
    it = make_pipeline(DOCS, TOK, "full_lm", "decoder", seq_lengths=64, batch_size=4, seed=1,
                       shard_index=index, shard_count=2, num_epochs=1, concatenate=False)
    shards.append(_documents_in(list(it)))
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(DOCS)
  assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_concatenated_shards_cover_every_token_once():
  counts = collections.Counter()
  for index in range(3):
    it = make_pipeline(DOCS, TOK, "full_lm", "decoder", seq_lengths=32, batch_size=5, seed=2,
                       shard_index=index, shard_count=3, num_epochs=1)
    for batch in it:
      counts.update(batch["decoder_target_tokens"][batch["decoder_segment_ids"] > 0].tolist())
  expected = collections.Counter()
  for doc in DOCS:
    expected.update(TOK.encode(doc).tolist() + [TOK.eos_id])
  assert counts == expected


def test_one_epoch_unpacked_rows_are_the_documents():
  # Without shuffling or packing, rows follow the source order exactly.
  it = make_pipeline(DOCS[:5], TOK, "full_lm", "decoder", seq_lengths=48, batch_size=2,
                     seed=0, num_epochs=1, shuffle=False, packing=False, concatenate=False)
  batches = list(it)
  assert [b["decoder_target_tokens"].shape for b in batches] == [(2, 48), (2, 48), (1, 48)]
  assert _documents_in(batches) == DOCS[:5]


class _EvilTokenizer(ByteTokenizer):
  """Bytes, except that "OOV" encodes to an id outside the vocabulary and "SENT" to a sentinel."""

  def encode(self, text):
    if text == "OOV":
      return np.array([5, self.vocab_size], np.int32)
    if text == "SENT":
      return np.array([5, 6, self.vocab_size - 1], np.int32)
    return super().encode(text)


def test_bad_documents_are_skipped_and_counted():
  docs = ["good one", "", "OOV", None, "SENT", "good two", "ok"]
  it = make_pipeline(docs, _EvilTokenizer(), "span_corruption", "encoder_decoder",
                     seq_lengths={"encoder": 32, "decoder": 16}, batch_size=8, seed=0,
                     num_epochs=1, concatenate=False, shuffle=False, packing=False)
  (batch,) = list(it)
  assert it.stats == {"documents": 7, "empty_documents": 1, "out_of_vocabulary_documents": 1,
                      "bad_documents": 1, "objective_errors": 1, "examples": 3}
  assert batch["encoder_input_tokens"].shape == (3, 32)


def test_too_short_for_the_objective_is_counted():
  def needs_eight(tokens, rng):
    del rng
    if tokens.size < 8:
      raise ValueError(f"tokens has length {tokens.size} < 8")
    return {"inputs": tokens[:4], "targets": tokens[4:]}

  docs = ["abcdefghijk", "ab", "abcdefgh", "a"]  # 12, 3, 9, 2 tokens with eos
  it = make_pipeline(docs, TOK, needs_eight, "decoder", seq_lengths=32, batch_size=4, seed=0,
                     num_epochs=1, concatenate=False, shuffle=False, chunk_length=32)
  (batch,) = list(it)
  assert it.stats["objective_errors"] == 2 and it.stats["examples"] == 2
  assert batch["decoder_segment_ids"].max() == 2  # the two good ones, packed in one row


def test_unusable_everything_raises_instead_of_spinning():
  images = [{"image": np.zeros((2, 2, 1), np.float32), "label": 0}] * 3
  it = make_pipeline(images, TOK, "full_lm", "decoder", seq_lengths=16, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="documents in a row are unusable"):
    next(it)

  def always_fails(tokens, rng):
    raise ValueError("no")

  it = make_pipeline(DOCS, TOK, always_fails, "decoder", seq_lengths=16, batch_size=2, seed=0,
                     chunk_length=4)
  with pytest.raises(ValueError, match="rejected 1000 chunks in a row; last error: no"):
    next(it)


def test_clear_errors_for_bad_configuration():
  with pytest.raises(ValueError, match="objective='bert'"):
    make_pipeline(DOCS, TOK, "bert", "encoder", seq_lengths=16, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="denoisers='nope'"):
    make_pipeline(DOCS, TOK, "ul2", "decoder", seq_lengths=64, batch_size=2, seed=0,
                  objective_kwargs={"denoisers": "nope"})
  with pytest.raises(ValueError, match="mlm and mlm_nsp need 'encoder'"):
    make_pipeline(DOCS, TOK, "mlm", "decoder", seq_lengths=16, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="mlm and mlm_nsp need 'encoder'"):
    make_pipeline(NSP_DOCS, TOK, "mlm_nsp", "encoder_decoder", seq_lengths=16, batch_size=2,
                  seed=0)
  with pytest.raises(ValueError, match=r"\['is_next_prob'\] are not options of objective='mlm'"):
    make_pipeline(DOCS, TOK, "mlm", "encoder", seq_lengths=16, batch_size=2, seed=0,
                  objective_kwargs={"is_next_prob": 0.5})
  with pytest.raises(ValueError, match="is_next_prob=1.5"):
    make_pipeline(NSP_DOCS, TOK, "mlm_nsp", "encoder", seq_lengths=16, batch_size=2, seed=0,
                  objective_kwargs={"is_next_prob": 1.5})
  with pytest.raises(ValueError, match=r"seq_lengths\['encoder'\]=4 is too short"):
    make_pipeline(NSP_DOCS, TOK, "mlm_nsp", "encoder", seq_lengths=4, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="needs a random-access source"):
    make_pipeline(_Stream(NSP_DOCS), TOK, "mlm_nsp", "encoder", seq_lengths=16, batch_size=2,
                  seed=0)
  with pytest.raises(ValueError, match="at least 2 documents"):
    make_pipeline(NSP_DOCS[:1], TOK, "mlm_nsp", "encoder", seq_lengths=16, batch_size=2, seed=0)
  it = make_pipeline(DOCS, TOK, "mlm_nsp", "encoder", seq_lengths=16, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="single_sentence_documents.*at least 2 non-blank lines"):
    next(it)  # every document of DOCS is one line
  with pytest.raises(ValueError, match="shard_index=2"):
    make_pipeline(DOCS, TOK, "full_lm", "decoder", seq_lengths=16, batch_size=2, seed=0,
                  shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match=r"needs 1\d\d sentinels"):
    make_pipeline(DOCS, ByteTokenizer(num_sentinels=100), "ul2", "encoder_decoder",
                  seq_lengths=512, batch_size=2, seed=0)


def test_examples_fit_rows_exactly_without_truncation():
  src = StdlibSource("validation")
  cases = [("span_corruption", "encoder_decoder", {"encoder": 512, "decoder": 114}),
           ("ul2", "decoder", 256), ("prefix_lm", "decoder", 128), ("full_lm", "decoder", 128),
           ("mlm", "encoder", 128)]
  for objective, arch, lengths in cases:
    it = make_pipeline(src, TOK, objective, arch, seq_lengths=lengths, batch_size=4, seed=0)
    batch = _take(it, 3)[-1]
    assert "truncated_examples" not in it.stats, (objective, it.stats)
    if objective == "span_corruption":  # T5's lengths: 568 raw tokens fill 512 inputs exactly
      assert it.chunk_length == 568
      assert (batch["encoder_segment_ids"] > 0).all()
    if objective in ("full_lm", "mlm"):
      key = "decoder_segment_ids" if arch == "decoder" else "encoder_segment_ids"
      assert (batch[key] > 0).all()


def test_pipeline_examples_match_the_objective_applied_by_hand():
  # One unshuffled, unpacked prefix-LM row rebuilt from the document and grain's per-example rng.
  doc = DOCS[3]
  it = make_pipeline([doc], TOK, "prefix_lm", "decoder", seq_lengths=64, batch_size=1, seed=0,
                     num_epochs=1, shuffle=False, packing=False, concatenate=False)
  (batch,) = list(it)
  tokens = np.append(TOK.encode(doc), TOK.eos_id)
  target = batch["decoder_target_tokens"][0]
  weights = batch["decoder_loss_weights"][0]
  split = int(np.argmax(weights)) - 1  # inputs ‖ eos, then targets
  np.testing.assert_array_equal(target[:split], tokens[:split])
  assert target[split] == TOK.eos_id
  np.testing.assert_array_equal(target[split + 1:split + 1 + tokens.size - split],
                                tokens[split:])
  assert 1 <= split <= tokens.size - 1
  assert isinstance(TOK.special_ids, objectives.SpecialIds)


class _Stream:
  """An iterable-only source (like a streaming Hugging Face dataset)."""

  def __init__(self, docs):
    self.docs = docs

  def __iter__(self):
    return iter(self.docs)


def test_streaming_source_shards_and_restores():
  shards = []
  for index in range(2):
    it = make_pipeline(_Stream(DOCS), TOK, "full_lm", "decoder", seq_lengths=64, batch_size=4,
                       seed=0, shard_index=index, shard_count=2, num_epochs=1,
                       concatenate=False)
    shards.append(_documents_in(list(it)))
  assert sorted(shards[0]) == sorted(DOCS[0::2]) and sorted(shards[1]) == sorted(DOCS[1::2])
  kwargs = dict(seq_lengths=24, batch_size=3, seed=0, num_epochs=2)
  reference = _take(make_pipeline(_Stream(DOCS), TOK, "ul2", "decoder", **kwargs), 10)
  it = make_pipeline(_Stream(DOCS), TOK, "ul2", "decoder", **kwargs)
  _take(it, 6)
  restored = make_pipeline(_Stream(DOCS), TOK, "ul2", "decoder", **kwargs)
  restored.set_state(json.loads(json.dumps(it.get_state())))
  _assert_same_batches(_take(restored, 4), reference[6:])


# ----------------------------------------------------------------------------- NSP pairs

CLS, SEP, MASK = TOK.special_ids.cls, TOK.special_ids.sep, TOK.special_ids.mask


def _letter_corpus(num_docs, seed, lines=(1, 12), letters_per_line=(6, 30)):
  """Documents of 1 to 11 lines of 6 to 29 random letters (so any 6+ letters occur once),
  some lines followed by a blank line; about 1 in 11 documents has a single line."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  docs = []
  for _ in range(num_docs):
    lines_of_doc = []
    for _ in range(int(rng.integers(*lines))):
      lines_of_doc.append("".join(rng.choice(letters, int(rng.integers(*letters_per_line))))
                          + "\n")
      if rng.random() < 0.2:
        lines_of_doc.append("\n")
    docs.append("".join(lines_of_doc))
  return docs


def _runs(doc, target):
  """The oracle's runs: [(start, sentence boundaries..., end)] char offsets, Google's greedy
  rule over sentences found by a regex (letters, then newlines)."""
  bounds = [0] + [m.end() for m in re.finditer(r"[a-z]+\n+", doc)]
  assert bounds[-1] == len(doc)
  runs, first = [], 0
  while first < len(bounds) - 1:
    last = first
    while last < len(bounds) - 1 and bounds[last] - bounds[first] < target:
      last += 1
    runs.append(bounds[first:last + 1])
    first = last
  return runs, bounds


def google_truncate_lengths(length_a, length_b, max_tokens):
  """Google's truncate_seq_pair, one token at a time: the longer side loses one, B on ties."""
  while length_a + length_b > max_tokens:
    if length_a > length_b:
      length_a -= 1
    else:
      length_b -= 1
  return length_a, length_b


def _segments(batches):
  """(original tokens, token types, nsp_label row, mlm inputs, mlm weights) of every segment."""
  out = []
  for batch in batches:
    original = np.where(batch["mlm_weights"] == 1, batch["mlm_targets"],
                        batch["encoder_input_tokens"])
    for row in range(original.shape[0]):
      segment_ids = batch["encoder_segment_ids"][row]
      for s in range(1, segment_ids.max() + 1):
        where = np.flatnonzero(segment_ids == s)
        np.testing.assert_array_equal(batch["encoder_positions"][row, where], np.arange(where.size))
        out.append(tuple(batch[k][row, where] if k != "original" else original[row, where]
                         for k in ("original", "token_type_ids", "nsp_label",
                                   "encoder_input_tokens", "mlm_weights")))
  return out


def _split_pair(tokens, types):
  """[CLS] A [SEP] B [SEP] with types 0 on [CLS] A [SEP], 1 on B [SEP] -> (A, B) text."""
  num_a = int((types == 0).sum()) - 2
  np.testing.assert_array_equal(types, [0] * (num_a + 2) + [1] * (tokens.size - num_a - 2))
  assert tokens[0] == CLS and tokens[num_a + 1] == SEP and tokens[-1] == SEP
  return TOK.decode(tokens[1:num_a + 1]), TOK.decode(tokens[num_a + 2:-1])


def test_nsp_pairs_follow_the_source_and_mlm_keeps_its_rates():
  docs = _letter_corpus(500, seed=0)
  length, num_epochs = 64, 3
  target = length - 3
  it = make_pipeline(docs, TOK, "mlm_nsp", "encoder", seq_lengths=length, batch_size=16,
                     seed=5, num_epochs=num_epochs)
  segments = _segments(list(it))
  # The oracle's counts of runs: those of >= 2 sentences become examples, single ones are
  # skipped, single-line documents never make runs.
  runs = {d: _runs(doc, target) for d, doc in enumerate(docs)}
  num_single_docs = sum(len(bounds) == 2 for _, bounds in runs.values())
  pair_runs = [(d, r) for d, (rs, bounds) in runs.items() if len(bounds) > 2
               for r in rs if len(r) > 2]
  single_runs = sum(len(r) == 2 for rs, bounds in runs.values() if len(bounds) > 2 for r in rs)
  assert num_single_docs > 10 and single_runs > 10
  assert it.stats == {"documents": num_epochs * len(docs),
                      "single_sentence_documents": num_epochs * num_single_docs,
                      "single_sentence_chunks": num_epochs * single_runs,
                      "examples": num_epochs * len(pair_runs)}
  assert len(segments) == num_epochs * len(pair_runs) >= 2000

  text = "\0".join(docs)
  starts = list(np.cumsum([0] + [len(doc) + 1 for doc in docs]))

  def locate(piece):
    at = text.find(piece)
    assert at >= 0 and text.find(piece, at + 1) < 0, piece
    d = bisect.bisect_right(starts, at) - 1
    return d, at - starts[d], at - starts[d] + len(piece)

  labels, seen_runs = [], collections.Counter()
  for tokens, types, nsp_label, _, _ in segments:
    label = int(nsp_label[0])
    assert (nsp_label[1:] == 0).all()
    labels.append(label)
    a, b = _split_pair(tokens, types)
    assert len(a) + len(b) <= target
    doc_a, a0, a1 = locate(a)
    doc_b, b0, b1 = locate(b)
    rs, _ = runs[doc_a]
    run = next(r for r in rs if r[0] <= a0 < r[-1])
    seen_runs[(doc_a, run[0])] += 1
    a_ends = [p for p in run[1:-1] if p >= a1]  # A = whole sentences of the run, truncated
    assert a_ends, (a, run)
    if label == 0:  # IsNext: B is the rest of the same run, truncated as Google does
      assert doc_b == doc_a and b1 <= run[-1]
      assert any(p <= b0 and (a1 - a0, b1 - b0) == google_truncate_lengths(
          p - run[0], run[-1] - p, target) for p in a_ends), (a, b, run)
    else:  # NotNext: B is whole sentences of another document from a sentence start on
      assert doc_b != doc_a
      _, bounds_b = runs[doc_b]
      ok = False
      for p in a_ends:
        for q in (q for q in bounds_b[:-1] if q <= b0):
          end = next((e for e in bounds_b if e > q and e - q >= target - (p - run[0])),
                     bounds_b[-1])
          ok |= b1 <= end and (a1 - a0, b1 - b0) == google_truncate_lengths(
              p - run[0], end - q, target)
      assert ok, (a, b, run)
  # Every run of >= 2 sentences is an example once per epoch.
  assert seen_runs == {(d, r[0]): num_epochs for d, r in pair_runs}
  assert abs(np.mean(labels) - 0.5) < 0.03, np.mean(labels)

  # MLM on top: Google's exact count per example over the non-special positions, 80/10/10.
  chosen_total, masked, replaced, kept = 0, 0, 0, 0
  for tokens, _, _, inputs, weights in segments:
    regular = (tokens != CLS) & (tokens != SEP)
    assert weights.sum() == max(1, round(0.15 * regular.sum()))
    assert not weights[~regular].any()
    chosen = weights == 1
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
    chosen_total += chosen.sum()
    masked += (chosen & (inputs == MASK)).sum()
    kept += (chosen & (inputs == tokens)).sum()
    replaced += (chosen & (inputs != tokens) & (inputs != MASK)).sum()
  assert chosen_total > 20_000
  assert abs(masked / chosen_total - 0.8) < 0.01
  assert abs(replaced / chosen_total - 0.1) < 0.01
  assert abs(kept / chosen_total - 0.1) < 0.01


def test_nsp_rows_by_hand():
  # "ab\n" "cd\n" | "\nef\n\n" "gh\n" (the leading blank line joins ef) | "Z\n" (one sentence:
  # skipped). Unshuffled, IsNext always: both pairs pack into one row of 32.
  docs = ["ab\ncd\n", "\nef\n\ngh\n", "Z\n"]
  it = make_pipeline(docs, TOK, "mlm_nsp", "encoder", seq_lengths=32, batch_size=1, seed=0,
                     num_epochs=1, shuffle=False, objective_kwargs={"is_next_prob": 1.0})
  (batch,) = list(it)
  ids = lambda text: TOK.encode(text).tolist()
  expected = ([CLS] + ids("ab\n") + [SEP] + ids("cd\n") + [SEP]
              + [CLS] + ids("\nef\n\n") + [SEP] + ids("gh\n") + [SEP])
  pad = [0] * (32 - len(expected))
  original = np.where(batch["mlm_weights"] == 1, batch["mlm_targets"],
                      batch["encoder_input_tokens"])[0]
  np.testing.assert_array_equal(original, expected + pad)
  np.testing.assert_array_equal(batch["token_type_ids"][0],
                                [0] * 5 + [1] * 4 + [0] * 7 + [1] * 4 + pad)
  np.testing.assert_array_equal(batch["encoder_segment_ids"][0], [1] * 9 + [2] * 11 + pad)
  np.testing.assert_array_equal(batch["encoder_positions"][0],
                                list(range(9)) + list(range(11)) + pad)
  np.testing.assert_array_equal(batch["nsp_label"][0], [0] * 32)  # IsNext = 0
  # One of 6 and one of 8 maskable positions (round(0.15 n)), never [CLS] / [SEP] / padding.
  weights = batch["mlm_weights"][0]
  assert weights[:9].sum() == 1 and weights[9:20].sum() == 1
  assert not weights[np.isin(expected + pad, [CLS, SEP, 0])].any()
  assert it.stats == {"documents": 3, "single_sentence_documents": 1, "examples": 2}

  # NotNext always: B comes from the only other document, "Z\n"; "cd\n" goes unused.
  it = make_pipeline(docs[:1] + docs[2:], TOK, "mlm_nsp", "encoder", seq_lengths=16,
                     batch_size=1, seed=0, num_epochs=1, shuffle=False,
                     objective_kwargs={"is_next_prob": 0.0})
  (batch,) = list(it)
  expected = [CLS] + ids("ab\n") + [SEP] + ids("Z\n") + [SEP]
  pad = [0] * (16 - len(expected))
  original = np.where(batch["mlm_weights"] == 1, batch["mlm_targets"],
                      batch["encoder_input_tokens"])[0]
  np.testing.assert_array_equal(original, expected + pad)
  np.testing.assert_array_equal(batch["token_type_ids"][0], [0] * 5 + [1] * 3 + pad)
  np.testing.assert_array_equal(batch["nsp_label"][0], [1] + [0] * 15)  # NotNext = 1


def test_split_sentences_keeps_the_text():
  from seqlab.data.sentence_pairs import split_sentences  # pylint: disable=g-import-not-at-top
  assert split_sentences("\n \nab\ncd\n\n  \nef") == ["\n \nab\n", "cd\n\n  \n", "ef"]
  assert split_sentences("a\r\nb\rc") == ["a\r\n", "b\r", "c"]
  assert split_sentences("") == [] and split_sentences(" \n\t\n") == []
  for doc in _letter_corpus(50, seed=1):
    sentences = split_sentences(doc)
    assert "".join(sentences) == doc
    assert len(sentences) == sum(bool(line.strip()) for line in doc.splitlines())


@functools.lru_cache(maxsize=None)
def _bert_tiny_step():
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import _helpers  # pylint: disable=g-import-not-at-top
  from seqlab import models  # pylint: disable=g-import-not-at-top
  from seqlab import train as train_lib  # pylint: disable=g-import-not-at-top
  cfg = models.get_preset("bert-tiny", pretraining_heads=True, max_length=128)
  model = cfg.build()
  params = _helpers.random_params(models.param_shapes(cfg))
  tx = optax.sgd(0.1)
  step = jax.jit(functools.partial(train_lib.make_train_step(train_lib.task_for("encoder")),
                                   axis_name=None))
  return model, params, _helpers.state_from_params(model, params, tx), step


def test_mlm_task_reads_nsp_labels_of_a_packed_pipeline_batch():
  # Documents of 2-3 short lines pack 2-3 pairs per row of 128: the NSP loss must be read at
  # every segment's [CLS], with the label that the source text says (B continues A or not).
  import jax  # pylint: disable=g-import-not-at-top
  docs = _letter_corpus(40, seed=2, lines=(2, 4), letters_per_line=(8, 16))
  it = make_pipeline(docs, TOK, "mlm_nsp", "encoder", seq_lengths=128, batch_size=4, seed=0,
                     num_epochs=1)
  batches = _take(it, 3)
  model, params, state, step = _bert_tiny_step()
  batch = batches[0]
  assert (batch["encoder_segment_ids"].max(axis=1) >= 2).all()
  # Oracle: segment starts from the segment ids alone; labels from the text.
  starts, labels = [], []
  for row, segment_ids in enumerate(batch["encoder_segment_ids"]):
    original = np.where(batch["mlm_weights"][row] == 1, batch["mlm_targets"][row],
                        batch["encoder_input_tokens"][row])
    for s in range(1, segment_ids.max() + 1):
      where = np.flatnonzero(segment_ids == s)
      a, b = _split_pair(original[where], batch["token_type_ids"][row, where])
      doc_a = next(d for d, doc in enumerate(docs) if a in doc)
      starts.append((row, where[0]))
      labels.append(0 if b in docs[doc_a] else 1)
  assert len(set(labels)) == 2
  assert [batch["nsp_label"][r, t] for r, t in starts] == labels
  outputs = model.apply({"params": params}, batch)
  logits = np.asarray(outputs["nsp_logits"], np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.mean([log_p[r, t, y] for (r, t), y in zip(starts, labels)])
  mlm_logits = np.asarray(outputs["mlm_logits"], np.float64)
  mlm_log_p = mlm_logits - np.log(np.exp(mlm_logits).sum(-1, keepdims=True))
  w = batch["mlm_weights"]
  mlm_nll = -np.take_along_axis(mlm_log_p, batch["mlm_targets"][..., None], -1)[..., 0]
  for i, b in enumerate(batches):
    state, metrics = step(state, b)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"])
    if i == 0:
      assert metrics["sum/nsp_weight"] == len(starts)
      np.testing.assert_allclose(metrics["loss/nsp"], expected, rtol=1e-5)
      np.testing.assert_allclose(metrics["loss/mlm"], (mlm_nll * w).sum() / w.sum(), rtol=1e-5)
  assert int(state.step) == 3


def test_loop_input_builds_nsp_pairs_from_the_config():
  import _helpers  # pylint: disable=g-import-not-at-top
  from seqlab import loop  # pylint: disable=g-import-not-at-top
  config = _helpers.tiny_config("", "model.preset=bert-tiny", "data.objective=mlm_nsp",
                                "data.seq_length=64")
  it = loop.make_input(config, "encoder", "validation", batch_size=4, shard_index=0,
                       shard_count=1)
  batch = next(it)
  starts = (batch["encoder_positions"] == 0) & (batch["encoder_segment_ids"] > 0)
  assert set(batch) >= {"nsp_label", "token_type_ids", "mlm_weights"}
  assert not batch["nsp_label"][~starts].any() and (batch["token_type_ids"] == 1).any()


# ----------------------------------------------------------------------------- images


def test_image_pipeline_shards_restore_and_mae_mask():
  from seqlab.data import DigitsSource  # pylint: disable=g-import-not-at-top
  from seqlab.data.images import make_image_pipeline  # pylint: disable=g-import-not-at-top
  src = DigitsSource("validation", image_size=8)
  labels = []
  for index in range(2):
    it = make_image_pipeline(src, batch_size=16, seed=0, shard_index=index, shard_count=2,
                             num_epochs=1)
    labels.append(np.concatenate([b["label"] for b in it]))
  # Each shard holds exactly its strided slice of the source, in some order.
  for index in range(2):
    assert sorted(labels[index]) == sorted(src.labels[index::2])

  kwargs = dict(batch_size=8, seed=3, mae_mask_ratio=0.75, patch_size=2)
  reference = _take(make_image_pipeline(src, **kwargs), 6)
  it = make_image_pipeline(src, **kwargs)
  _take(it, 2)
  restored = make_image_pipeline(src, **kwargs)
  restored.set_state(json.loads(json.dumps(it.get_state())))
  _assert_same_batches(_take(restored, 4), reference[2:])
  batch = reference[0]
  assert batch["image"].shape == (8, 8, 8, 1) and batch["mask"].shape == (8, 16)
  for mask, restore, keep in zip(batch["mask"], batch["ids_restore"], batch["ids_keep"]):
    assert mask.sum() == 12 and keep.size == 4  # 16 patches, 75% removed
    assert sorted(restore) == list(range(16))
    np.testing.assert_array_equal(np.flatnonzero(mask == 0), np.sort(keep))
  assert not np.array_equal(batch["mask"][0], batch["mask"][1])


# ----------------------------------------------------------------------------- benchmark


def test_data_pipeline_benchmark_smoke():
  # experiments/benchmarks/data_pipeline.py: every case's config builds its model, the table
  # computes feed ratios and verdicts from the numbers given (no train step is compiled here).
  import _helpers  # pylint: disable=g-import-not-at-top
  from seqlab import loop  # pylint: disable=g-import-not-at-top
  bench = _helpers.load_script("experiments/benchmarks/data_pipeline.py", "bench_data_pipeline")
  assert bench._train_throughput().median_step_seconds  # the shared timing loop imports
  for case in bench.CASES:
    experiment = loop.build(bench.case_config(case, batch_size=4))
    assert experiment.architecture == case[2]
    assert experiment.model_cfg.max_length == 512
    assert experiment.lengths == loop.seq_lengths(bench.case_config(case, 4), case[2])
  cases = [c for c in bench.CASES if c[0] in ("full LM", "MLM + NSP")]
  rows = bench.benchmark_rows(batch_size=2, seconds=0.05, warmup_batches=1, cases=cases)
  assert [r["label"] for r in rows] == ["full LM", "MLM + NSP"]
  assert all(r["rows_per_s"] > 0 and 0 < r["fill"] <= 1 for r in rows)
  step = {"full LM": rows[0]["rows_per_s"] / 12.5, "MLM + NSP": rows[1]["rows_per_s"] / 8}
  table = bench.format_table(rows, step, {"full LM": 0.01, "MLM + NSP": 0.2}).splitlines()
  assert table[0].split()[-5:] == ["ratio", ">=10x", "data", "wait", "<5%"]
  assert table[2].split()[-5:] == [f"{step['full LM']:.1f}", "12.5x", "PASS", "1.00%", "PASS"]
  assert table[3].split()[-5:] == [f"{step['MLM + NSP']:.1f}", "8.0x", "FAIL", "20.00%", "FAIL"]
