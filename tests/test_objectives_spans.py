"""Span corruption: property tests against a hand-written decoder, T5's published lengths."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from seqlab import objectives

VOCAB = 2000
SENTINELS = VOCAB - 1 - np.arange(400)  # sentinel i = vocab_size - 1 - i


def runs(mask):
  """Run-length encoding [(value, length), ...] in pure Python."""
  return [(bool(k), len(list(g))) for k, g in itertools.groupby(mask.tolist())]


def t5_counts(length, noise_density, mean_noise_span_length):
  """T5's random_spans_noise_mask counts: tf.round (half to even) of float32 tensors."""
  num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
  return num_noise, max(num_spans, 1)


def expected_counts(length, noise_density, mean_noise_span_length):
  """T5's counts with seqlab's cap: no more spans than tokens of either kind."""
  num_noise, num_spans = t5_counts(length, noise_density, mean_noise_span_length)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def t5_helper_float64(inputs_length, noise_density, mean_noise_span_length):
  """T5's random_spans_helper (Python float64 counts, no clipping), for contrast."""
  def lengths(raw_length):
    num_noise = int(round(raw_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  raw_length = inputs_length - 1
  while lengths(raw_length + 1)[0] <= inputs_length:
    raw_length += 1
  return raw_length, lengths(raw_length)[1]


def reconstruct(inputs, targets, sentinels):
  """Inverts span corruption by hand: each sentinel in inputs -> its span from targets."""
  sentinels = set(int(s) for s in sentinels)
  spans, current = {}, None
  for token in targets.tolist():
    if token in sentinels:
      assert token not in spans, "a sentinel appears twice in the targets"
      current = token
      spans[current] = []
    else:
      assert current is not None, "targets must start with a sentinel"
      spans[current].append(token)
  assert all(spans.values()), "a target span is empty"
  out = []
  for token in inputs.tolist():
    out.extend(spans.pop(token) if token in sentinels else [token])
  assert not spans, "a target span has no sentinel in the inputs"
  return np.array(out)


@settings(max_examples=150, deadline=None)
@given(length=st.integers(2, 700), noise_density=st.floats(0.01, 0.95),
       mean_noise_span_length=st.floats(1.0, 80.0), seed=st.integers(0, 2**32 - 1),
       random_roll=st.booleans())
def test_span_corruption_properties(length, noise_density, mean_noise_span_length, seed,
                                    random_roll):
  tokens = np.random.default_rng(seed + 1).integers(3, VOCAB - 400, length)
  mask = objectives.random_spans_noise_mask(length, noise_density, mean_noise_span_length,
                                            np.random.default_rng(seed),
                                            random_roll=random_roll)
  num_noise, num_spans = expected_counts(length, noise_density, mean_noise_span_length)
  assert mask.shape == (length,) and mask.dtype == bool
  assert mask.sum() == num_noise
  mask_runs = runs(mask)
  if not random_roll:
    # Alternating, non-noise first, one non-noise run per noise run, none empty.
    assert [v for v, _ in mask_runs] == [False, True] * num_spans
  else:
    # Rolling keeps the circular structure: merge a run that wraps around the end.
    values = [v for v, _ in mask_runs]
    circular_noise_runs = values.count(True) - (1 if values[0] and values[-1] else 0)
    assert circular_noise_runs == num_spans
  assert all(n >= 1 for _, n in mask_runs)

  example = objectives.span_corruption(
      tokens, np.random.default_rng(seed), noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length, sentinel_ids=SENTINELS,
      random_roll=random_roll)
  inputs, targets = example["inputs"], example["targets"]
  assert inputs.dtype == np.int32 and targets.dtype == np.int32
  np.testing.assert_array_equal(reconstruct(inputs, targets, SENTINELS), tokens)
  # Same generator state -> the corruption used exactly this mask.
  noise_runs = [n for v, n in mask_runs if v]
  used = SENTINELS[:len(noise_runs)]
  np.testing.assert_array_equal(inputs[np.isin(inputs, SENTINELS)], used)
  np.testing.assert_array_equal(targets[np.isin(targets, SENTINELS)], used)
  assert len(set(used.tolist())) == len(used)
  np.testing.assert_array_equal(tokens[~mask], inputs[~np.isin(inputs, SENTINELS)])
  assert targets.size == num_noise + len(noise_runs)
  if not random_roll:
    assert len(noise_runs) == num_spans


def test_span_corruption_hand_example():
  # Noise mask F T T F F T on [10..15]: inputs keep 10, 13, 14 with sentinels in order.
  tokens = np.arange(10, 16)
  mask = np.array([False, True, True, False, False, True])
  example = objectives.corrupt_spans(tokens, mask, np.int32([99, 98, 97]))
  np.testing.assert_array_equal(example["inputs"], [10, 99, 13, 14, 98])
  np.testing.assert_array_equal(example["targets"], [99, 11, 12, 98, 15])
  # A rolled mask that starts with noise stays aligned: sentinel 0 leads both sides.
  example = objectives.corrupt_spans(tokens, ~mask, np.int32([99, 98, 97]))
  np.testing.assert_array_equal(example["inputs"], [99, 11, 12, 98, 15])
  np.testing.assert_array_equal(example["targets"], [99, 10, 98, 13, 14])


@pytest.mark.parametrize("mean_noise_span_length,noise_density,expected", [
    (3, 0.15, (568, 114)), (8, 0.15, (588, 100)), (3, 0.5, (766, 512)),
    (8, 0.5, (908, 512)), (64, 0.15, (600, 92)), (64, 0.5, (1006, 512)),
])
def test_span_corruption_lengths_published(mean_noise_span_length, noise_density, expected):
  assert objectives.span_corruption_lengths(512, noise_density,
                                            mean_noise_span_length) == expected


@pytest.mark.parametrize("noise_density,mean_noise_span_length", [(0.15, 3), (0.5, 8), (0.15, 64)])
def test_span_corruption_lengths_match_real_examples(noise_density, mean_noise_span_length):
  raw_length, targets_length = objectives.span_corruption_lengths(512, noise_density,
                                                                  mean_noise_span_length)
  rng = np.random.default_rng(0)
  example = objectives.span_corruption(
      rng.integers(3, 1000, raw_length), rng, noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length, sentinel_ids=SENTINELS)
  assert example["inputs"].size + 1 == 512  # + eos, appended by the feature converter
  assert example["targets"].size + 1 == targets_length


DENSITIES = sorted({0.15, *np.round(np.arange(0.05, 0.501, 0.01), 2).tolist()})


def test_noise_counts_match_t5_float32_at_ties():
  # 190 * 0.15 is 28.500002 in float32 (T5 rounds to 29, then 29 / 3 -> 10 spans) but
  # 28.499999999999996 in float64 (28 tokens, 9 spans).
  assert objectives.noise_span_counts(190, 0.15, 3.0) == (29, 10)
  assert round(190 * 0.15) == 28  # the float64 arithmetic this replaces
  mask = objectives.random_spans_noise_mask(190, 0.15, 3.0, np.random.default_rng(0))
  assert mask.sum() == 29 and [v for v, _ in runs(mask)] == [False, True] * 10
  # 12 / 8 = 1.5 and 20 / 8 = 2.5: exact ties in both precisions, rounded half to even.
  assert objectives.noise_span_counts(80, 0.15, 8.0) == (12, 2)
  assert objectives.noise_span_counts(400, 0.05, 8.0) == (20, 2)
  ties = 0
  for mean_noise_span_length, densities in ((3.0, DENSITIES), (2.5, [0.15]), (8.0, [0.15])):
    for noise_density in densities:
      for length in range(2, 2049):
        got = objectives.noise_span_counts(length, noise_density, mean_noise_span_length)
        assert got == expected_counts(length, noise_density, mean_noise_span_length), (
            length, noise_density, mean_noise_span_length)
        ties += got[0] != min(max(round(length * noise_density), 1), length - 1)
  assert ties > 50  # the sweep does cross float32 / float64 disagreements


def test_span_corruption_lengths_fit_masks_at_ties():
  # Inputs budget 172 at (0.15, 3) plans 190 raw tokens, a float32 tie: the masks give
  # 29 + 10 target tokens + eos = 40, where T5's float64 helper would plan 38.
  assert objectives.span_corruption_lengths(172, 0.15, 3.0) == (190, 40)
  assert t5_helper_float64(172, 0.15, 3.0) == (190, 38)
  rng = np.random.default_rng(0)
  for inputs_length in range(10, 800, 3):
    raw_length, targets_length = objectives.span_corruption_lengths(inputs_length, 0.15, 3.0)
    example = objectives.span_corruption(rng.integers(3, 1000, raw_length), rng,
                                         sentinel_ids=SENTINELS)
    assert example["inputs"].size + 1 <= inputs_length
    assert example["targets"].size + 1 == targets_length
    num_noise, num_spans = expected_counts(raw_length + 1, 0.15, 3.0)
    assert raw_length + 1 - num_noise + num_spans + 1 > inputs_length  # raw_length is maximal


def test_noise_mask_is_uniform_over_valid_masks():
  # L=8, r=0.5, mu=2: 4 noise tokens in 2 spans, 4 non-noise in 2 spans, 3 * 3 masks.
  valid = [m for m in itertools.product([False, True], repeat=8)
           if sum(m) == 4 and [v for v, _ in runs(np.array(m))] == [False, True, False, True]]
  assert len(valid) == 9
  rng = np.random.default_rng(0)
  counts = dict.fromkeys(valid, 0)
  for _ in range(4500):
    counts[tuple(objectives.random_spans_noise_mask(8, 0.5, 2.0, rng).tolist())] += 1
  assert sum(counts.values()) == 4500  # no mask outside the valid set
  assert stats.chisquare(list(counts.values())).pvalue > 1e-4


def test_noise_mask_caps_spans_where_t5_would_make_empty_ones():
  # r=0.8, mu=1 on 10 tokens: T5 asks for 8 spans but only 2 non-noise tokens exist.
  assert objectives.noise_span_counts(10, 0.8, 1.0) == (8, 2)
  mask = objectives.random_spans_noise_mask(10, 0.8, 1.0, np.random.default_rng(0))
  assert mask.sum() == 8
  assert [v for v, _ in runs(mask)] == [False, True, False, True]


def test_noise_mask_edge_counts():
  assert objectives.noise_span_counts(2, 0.01, 3.0) == (1, 1)  # clipped up to 1 noise
  assert objectives.noise_span_counts(3, 0.9, 1.0) == (2, 1)   # clipped down to L - 1
  assert not objectives.random_spans_noise_mask(5, 0.0, 3.0, np.random.default_rng(0)).any()


def test_span_corruption_is_deterministic_per_seed():
  tokens = np.arange(3, 203)
  a = objectives.span_corruption(tokens, np.random.default_rng(7), sentinel_ids=SENTINELS)
  b = objectives.span_corruption(tokens, np.random.default_rng(7), sentinel_ids=SENTINELS)
  c = objectives.span_corruption(tokens, np.random.default_rng(8), sentinel_ids=SENTINELS)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  np.testing.assert_array_equal(a["targets"], b["targets"])
  assert not np.array_equal(a["inputs"], c["inputs"])


@pytest.mark.parametrize("tokens,kwargs,match", [
    ([], {}, "tokens is empty"),
    ([5], {}, "tokens has length 1"),
    ([[5, 6], [7, 8]], {}, "tokens must be 1-D"),
    ([5.0, 6.0], {}, "integer ids"),
    ([5, -1, 6], {}, "id -1"),
    ([5, 6, 2500], {"vocab_size": VOCAB}, "id 2500 outside the vocabulary"),
    ([5, 6, VOCAB - 1], {}, "one of the sentinel_ids"),
    ([5, 6, 7], {"noise_density": 1.5}, "noise_density=1.5"),
    ([5, 6, 7], {"mean_noise_span_length": 0.5}, "mean_noise_span_length=0.5"),
])
def test_span_corruption_bad_input(tokens, kwargs, match):
  with pytest.raises(ValueError, match=match):
    objectives.span_corruption(np.array(tokens), np.random.default_rng(0),
                               sentinel_ids=SENTINELS, **kwargs)


def test_span_corruption_never_reuses_ordinary_ids():
  # 100 tokens at r=0.5, mu=1 need 50 sentinels; 10 are reserved.
  with pytest.raises(ValueError, match="50 spans but only 10 sentinel_ids"):
    objectives.span_corruption(np.arange(3, 103), np.random.default_rng(0), noise_density=0.5,
                               mean_noise_span_length=1.0, sentinel_ids=SENTINELS[:10])
  with pytest.raises(ValueError, match="distinct"):
    objectives.span_corruption(np.arange(3, 13), np.random.default_rng(0),
                               sentinel_ids=[1999, 1999])


def test_length_helpers_bad_input():
  with pytest.raises(ValueError, match="length=1"):
    objectives.random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0))
  with pytest.raises(ValueError, match="inputs_length=2 is too short"):
    objectives.span_corruption_lengths(2, 0.15, 3.0)
  with pytest.raises(ValueError, match="noise_density=-0.1"):
    objectives.span_corruption_lengths(512, -0.1, 3.0)
