"""KV-cached generation: prefill, then greedy / sampling / beam search, all under one `jit`.

The models own their cache (see `init_cache`, `extend`, `encode` in `seqlab.models.transformer`);
this module drives it:

* **Prefill.** A decoder-only model receives the whole prompt in one `extend` call; an
  encoder-decoder encodes its input once (cross-attention keys/values go into the cache) and
  its decoder starts from id 0.
* **Decode.** One token per step inside `lax.while_loop`, on fixed-size cache buffers, so the
  shapes are static and the loop compiles once per (batch, prompt length, options).
* **Batches of different lengths** are LEFT-padded: every row's last prompt token sits in the
  same slot, so every row's next token is decoded in the same step. Padding slots are marked
  invalid, are never attended to and take no position.

Token conventions (docs/design.md): pad = 0, eos = 1. A decoder-only model is trained on
seqio's shifted-right inputs `[0, x_0, x_1, ...]`, so `generate` puts the start id 0 in front of
every prompt (`bos_id=0`; `bos_id=None` feeds the prompt as given). Output tokens after a row's
eos are pad 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = Any  # jax.Array or numpy.ndarray

STRATEGIES = ("greedy", "sample", "beam")


class GenerateOutput(NamedTuple):
  """What `generate` returns.

  tokens:  int32 [B, max_new_tokens], the generated ids (without the prompt), eos included
           where a row stopped, pad 0 after it.
  scores:  float32 [B]. greedy / sample: the sum of the model's log-probabilities (temperature 1,
           unfiltered) of the generated tokens up to and including eos. beam: the length-penalised
           beam score `sum log p / length ** length_penalty` of the returned (best) beam.
  lengths: int32 [B], generated tokens up to and including eos (max_new_tokens if none).
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
  """Everything that shapes the compiled loop (a jit static argument). The knobs
  (temperature, top_k, top_p, length_penalty, eos_id) are traced instead, so changing them does
  not recompile."""
  strategy: str
  max_new_tokens: int
  cache_length: int
  use_top_k: bool
  use_top_p: bool
  num_beams: int
  prefix_lm: bool
  encoder_decoder: bool


def generate(model, params, prompt, *, max_new_tokens: int, strategy: str = "greedy",
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_beams: int = 4, length_penalty: float = 1.0, eos_id: int | None = 1,
             rng: jax.Array | int | None = None, prefix_lm: bool | None = None,
             bos_id: int | None = 0, cache_length: int | None = None) -> GenerateOutput:
  """Generates `max_new_tokens` tokens per prompt with a KV cache; one compiled loop per shape.

  model: a seqlab decoder (causal or prefix) or encoder-decoder module; params: its `params`
  (or the whole variables dict `{"params": ...}`).

  prompt:
    decoder-only: int [B, P], LEFT-padded with 0 (leading zeros are padding), or a list of B
      1-D int arrays of different lengths (padded here). `bos_id` is put in front of each row.
      An empty row is allowed when `bos_id` is not None (unconditional generation).
    encoder-decoder: the encoder input, int [B, S] (0 = padding), a list of 1-D arrays (RIGHT-
      padded here, as an encoder batch), or a feature dict for `model.encode`
      (`encoder_input_tokens`, optionally `encoder_segment_ids` / `encoder_positions`). The
      decoder starts from id 0.
  strategy: "greedy" (argmax), "sample" (softmax of `filter_logits(logits / temperature, top_k,
    top_p)`, needs `rng`), or "beam" (`num_beams` beams; a finished hypothesis scores
    `sum log p / length ** length_penalty` (Hugging Face's convention; length counts generated
    tokens including eos); hypotheses that reach `max_new_tokens` without eos are finished
    there; the search stops early once no live beam can beat the worst kept hypothesis).
  temperature, top_k, top_p: sampling only; greedy and beam search use the raw logits.
  eos_id: a row stops after emitting it (None: never stop early).
  prefix_lm: the prompt attends to itself bidirectionally (a prefix-LM decoder; the prompt,
    with its start id, is the decoder's `decoder_causal_attention` region, seqio's rule).
    None: True iff the model's config has attention="prefix".
  cache_length: cache slots per row (default: exactly what the call needs). A call that needs
    more slots than `cache_length`, or positions beyond the model's position table, raises
    ValueError before anything runs.

  Returns `GenerateOutput(tokens [B, max_new_tokens], scores [B], lengths [B])`.
  `generate` itself runs eagerly (it pads and validates with NumPy); everything after that
  (encoder, prefill, the decode loop) is one jitted call, compiled once per model, shapes and
  strategy; the knobs temperature, top_k, top_p, length_penalty and eos_id are traced, so
  changing them does not recompile.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if strategy == "sample":
    _check_sampling(temperature, top_k, top_p)
    if rng is None:
      raise ValueError("rng=None: strategy='sample' needs a jax.random key (or an int seed)")
  if strategy == "beam":
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) \
        or num_beams < 1:
      raise ValueError(f"num_beams={num_beams!r} must be an integer >= 1")
    if not np.isfinite(length_penalty):
      raise ValueError(f"length_penalty={length_penalty!r} must be finite")
  if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer))
                             or eos_id < 0):
    raise ValueError(f"eos_id={eos_id!r} must be None or an integer >= 0")
  encoder_decoder = hasattr(model, "encode")
  if prefix_lm is None:
    prefix_lm = getattr(getattr(model, "config", None), "attention", None) == "prefix"
  if encoder_decoder and prefix_lm:
    raise ValueError("prefix_lm=True is for decoder-only models; this model is an "
                     "encoder-decoder (its encoder input is always bidirectional)")

  if encoder_decoder:
    encoder_batch = _encoder_batch(prompt)
    batch_size = encoder_batch["encoder_input_tokens"].shape[0]
    tokens_BP = np.zeros((batch_size, 1), np.int32)  # the decoder's start id 0
    valid_BP = np.ones((batch_size, 1), bool)
  else:
    encoder_batch = None
    tokens_BP, valid_BP = _left_pad(prompt, bos_id)
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
    for name, value in (("prompt token id", int(np.max(prompt_tokens))), ("eos_id", eos_id),
                        ("bos_id", bos_id)):
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
      strategy=strategy, max_new_tokens=int(max_new_tokens), cache_length=int(cache_length),
      use_top_k=top_k is not None, use_top_p=top_p is not None and top_p < 1,
      num_beams=int(num_beams),
      prefix_lm=bool(prefix_lm), encoder_decoder=encoder_decoder)
  knobs = {"temperature": np.float32(temperature),
           "top_k": np.int32(0 if top_k is None else min(top_k, np.iinfo(np.int32).max)),
           "eos_id": np.int32(-1 if eos_id is None else eos_id),  # -1 never matches a token
           "top_p": np.float32(1.0 if top_p is None else top_p),
           "length_penalty": np.float32(length_penalty)}
  return _generate(model, params, jnp.asarray(tokens_BP), jnp.asarray(valid_BP), encoder_batch,
                   rng, knobs, options=options)


def _left_pad(prompt, bos_id) -> tuple[np.ndarray, np.ndarray]:
  """Decoder prompts -> (tokens int32 [B, P], valid bool [B, P]), LEFT-padded, bos in front."""
  if isinstance(prompt, (list, tuple)):
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
    # Left padding: everything before a row's first non-pad token is padding.
    starts = np.where(array.any(axis=1), np.argmax(array != 0, axis=1), array.shape[1])
    rows = [array[i, start:] for i, start in enumerate(starts)]
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


def _encoder_batch(prompt) -> dict:
  """Encoder prompts -> a feature dict for `model.encode` (lists RIGHT-padded with 0)."""
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
# The compiled loop.
# ---------------------------------------------------------------------------------------------


def _extend(model, params, tokens_BT, cache, valid_BT, bidirectional=False):
  """One `model.extend` call (the contract's positional order) -> (float32 logits, cache)."""
  logits_BTV, cache = model.apply(params, tokens_BT, cache, valid_BT, bidirectional,
                                  method="extend")
  return logits_BTV.astype(jnp.float32), cache


def _repeat_rows(tree, batch_size: int, repeats: int):
  """Repeats every per-row cache array `repeats` times along its batch axis (row b -> b*W+w)."""
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
  if options.strategy == "beam":
    return _beam_search(model, params, cache, logits_BV, knobs, options)
  return _greedy_or_sample(model, params, cache, logits_BV, rng, knobs, options)


def _greedy_or_sample(model, params, cache, logits_BV, rng, knobs,
                      options: _Options) -> GenerateOutput:
  """One token per row per step: argmax or a filtered sample; rows that emitted eos emit pad."""
  batch_size = logits_BV.shape[0]
  max_new = options.max_new_tokens
  eos = knobs["eos_id"]

  def pick(step, state):
    logits = state["logits"]
    if options.strategy == "greedy":
      token_B = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      token_B = _sample(jax.random.fold_in(rng, step), logits, knobs["temperature"],
                        knobs["top_k"] if options.use_top_k else None,
                        knobs["top_p"] if options.use_top_p else None)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token_B[:, None],
                                 axis=-1)[:, 0]
    done = state["done"]
    token_B = jnp.where(done, 0, token_B)
    return token_B, dict(
        state,
        tokens=state["tokens"].at[:, step].set(token_B),
        scores=state["scores"] + jnp.where(done, 0.0, logp_B),
        lengths=state["lengths"] + (~done).astype(jnp.int32),
        done=done | (token_B == eos))

  def body(carry):
    step, state = carry
    token_B, state = pick(step, state)
    logits_B1V, cache = _extend(model, params, token_B[:, None], state["cache"],
                                jnp.ones((batch_size, 1), bool))
    return step + 1, dict(state, cache=cache, logits=logits_B1V[:, 0])

  def cond(carry):
    step, state = carry
    return (step < max_new - 1) & ~jnp.all(state["done"])

  state = dict(
      tokens=jnp.zeros((batch_size, max_new), jnp.int32),
      scores=jnp.zeros((batch_size,), jnp.float32),
      lengths=jnp.zeros((batch_size,), jnp.int32),
      done=jnp.zeros((batch_size,), bool),
      cache=cache, logits=logits_BV)
  step, state = lax.while_loop(cond, body, (jnp.int32(0), state))
  # The last token is picked without feeding it back: the cache never needs its slot.
  _, state = pick(step, state)
  return GenerateOutput(state["tokens"], state["scores"], state["lengths"])


def _beam_search(model, params, cache, logits_BV, knobs, options: _Options) -> GenerateOutput:
  """Beam search over `num_beams` live beams and `num_beams` finished hypotheses per row.

  Each step takes the top 2W of the W·V extensions (at most W of them end in eos, so at least W
  can stay alive): those ending in eos (or reaching max_new_tokens) compete for the finished
  set by penalised score, the others for the live set by log-probability.
  """
  batch_size, vocab = logits_BV.shape
  W, max_new = options.num_beams, options.max_new_tokens
  eos = knobs["eos_id"]
  alpha = knobs["length_penalty"]
  if 2 * W > W * vocab:
    raise ValueError(f"num_beams={W} needs a vocabulary of at least 2 tokens, got {vocab}")
  cache = _repeat_rows(cache, batch_size, W)
  logits_RV = jnp.repeat(logits_BV, W, axis=0)  # R = B·W rows, row b*W + w is beam w of b
  neg_inf = jnp.float32(-jnp.inf)

  def penalised(logp, length):
    return logp / length.astype(jnp.float32) ** alpha

  def select(step, state, logits_RV):
    logp_BWV = jax.nn.log_softmax(logits_RV, axis=-1).reshape(batch_size, W, vocab)
    candidates_BC = (state["alive_logp"][:, :, None] + logp_BWV).reshape(batch_size, W * vocab)
    top_logp_B2W, top_index_B2W = lax.top_k(candidates_BC, 2 * W)
    parent_B2W, token_B2W = top_index_B2W // vocab, (top_index_B2W % vocab).astype(jnp.int32)
    seqs_B2WT = jnp.take_along_axis(state["alive_seqs"], parent_B2W[:, :, None], axis=1)
    seqs_B2WT = seqs_B2WT.at[:, :, step].set(token_B2W)
    length = step + 1
    ends_B2W = (token_B2W == eos) | (length == max_new)
    # Finished: the kept hypotheses first, so a tie keeps the older one.
    all_scores = jnp.concatenate(
        [state["finished_scores"], jnp.where(ends_B2W, penalised(top_logp_B2W, length), neg_inf)],
        axis=1)
    all_seqs = jnp.concatenate([state["finished_seqs"], seqs_B2WT], axis=1)
    all_lengths = jnp.concatenate(
        [state["finished_lengths"], jnp.full((batch_size, 2 * W), length, jnp.int32)], axis=1)
    finished_scores, keep_BW = lax.top_k(all_scores, W)
    # Alive: extensions that did not end, ranked by log-probability.
    alive_logp, alive_BW = lax.top_k(jnp.where(token_B2W == eos, neg_inf, top_logp_B2W), W)
    return dict(
        state,
        finished_scores=finished_scores,
        finished_seqs=jnp.take_along_axis(all_seqs, keep_BW[:, :, None], axis=1),
        finished_lengths=jnp.take_along_axis(all_lengths, keep_BW, axis=1),
        alive_logp=alive_logp,
        alive_seqs=jnp.take_along_axis(seqs_B2WT, alive_BW[:, :, None], axis=1),
    ), jnp.take_along_axis(parent_B2W, alive_BW, axis=1), \
        jnp.take_along_axis(token_B2W, alive_BW, axis=1)

  def body(carry):
    step, state = carry
    state, parent_BW, token_BW = select(step, state, state["logits"])
    rows_R = (jnp.arange(batch_size)[:, None] * W + parent_BW).reshape(-1)
    cache = _gather_rows(state["cache"], rows_R)
    logits_R1V, cache = _extend(model, params, token_BW.reshape(-1, 1), cache,
                                jnp.ones((batch_size * W, 1), bool))
    return step + 1, dict(state, cache=cache, logits=logits_R1V[:, 0])

  def cond(carry):
    step, state = carry
    # A live beam's log-probability only falls, so its best final score is at the shortest or
    # the longest remaining length (length ** alpha is monotonic).
    best_alive = state["alive_logp"][:, 0]
    bound = jnp.maximum(penalised(best_alive, step + 1), penalised(best_alive, jnp.int32(max_new)))
    settled = (bound <= state["finished_scores"][:, -1]) | (best_alive == neg_inf)
    return (step < max_new - 1) & ~jnp.all(settled)

  state = dict(
      alive_logp=jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, neg_inf), (batch_size, 1)),
      alive_seqs=jnp.zeros((batch_size, W, max_new), jnp.int32),
      finished_scores=jnp.full((batch_size, W), neg_inf),
      finished_seqs=jnp.zeros((batch_size, W, max_new), jnp.int32),
      finished_lengths=jnp.zeros((batch_size, W), jnp.int32),
      cache=cache, logits=logits_RV)
  step, state = lax.while_loop(cond, body, (jnp.int32(0), state))
  state, _, _ = select(step, state, state["logits"])
  return GenerateOutput(state["finished_seqs"][:, 0], state["finished_scores"][:, 0],
                        state["finished_lengths"][:, 0])
