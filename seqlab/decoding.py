"""KV-cached generation: prefill, then greedy / sampling / beam search, all under one `jit`.

The models own their cache (see `init_cache`, `extend`, `encode` in `seqlab.models.transformer`);
this module drives it:

* **Prefill.** A decoder-only model receives the whole prompt in one `extend` call; an
  encoder-decoder encodes its input once (cross-attention keys/values go into the cache) and
  its decoder starts from `decoder_start_id` (0, as T5).
* **Decode.** One token per step inside `lax.while_loop`, on fixed-size cache buffers, so the
  shapes are static and the loop compiles once per (batch, prompt length, options).
* **Batches of different lengths** are LEFT-padded: every row's last prompt token sits in the
  same slot, so every row's next token is decoded in the same step. Padding slots are marked
  invalid, are never attended to and take no position.

Token conventions (docs/design.md): pad = 0, eos = 1. A decoder-only model is trained on
seqio's shifted-right inputs `[0, x_0, x_1, ...]`, so `generate` puts the start id 0 in front of
every prompt (`bos_id=0`; `bos_id=None` feeds the prompt as given, as Hugging Face GPT-2 is
fed). Output tokens after a row's eos are pad 0.

Hugging Face parity (transformers 5, `generation/utils.py` `_beam_search` and
`generation/logits_process.py`; pinned by tests/test_decoding_hf.py): beam search finalises
only the top `num_beams` candidates of each step and honours `early_stopping` True / False /
"never"; `repetition_penalty`, `no_repeat_ngram_size` and `min_new_tokens` act on the logits
(greedy, sampling) or on the log-probabilities (beam search), in Hugging Face's order, before
temperature / top-k / top-p.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqlab.validation import check_int

Array = Any  # jax.Array or numpy.ndarray

STRATEGIES = ("greedy", "sample", "beam")
BEAM_RULES = ("hf", "t5x")
# early_stopping as a traced int32 knob.
_EARLY_STOPPING = {False: 0, True: 1, "never": 2}


class GenerateOutput(NamedTuple):
  """What `generate` returns.

  With `num_return_sequences` n, there are B·n rows: row b·n + i is the i-th sequence of prompt b
  (beam: the i-th best beam; sampling: the i-th sample), Hugging Face's layout.

  tokens:  int32 [B·n, max_new_tokens], the generated ids (without the prompt), eos included
           where a row stopped, pad 0 after it.
  scores:  float32 [B·n]. greedy / sample: the sum of the model's log-probabilities (temperature
           1, no processor or filter) of the generated tokens up to and including eos. beam: the
           length-penalised beam score `sum log p / length ** length_penalty` (Hugging Face's
           `sequences_scores`; log p after `repetition_penalty` / `no_repeat_ngram_size` /
           `min_new_tokens`, unnormalised as there).
  lengths: int32 [B·n], generated tokens up to and including eos (max_new_tokens if none).
  """
  tokens: jax.Array
  scores: jax.Array
  lengths: jax.Array


# ---------------------------------------------------------------------------------------------
# Sampling filters: pure functions on logits [..., V] (float), -inf marks a removed token.
# ---------------------------------------------------------------------------------------------


def top_k_logits(logits: Array, top_k: int | jax.Array) -> jax.Array:
  """Keeps the `top_k` largest logits along the last axis, sets the rest to -inf.

  Ties with the k-th largest value are all kept (as Hugging Face's `TopKLogitsWarper`);
  `top_k >= V` keeps everything. `top_k` may be traced (a sort, not `lax.top_k`, so that
  changing k does not recompile).
  """
  logits = jnp.asarray(logits)
  vocab = logits.shape[-1]
  descending = -jnp.sort(-logits, axis=-1)
  index = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab) - 1
  kth_largest = lax.dynamic_slice_in_dim(descending, index, 1, axis=-1)
  return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_logits(logits: Array, top_p: float) -> jax.Array:
  """Nucleus filter: keeps the most probable tokens whose probabilities first reach `top_p`.

  In order of decreasing probability, a token is kept iff the probability mass of the tokens
  before it is < `top_p`, so the most probable token is always kept and the kept mass is >= top_p
  (Holtzman et al. 2020). Ties with the last kept logit are kept. `top_p = 1` keeps everything.
  """
  logits = jnp.asarray(logits)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  order = jnp.argsort(-logits, axis=-1)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  last_kept = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
  return jnp.where(logits >= last_kept, logits, -jnp.inf)


def filter_logits(logits: Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """Sampling logits: divides by `temperature`, then top-k, then top-p (Hugging Face's order).

  logits [..., V] -> float32 [..., V]; `softmax` of the result is the distribution `generate`
  samples from.
  """
  _check_sampling(temperature, top_k, top_p)
  return _filter(logits, temperature, top_k, top_p)


def sample_logits(rng: jax.Array, logits: Array, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """Draws one token per row from `softmax(filter_logits(logits, ...))`: [..., V] -> int32 [...]."""
  _check_sampling(temperature, top_k, top_p)
  return _sample(rng, logits, temperature, top_k, top_p)


def _filter(logits, temperature, top_k, top_p):
  """`filter_logits` without the checks, so `temperature` and `top_p` may be traced."""
  logits = jnp.asarray(logits).astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  if top_k is not None:
    logits = top_k_logits(logits, top_k)
  if top_p is not None:
    logits = top_p_logits(logits, top_p)
  return logits


def _sample(rng, logits, temperature, top_k, top_p):
  filtered = _filter(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p) -> None:
  if not (isinstance(temperature, (int, float, np.number)) and np.isfinite(temperature)
          and temperature > 0):
    raise ValueError(f"temperature={temperature!r} must be a finite number > 0 "
                     "(use strategy='greedy' for the temperature -> 0 limit)")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                            or top_k < 1):
    raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
  if top_p is not None and not (isinstance(top_p, (int, float, np.number)) and 0 < top_p <= 1):
    raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Public entry.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
  """Everything that shapes the compiled loop (a jit static argument).

  The knobs (temperature, top_k, top_p, length_penalty, early_stopping, beam_rule, eos ids,
  repetition_penalty's value, min_new_tokens) are traced instead, so changing them does not
  recompile.
  """
  strategy: str
  max_new_tokens: int
  cache_length: int
  use_top_k: bool
  use_top_p: bool
  num_beams: int
  num_return_sequences: int
  use_repetition_penalty: bool
  no_repeat_ngram_size: int
  prefix_lm: bool
  encoder_decoder: bool


def generate(model, params, prompt, *, max_new_tokens: int, strategy: str = "greedy",
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_beams: int = 4, length_penalty: float = 1.0,
             early_stopping: bool | str | None = None, beam_rule: str = "hf",
             num_return_sequences: int = 1, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
             eos_id: int | Sequence[int] | None = 1, rng: jax.Array | int | None = None,
             prefix_lm: bool | None = None, bos_id: int | None = 0, decoder_start_id: int = 0,
             prompt_valid: Array | None = None,
             cache_length: int | None = None) -> GenerateOutput:
  """Generates `max_new_tokens` tokens per prompt with a KV cache; one compiled loop per shape.

  model: a seqlab decoder (causal or prefix) or encoder-decoder module; params: its `params`
  (or the whole variables dict `{"params": ...}`).

  prompt:
    decoder-only: int [B, P], LEFT-padded with 0 (leading zeros are padding unless
      `prompt_valid` is given), or a list of B 1-D int arrays of different lengths (padded here;
      every token is kept, 0 included). `bos_id` is put in front of each row. An empty row is
      allowed when `bos_id` is not None (unconditional generation).
    encoder-decoder: the encoder input, int [B, S] (0 = padding), a list of 1-D arrays (RIGHT-
      padded here, as an encoder batch), or a feature dict for `model.encode`
      (`encoder_input_tokens`, optionally `encoder_segment_ids` / `encoder_positions`). The
      decoder starts from `decoder_start_id` (0, T5's; Hugging Face's `decoder_start_token_id`).
  prompt_valid: bool [B, P] for an int-array prompt, Hugging Face's `attention_mask`: True marks
    the prompt's tokens (in order, on either side of any padding), so a real token 0 (GPT-2's
    "!") is not read as padding. An encoder-decoder's encoder still treats token 0 as padding.
  bos_id: the start id put before a decoder-only prompt (0: seqlab's own decoders, trained on
    seqio's shifted-right inputs). Checkpoints converted from Hugging Face GPT-2
    (`seqlab.convert.text.gpt2_from_hf`) were trained without it: pass `bos_id=None` (or, for
    unconditional generation, their `<|endoftext|>` id, 50256) and `eos_id=50256`.
  strategy: "greedy" (argmax), "sample" (softmax of `filter_logits(logits / temperature, top_k,
    top_p)`, needs `rng`), or "beam" (`num_beams` beams, below).
  temperature, top_k, top_p: sampling only; greedy and beam search use the raw logits.
  num_beams, length_penalty, early_stopping, beam_rule: beam search. A finished hypothesis
    scores `sum log p / length ** length_penalty`, length = generated tokens including eos
    (Hugging Face's convention); hypotheses that reach `max_new_tokens` without eos finish
    there. Each step ranks the `max(2, 1 + number of eos ids) · num_beams` best extensions;
    the best `num_beams` of them that do not end stay alive, and of those that end only the top
    `num_beams` ("hf", Hugging Face's `_beam_search`) or all of them ("t5x", the t5x / Flax rule)
    enter the `num_beams` finished hypotheses. `early_stopping` (Hugging Face's semantics): True
    closes a row once it holds `num_beams` finished hypotheses; False (the "hf" default) closes
    it once the best live beam, scored at its current length, cannot beat the worst kept
    hypothesis (a heuristic when length_penalty > 0); "never" (the "t5x" default, exact)
    scores the best live beam at `max_new_tokens` when length_penalty > 0. A closed row takes no
    new hypotheses; the loop ends when every row is closed.
  num_return_sequences: n rows per prompt (see `GenerateOutput`): beam search's n best
    (n <= num_beams), or n independent samples; greedy allows only 1 (as Hugging Face).
  repetition_penalty: Hugging Face's (Keskar et al. 2019): the scores of tokens already in the
    decoder's sequence (the prompt, its `bos_id` / `decoder_start_id` and the generated tokens;
    not padding) are divided by it where positive and multiplied by it where negative. 1 = off.
  no_repeat_ngram_size: n > 0 bans every token that would repeat an n-gram of that sequence.
  min_new_tokens: every eos id is banned while fewer tokens than this have been generated.
  eos_id: an id or a sequence of ids; a row stops after emitting any of them (None: never).
  prefix_lm: the prompt attends to itself bidirectionally (a prefix-LM decoder; the prompt,
    with its start id, is the decoder's `decoder_causal_attention` region, seqio's rule).
    None: True iff the model's config has attention="prefix".
  cache_length: cache slots per row (default: exactly what the call needs). A call that needs
    more slots than `cache_length`, or positions beyond the model's position table, raises
    ValueError before anything runs.

  Returns `GenerateOutput(tokens [B·n, max_new_tokens], scores [B·n], lengths [B·n])`.
  `generate` itself runs eagerly (it pads and validates with NumPy); everything after that
  (encoder, prefill, the decode loop) is one jitted call, compiled once per model, shapes,
  strategy and the options that shape the loop (num_beams, num_return_sequences, whether
  repetition_penalty is 1, no_repeat_ngram_size, the number of eos ids); the knobs
  temperature, top_k, top_p, length_penalty, early_stopping, beam_rule, repetition_penalty's
  value, min_new_tokens and the eos ids are traced, so changing them does not recompile.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
  max_new_tokens = check_int("max_new_tokens", max_new_tokens)
  num_return_sequences = check_int("num_return_sequences", num_return_sequences)
  no_repeat_ngram_size = check_int("no_repeat_ngram_size", no_repeat_ngram_size, minimum=0)
  min_new_tokens = check_int("min_new_tokens", min_new_tokens, minimum=0)
  if not (isinstance(repetition_penalty, (int, float, np.number))
          and np.isfinite(repetition_penalty) and repetition_penalty > 0):
    raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a finite number > 0")
  if strategy == "sample":
    _check_sampling(temperature, top_k, top_p)
    if rng is None:
      raise ValueError("rng=None: strategy='sample' needs a jax.random key (or an int seed)")
  if strategy == "greedy" and num_return_sequences != 1:
    raise ValueError(f"num_return_sequences={num_return_sequences}: greedy decoding returns one "
                     "sequence per prompt (use strategy='beam' or 'sample')")
  if beam_rule not in BEAM_RULES:
    raise ValueError(f"beam_rule={beam_rule!r} must be one of {BEAM_RULES}")
  if early_stopping is None:
    early_stopping = False if beam_rule == "hf" else "never"
  if not any(early_stopping is v for v in (True, False)) and early_stopping != "never":
    raise ValueError(f"early_stopping={early_stopping!r} must be True, False, 'never' or None")
  if strategy == "beam":
    num_beams = check_int("num_beams", num_beams)
    if not np.isfinite(length_penalty):
      raise ValueError(f"length_penalty={length_penalty!r} must be finite")
    if num_return_sequences > num_beams:
      raise ValueError(f"num_return_sequences={num_return_sequences} must be <= "
                       f"num_beams={num_beams}")
  eos_ids = _eos_ids(eos_id)
  decoder_start_id = check_int("decoder_start_id", decoder_start_id, minimum=0)
  encoder_decoder = hasattr(model, "encode")
  if prefix_lm is None:
    prefix_lm = getattr(getattr(model, "config", None), "attention", None) == "prefix"
  if encoder_decoder and prefix_lm:
    raise ValueError("prefix_lm=True is for decoder-only models; this model is an "
                     "encoder-decoder (its encoder input is always bidirectional)")

  if encoder_decoder:
    encoder_batch = _encoder_batch(prompt, prompt_valid)
    batch_size = encoder_batch["encoder_input_tokens"].shape[0]
    tokens_BP = np.full((batch_size, 1), decoder_start_id, np.int32)
    valid_BP = np.ones((batch_size, 1), bool)
  else:
    encoder_batch = None
    tokens_BP, valid_BP = _left_pad(prompt, bos_id, prompt_valid)
  needed = tokens_BP.shape[1] + max_new_tokens - 1  # the last token is never fed back
  if cache_length is None:
    cache_length = needed
  elif needed > cache_length:
    raise ValueError(
        f"decoding needs {needed} cache slots (prompt length {tokens_BP.shape[1]} + "
        f"max_new_tokens={max_new_tokens} - 1) but cache_length={cache_length}")
  vocab_size = _config_int(model, "vocab_size")
  if vocab_size is not None:
    prompt_tokens = (encoder_batch["encoder_input_tokens"] if encoder_decoder else tokens_BP)
    for name, value in (("prompt token id", int(np.max(prompt_tokens))),
                        ("eos_id", max(eos_ids, default=None)), ("bos_id", bos_id),
                        ("decoder_start_id", decoder_start_id if encoder_decoder else None)):
      if value is not None and value >= vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary (vocab_size={vocab_size})")
  max_positions = _max_positions(model)
  positions_needed = int(valid_BP.sum(axis=1).max()) + max_new_tokens - 1
  if max_positions is not None and positions_needed > max_positions:
    raise ValueError(
        f"decoding needs {positions_needed} positions (longest prompt + max_new_tokens="
        f"{max_new_tokens} - 1) but the model's position table holds {max_positions}")

  if isinstance(rng, (int, np.integer)):
    rng = jax.random.key(int(rng))
  if rng is None:
    rng = jax.random.key(0)  # unused by greedy and beam search
  if not (isinstance(params, Mapping) and "params" in params):
    params = {"params": params}
  options = _Options(
      strategy=strategy, max_new_tokens=max_new_tokens, cache_length=int(cache_length),
      use_top_k=top_k is not None, use_top_p=top_p is not None and top_p < 1,
      num_beams=int(num_beams) if strategy == "beam" else 1,
      num_return_sequences=num_return_sequences,
      use_repetition_penalty=repetition_penalty != 1, no_repeat_ngram_size=no_repeat_ngram_size,
      prefix_lm=bool(prefix_lm), encoder_decoder=encoder_decoder)
  knobs = {"temperature": np.float32(temperature),
           "top_k": np.int32(0 if top_k is None else min(top_k, np.iinfo(np.int32).max)),
           "top_p": np.float32(1.0 if top_p is None else top_p),
           "eos_ids": np.asarray(eos_ids, np.int32).reshape(-1),
           "length_penalty": np.float32(length_penalty),
           "early_stopping": np.int32(_EARLY_STOPPING[early_stopping]),
           "t5x_rule": np.bool_(beam_rule == "t5x"),
           "repetition_penalty": np.float32(repetition_penalty),
           "min_new_tokens": np.int32(min(min_new_tokens, np.iinfo(np.int32).max))}
  return _generate(model, params, jnp.asarray(tokens_BP), jnp.asarray(valid_BP), encoder_batch,
                   rng, knobs, options=options)


def _eos_ids(eos_id) -> tuple[int, ...]:
  """`eos_id` (None, an id, or a sequence of ids) -> a tuple of distinct ids >= 0."""
  if eos_id is None:
    return ()
  ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(np.asarray(eos_id).ravel())
  for value in ids:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"eos_id={eos_id!r} must be None, an integer >= 0 or a sequence of them")
  return tuple(dict.fromkeys(int(value) for value in ids))


def _left_pad(prompt, bos_id, prompt_valid=None) -> tuple[np.ndarray, np.ndarray]:
  """Decoder prompts -> (tokens int32 [B, P], valid bool [B, P]), LEFT-padded, bos in front."""
  if isinstance(prompt, (list, tuple)):
    if prompt_valid is not None:
      raise ValueError("prompt_valid is for an int-array prompt; a list of rows needs none")
    rows = [np.asarray(row) for row in prompt]
    if not rows:
      raise ValueError("prompt is an empty list; give at least one prompt")
    for i, row in enumerate(rows):
      if row.ndim != 1:
        raise ValueError(f"prompt[{i}] must be 1-D, got shape {row.shape}")
  else:
    array = np.asarray(prompt)
    if array.ndim != 2:
      raise ValueError(f"prompt must be int [batch, length] or a list of 1-D arrays, got shape "
                       f"{array.shape}")
    if prompt_valid is None:
      # Left padding: everything before a row's first non-pad token is padding.
      starts = np.where(array.any(axis=1), np.argmax(array != 0, axis=1), array.shape[1])
      rows = [array[i, start:] for i, start in enumerate(starts)]
    else:
      valid = _prompt_valid(prompt_valid, array.shape)
      rows = [array[i][valid[i]] for i in range(array.shape[0])]
  for i, row in enumerate(rows):
    if row.size and not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt[{i}] must hold integer token ids, got dtype {row.dtype}")
    if row.size and row.min() < 0:
      raise ValueError(f"prompt[{i}] holds a negative token id {row.min()}")
    if bos_id is None and row.size == 0:
      raise ValueError(f"prompt[{i}] is empty and bos_id=None: nothing to condition on")
  if bos_id is not None:
    rows = [np.concatenate([[bos_id], row]) for row in rows]
  length = max(row.size for row in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  valid = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    tokens[i, length - row.size:] = row
    valid[i, length - row.size:] = True
  return tokens, valid


def _prompt_valid(prompt_valid, shape) -> np.ndarray:
  """`prompt_valid` (bool or 0/1 ints, the prompt's shape) -> bool, or ValueError."""
  valid = np.asarray(prompt_valid)
  if valid.shape != tuple(shape) or not (valid.dtype == bool
                                         or np.issubdtype(valid.dtype, np.integer)):
    raise ValueError(f"prompt_valid must be bool or int {tuple(shape)} like the prompt, got "
                     f"shape {valid.shape} dtype {valid.dtype}")
  return valid != 0


def _encoder_batch(prompt, prompt_valid=None) -> dict:
  """Encoder prompts -> a feature dict for `model.encode` (lists RIGHT-padded with 0)."""
  if prompt_valid is not None and isinstance(prompt, (Mapping, list, tuple)):
    raise ValueError("prompt_valid is for an int-array prompt (a dict carries "
                     "encoder_segment_ids; a list of rows needs none)")
  if isinstance(prompt, Mapping):
    if "encoder_input_tokens" not in prompt:
      raise ValueError(f"prompt dict has keys {sorted(prompt)}; it needs encoder_input_tokens")
    batch = {k: jnp.asarray(v) for k, v in prompt.items()}
  elif isinstance(prompt, (list, tuple)):
    rows = [np.asarray(row) for row in prompt]
    if not rows or any(row.ndim != 1 or row.size == 0 for row in rows):
      raise ValueError("prompt must be a non-empty list of non-empty 1-D token arrays")
    tokens = np.zeros((len(rows), max(row.size for row in rows)), np.int32)
    for i, row in enumerate(rows):
      tokens[i, :row.size] = row
    batch = {"encoder_input_tokens": jnp.asarray(tokens)}
  else:
    batch = {"encoder_input_tokens": jnp.asarray(prompt)}
  tokens = batch["encoder_input_tokens"]
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"encoder_input_tokens must be int [batch, length], got shape "
                     f"{tokens.shape} dtype {tokens.dtype}")
  if prompt_valid is not None:
    valid = _prompt_valid(prompt_valid, tokens.shape)
    if np.any(valid & (np.asarray(tokens) == 0)):
      raise ValueError("prompt_valid marks an encoder token 0 as real, but the encoder reads "
                       "token 0 as padding")
    # The encoder's padding rule: segment id 0 is padding.
    batch["encoder_segment_ids"] = jnp.asarray(valid.astype(np.int32))
  return batch


def _config_int(model, name: str) -> int | None:
  """`model.config.<name>` when the model has such an int field (seqlab's configs do)."""
  value = getattr(getattr(model, "config", None), name, None)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  return None


def _max_positions(model) -> int | None:
  """The size of a decoder's learned position table; None when positions are unbounded."""
  config = getattr(model, "config", None)
  if getattr(config, "position_embedding", None) != "learned":
    return None
  return _config_int(model, "max_length")


# ---------------------------------------------------------------------------------------------
# Logits processors (Hugging Face's `RepetitionPenaltyLogitsProcessor`,
# `NoRepeatNGramLogitsProcessor`, `MinNewTokensLengthLogitsProcessor`), on the history of each
# row: its valid prompt slots, then the tokens generated so far.
# ---------------------------------------------------------------------------------------------


def _is_eos(token: jax.Array, eos_ids: jax.Array) -> jax.Array:
  """token [...] -> bool [...], whether it is one of `eos_ids` [n] (n = 0: never)."""
  return jnp.any(token[..., None] == eos_ids.reshape((1,) * token.ndim + (-1,)), axis=-1)


def _repetition_penalty(scores_RV, history_RL, valid_RL, penalty):
  """Scores of tokens in the history: / penalty where positive, * penalty where negative."""
  num_rows, vocab = scores_RV.shape
  index_RL = jnp.where(valid_RL, jnp.minimum(history_RL, vocab), vocab)  # vocab: a spare column
  seen_RV = jnp.zeros((num_rows, vocab + 1), bool).at[
      jnp.arange(num_rows)[:, None], index_RL].set(True)[:, :vocab]
  penalised = jnp.where(scores_RV < 0, scores_RV * penalty, scores_RV / penalty)
  return jnp.where(seen_RV, penalised, scores_RV)


def _no_repeat_ngram(scores_RV, history_RL, valid_RL, end, size: int):
  """Bans (-inf) every token that, after the last size-1 tokens, would repeat an n-gram.

  The valid history of every row ends at slot `end` (left padding); a window of `size` slots
  counts only when all of them are valid.
  """
  num_rows, vocab = scores_RV.shape
  num_windows = history_RL.shape[1] - size + 1
  if num_windows < 1:
    return scores_RV
  suffix_RN = lax.dynamic_slice_in_dim(history_RL, jnp.maximum(end - (size - 1), 0), size - 1,
                                       axis=1)
  matches_RJ = jnp.ones((num_rows, num_windows), bool)
  for offset in range(size):
    window_RJ = slice(offset, offset + num_windows)
    matches_RJ &= valid_RL[:, window_RJ]
    if offset < size - 1:
      matches_RJ &= history_RL[:, window_RJ] == suffix_RN[:, offset:offset + 1]
  index_RJ = jnp.where(matches_RJ, jnp.minimum(history_RL[:, size - 1:], vocab), vocab)
  banned_RV = jnp.zeros((num_rows, vocab + 1), bool).at[
      jnp.arange(num_rows)[:, None], index_RJ].set(True)[:, :vocab]
  return jnp.where(banned_RV, -jnp.inf, scores_RV)


def _process(scores_RV, prompt_RP, prompt_valid_RP, generated_RT, step, knobs,
             options: _Options):
  """The processors in Hugging Face's order, before `step`'s token is chosen.

  scores [R, V]: logits (greedy, sampling) or log-probabilities (beam search); generated_RT
  holds each row's tokens, valid before `step`.
  """
  if options.use_repetition_penalty or options.no_repeat_ngram_size:
    history_RL = jnp.concatenate([prompt_RP, generated_RT], axis=1)
    generated_valid_RT = jnp.broadcast_to(jnp.arange(generated_RT.shape[1]) < step,
                                          generated_RT.shape)
    valid_RL = jnp.concatenate([prompt_valid_RP, generated_valid_RT], axis=1)
    if options.use_repetition_penalty:
      scores_RV = _repetition_penalty(scores_RV, history_RL, valid_RL,
                                      knobs["repetition_penalty"])
    if options.no_repeat_ngram_size:
      scores_RV = _no_repeat_ngram(scores_RV, history_RL, valid_RL, prompt_RP.shape[1] + step,
                                   options.no_repeat_ngram_size)
  eos_V = _is_eos(jnp.arange(scores_RV.shape[-1]), knobs["eos_ids"])
  return jnp.where(eos_V[None, :] & (step < knobs["min_new_tokens"]), -jnp.inf, scores_RV)


# ---------------------------------------------------------------------------------------------
# The compiled loop.
# ---------------------------------------------------------------------------------------------


def _extend(model, params, tokens_BT, cache, valid_BT, bidirectional=False):
  """One `model.extend` call (the contract's positional order) -> (float32 logits, cache)."""
  logits_BTV, cache = model.apply(params, tokens_BT, cache, valid_BT, bidirectional,
                                  method="extend")
  return logits_BTV.astype(jnp.float32), cache


def _repeat_rows(tree, batch_size: int, repeats: int):
  """Repeats every per-row array `repeats` times along its batch axis (row b -> b*W+w)."""
  def repeat(x):
    if x.ndim >= 1 and x.shape[0] == batch_size:
      return jnp.repeat(x, repeats, axis=0)
    return x
  return jax.tree_util.tree_map(repeat, tree)


def _gather_rows(tree, rows_R: jax.Array):
  """Reorders every per-row cache array along its batch axis (beam search's parent beams)."""
  num_rows = rows_R.shape[0]
  def gather(x):
    if x.ndim >= 1 and x.shape[0] == num_rows:
      return jnp.take(x, rows_R, axis=0)
    return x
  return jax.tree_util.tree_map(gather, tree)


@functools.partial(jax.jit, static_argnames=("model", "options"))
def _generate(model, params, tokens_BP, valid_BP, encoder_batch, rng, knobs, *,
              options: _Options):
  """Encoder (enc-dec), cache, prefill of the whole prompt in one call, then the decode loop."""
  batch_size = tokens_BP.shape[0]
  if options.encoder_decoder:
    encoded, encoder_valid = model.apply(params, encoder_batch, method="encode")
    cache = model.apply(params, batch_size, options.cache_length, encoded, encoder_valid,
                        method="init_cache")
  else:
    cache = model.apply(params, batch_size, options.cache_length, method="init_cache")
  logits_BPV, cache = _extend(model, params, tokens_BP, cache, valid_BP,
                              bidirectional=options.prefix_lm)
  logits_BV = logits_BPV[:, -1]  # left padding: the last slot is every row's last prompt token
  # The prompt (for the processors) travels with the cache rows.
  copies = options.num_beams if options.strategy == "beam" else options.num_return_sequences
  cache, logits_RV, tokens_RP, valid_RP = _repeat_rows(
      (cache, logits_BV, tokens_BP, valid_BP), batch_size, copies)
  if options.strategy == "beam":
    return _beam_search(model, params, cache, logits_RV, tokens_RP, valid_RP, knobs, options)
  return _greedy_or_sample(model, params, cache, logits_RV, tokens_RP, valid_RP, rng, knobs,
                           options)


def _greedy_or_sample(model, params, cache, logits_RV, prompt_RP, prompt_valid_RP, rng, knobs,
                      options: _Options) -> GenerateOutput:
  """One token per row per step: argmax or a filtered sample; rows that emitted eos emit pad."""
  num_rows = logits_RV.shape[0]
  max_new = options.max_new_tokens

  def pick(step, state):
    logits = state["logits"]
    processed = _process(logits, prompt_RP, prompt_valid_RP, state["tokens"], step, knobs,
                         options)
    if options.strategy == "greedy":
      token_R = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    else:
      token_R = _sample(jax.random.fold_in(rng, step), processed, knobs["temperature"],
                        knobs["top_k"] if options.use_top_k else None,
                        knobs["top_p"] if options.use_top_p else None)
    logp_R = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token_R[:, None],
                                 axis=-1)[:, 0]
    done = state["done"]
    token_R = jnp.where(done, 0, token_R)
    return token_R, dict(
        state,
        tokens=state["tokens"].at[:, step].set(token_R),
        scores=state["scores"] + jnp.where(done, 0.0, logp_R),
        lengths=state["lengths"] + (~done).astype(jnp.int32),
        done=done | _is_eos(token_R, knobs["eos_ids"]))

  def body(carry):
    step, state = carry
    token_R, state = pick(step, state)
    logits_R1V, cache = _extend(model, params, token_R[:, None], state["cache"],
                                jnp.ones((num_rows, 1), bool))
    return step + 1, dict(state, cache=cache, logits=logits_R1V[:, 0])

  def cond(carry):
    step, state = carry
    return (step < max_new - 1) & ~jnp.all(state["done"])

  state = dict(
      tokens=jnp.zeros((num_rows, max_new), jnp.int32),
      scores=jnp.zeros((num_rows,), jnp.float32),
      lengths=jnp.zeros((num_rows,), jnp.int32),
      done=jnp.zeros((num_rows,), bool),
      cache=cache, logits=logits_RV)
  step, state = lax.while_loop(cond, body, (jnp.int32(0), state))
  # The last token is picked without feeding it back: the cache never needs its slot.
  _, state = pick(step, state)
  return GenerateOutput(state["tokens"], state["scores"], state["lengths"])


def _beam_search(model, params, cache, logits_RV, prompt_RP, prompt_valid_RP, knobs,
                 options: _Options) -> GenerateOutput:
  """Beam search over `num_beams` live beams and `num_beams` finished hypotheses per row.

  Rows R = B·W (row b·W + w is beam w of prompt b). Each step takes the top
  K = max(2, 1 + number of eos ids)·W of the W·V extensions (at most W per eos id end in eos,
  so at least W can stay alive); those ending (eos or max_new_tokens) among the top W ("hf") or
  all K ("t5x") compete for the finished set by penalised score, the others for the live set by
  log-probability. Hugging Face's `_beam_search` step by step (`_get_top_k_continuations`,
  `_get_running_beams_for_next_iteration`, `_update_finished_beams`,
  `_check_early_stop_heuristic`), with -inf where it adds -1e9.
  """
  num_rows, vocab = logits_RV.shape
  W, max_new = options.num_beams, options.max_new_tokens
  batch_size = num_rows // W
  eos_ids = knobs["eos_ids"]
  alpha = knobs["length_penalty"]
  early_stopping = knobs["early_stopping"]
  if vocab < 2:
    raise ValueError(f"beam search needs a vocabulary of at least 2 tokens, got {vocab}")
  K = min(max(2, 1 + eos_ids.shape[0]) * W, W * vocab)
  num_finishing = jnp.where(knobs["t5x_rule"], K, W)
  neg_inf = jnp.float32(-jnp.inf)

  def penalised(logp, length):
    return logp / length.astype(jnp.float32) ** alpha

  def select(step, state, logits_RV):
    logp_RV = jax.nn.log_softmax(logits_RV, axis=-1)
    # Hugging Face processes the log-probabilities here, and does not renormalise them.
    logp_RV = _process(logp_RV, prompt_RP, prompt_valid_RP,
                       state["alive_seqs"].reshape(num_rows, max_new), step, knobs, options)
    candidates_BC = (state["alive_logp"][:, :, None]
                     + logp_RV.reshape(batch_size, W, vocab)).reshape(batch_size, W * vocab)
    top_logp_BK, top_index_BK = lax.top_k(candidates_BC, K)
    parent_BK, token_BK = top_index_BK // vocab, (top_index_BK % vocab).astype(jnp.int32)
    seqs_BKT = jnp.take_along_axis(state["alive_seqs"], parent_BK[:, :, None], axis=1)
    seqs_BKT = seqs_BKT.at[:, :, step].set(token_BK)
    length = step + 1
    ends_BK = _is_eos(token_BK, eos_ids) | (length == max_new)
    # A closed row, or (early_stopping=True) a full one, takes no new hypotheses.
    full_B = jnp.all(state["finished_valid"], axis=1)
    accepts_B = state["open"] & ~((early_stopping == 1) & full_B)
    finishes_BK = (ends_BK & (jnp.arange(K) < num_finishing)[None, :] & accepts_B[:, None]
                   & (top_logp_BK > neg_inf))
    # Finished: the kept hypotheses first, so a tie keeps the older one.
    all_scores = jnp.concatenate(
        [state["finished_scores"], jnp.where(finishes_BK, penalised(top_logp_BK, length),
                                             neg_inf)], axis=1)
    all_seqs = jnp.concatenate([state["finished_seqs"], seqs_BKT], axis=1)
    all_lengths = jnp.concatenate(
        [state["finished_lengths"], jnp.full((batch_size, K), length, jnp.int32)], axis=1)
    all_valid = jnp.concatenate([state["finished_valid"], finishes_BK], axis=1)
    finished_scores, keep_BW = lax.top_k(all_scores, W)
    # Alive: extensions that did not end, ranked by log-probability.
    alive_logp, alive_BW = lax.top_k(jnp.where(ends_BK, neg_inf, top_logp_BK), W)
    return dict(
        state,
        finished_scores=finished_scores,
        finished_seqs=jnp.take_along_axis(all_seqs, keep_BW[:, :, None], axis=1),
        finished_lengths=jnp.take_along_axis(all_lengths, keep_BW, axis=1),
        finished_valid=jnp.take_along_axis(all_valid, keep_BW, axis=1),
        alive_logp=alive_logp,
        alive_seqs=jnp.take_along_axis(seqs_BKT, alive_BW[:, :, None], axis=1),
    ), jnp.take_along_axis(parent_BK, alive_BW, axis=1), \
        jnp.take_along_axis(token_BK, alive_BW, axis=1)

  def still_open(state, generated):
    """Hugging Face's early-stop test: can the best live beam still beat the worst kept one?

    It is scored at its current length, or ("never" with length_penalty > 0) at max_new_tokens,
    where a live beam's best possible score lies; a slot not yet filled is beaten by anything.
    """
    length = jnp.where((early_stopping == 2) & (alpha > 0), max_new, generated)
    best_B = penalised(state["alive_logp"][:, 0], length)
    worst_BW = jnp.where(state["finished_valid"],
                         jnp.min(state["finished_scores"], axis=1, keepdims=True), neg_inf)
    return state["open"] & jnp.any(best_B[:, None] > worst_BW, axis=1)

  def body(carry):
    step, state = carry
    state, parent_BW, token_BW = select(step, state, state["logits"])
    state = dict(state, open=still_open(state, step + 1))
    rows_R = (jnp.arange(batch_size)[:, None] * W + parent_BW).reshape(-1)
    cache = _gather_rows(state["cache"], rows_R)
    logits_R1V, cache = _extend(model, params, token_BW.reshape(-1, 1), cache,
                                jnp.ones((num_rows, 1), bool))
    return step + 1, dict(state, cache=cache, logits=logits_R1V[:, 0])

  def cond(carry):
    step, state = carry
    all_full = (early_stopping == 1) & jnp.all(state["finished_valid"])
    return (step < max_new - 1) & jnp.any(state["open"]) & ~all_full

  state = dict(
      alive_logp=jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, neg_inf), (batch_size, 1)),
      alive_seqs=jnp.zeros((batch_size, W, max_new), jnp.int32),
      finished_scores=jnp.full((batch_size, W), neg_inf),
      finished_seqs=jnp.zeros((batch_size, W, max_new), jnp.int32),
      finished_lengths=jnp.zeros((batch_size, W), jnp.int32),
      finished_valid=jnp.zeros((batch_size, W), bool),
      open=jnp.ones((batch_size,), bool),
      cache=cache, logits=logits_RV)
  step, state = lax.while_loop(cond, body, (jnp.int32(0), state))
  # The last step (or, after an early exit, a step in which every row is closed or full and
  # nothing changes).
  state, _, _ = select(step, state, state["logits"])
  n = options.num_return_sequences
  return GenerateOutput(state["finished_seqs"][:, :n].reshape(batch_size * n, max_new),
                        state["finished_scores"][:, :n].reshape(-1),
                        state["finished_lengths"][:, :n].reshape(-1))
