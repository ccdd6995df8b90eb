"""The oracle of the scoring tests: one request, one hand-written unpacked row.

It runs the model once per request on a row written out by hand from `seqlab.evaluation.
scoring`'s documented layouts (no converter, no packing) and sums NumPy float64
log-softmaxes of the scored positions.
"""

import jax
import numpy as np

from seqlab.models.encoder_decoder import EncoderDecoderConfig
from seqlab.models.gpt import DecoderConfig

EOS = 1
SMALL = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, dropout_rate=0.0)


def decoder(attention="causal", vocab_size=50, max_length=64):
  return DecoderConfig(vocab_size=vocab_size, num_layers=1, max_length=max_length,
                       attention=attention, **SMALL)


def encoder_decoder(vocab_size=50):
  return EncoderDecoderConfig(vocab_size=vocab_size, num_encoder_layers=1,
                              num_decoder_layers=1, relative_num_buckets=8,
                              relative_max_distance=16, **SMALL)


def init_params(cfg, seed=0):
  return cfg.build().init(jax.random.key(seed), cfg.dummy_batch(1))["params"]


def _logsoftmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


_APPLY = {}


def forward(cfg, params, batch):
  """`model.apply` jitted per config (rows are padded to multiples of 32: few compilations)."""
  if cfg not in _APPLY:
    model = cfg.build()
    _APPLY[cfg] = jax.jit(lambda p, b: model.apply({"params": p}, b))
  return np.asarray(_APPLY[cfg](params, batch))[0]


def padded(values, fill=0):
  n = -(-max(len(values), 1) // 32) * 32
  return np.int32([list(values) + [fill] * (n - len(values))])


def oracle(cfg, params, fmt, context, continuation, *, mode_id=None, scored=None):
  """(log-likelihood, all argmax) of one request from a hand-written unpacked row.

  The row is padded at its end, where a causal decoder (and the causal part of a prefix
  decoder) never looks back from the real positions; encoder padding has segment id 0.
  """
  context = ([mode_id] if mode_id is not None else []) + list(context)
  continuation = list(continuation)
  scored = np.ones(len(continuation), bool) if scored is None else np.asarray(scored)
  if isinstance(cfg, EncoderDecoderConfig):
    enc = context + [EOS] if context else []
    targets = continuation + [EOS]
    batch = {"encoder_input_tokens": padded(enc),
             "encoder_segment_ids": padded([1] * len(enc)),
             "decoder_input_tokens": padded([0] + targets[:-1]),
             "decoder_target_tokens": padded(targets),
             "decoder_segment_ids": padded([1] * len(targets))}
    first = 0
  else:
    if fmt == "lm":
      stream = context + continuation
      bidirectional = 1
      first = len(context)
    else:
      head = context + [EOS] if context else []
      stream = head + continuation + [EOS]
      bidirectional = len(head) + 1
      first = len(head)
    batch = {"decoder_input_tokens": padded([0] + stream[:-1]),
             "decoder_target_tokens": padded(stream),
             "decoder_causal_attention": padded(
                 [1] * bidirectional + [0] * (len(stream) - bidirectional))}
  logits = forward(cfg, params, batch)
  logp = _logsoftmax64(logits)
  positions = first + np.flatnonzero(scored)
  targets = np.asarray(continuation)[scored]
  total = float(logp[positions, targets].sum())
  greedy = bool(np.all(logits[positions].argmax(-1) == targets))
  return total, greedy
