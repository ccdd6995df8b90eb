"""T5 span corruption: the random-spans noise mask, the corruption itself and its length helper.

Follows t5.data.preprocessors (`random_spans_noise_mask`, `noise_span_to_unique_sentinel`,
`nonnoise_span_to_unique_sentinel`, `random_spans_helper`) with NumPy and an explicit
`numpy.random.Generator`. The counts are T5's to the bit: `random_spans_noise_mask` rounds
float32(length) * float32(noise_density) and float32(num_noise) / float32(mean_noise_span_length)
half to even (`tf.round` on float32 tensors), which differs from float64 where a product lands
on .5 in one precision only -- e.g. length 190 at density 0.15 is 28.500002 in float32 (29
noise tokens in 10 spans) but 28.499999999999996 in float64 (28 in 9); at density 0.15 the
lengths 190, 350, 390, 670, 710, 750, 790 and 830 in 64..1024 are such ties. T5's own length
helper, `random_spans_helper`, counts in float64 and so can disagree with T5's masks at those
lengths; `span_corruption_lengths` uses the float32 counts the masks use, so a planned length
always fits the examples seqlab makes.

Two deliberate differences from T5, both where T5 would break:

* T5 segments `num_nonnoise_tokens` into `num_noise_spans` non-empty pieces, impossible when
  there are more spans than non-noise tokens (e.g. noise_density=0.8, mean length 1). We cap
  the span count at `min(num_noise_tokens, num_nonnoise_tokens)`: every span keeps >= 1 token
  and the noise count stays exactly `clip(round(L * noise_density), 1, L - 1)`.
* A configuration that needs more sentinels than are given raises ValueError; T5 silently
  counts down into ordinary vocabulary ids.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from seqlab.objectives.special_ids import as_tokens


def _check_rates(noise_density: float, mean_noise_span_length: float):
  if not 0.0 <= noise_density < 1.0:
    raise ValueError(f"noise_density={noise_density!r} must be in [0, 1)")
  if not mean_noise_span_length >= 1.0:
    raise ValueError(f"mean_noise_span_length={mean_noise_span_length!r} must be >= 1")


def noise_span_counts(length: int, noise_density: float,
                      mean_noise_span_length: float) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) that `random_spans_noise_mask` uses for `length`.

  num_noise = clip(round(length * noise_density), 1, length - 1) (0 when noise_density == 0);
  num_spans = max(round(num_noise / mean_noise_span_length), 1), capped at
  min(num_noise, length - num_noise) so no span is empty. Both products are float32 and
  both rounds half to even, as T5's `random_spans_noise_mask` (tf.round on float32), so the
  counts match T5's masks at .5 ties (length 190, density 0.15: 29 tokens, 10 spans).
  """
  _check_rates(noise_density, mean_noise_span_length)
  if noise_density == 0.0:
    return 0, 0
  # TF casts the Python floats to float32 tensors before multiplying; np.round is half to even.
  product = np.float32(length) * np.float32(noise_density)
  num_noise = min(max(int(np.round(product)), 1), length - 1)
  quotient = np.float32(num_noise) / np.float32(mean_noise_span_length)
  num_spans = max(int(np.round(quotient)), 1)
  num_spans = min(num_spans, num_noise, length - num_noise)
  return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """int64[num_segments] positive lengths summing to num_items, every composition equally likely."""
  # Choosing num_segments - 1 distinct cut points among the num_items - 1 gaps is a uniform
  # draw over compositions, the same law as T5's shuffled indicator vector.
  bounds = np.empty(num_segments + 1, np.int64)
  bounds[0], bounds[-1] = 0, num_items
  bounds[1:-1] = np.sort(rng.permutation(num_items - 1)[:num_segments - 1]) + 1
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator, *, random_roll: bool = False) -> np.ndarray:
  """bool[length] noise mask made of random spans (True = noise), as T5.

  Counts come from `noise_span_counts`. Spans alternate non-noise / noise, beginning with
  non-noise (so the mask ends in noise); subject to the counts all such masks are equally
  likely. `random_roll` rolls the mask by an offset uniform in [0, length): the noise count
  and the number of *circular* noise runs are kept, but a run that wraps around the end
  shows up as two linear runs (num_spans + 1) -- span corruption then uses one more sentinel.
  """
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 2:
    raise ValueError(
        f"length={length!r} is too short for a noise mask (needs an integer >= 2: one noise "
        "and one non-noise token)")
  num_noise, num_spans = noise_span_counts(int(length), noise_density, mean_noise_span_length)
  if num_noise == 0:
    return np.zeros(length, bool)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  interleaved = np.empty(2 * num_spans, np.int64)
  interleaved[0::2] = _random_segmentation(length - num_noise, num_spans, rng)
  interleaved[1::2] = noise_lengths
  mask = np.repeat(np.arange(2 * num_spans) % 2 == 1, interleaved)
  if random_roll:
    mask = np.roll(mask, int(rng.integers(length)))
  return mask


def as_sentinel_ids(sentinel_ids: Any) -> np.ndarray:
  """Validates sentinel ids: 1-D, non-negative, distinct integers -> int32[S]."""
  array = np.asarray(sentinel_ids)
  if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"sentinel_ids must be a 1-D sequence of integer ids, got {sentinel_ids!r}")
  if array.size and array.min() < 0:
    raise ValueError(f"sentinel_ids holds a negative id {int(array.min())}")
  ordered = np.sort(array)
  if (ordered[1:] == ordered[:-1]).any():
    raise ValueError(f"sentinel_ids must be distinct, got {sentinel_ids!r}")
  return array.astype(np.int32, copy=False)


def _check_no_sentinels(tokens: np.ndarray, sentinel_ids: np.ndarray, name: str = "tokens"):
  if not sentinel_ids.size:
    return
  low, high = int(sentinel_ids.min()), int(sentinel_ids.max())
  if high - low + 1 == sentinel_ids.size:  # the usual contiguous block: a range test suffices
    hits = (tokens >= low) & (tokens <= high)
  else:
    hits = np.isin(tokens, sentinel_ids)
  if hits.any():
    raise ValueError(
        f"{name} holds id {int(tokens[np.argmax(hits)])}, which is one of the sentinel_ids")


def corrupt_spans(tokens: np.ndarray, noise_mask: np.ndarray,
                  sentinel_ids: np.ndarray) -> dict[str, np.ndarray]:
  """Applies a noise mask: one unique sentinel per noise run in the inputs, runs in the targets.

  inputs = the non-noise tokens with noise run k replaced by `sentinel_ids[k]`;
  targets = `sentinel_ids[k]` followed by run k, for k = 0, 1, ... (T5's
  noise_span_to_unique_sentinel / nonnoise_span_to_unique_sentinel for a mask that starts
  with non-noise; for a rolled mask that starts with noise this stays aligned, T5 does not).
  No eos is appended. ValueError if there are more runs than sentinels.
  """
  previous = np.empty_like(noise_mask)
  previous[0], previous[1:] = False, noise_mask[:-1]
  first_noise = noise_mask & ~previous
  num_runs = int(np.count_nonzero(first_noise))
  if num_runs > sentinel_ids.size:
    raise ValueError(
        f"the noise mask has {num_runs} spans but only {sentinel_ids.size} sentinel_ids are "
        "reserved; reserve more sentinels or lower noise_density / raise mean_noise_span_length")
  sentinels = sentinel_ids[:num_runs]
  inputs = tokens.copy()
  inputs[first_noise] = sentinels
  inputs = inputs[~(noise_mask & previous)]
  # Run k's sentinel goes before the run's first noise token, shifted by the k sentinels
  # already placed before it.
  noise_tokens = tokens[noise_mask]
  is_sentinel = np.zeros(noise_tokens.size + num_runs, bool)
  is_sentinel[(np.cumsum(noise_mask) - 1)[first_noise] + np.arange(num_runs)] = True
  targets = np.empty(is_sentinel.size, np.int32)
  targets[is_sentinel] = sentinels
  targets[~is_sentinel] = noise_tokens
  return {"inputs": inputs.astype(np.int32, copy=False), "targets": targets}


def span_corruption(tokens: Any, rng: np.random.Generator, *, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, sentinel_ids: Any,
                    random_roll: bool = False,
                    vocab_size: int | None = None) -> dict[str, np.ndarray]:
  """T5's span corruption: {"inputs": int32[I], "targets": int32[T]}, no eos appended.

  The mask is `random_spans_noise_mask(len(tokens), ...)`; inputs keep the non-noise tokens
  with one sentinel per noise span, `sentinel_ids[0]` first, and targets are each sentinel
  followed by its span. Example (noise on "b c" and "f"):
  tokens [a b c d e f] -> inputs [a S0 d e S1], targets [S0 b c S1 f].

  The feature converter appends one eos to each side, as T5; `span_corruption_lengths`
  counts it. `tokens` needs length >= 2 and must not contain a sentinel id (the targets
  would be ambiguous); ids >= `vocab_size` are rejected when it is given. More noise spans
  than `sentinel_ids` raise ValueError.
  """
  tokens = as_tokens(tokens, min_length=2, vocab_size=vocab_size, objective="span corruption")
  sentinel_ids = as_sentinel_ids(sentinel_ids)
  _check_no_sentinels(tokens, sentinel_ids)
  mask = random_spans_noise_mask(tokens.size, noise_density, mean_noise_span_length, rng,
                                 random_roll=random_roll)
  return corrupt_spans(tokens, mask, sentinel_ids)


def span_corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float,
                           *, random_roll: bool = False) -> tuple[int, int]:
  """(inputs, targets) lengths span corruption gives for `raw_length` tokens, without eos.

  With `random_roll` a wrapped span can need one more sentinel on each side; this returns
  that worst case.
  """
  num_noise, num_spans = noise_span_counts(raw_length, noise_density, mean_noise_span_length)
  extra = 1 if random_roll and num_noise else 0
  return (raw_length - num_noise + num_spans + extra, num_noise + num_spans + extra)


def max_fitting_length(fits: Callable[[int], bool], *, what: str) -> int:
  """The largest raw length L >= 2 with fits(L); fits must be True up to some L, False after.

  ValueError when even L = 2 does not fit, or when no budget bounds L.
  """
  if not fits(2):
    raise ValueError(f"{what} is too short: not even 2 raw tokens fit")
  low, high = 2, 4
  while fits(high):  # exponential search for an upper bound, then bisection
    low, high = high, high * 2
    if high > 2**40:
      raise ValueError(f"{what} does not bound the raw length")
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low


def span_corruption_lengths(inputs_length: int, noise_density: float,
                            mean_noise_span_length: float) -> tuple[int, int]:
  """T5's `random_spans_helper`: (raw_length, targets_length) for an inputs budget.

  raw_length is the largest number of raw tokens whose corrupted inputs, plus one eos, fit in
  `inputs_length`; targets_length is the corrupted targets length plus one eos. The counts
  are `noise_span_counts`' float32 ones, those of the masks, not T5's float64 helper
  arithmetic (see the module docstring). As T5, when noise_density == 0.5 and the targets
  come out longer than the inputs, one raw token is dropped so the targets fit the (usually
  round) inputs length. For example
  `span_corruption_lengths(512, 0.15, 3.0) == (568, 114)`.
  """
  if isinstance(inputs_length, bool) or not isinstance(inputs_length, (int, np.integer)):
    raise ValueError(f"inputs_length={inputs_length!r} must be an integer")
  _check_rates(noise_density, mean_noise_span_length)

  def lengths(raw_length):
    inputs, targets = span_corrupted_lengths(raw_length, noise_density, mean_noise_span_length)
    return inputs + 1, targets + 1

  raw_length = max_fitting_length(lambda n: lengths(n)[0] <= inputs_length,
                                  what=f"inputs_length={inputs_length}")
  inputs, targets = lengths(raw_length)
  if noise_density == 0.5 and targets > inputs and raw_length > 2:
    raw_length -= 1
    targets = lengths(raw_length)[1]
  return raw_length, targets
