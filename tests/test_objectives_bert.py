"""BERT data: MLM statistics over 10k examples, NSP pairs against Google's truncation loop."""

import numpy as np
import pytest

from seqlab import objectives

SPECIAL = objectives.SpecialIds(vocab_size=30000, mask=3, cls=4, sep=5, nlu=6, nlg=7, s2s=8,
                                num_sentinels=100)
RESERVED = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8] + list(range(29900, 30000)))


def sentence_with_specials(rng, length):
  """[CLS] text [SEP] with pad / eos / unk / sentinel ids sprinkled in."""
  tokens = rng.integers(9, 29900, length)
  tokens[rng.random(length) < 0.05] = rng.choice(RESERVED, 1)[0]
  tokens[0], tokens[-1] = SPECIAL.cls, SPECIAL.sep
  return tokens


def test_mlm_statistics_over_10k_examples():
  rng = np.random.default_rng(0)
  is_reserved = np.zeros(SPECIAL.vocab_size, bool)
  is_reserved[RESERVED] = True
  tokens, inputs, targets, weights, counts = [], [], [], [], []
  for _ in range(10_000):
    example_tokens = sentence_with_specials(rng, int(rng.integers(20, 120)))
    example = objectives.mlm(example_tokens, rng, special=SPECIAL)
    tokens.append(example_tokens)
    inputs.append(example["inputs"])
    targets.append(example["targets"])
    weights.append(example["weights"])
    counts.append((example["weights"].sum(), (~is_reserved[example_tokens]).sum()))
  tokens, inputs, targets, weights = map(np.concatenate, (tokens, inputs, targets, weights))
  counts = np.array(counts)
  # Google's exact count over the maskable positions, in every example.
  np.testing.assert_array_equal(counts[:, 0], np.maximum(1, np.round(0.15 * counts[:, 1])))
  chosen = weights == 1
  special = is_reserved[tokens]
  assert not (chosen & special).any(), "a special token was selected"
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
  np.testing.assert_array_equal(targets[chosen], tokens[chosen])
  assert (targets[~chosen] == SPECIAL.pad).all()
  masked = chosen & (inputs == SPECIAL.mask)
  replaced = chosen & (inputs != tokens) & ~masked
  kept = chosen & (inputs == tokens)
  assert not is_reserved[inputs[replaced]].any(), "a random replacement was a special id"
  assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.005
  assert abs(masked.sum() / chosen.sum() - 0.8) < 0.01
  assert abs(replaced.sum() / chosen.sum() - 0.1) < 0.01
  assert abs(kept.sum() / chosen.sum() - 0.1) < 0.01


def test_mlm_max_predictions_caps_the_count():
  tokens = np.arange(9, 509)
  example = objectives.mlm(tokens, np.random.default_rng(0), special=SPECIAL, max_predictions=20)
  assert example["weights"].sum() == 20
  # One maskable token still gets a prediction (max(1, round(0.15))).
  example = objectives.mlm(np.array([4, 100, 5]), np.random.default_rng(0), special=SPECIAL)
  np.testing.assert_array_equal(example["weights"], [0, 1, 0])


@pytest.mark.parametrize("tokens,kwargs,match", [
    ([], {}, "tokens is empty"),
    ([4, 5, 0], {}, "only reserved ids"),
    ([4, 30000, 5], {}, "id 30000 outside the vocabulary"),
    ([4, 10, 5], {"selection_rate": 0.0}, "selection_rate=0.0"),
    ([4, 10, 5], {"mask_token_rate": 0.95, "random_token_rate": 0.1}, "sum <= 1"),
    ([4, 10, 5], {"max_predictions": 0}, "max_predictions=0"),
])
def test_mlm_bad_input(tokens, kwargs, match):
  with pytest.raises(ValueError, match=match):
    objectives.mlm(np.array(tokens, dtype=np.int64), np.random.default_rng(0), special=SPECIAL,
                   **kwargs)
  with pytest.raises(ValueError, match="special.mask is None"):
    objectives.mlm(np.array([10, 11]), np.random.default_rng(0),
                   special=objectives.SpecialIds(vocab_size=100))


def google_truncate_lengths(length_a, length_b, max_tokens):
  """Google's truncate_seq_pair, one token at a time: the longer side loses one, B on ties."""
  while length_a + length_b > max_tokens:
    if length_a > length_b:
      length_a -= 1
    else:
      length_b -= 1
  return length_a, length_b


def split_pair(example):
  inputs, types = example["inputs"], example["token_type_ids"]
  assert inputs[0] == SPECIAL.cls and inputs[-1] == SPECIAL.sep
  num_a = int((types == 0).sum()) - 2
  assert inputs[num_a + 1] == SPECIAL.sep
  np.testing.assert_array_equal(types, [0] * (num_a + 2) + [1] * (inputs.size - num_a - 2))
  return inputs[1:num_a + 1], inputs[num_a + 2:-1]


def test_nsp_pairs_is_next_half_the_time_and_b_follows_a():
  rng = np.random.default_rng(0)
  sentences = [np.arange(100 * i + 10, 100 * i + 10 + n) for i, n in enumerate([4, 7, 3, 5, 6])]
  others = [np.arange(20000 + 50 * i, 20000 + 50 * i + 8) for i in range(6)]
  document = np.concatenate(sentences)
  boundaries = list(np.cumsum([0] + [s.size for s in sentences]))
  labels, a_ends = [], []
  for _ in range(5000):
    example = objectives.nsp_pair(sentences, others, rng, special=SPECIAL, max_length=128)
    a, b = split_pair(example)
    label = int(example["nsp_label"])
    labels.append(label)
    a_end = boundaries.index(a.size)
    assert np.array_equal(a, document[:a.size])
    if label == 0:  # IsNext: B is the rest of the document
      assert np.array_equal(b, document[a.size:])
    else:  # NotNext: B is a run of the other document starting at a sentence
      start = (int(b[0]) - 20000) // 50
      assert np.array_equal(b, np.concatenate(others[start:])[:b.size])
      assert b.size >= 128 - 3 - a.size or start + b.size // 8 == len(others)
    a_ends.append(a_end)
  assert abs(np.mean(labels) - 0.5) < 0.02
  # a_end is uniform on [1, n - 1].
  np.testing.assert_allclose(np.bincount(a_ends, minlength=5)[1:] / 5000, 0.25, atol=0.025)


@pytest.mark.parametrize("length_a,length_b,max_length", [
    (50, 10, 40), (10, 50, 40), (30, 30, 23), (31, 30, 24), (5, 5, 13), (100, 99, 8)])
def test_nsp_truncation_matches_google_loop(length_a, length_b, max_length):
  # One sentence forces NotNext; a one-sentence other document makes B that whole sentence.
  a = np.arange(10, 10 + length_a)
  b = np.arange(5000, 5000 + length_b)
  expected = google_truncate_lengths(length_a, length_b, max_length - 3)
  rng = np.random.default_rng(0)
  fronts = set()
  for _ in range(40):
    example = objectives.nsp_pair([a], [b], rng, special=SPECIAL, max_length=max_length)
    got_a, got_b = split_pair(example)
    assert example["nsp_label"] == 1
    assert (got_a.size, got_b.size) == expected
    # Truncation keeps a contiguous slice of each side.
    np.testing.assert_array_equal(got_a, np.arange(got_a[0], got_a[0] + got_a.size))
    np.testing.assert_array_equal(got_b, np.arange(got_b[0], got_b[0] + got_b.size))
    fronts.add(int(got_a[0]) - 10)
  if length_a - expected[0] >= 2:
    assert len(fronts) > 1, "tokens should be dropped from both ends at random"


def test_nsp_pair_bad_input():
  rng = np.random.default_rng(0)
  good = [np.arange(10, 15), np.arange(20, 25)]
  with pytest.raises(ValueError, match="sentences is empty"):
    objectives.nsp_pair([], good, rng, special=SPECIAL, max_length=64)
  with pytest.raises(ValueError, match="random_sentences is empty"):
    objectives.nsp_pair(good, [], rng, special=SPECIAL, max_length=64)
  with pytest.raises(ValueError, match=r"sentences\[1\] is empty"):
    objectives.nsp_pair([good[0], np.zeros(0, int)], good, rng, special=SPECIAL, max_length=64)
  with pytest.raises(ValueError, match="id 40000 outside the vocabulary"):
    objectives.nsp_pair([np.array([40000])], good, rng, special=SPECIAL, max_length=64)
  with pytest.raises(ValueError, match="max_length=4"):
    objectives.nsp_pair(good, good, rng, special=SPECIAL, max_length=4)
  with pytest.raises(ValueError, match="special.cls and special.sep"):
    objectives.nsp_pair(good, good, rng, special=objectives.SpecialIds(vocab_size=100),
                        max_length=64)


def test_nsp_pair_calls_a_random_document_function_only_for_not_next():
  # A function in place of random_sentences gives the same pairs from the same generator
  # state, and is called exactly once per NotNext pair (the pipeline reads a document there).
  sentences = [np.arange(100 * i + 10, 100 * i + 10 + n) for i, n in enumerate([4, 7, 3, 5])]
  others = [np.arange(20000 + 50 * i, 20000 + 50 * i + 8) for i in range(6)]
  calls = []

  def random_document():
    calls.append(1)
    return others

  rng_list, rng_fn = np.random.default_rng(3), np.random.default_rng(3)
  not_next = 0
  for _ in range(300):
    expected = objectives.nsp_pair(sentences, others, rng_list, special=SPECIAL, max_length=24)
    got = objectives.nsp_pair(sentences, random_document, rng_fn, special=SPECIAL,
                              max_length=24)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    not_next += int(expected["nsp_label"])
  assert 100 < not_next < 200 and len(calls) == not_next
  with pytest.raises(ValueError, match="random_sentences is empty"):
    objectives.nsp_pair([np.arange(10, 15)], lambda: [], np.random.default_rng(0),
                        special=SPECIAL, max_length=64)
