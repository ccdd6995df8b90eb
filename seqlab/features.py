"""Feature converters and packing: objective examples -> fixed-length model features (NumPy).

An objective gives `{"inputs": int32[I], "targets": int32[T]}` (plus optional extras); a
converter turns one example into *unpadded* model features for an architecture, and a packer
places several converted examples into fixed-length rows with segment ids and positions.

Features per architecture (docs/design.md's contract; every array int32, one row shown):

  encoder          encoder_input_tokens, token_type_ids, mlm_targets, mlm_weights,
                   (+ nsp_label), encoder_segment_ids, encoder_positions        all [Le]
  decoder          decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
                   decoder_causal_attention, decoder_segment_ids, decoder_positions  all [Ld]
  encoder_decoder  encoder_input_tokens, encoder_segment_ids, encoder_positions  [Le]
                   decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
                   decoder_segment_ids, decoder_positions                       [Ld]

EOS: objectives append none. With `eos_id` (default 1) the decoder and encoder-decoder
converters append eos to the targets and to non-empty inputs, as T5's `append_eos_after_trim`
(`span_corruption_lengths` budgets it); `eos_id=None` appends nothing (the pipeline's choice for
full LM, whose eos sits at document boundaries). The encoder converter appends nothing
([CLS]/[SEP] come with the MLM example).

Decoder (seqio's PrefixLMFeatureConverter rule), for inputs [7, 8] and targets [3, 9]:

  decoder_target_tokens    = [7, 8, 1, 3, 9, 1]     inputs ‖ eos ‖ targets ‖ eos
  decoder_input_tokens     = [0, 7, 8, 1, 3, 9]     shifted right, start id 0 in every segment
  decoder_causal_attention = [1, 1, 1, 1, 0, 0]     positions < len(inputs) + 1
  decoder_loss_weights     = [0, 0, 0, 1, 1, 1]     targets only (all tokens if not
                                                    loss_on_targets_only)

Full LM has empty inputs, so the same rule gives causal attention 1 on the first position only
(a no-op: one position attending to itself) and loss on every token.

Encoder-decoder: encoder_input_tokens = inputs ‖ eos; decoder_target_tokens = targets ‖ eos;
decoder_input_tokens = those shifted right with start id 0; loss on every target.

Encoder (MLM): encoder_input_tokens = inputs; mlm_targets = targets; mlm_weights = the
example's `weights` if given (`objectives.mlm` gives them), else `targets != pad` (the
objective puts pad at unselected positions); token_type_ids = the example's, else zeros.
A scalar `nsp_label` is placed at the first token of its segment (the [CLS] position, where
`encoder_positions == 0` and `encoder_segment_ids > 0`) and is 0 elsewhere, so it survives
packing; an NSP head reads it at those positions.

Segment ids and positions: segment ids are 1, 2, ... per example in a row, 0 on padding;
positions restart at 0 in every segment and are 0 on padding. An unpacked row is a packed row
with one segment. In encoder-decoder rows, example k has segment id k in both streams.

Truncation policy: before packing, a stream longer than its row is cut at the end (the first
`length` tokens are kept; for a decoder that cuts the tail of `inputs ‖ targets`).
`truncate` reports it and the pipeline counts it; the pipeline sizes its chunks so that the
built-in objectives never need it.

Packing: greedy first-fit over `num_bins` rows (grain's FirstFit scheme). Each example goes
into the first row where every stream has room (and the row has fewer than `max_segments`
segments); when an example fits no row, the rows are emitted in order, emptied, and the
example starts the next group. `num_bins=1` is "next-fit": fill one row until the next
example does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ARCHITECTURES = ("encoder", "decoder", "encoder_decoder")

# Which length axis ("stream") every token-aligned feature lives on.
FEATURE_STREAM = {
    "encoder_input_tokens": "encoder",
    "token_type_ids": "encoder",
    "mlm_targets": "encoder",
    "mlm_weights": "encoder",
    "nsp_label": "encoder",
    "decoder_input_tokens": "decoder",
    "decoder_target_tokens": "decoder",
    "decoder_loss_weights": "decoder",
    "decoder_causal_attention": "decoder",
}
# Per-example scalars, placed at the first token of their segment.
SCALAR_FEATURES = ("nsp_label",)
STREAMS = {
    "encoder": ("encoder",),
    "decoder": ("decoder",),
    "encoder_decoder": ("encoder", "decoder"),
}

Features = dict[str, np.ndarray]


def _check_architecture(architecture: str) -> None:
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not one of {ARCHITECTURES}")


def stream_lengths(architecture: str, seq_lengths: int | Mapping[str, int]) -> dict[str, int]:
  """Row length per stream: an int for every stream, or a mapping {"encoder": L, ...}."""
  _check_architecture(architecture)
  streams = STREAMS[architecture]
  if isinstance(seq_lengths, (int, np.integer)):
    lengths = {s: int(seq_lengths) for s in streams}
  else:
    lengths = {s: seq_lengths[s] for s in streams if s in seq_lengths}
    if set(lengths) != set(streams) or set(seq_lengths) - set(streams):
      raise ValueError(f"seq_lengths={dict(seq_lengths)} must have exactly the keys {streams} "
                       f"for architecture={architecture!r}")
  for s, n in lengths.items():
    if n < 1:
      raise ValueError(f"seq_lengths[{s!r}]={n} is not positive")
  return lengths


def shift_right(tokens: np.ndarray, start_id: int = 0) -> np.ndarray:
  """[t0, t1, ..., tn] -> [start_id, t0, ..., t(n-1)] (one unpacked segment)."""
  tokens = np.asarray(tokens, np.int32)
  out = np.empty_like(tokens)
  if tokens.size:
    out[0] = start_id
    out[1:] = tokens[:-1]
  return out


def _tokens(example: Mapping[str, Any], key: str) -> np.ndarray:
  arr = np.asarray(example.get(key, ()), dtype=np.int32)
  if arr.ndim != 1:
    raise ValueError(f"example[{key!r}] has shape {arr.shape}; a 1-D token array is needed")
  return arr


def _with_eos(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
  if eos_id is None:
    return tokens
  return np.concatenate([tokens, np.array([eos_id], np.int32)])


def convert_decoder(example: Mapping[str, Any], *, loss_on_targets_only: bool = True,
                    eos_id: int | None = 1) -> Features:
  """{"inputs": [I], "targets": [T]} -> unpadded decoder features (see module).

  With `eos_id`, eos is appended to the targets and to non-empty inputs first (length
  I + T + 2, or T + 1 for full LM); `eos_id=None` takes the example as it is.
  """
  inputs, targets = _tokens(example, "inputs"), _tokens(example, "targets")
  if inputs.size:
    inputs = _with_eos(inputs, eos_id)
  targets = _with_eos(targets, eos_id)
  concat = np.concatenate([inputs, targets])
  positions = np.arange(concat.size)
  is_target = positions >= inputs.size
  return {
      "decoder_input_tokens": shift_right(concat),
      "decoder_target_tokens": concat,
      "decoder_loss_weights": (is_target if loss_on_targets_only
                               else np.ones_like(is_target)).astype(np.int32),
      "decoder_causal_attention": (positions < inputs.size + 1).astype(np.int32),
  }


def convert_encoder_decoder(example: Mapping[str, Any], *, eos_id: int | None = 1) -> Features:
  """{"inputs": [I], "targets": [T]} -> encoder features [I + 1] and decoder features [T + 1]
  (eos appended to the targets and to non-empty inputs; `eos_id=None` appends nothing)."""
  inputs, targets = _tokens(example, "inputs"), _tokens(example, "targets")
  if inputs.size:
    inputs = _with_eos(inputs, eos_id)
  targets = _with_eos(targets, eos_id)
  return {
      "encoder_input_tokens": inputs,
      "decoder_input_tokens": shift_right(targets),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones_like(targets),
  }


def convert_encoder(example: Mapping[str, Any], *, pad_id: int = 0) -> Features:
  """MLM example {"inputs", "targets"[, "weights", "token_type_ids", "nsp_label"]} -> encoder
  features of length I (see module)."""
  inputs, targets = _tokens(example, "inputs"), _tokens(example, "targets")
  if targets.shape != inputs.shape:
    raise ValueError(f"encoder example has inputs of length {inputs.size} but targets of "
                     f"length {targets.size}; MLM targets are aligned with inputs")
  if "weights" in example:
    weights = _tokens(example, "weights")
  else:
    weights = (targets != pad_id).astype(np.int32)
  token_types = (_tokens(example, "token_type_ids") if "token_type_ids" in example
                 else np.zeros_like(inputs))
  features = {
      "encoder_input_tokens": inputs,
      "token_type_ids": token_types,
      "mlm_targets": targets,
      "mlm_weights": weights,
  }
  if "nsp_label" in example:
    features["nsp_label"] = np.asarray(example["nsp_label"], np.int32).reshape(())
  return features


def convert_example(example: Mapping[str, Any], architecture: str, *,
                    loss_on_targets_only: bool = True, eos_id: int | None = 1,
                    pad_id: int = 0) -> Features:
  """Dispatches to the converter of `architecture` (the encoder appends no eos)."""
  _check_architecture(architecture)
  if architecture == "encoder":
    return convert_encoder(example, pad_id=pad_id)
  if architecture == "decoder":
    return convert_decoder(example, loss_on_targets_only=loss_on_targets_only, eos_id=eos_id)
  return convert_encoder_decoder(example, eos_id=eos_id)


def feature_lengths(features: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Length of each stream in unpadded features; streams must be internally consistent."""
  lengths: dict[str, int] = {}
  for name, value in features.items():
    if name in SCALAR_FEATURES:
      continue
    stream = FEATURE_STREAM[name]
    if lengths.setdefault(stream, len(value)) != len(value):
      raise ValueError(f"feature {name!r} has length {len(value)} but stream {stream!r} has "
                       f"length {lengths[stream]}")
  return lengths


def truncate(features: Mapping[str, np.ndarray],
             lengths: Mapping[str, int]) -> tuple[Features, bool]:
  """Cuts every stream longer than its row length at the end; returns (features, truncated)."""
  out, truncated = {}, False
  for name, value in features.items():
    if name in SCALAR_FEATURES:
      out[name] = value
      continue
    n = lengths[FEATURE_STREAM[name]]
    truncated |= len(value) > n
    out[name] = value[:n]
  return out, truncated


class FirstFitPacker:
  """Greedy first-fit packing of unpadded features into `num_bins` rows (see module doc).

  Usage: `if not packer.add(f): rows = packer.flush(); packer.add(f)`; `flush()` at the end.
  Examples must already fit a row (`truncate`).
  """

  def __init__(self, lengths: Mapping[str, int], *, num_bins: int = 1,
               max_segments: int | None = None):
    if num_bins < 1:
      raise ValueError(f"num_bins={num_bins} is not positive")
    if max_segments is not None and max_segments < 1:
      raise ValueError(f"max_segments={max_segments} is not positive")
    self.lengths = dict(lengths)
    self.num_bins = num_bins
    self.max_segments = max_segments
    self._bins: list[list[Features]] = []
    self._used: list[dict[str, int]] = []

  def __len__(self) -> int:
    """Number of examples held."""
    return sum(len(b) for b in self._bins)

  def add(self, features: Features) -> bool:
    """Places `features` in the first row with room; False if no row (open or new) has room."""
    need = feature_lengths(features)
    for stream, n in need.items():
      if n > self.lengths[stream]:
        raise ValueError(f"an example of {stream} length {n} exceeds the row length "
                         f"{self.lengths[stream]}; truncate it first")
    for row, used in zip(self._bins, self._used):
      if self.max_segments is not None and len(row) >= self.max_segments:
        continue
      if all(used.get(s, 0) + n <= self.lengths[s] for s, n in need.items()):
        row.append(features)
        for s, n in need.items():
          used[s] = used.get(s, 0) + n
        return True
    if len(self._bins) < self.num_bins:
      self._bins.append([features])
      self._used.append(dict(need))
      return True
    return False

  def flush(self) -> list[Features]:
    """The held rows, padded, in bin order; empties the packer."""
    rows = [pack_row(row, self.lengths) for row in self._bins]
    self._bins, self._used = [], []
    return rows


def pack_row(examples: Sequence[Mapping[str, np.ndarray]],
             lengths: Mapping[str, int]) -> Features:
  """Concatenates unpadded examples into one padded row with segment ids and positions."""
  row: Features = {}
  for stream, n in lengths.items():
    row[f"{stream}_segment_ids"] = np.zeros(n, np.int32)
    row[f"{stream}_positions"] = np.zeros(n, np.int32)
  offsets = dict.fromkeys(lengths, 0)
  for segment, example in enumerate(examples, start=1):
    ex_lengths = feature_lengths(example)
    for name, value in example.items():
      stream = FEATURE_STREAM[name]
      if name not in row:
        row[name] = np.zeros(lengths[stream], np.int32)
      start = offsets[stream]
      if name in SCALAR_FEATURES:
        row[name][start] = value
      else:
        row[name][start:start + len(value)] = value
    for stream, n in ex_lengths.items():
      start = offsets[stream]
      if start + n > lengths[stream]:
        raise ValueError(f"examples of total {stream} length {start + n} exceed the row "
                         f"length {lengths[stream]}")
      row[f"{stream}_segment_ids"][start:start + n] = segment
      row[f"{stream}_positions"][start:start + n] = np.arange(n)
      offsets[stream] = start + n
  return row


def pack(examples: Sequence[Mapping[str, np.ndarray]], lengths: Mapping[str, int], *,
         num_bins: int = 1, max_segments: int | None = None) -> list[Features]:
  """Packs a list of unpadded features into rows (first-fit over `num_bins`; module doc)."""
  packer = FirstFitPacker(lengths, num_bins=num_bins, max_segments=max_segments)
  rows = []
  for features in examples:
    if not packer.add(features):
      rows.extend(packer.flush())
      packer.add(features)
  rows.extend(packer.flush())
  return rows


def pad(features: Mapping[str, np.ndarray], lengths: Mapping[str, int]) -> Features:
  """One example as one padded row (segment id 1, positions 0..n-1); the unpacked path."""
  return pack_row([features], lengths)
