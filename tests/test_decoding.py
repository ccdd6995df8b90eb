"""Tests for seqlab.decoding: filters vs NumPy brute force, the decode loop vs a brute-force
oracle on a toy model, beam search vs exhaustive enumeration, and the real models vs their full
(uncached) forward pass."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy import stats

from seqlab import decoding

EOS = 1


# ---------------------------------------------------------------------------------------------
# A toy model that implements the decoding contract (init_cache / extend / encode) and whose
# next-token logits are a closed-form function of the visible history, so that every decoded
# sequence has an independent NumPy oracle:
#   logits(history h, position p) = bigram[h[-1]] + mean_j mixer[h_j] + position[p]
#                                   (+ mean of the encoder's valid token rows, enc-dec only)
# ---------------------------------------------------------------------------------------------


class ToyDecoder(nn.Module):
  vocab_size: int = 8
  max_positions: int = 32
  encoder_decoder: bool = False

  def setup(self):
    init = nn.initializers.normal(1.5)
    self.bigram = self.param("bigram", init, (self.vocab_size, self.vocab_size))
    self.mixer = self.param("mixer", init, (self.vocab_size, self.vocab_size))
    self.position = self.param("position", init, (self.max_positions, self.vocab_size))
    if self.encoder_decoder:
      self.source = self.param("source", init, (self.vocab_size, self.vocab_size))

  def init_cache(self, batch_size, max_length, encoded=None, encoder_valid=None):
    cache = {"tokens": jnp.zeros((batch_size, max_length), jnp.int32),
             "valid": jnp.zeros((batch_size, max_length), bool),
             "end": jnp.zeros((), jnp.int32),
             "next_position": jnp.zeros((batch_size,), jnp.int32)}
    if self.encoder_decoder:
      weights = encoder_valid.astype(jnp.float32)
      cache["cross"] = (jnp.einsum("bsv,bs->bv", encoded, weights)
                        / jnp.sum(weights, axis=1, keepdims=True))
    return cache

  def extend(self, tokens_BT, cache, valid_BT=None, bidirectional=False):
    batch_size, length = tokens_BT.shape
    max_length = cache["tokens"].shape[1]
    if valid_BT is None:
      valid_BT = jnp.ones(tokens_BT.shape, bool)
    end = cache["end"]
    if not isinstance(end, jax.core.Tracer) and int(end) + length > max_length:
      raise ValueError(f"cache overflow: end={int(end)} + {length} > {max_length}")
    tokens_BL = lax.dynamic_update_slice(cache["tokens"], tokens_BT.astype(jnp.int32), (0, end))
    valid_BL = lax.dynamic_update_slice(cache["valid"], valid_BT, (0, end))
    positions_BT = cache["next_position"][:, None] + jnp.cumsum(valid_BT, axis=1) - 1
    slot_S = jnp.arange(max_length)[None, :]
    query_T = end + jnp.arange(length)[:, None]
    sees_TS = slot_S < end + length if bidirectional else slot_S <= query_T
    visible_BTS = valid_BL[:, None, :] & sees_TS[None]
    weights = visible_BTS.astype(jnp.float32)
    history = jnp.einsum("bts,bsv->btv", weights, self.mixer[tokens_BL]) / jnp.maximum(
        jnp.sum(weights, axis=2, keepdims=True), 1.0)
    logits = self.bigram[tokens_BT] + history + self.position[jnp.maximum(positions_BT, 0)]
    if self.encoder_decoder:
      logits = logits + cache["cross"][:, None, :]
    cache = dict(cache, tokens=tokens_BL, valid=valid_BL, end=end + length,
                 next_position=cache["next_position"] + jnp.sum(valid_BT, axis=1))
    return logits, cache


class ToyEncoderDecoder(ToyDecoder):
  encoder_decoder: bool = True

  def encode(self, batch):
    tokens = batch["encoder_input_tokens"]
    return self.source[tokens], tokens != 0


def toy_params(model, seed=0, eos_boost=0.0):
  """N(0, 1.5²) tables drawn in NumPy (no `model.init`: compiling initialisers is slow)."""
  rng = np.random.default_rng(seed)
  names = ["bigram", "mixer", "position"] + (["source"] if model.encoder_decoder else [])
  params = {name: rng.normal(0.0, 1.5, (model.max_positions if name == "position"
                                        else model.vocab_size, model.vocab_size))
            .astype(np.float32) for name in names}
  params["bigram"][:, 0] -= 30.0  # the pad id is (practically) never generated
  if eos_boost:
    params["bigram"][5, EOS] += eos_boost  # eos likely after token 5
  return params


def toy_next_logits(params, history, source=None) -> np.ndarray:
  """The toy's next-token logits, float64, from its formula (`history` includes the start id)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  history = np.asarray(history)
  logits = p["bigram"][history[-1]] + p["mixer"][history].mean(0) + p["position"][len(history) - 1]
  if source is not None:
    source = np.asarray(source)
    logits = logits + p["source"][source[source != 0]].mean(0)
  return logits


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max() - np.log(np.exp(x - x.max()).sum())


def greedy_oracle(next_logits, start, max_new, eos=EOS):
  """Greedy decoding by brute force: (tokens with pad after eos, sum of log-probs, length)."""
  history, out, score = list(start), [], 0.0
  for _ in range(max_new):
    logits = next_logits(history)
    token = int(np.argmax(logits))
    score += log_softmax(logits)[token]
    out.append(token)
    history.append(token)
    if token == eos:
      break
  return out + [0] * (max_new - len(out)), score, len(out)


def generate(*args, **kwargs) -> decoding.GenerateOutput:
  """`decoding.generate` with NumPy outputs (indexing jax arrays eagerly compiles every op)."""
  return jax.tree_util.tree_map(np.asarray, decoding.generate(*args, **kwargs))


def chi_square_pvalue(counts, probs):
  """Pearson's test of observed counts against probabilities (zero-probability bins must be 0)."""
  assert np.all(counts[probs == 0] == 0), (counts, probs)
  kept = probs > 0
  expected = probs[kept] / probs[kept].sum() * counts.sum()
  return stats.chisquare(counts[kept], expected).pvalue


# ---------------------------------------------------------------------------------------------
# Sampling filters vs NumPy brute force.
# ---------------------------------------------------------------------------------------------


def np_top_k(logits, k):
  out = np.full_like(logits, -np.inf)
  for row, (x, o) in enumerate(zip(logits, out)):
    kth = sorted(x, reverse=True)[min(k, len(x)) - 1]
    o[x >= kth] = x[x >= kth]
  return out


def np_top_p(logits, p):
  out = np.full_like(logits, -np.inf)
  for x, o in zip(logits, out):
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    mass = 0.0
    for i in np.argsort(-x, kind="stable"):
      if mass < p:  # the mass before this token has not reached p yet: keep it
        o[i] = x[i]
      mass += probs[i]
    o[x >= x[o > -np.inf].min()] = x[x >= x[o > -np.inf].min()]  # ties with the last kept
  return out


def test_top_k_logits_matches_brute_force():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 11)).astype(np.float32)
  logits[0, [2, 7]] = logits[0].max() + 1.0  # a tie at the top
  logits[1, [3, 4]] = np.sort(logits[1])[-3]  # a tie at the 3rd largest value
  for k in (1, 2, 3, 5, 11, 20):
    np.testing.assert_array_equal(decoding.top_k_logits(logits, k), np_top_k(logits, k))


def test_top_p_logits_matches_brute_force():
  rng = np.random.default_rng(1)
  logits = (2 * rng.normal(size=(6, 13))).astype(np.float32)
  for p in (0.05, 0.3, 0.5, 0.9, 0.99, 1.0):
    got = np.asarray(decoding.top_p_logits(logits, p))
    np.testing.assert_array_equal(got, np_top_p(logits, p))
    assert np.all(np.isfinite(got).sum(-1) >= 1)


def test_filter_logits_order_is_temperature_then_top_k_then_top_p():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 10)).astype(np.float32)
  got = decoding.filter_logits(logits, temperature=0.7, top_k=6, top_p=0.8)
  want = np_top_p(np_top_k(logits / np.float32(0.7), 6), 0.8)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=-1.0),
                                 dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_filter_logits_rejects_bad_arguments(bad):
  with pytest.raises(ValueError, match=next(iter(bad))):
    decoding.filter_logits(np.zeros((1, 4), np.float32), **bad)


def test_sample_logits_frequencies_match_filtered_distribution():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(12,)).astype(np.float32)
  num_draws = 20000
  draws = decoding.sample_logits(jax.random.key(0), np.tile(logits, (num_draws, 1)),
                                 temperature=0.8, top_k=8, top_p=0.9)
  filtered = np_top_p(np_top_k(logits[None] / np.float32(0.8), 8), 0.9)[0].astype(np.float64)
  probs = np.exp(filtered - filtered.max())
  probs /= probs.sum()
  counts = np.bincount(np.asarray(draws), minlength=12)
  assert chi_square_pvalue(counts, probs) > 1e-3


# ---------------------------------------------------------------------------------------------
# The decode loop on the toy model.
# ---------------------------------------------------------------------------------------------

PROMPTS = [np.array([3, 4, 5, 6, 7]), np.array([6]), np.array([7, 2, 3]), np.array([], np.int32)]


def test_greedy_batch_of_different_lengths_matches_brute_force():
  model = ToyDecoder()
  params = toy_params(model, eos_boost=3.0)
  out = generate(model, params, PROMPTS, max_new_tokens=7)
  for i, prompt in enumerate(PROMPTS):
    tokens, score, length = greedy_oracle(lambda h: toy_next_logits(params, h),
                                          [0, *prompt], 7)
    np.testing.assert_array_equal(out.tokens[i], tokens)
    assert int(out.lengths[i]) == length
    np.testing.assert_allclose(out.scores[i], score, rtol=1e-5)
  assert (np.asarray(out.lengths) < 7).any(), "eos never stopped a row: the test is too weak"


def test_left_padded_array_is_the_same_as_a_list():
  model = ToyDecoder()
  params = toy_params(model, seed=1)
  padded = np.zeros((len(PROMPTS), 5), np.int32)
  for i, prompt in enumerate(PROMPTS):
    padded[i, 5 - len(prompt):] = prompt
  from_array = generate(model, params, padded, max_new_tokens=7)
  from_list = generate(model, params, PROMPTS, max_new_tokens=7)
  np.testing.assert_array_equal(from_array.tokens, from_list.tokens)
  for i, prompt in enumerate(PROMPTS):  # and each row is that prompt decoded alone
    want, _, _ = greedy_oracle(lambda h: toy_next_logits(params, h), [0, *prompt], 7)
    np.testing.assert_array_equal(from_array.tokens[i], want)


def test_prompt_valid_keeps_real_zeros_of_an_array_prompt():
  """Token 0 is a real token where `prompt_valid` says so (as a list row keeps it)."""
  model = ToyDecoder()
  params = toy_params(model, seed=1)
  prompts = [np.array([0, 0, 3, 4]), np.array([5, 0]), np.array([0])]
  padded = np.zeros((3, 5), np.int32)
  valid = np.zeros((3, 5), bool)
  for i, prompt in enumerate(prompts):  # padding on the right, to show it need not be left
    padded[i, :len(prompt)] = prompt
    valid[i, :len(prompt)] = True
  padded[:, -1] = 6  # a junk id under padding
  out = generate(model, params, padded, prompt_valid=valid, max_new_tokens=5)
  np.testing.assert_array_equal(out.tokens, generate(model, params, prompts, max_new_tokens=5)
                                .tokens)
  for i, prompt in enumerate(prompts):
    want, _, _ = greedy_oracle(lambda h: toy_next_logits(params, h), [0, *prompt], 5)
    np.testing.assert_array_equal(out.tokens[i], want)


def test_bos_none_and_a_cache_that_fits_exactly():
  model = ToyDecoder()
  params = toy_params(model, seed=2)
  # 2 prompt slots + 3 new tokens - 1 (the last token is never fed back) = 4 slots.
  out = generate(model, params, [np.array([4, 3])], max_new_tokens=3, bos_id=None,
                          eos_id=None, cache_length=4)
  want, _, _ = greedy_oracle(lambda h: toy_next_logits(params, h), [4, 3], 3, eos=-1)
  np.testing.assert_array_equal(out.tokens[0], want)


def test_sampling_frequencies_reproducibility_and_zero_temperature_limit():
  """One compiled sampler (temperature, top-k, top-p are traced): many rows holding two
  left-padded prompts, so each prompt's first token is drawn thousands of times."""
  model = ToyDecoder(vocab_size=10)
  params = toy_params(model, seed=5)
  prompts = {0: [4, 7, 2], 1: [3]}
  num_rows = 4000
  batch = np.zeros((num_rows, 3), np.int32)
  batch[0::2] = prompts[0]
  batch[1::2, -1:] = prompts[1]
  kwargs = dict(max_new_tokens=4, strategy="sample", top_k=5, top_p=0.7)
  out = generate(model, params, batch, temperature=1.5, rng=11, **kwargs)
  for parity, prompt in prompts.items():
    logits = toy_next_logits(params, [0, *prompt])[None].astype(np.float32)
    scaled = logits / np.float32(1.5)
    # Both filters bite: together they keep fewer tokens than either alone.
    filtered = np_top_p(np_top_k(scaled, 5), 0.7)[0].astype(np.float64)
    assert np.isfinite(filtered).sum() < min(np.isfinite(np_top_p(scaled, 0.7)).sum(), 5)
    probs = np.exp(filtered - filtered.max())
    probs /= probs.sum()
    counts = np.bincount(np.asarray(out.tokens[parity::2, 0]), minlength=10)
    assert chi_square_pvalue(counts, probs) > 1e-3

  # The reported score is the model's (unfiltered) log-probability of what was sampled.
  for row in range(4):
    history, score = [0, *prompts[row % 2]], 0.0
    for token in np.asarray(out.tokens[row])[:int(out.lengths[row])]:
      score += log_softmax(toy_next_logits(params, history))[token]
      history.append(int(token))
    np.testing.assert_allclose(out.scores[row], score, rtol=1e-5)

  again = generate(model, params, batch, temperature=1.5, rng=11, **kwargs)
  other = generate(model, params, batch, temperature=1.5, rng=12, **kwargs)
  np.testing.assert_array_equal(again.tokens, out.tokens)
  assert not np.array_equal(other.tokens, out.tokens)

  cold = generate(model, params, batch, temperature=1e-4, rng=11, **kwargs)
  for parity, prompt in prompts.items():
    want, _, _ = greedy_oracle(lambda h: toy_next_logits(params, h), [0, *prompt], 4)
    np.testing.assert_array_equal(cold.tokens[parity::2], np.tile(want, (num_rows // 2, 1)))


def test_num_return_sequences_samples_each_prompt_independently():
  """Row b·n + i is the i-th sample of prompt b: its score is the oracle log-probability of its
  tokens after prompt b, and the samples of a prompt differ."""
  model = ToyDecoder()
  params = toy_params(model, seed=4)
  prompts = [np.array([4, 7, 2]), np.array([3])]
  n = 5
  out = generate(model, params, prompts, max_new_tokens=6, strategy="sample", rng=3,
                 num_return_sequences=n)
  assert out.tokens.shape == (len(prompts) * n, 6)
  for row in range(len(prompts) * n):
    history, score = [0, *prompts[row // n]], 0.0
    for token in out.tokens[row, :out.lengths[row]]:
      score += log_softmax(toy_next_logits(params, history))[token]
      history.append(int(token))
    np.testing.assert_allclose(out.scores[row], score, rtol=1e-5)
  for b in range(len(prompts)):
    assert len({out.tokens[b * n + i].tobytes() for i in range(n)}) > 1


def test_prefix_lm_prompt_is_fed_bidirectionally_in_one_call():
  """The last prompt position sees the whole prompt either way, so generation agrees; what
  differs is the calls: one bidirectional prefill, then one token per step."""
  model = ToyDecoder()
  params = toy_params(model, seed=6)
  calls = []

  class Recording(ToyDecoder):
    def extend(self, tokens_BT, cache, valid_BT=None, bidirectional=False):
      calls.append((tokens_BT.shape[1], bidirectional))
      return super().extend(tokens_BT, cache, valid_BT, bidirectional)

  out = generate(Recording(), params, PROMPTS, max_new_tokens=7, prefix_lm=True)
  assert calls == [(6, True), (1, False)]  # traced once: the prefill, then the loop body
  plain = generate(model, params, PROMPTS, max_new_tokens=7)
  np.testing.assert_array_equal(out.tokens, plain.tokens)


# ---------------------------------------------------------------------------------------------
# Beam search vs exhaustive enumeration.
# ---------------------------------------------------------------------------------------------


def best_by_enumeration(next_logits, start, vocab_size, max_new, alpha):
  """The argmax over every possible output (eos-terminated or max_new long) of
  sum log p / length ** alpha, by enumerating them all: (score, padded tokens, length)."""
  best = (-np.inf, None, 0)
  for length in range(1, max_new + 1):
    for seq in itertools.product(range(vocab_size), repeat=length):
      if EOS in seq[:-1] or (length < max_new and seq[-1] != EOS):
        continue
      history, logp = list(start), 0.0
      for token in seq:
        logp += log_softmax(next_logits(history))[token]
        history.append(token)
      score = logp / length ** alpha
      if score > best[0]:
        best = (score, list(seq) + [0] * (max_new - length), length)
  return best


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5, -0.5])
def test_exhaustive_beam_search_finds_the_best_sequence(alpha):
  vocab, max_new = 4, 3
  model = ToyDecoder(vocab_size=vocab)
  params = toy_params(model, seed=9)  # a draw whose best lengths are 1, 2 or 3 by prompt/alpha
  prompts = [np.array([3, 2]), np.array([2]), np.array([3, 3, 2, 3])]
  out = generate(model, params, prompts, max_new_tokens=max_new, strategy="beam",
                          num_beams=vocab ** max_new, length_penalty=alpha)
  for i, prompt in enumerate(prompts):
    score, seq, length = best_by_enumeration(lambda h: toy_next_logits(params, h),
                                             [0, *prompt], vocab, max_new, alpha)
    np.testing.assert_array_equal(out.tokens[i], seq)
    np.testing.assert_allclose(out.scores[i], score, rtol=1e-5)
    assert int(out.lengths[i]) == length


def beam_oracle(next_logits, start, max_new, num_beams, alpha, eos=EOS):
  """Beam search in plain Python lists: each step ranks all extensions of the live beams,
  keeps the top 2W; those ending in eos (or at the last step) become finished hypotheses
  scored sum log p / length ** alpha, the best W others stay alive. Returns the best finished
  (score, padded tokens). No early stopping: it must not change the answer."""
  alive, finished = [(0.0, [])], []
  for step in range(max_new):
    candidates = []
    for logp, seq in alive:
      step_logp = log_softmax(next_logits(list(start) + seq))
      candidates += [(logp + step_logp[t], seq + [t]) for t in range(len(step_logp))]
    candidates = sorted(candidates, key=lambda c: -c[0])[:2 * num_beams]
    finished += [(logp / (step + 1) ** alpha, seq) for logp, seq in candidates
                 if seq[-1] == eos or step == max_new - 1]
    alive = [c for c in candidates if c[1][-1] != eos][:num_beams]
  score, seq = max(finished, key=lambda f: f[0])
  return score, seq + [0] * (max_new - len(seq))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_beam_search_matches_python_reference(num_beams):
  model = ToyDecoder()
  params = toy_params(model, seed=8, eos_boost=2.0)
  for alpha in (0.0, 1.3):
    beam = generate(model, params, PROMPTS, max_new_tokens=7, strategy="beam",
                    num_beams=num_beams, length_penalty=alpha, beam_rule="t5x")
    for i, prompt in enumerate(PROMPTS):
      score, seq = beam_oracle(lambda h: toy_next_logits(params, h), [0, *prompt], 7,
                               num_beams, alpha)
      np.testing.assert_array_equal(beam.tokens[i], seq)
      np.testing.assert_allclose(beam.scores[i], score, rtol=1e-5)


def test_encoder_decoder_beam_search_matches_enumeration():
  model = ToyEncoderDecoder(vocab_size=5)
  params = toy_params(model, seed=10)
  sources = [np.array([3, 4, 2]), np.array([4]), np.array([2, 2, 3, 4, 4])]
  beam = generate(model, params, sources, max_new_tokens=3, strategy="beam",
                           num_beams=125, length_penalty=0.7)
  for i, source in enumerate(sources):
    next_logits = lambda h, s=source: toy_next_logits(params, h, s)
    best_score, best, _ = best_by_enumeration(next_logits, [0], 5, 3, 0.7)
    np.testing.assert_array_equal(beam.tokens[i], best)
    np.testing.assert_allclose(beam.scores[i], best_score, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=3, strategy="nucleus"), "strategy='nucleus'"),
    (dict(max_new_tokens=3, strategy="sample"), "rng=None"),
    (dict(max_new_tokens=3, strategy="sample", rng=0, temperature=0.0), "temperature=0.0"),
    (dict(max_new_tokens=3, strategy="beam", num_beams=0), "num_beams=0"),
    (dict(max_new_tokens=3, cache_length=6), "cache_length=6"),
    (dict(max_new_tokens=3, bos_id=None), "empty"),
    (dict(max_new_tokens=3, num_return_sequences=2), "num_return_sequences=2"),
    (dict(max_new_tokens=3, strategy="beam", num_beams=2, num_return_sequences=3),
     "num_return_sequences=3 must be <= num_beams=2"),
    (dict(max_new_tokens=3, strategy="beam", early_stopping="always"), "early_stopping"),
    (dict(max_new_tokens=3, strategy="beam", beam_rule="flax"), "beam_rule='flax'"),
    (dict(max_new_tokens=3, repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(max_new_tokens=3, no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1"),
    (dict(max_new_tokens=3, min_new_tokens=1.5), "min_new_tokens=1.5"),
    (dict(max_new_tokens=3, eos_id=(1, -2)), "eos_id"),
    (dict(max_new_tokens=3, prompt_valid=np.ones((2, 4), bool)), "prompt_valid"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
  model = ToyDecoder()
  params = toy_params(model)
  with pytest.raises(ValueError, match=match):
    generate(model, params, [np.array([3, 4, 5, 6]), np.array([], np.int32)], **kwargs)




# ---------------------------------------------------------------------------------------------
# The real models: cached generation vs repeated argmax of the full (uncached) forward pass.
# ---------------------------------------------------------------------------------------------

REAL_PROMPTS = [np.array([5, 9, 13, 2, 7]), np.array([11]), np.array([3, 8, 4])]


def real_model(kind: str):
  from seqlab import models
  if kind == "encoder-decoder":
    config = models.get_preset("t5-tiny", vocab_size=48, d_model=32, num_heads=4, num_kv_heads=2,
                               head_dim=8, d_ff=64, num_encoder_layers=2, num_decoder_layers=2)
  else:
    num_kv_heads = {"MHA": 4, "GQA": 2, "MQA": 1, "prefix": 2}[kind]
    config = models.get_preset("gpt-tiny", vocab_size=48, d_model=32, num_heads=4,
                               num_kv_heads=num_kv_heads, head_dim=8, d_ff=64, num_layers=2,
                               max_length=24,
                               attention="prefix" if kind == "prefix" else "causal")
  model = config.build()
  # Random parameters of the right shapes, drawn in NumPy (compiling `model.init`'s random
  # initialisers costs seconds on a CPU); scaled so that greedy outputs vary with the context.
  shapes = jax.eval_shape(model.init, jax.random.key(0), config.dummy_batch(1))["params"]
  rng = np.random.default_rng(1)

  def draw(path, x):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.normal(size=x.shape)
    elif name == "bias":
      value = 0.1 * rng.normal(size=x.shape)
    elif name == "kernel":  # fan-in: every axis but the last
      value = 2.0 * rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    else:  # embeddings, relative-position tables
      value = rng.normal(size=x.shape)
    return jnp.asarray(value, x.dtype)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  return model, params


def full_forward_greedy(model, params, prompts, max_new, kind):
  """Greedy decoding by re-running the whole uncached forward pass for every new token.

  Each prompt is its own row, unpadded at the front (a right-padded buffer: later slots cannot
  affect earlier ones), so this is every prompt decoded alone. Returns tokens, summed log-probs.
  """
  starts = [[0] if kind == "encoder-decoder" else [0, *p] for p in prompts]
  length = max(len(s) for s in starts) + max_new
  batch = {}
  if kind == "encoder-decoder":
    sources = np.zeros((len(prompts), max(len(p) for p in prompts)), np.int32)
    for i, p in enumerate(prompts):
      sources[i, :len(p)] = p
    batch["encoder_input_tokens"] = sources
  if kind == "prefix":  # seqio: the start id and the prompt are the bidirectional prefix
    batch["decoder_causal_attention"] = (
        np.arange(length)[None, :] < np.array([len(s) for s in starts])[:, None]).astype(np.int32)
  logits_fn = jax.jit(lambda tokens: model.apply(
      {"params": params}, dict(batch, decoder_input_tokens=tokens)))
  histories = [list(s) for s in starts]
  scores = np.zeros(len(prompts))
  for _ in range(max_new):
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, h in enumerate(histories):
      tokens[i, :len(h)] = h
    logits = np.asarray(logits_fn(tokens))
    for i, h in enumerate(histories):
      row = logits[i, len(h) - 1]
      token = int(np.argmax(row))
      scores[i] += log_softmax(row)[token]
      h.append(token)
  return np.array([h[len(s):] for h, s in zip(histories, starts)]), scores


@pytest.mark.parametrize("kind", ["MHA", "GQA", "MQA", "prefix", "encoder-decoder"])
def test_greedy_equals_repeated_argmax_of_the_full_forward_pass(kind):
  model, params = real_model(kind)
  max_new = 6
  out = generate(model, params, REAL_PROMPTS, max_new_tokens=max_new, eos_id=None)
  tokens, scores = full_forward_greedy(model, params, REAL_PROMPTS, max_new, kind)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_allclose(out.scores, scores, rtol=1e-5, atol=1e-5)


def test_real_eos_stops_a_row():
  model, params = real_model("GQA")  # the same compiled loop as above: eos_id is traced
  free = generate(model, params, REAL_PROMPTS, max_new_tokens=6, eos_id=None)
  # Declare row 0's third token the eos: row 0 stops there (pad 0 after it); the other rows
  # run on unless they emit that token too.
  eos = int(free.tokens[0, 2])
  stopped = generate(model, params, REAL_PROMPTS, max_new_tokens=6, eos_id=eos)
  for i in range(len(REAL_PROMPTS)):
    row = list(np.asarray(free.tokens[i]))
    length = row.index(eos) + 1 if eos in row else 6
    np.testing.assert_array_equal(stopped.tokens[i], row[:length] + [0] * (6 - length))
    assert int(stopped.lengths[i]) == length
  assert int(stopped.lengths[0]) <= 3


def test_gqa_cache_holds_k_over_n_of_the_mha_bytes():
  def cache_bytes(kind):
    model, params = real_model(kind)
    cache = jax.eval_shape(lambda: model.apply({"params": params}, 2, 16, method="init_cache"))
    kv = [x for layer in cache["layers"] for x in (layer["k"], layer["v"])]
    return sum(x.size * x.dtype.itemsize for x in kv)
  assert cache_bytes("GQA") * 2 == cache_bytes("MHA")
  assert cache_bytes("MQA") * 4 == cache_bytes("MHA")


def test_decoding_past_the_cache_or_position_table_or_vocabulary_fails_before_running():
  model, params = real_model("MHA")  # a learned position table of 24
  with pytest.raises(ValueError, match="position table holds 24"):
    generate(model, params, [np.arange(3, 13)], max_new_tokens=15)  # 11 + 15 - 1 > 24
  with pytest.raises(ValueError, match="cache_length=10"):
    generate(model, params, [np.arange(3, 8)], max_new_tokens=6, cache_length=10)
  with pytest.raises(ValueError, match="prompt token id=48 is outside the vocabulary"):
    generate(model, params, [np.array([3, 48])], max_new_tokens=2)
