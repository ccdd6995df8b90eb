"""Log-likelihood of continuations for every text architecture, batched, packed and jitted.

A request is a (context, continuation) pair of token arrays; its score is
Σ log p(continuation token | context, earlier continuation tokens) over the scored tokens,
and whether every scored token is the model's argmax (lm-evaluation-harness's `is_greedy`).

How a pair is shown to a model (its *format*) follows how the model was trained:

  format     architecture      the model sees                                        scored
  "lm"       decoder           one stream: [mode] context ‖ continuation (no eos; a    continuation
                               full-LM decoder saw raw text, eos between documents)
  "seq2seq"  decoder           seqio's features: [mode] context ‖ eos ‖ continuation  continuation
                               ‖ eos; a prefix decoder sees the context ‖ eos
                               bidirectionally, a causal one causally
  "seq2seq"  encoder_decoder   encoder: [mode] context ‖ eos; decoder: continuation  continuation
                               ‖ eos

The final eos is never scored (a continuation may go on), nor the separator. An empty context
gets no separator. `mode` is the UL2 mode token ("nlu", "nlg", "s2s") put in front of the
context, for a model pretrained with mode tokens.

Requests are packed next-fit into fixed rows (segment ids keep them apart, as in training) and
the rows go in batches of one shape, so one compilation serves every request. A request longer
than a row loses context tokens from the left (as lm-evaluation-harness truncates); a
continuation that alone does not fit is an error. Sums are taken in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import features as features_lib

FORMATS = ("lm", "seq2seq")
ARCHITECTURES = ("decoder", "encoder_decoder")


@dataclasses.dataclass(frozen=True)
class Request:
  """One (context, continuation) pair of int32 token arrays; `scored` (bool, like the
  continuation) picks the tokens that count, all of them when None."""
  context: np.ndarray
  continuation: np.ndarray
  scored: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Score:
  """A request's log-likelihood (nats, float64 sum), whether every scored token is the argmax,
  and how many tokens were scored."""
  logprob: float
  greedy: bool
  num_tokens: int


def _tokens(value: Any, name: str) -> np.ndarray:
  arr = np.asarray(value, np.int32)
  if arr.ndim != 1:
    raise ValueError(f"{name} has shape {arr.shape}; a 1-D token array is needed")
  return arr


def architecture_of(model_cfg) -> str:
  """"decoder" or "encoder_decoder" (`seqlab.loop.architecture_of`); ValueError otherwise."""
  from seqlab import loop  # pylint: disable=g-import-not-at-top
  architecture = loop.architecture_of(model_cfg)
  if architecture not in ARCHITECTURES:
    raise ValueError(f"model config {type(model_cfg).__name__} cannot score continuations; "
                     "a decoder or an encoder-decoder can")
  return architecture


def _check(fmt: str, architecture: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r} is not one of {FORMATS}")
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not one of {ARCHITECTURES}")
  if fmt == "lm" and architecture != "decoder":
    raise ValueError(f"format='lm' needs architecture='decoder', not {architecture!r}")


def request_features(request: Request, architecture: str, fmt: str, *, eos_id: int,
                     mode_id: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """One request -> (unpadded features, int32 weights over `decoder_target_tokens`).

  The weights are 1 exactly on the scored continuation tokens (module doc).
  """
  _check(fmt, architecture)
  context = _tokens(request.context, "context")
  continuation = _tokens(request.continuation, "continuation")
  scored = (np.ones(continuation.size, bool) if request.scored is None
            else np.asarray(request.scored, bool))
  if scored.shape != continuation.shape:
    raise ValueError(f"scored has shape {scored.shape}, the continuation {continuation.shape}")
  if mode_id is not None:
    context = np.concatenate([np.int32([mode_id]), context])
  if fmt == "lm":
    feats = features_lib.convert_decoder(
        {"targets": np.concatenate([context, continuation])}, eos_id=None,
        loss_on_targets_only=False)
    offset = context.size
  else:
    feats = features_lib.convert_example({"inputs": context, "targets": continuation},
                                         architecture, eos_id=eos_id)
    offset = context.size + (context.size > 0) if architecture == "decoder" else 0
  weights = np.zeros(feats["decoder_target_tokens"].size, np.int32)
  weights[offset:offset + continuation.size] = scored
  feats["decoder_loss_weights"] = weights
  return feats, weights


def _fit(request: Request, architecture: str, fmt: str, lengths: Mapping[str, int], *,
         eos_id: int, mode_id: int | None) -> tuple[dict[str, np.ndarray], bool]:
  """The request's features, with context tokens dropped from the left until they fit."""
  feats, _ = request_features(request, architecture, fmt, eos_id=eos_id, mode_id=mode_id)
  need = features_lib.feature_lengths(feats)
  if all(need[s] <= lengths[s] for s in need):
    return feats, False
  context = _tokens(request.context, "context")
  # Only the context can shrink: the encoder's in an encoder-decoder, the shared row otherwise.
  stream = "encoder" if architecture == "encoder_decoder" else "decoder"
  over = need[stream] - lengths[stream]
  if need["decoder"] > lengths["decoder"] and stream == "encoder" or over > context.size:
    raise ValueError(f"a continuation of {np.size(request.continuation)} tokens does not fit "
                     f"the rows {dict(lengths)}")
  cut = dataclasses.replace(request, context=context[max(over, 0):])
  feats, _ = request_features(cut, architecture, fmt, eos_id=eos_id, mode_id=mode_id)
  return feats, True


def pack_requests(requests: Iterable[Request], architecture: str, fmt: str,
                  lengths: Mapping[str, int], *, eos_id: int, mode_id: int | None = None,
                  pack: bool = True):
  """Yields (padded row, [(request index, segment id), ...], requests truncated) next-fit:
  a row takes requests in order until the next does not fit (one request per row without
  `pack`). The row's `decoder_loss_weights` mark the scored tokens."""
  current, members, used, cut = [], [], dict.fromkeys(lengths, 0), 0
  for index, request in enumerate(requests):
    feats, truncated = _fit(request, architecture, fmt, lengths, eos_id=eos_id, mode_id=mode_id)
    need = features_lib.feature_lengths(feats)
    full = any(used[s] + n > lengths[s] for s, n in need.items())
    if current and (full or not pack):
      yield features_lib.pack_row(current, lengths), members, cut
      current, members, used, cut = [], [], dict.fromkeys(lengths, 0), 0
    current.append(feats)
    members.append((index, len(current)))
    cut += truncated
    for s, n in need.items():
      used[s] += n
  if current:
    yield features_lib.pack_row(current, lengths), members, cut


@functools.lru_cache(maxsize=None)
def token_scores(model_cfg) -> Any:
  """jit (params, batch) -> (float32 log p(decoder_target_tokens) [B, L], bool argmax [B, L])."""
  model = model_cfg.build()

  def fn(params, batch):
    logits = model.apply({"params": params}, batch).astype(jnp.float32)
    targets = batch["decoder_target_tokens"]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], -1)
    return logp[..., 0], jnp.argmax(logits, axis=-1) == targets

  return jax.jit(fn)


class Scorer:
  """Scores requests with one model and its parameters (module doc).

  Args:
    model_cfg: a decoder or encoder-decoder config (`seqlab.models`).
    params: its parameters.
    fmt: "lm" or "seq2seq" (module doc).
    lengths: row length per stream ({"decoder": L} or {"encoder": Le, "decoder": Ld}).
    eos_id: the separator and end id of the "seq2seq" format.
    mode_id: the mode token id put in front of every context, or None.
    batch_size: rows per call of the model.
    pack: several requests per row (False: one per row, for a model that must not see packed
      rows, or to compare).
  """

  def __init__(self, model_cfg, params, *, fmt: str, lengths: Mapping[str, int],
               eos_id: int = 1, mode_id: int | None = None, batch_size: int = 8,
               pack: bool = True):
    architecture = architecture_of(model_cfg)
    _check(fmt, architecture)
    want = features_lib.STREAMS[architecture]
    if set(lengths) != set(want):
      raise ValueError(f"lengths={dict(lengths)} must give exactly the streams {want}")
    for stream, n in lengths.items():
      if int(n) < 2:
        raise ValueError(f"lengths[{stream!r}]={n} is below 2")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} is not positive")
    self.model_cfg, self.params = model_cfg, params
    self.architecture, self.fmt = architecture, fmt
    self.lengths = {k: int(v) for k, v in lengths.items()}
    self.eos_id, self.mode_id = eos_id, mode_id
    self.batch_size, self.pack = batch_size, pack
    self.truncated = 0  # requests whose context lost tokens to fit a row

  def _rows(self, requests: Sequence[Request]):
    for row, members, cut in pack_requests(requests, self.architecture, self.fmt, self.lengths,
                                           eos_id=self.eos_id, mode_id=self.mode_id,
                                           pack=self.pack):
      self.truncated += cut
      yield row, members

  def score(self, requests: Iterable[Request]) -> list[Score]:
    """A `Score` per request, in order."""
    requests = list(requests)
    fn = token_scores(self.model_cfg)
    logprob = np.zeros(len(requests), np.float64)
    greedy = np.ones(len(requests), bool)
    count = np.zeros(len(requests), np.int64)

    def flush(rows, owners):
      blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
      batch = {k: np.stack([r[k] for r in rows] + [blank[k]] * (self.batch_size - len(rows)))
               for k in rows[0]}
      lp, top = jax.device_get(fn(self.params, batch))
      lp = np.asarray(lp, np.float64)
      for r, (row, members) in enumerate(zip(rows, owners)):
        for index, segment in members:
          mask = (row["decoder_segment_ids"] == segment) & (row["decoder_loss_weights"] > 0)
          logprob[index] = lp[r][mask].sum()
          greedy[index] = bool(top[r][mask].all())
          count[index] = int(mask.sum())

    rows, owners = [], []
    for row, members in self._rows(requests):
      rows.append(row)
      owners.append(members)
      if len(rows) == self.batch_size:
        flush(rows, owners)
        rows, owners = [], []
    if rows:
      flush(rows, owners)
    return [Score(float(a), bool(b), int(c)) for a, b, c in zip(logprob, greedy, count)]

  def loglikelihood(self, requests: Iterable[Request]) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per request: lm-evaluation-harness's `loglikelihood`."""
    return [(s.logprob, s.greedy) for s in self.score(requests)]

  def rolling_requests(self, tokens: np.ndarray, *, context_len: int = 1) -> list[Request]:
    """Disjoint windows that score every token of `tokens` once (lm-evaluation-harness's
    rolling windows): the first predicts the first tokens from nothing; each later one
    predicts the next tokens from up to `context_len` tokens before them."""
    tokens = _tokens(tokens, "tokens")
    if context_len < 0:
      raise ValueError(f"context_len={context_len} is negative")
    room = self._continuation_room(context_len)
    first = self._continuation_room(0)
    out, start = [], 0
    while start < tokens.size:
      size = first if start == 0 else room
      if size < 1:
        raise ValueError(f"context_len={context_len} leaves no room in the rows {self.lengths}")
      end = min(tokens.size, start + size)
      out.append(Request(tokens[max(0, start - context_len):start], tokens[start:end]))
      start = end
    return out

  def _continuation_room(self, context_len: int) -> int:
    """The longest continuation that fits a row behind `context_len` context tokens."""
    mode = int(self.mode_id is not None)
    if self.fmt == "lm":
      return self.lengths["decoder"] - context_len - mode
    if self.architecture == "decoder":
      context = context_len + mode
      return self.lengths["decoder"] - context - (context > 0) - 1
    return self.lengths["decoder"] - 1

  def loglikelihood_rolling(self, token_lists: Iterable[np.ndarray], *,
                            context_len: int = 1) -> list[float]:
    """The log-likelihood of each whole token sequence, over `rolling_requests` windows."""
    token_lists = list(token_lists)
    windows, owner = [], []
    for i, tokens in enumerate(token_lists):
      for request in self.rolling_requests(tokens, context_len=context_len):
        windows.append(request)
        owner.append(i)
    totals = np.zeros(len(token_lists), np.float64)
    for i, s in zip(owner, self.score(windows)):
      totals[i] += s.logprob
    return [float(t) for t in totals]
