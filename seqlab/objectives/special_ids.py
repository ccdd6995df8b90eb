"""Reserved token ids shared by every objective, and token validation at the boundary.

Conventions (docs/design.md): pad = 0, eos = 1, unk = 2; sentinel i is `vocab_size - 1 - i`
(sentinels count down from the top of the vocabulary, as T5's extra ids); mode tokens
`[NLU]` / `[NLG]` / `[S2S]` and BERT's `[MASK]` / `[CLS]` / `[SEP]` are single reserved ids that
the tokenizer places below the sentinels and passes in here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

_NAMED_FIELDS = ("pad", "eos", "unk", "mask", "cls", "sep", "nlu", "nlg", "s2s")
# Ids an objective inserts itself; raw text handed to span corruption / UL2 must not contain
# them, or the targets could not be told apart from the corruption markers.
_OBJECTIVE_FIELDS = ("pad", "mask", "cls", "sep", "nlu", "nlg", "s2s")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The reserved ids of one vocabulary; constructed by the tokenizer, read by objectives.

  Attributes:
    vocab_size: total number of ids, sentinels included.
    pad, eos, unk: docs/design.md fixes them at 0, 1, 2.
    mask, cls, sep: BERT's `[MASK]`, `[CLS]`, `[SEP]` (None when the vocabulary has none).
    nlu, nlg, s2s: UL2's mode tokens `[NLU]`, `[NLG]`, `[S2S]` (None when absent).
    num_sentinels: how many ids at the top of the vocabulary are sentinels.

  Every named id lies in `[0, vocab_size - num_sentinels)` and all are distinct; the ids
  that are neither named nor sentinels are the *regular* ids (`regular_ids`), the only ones
  MLM draws random replacements from.
  """

  vocab_size: int
  pad: int = 0
  eos: int = 1
  unk: int = 2
  mask: int | None = None
  cls: int | None = None
  sep: int | None = None
  nlu: int | None = None
  nlg: int | None = None
  s2s: int | None = None
  num_sentinels: int = 0

  def __post_init__(self):
    if not _is_int(self.vocab_size) or self.vocab_size <= 0:
      raise ValueError(f"vocab_size={self.vocab_size!r} must be a positive integer")
    if not _is_int(self.num_sentinels) or not 0 <= self.num_sentinels < self.vocab_size:
      raise ValueError(
          f"num_sentinels={self.num_sentinels!r} must be an integer in [0, vocab_size="
          f"{self.vocab_size})")
    limit = self.vocab_size - self.num_sentinels
    seen = {}
    for field in _NAMED_FIELDS:
      value = getattr(self, field)
      if value is None:
        continue
      if not _is_int(value) or not 0 <= value < limit:
        raise ValueError(
            f"{field}={value!r} must be an integer in [0, {limit}) (vocab_size="
            f"{self.vocab_size} minus num_sentinels={self.num_sentinels})")
      if value in seen:
        raise ValueError(f"{field}={value} is the same id as {seen[value]}={value}")
      seen[value] = field
    if len(seen) + self.num_sentinels >= self.vocab_size:
      raise ValueError(
          f"vocab_size={self.vocab_size} leaves no regular ids after {len(seen)} named ids "
          f"and num_sentinels={self.num_sentinels}")

  @functools.cached_property
  def sentinel_ids(self) -> np.ndarray:
    """int32[num_sentinels]: sentinel i is `vocab_size - 1 - i` (read-only)."""
    ids = (self.vocab_size - 1 - np.arange(self.num_sentinels)).astype(np.int32)
    ids.flags.writeable = False
    return ids

  def sentinel(self, i: int) -> int:
    """The id of sentinel `i` (0-based); ValueError past `num_sentinels`."""
    if not 0 <= i < self.num_sentinels:
      raise ValueError(f"sentinel index i={i} is outside [0, num_sentinels={self.num_sentinels})")
    return self.vocab_size - 1 - i

  @functools.cached_property
  def reserved_table(self) -> np.ndarray:
    """bool[vocab_size]: True on every named id and every sentinel."""
    table = np.zeros(self.vocab_size, bool)
    table[self.vocab_size - self.num_sentinels:] = True
    table[[getattr(self, f) for f in _NAMED_FIELDS if getattr(self, f) is not None]] = True
    table.flags.writeable = False
    return table

  @functools.cached_property
  def objective_table(self) -> np.ndarray:
    """bool[vocab_size]: True on ids objectives insert (pad, mask/cls/sep, modes, sentinels)."""
    table = np.zeros(self.vocab_size, bool)
    table[self.vocab_size - self.num_sentinels:] = True
    table[[getattr(self, f) for f in _OBJECTIVE_FIELDS if getattr(self, f) is not None]] = True
    table.flags.writeable = False
    return table

  @functools.cached_property
  def regular_ids(self) -> np.ndarray:
    """int32[R], sorted: the ids that are neither named nor sentinels."""
    ids = np.flatnonzero(~self.reserved_table).astype(np.int32)
    ids.flags.writeable = False
    return ids

  @property
  def first_regular_id(self) -> int:
    """The smallest regular id (3 for a byte vocabulary laid out as docs/design.md)."""
    return int(self.regular_ids[0])

  def mode_id(self, mode: str) -> int:
    """The id of mode token `mode` in {"nlu", "nlg", "s2s"}; ValueError if absent."""
    if mode not in ("nlu", "nlg", "s2s"):
      raise ValueError(f"mode={mode!r} is not one of 'nlu', 'nlg', 's2s'")
    value = getattr(self, mode)
    if value is None:
      raise ValueError(f"mode={mode!r} needs SpecialIds.{mode} but it is None")
    return value


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def as_tokens(tokens: Any, *, name: str = "tokens", min_length: int = 1,
              vocab_size: int | None = None, objective: str = "this objective") -> np.ndarray:
  """Validates a 1-D integer token sequence and returns it as int32[L].

  Raises ValueError naming `name` when the array is not 1-D integers, is shorter than
  `min_length`, holds a negative id, or an id >= `vocab_size` (when given).
  """
  array = np.asarray(tokens)
  if array.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
  if array.size == 0:
    if min_length > 0:
      raise ValueError(f"{name} is empty (length 0); {objective} needs at least {min_length}")
    return np.zeros(0, np.int32)
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{name} must hold integer ids, got dtype {array.dtype}")
  if array.size < min_length:
    raise ValueError(
        f"{name} has length {array.size}; {objective} needs at least {min_length}")
  low, high = int(array.min()), int(array.max())
  if low < 0:
    raise ValueError(f"{name} holds id {low} < 0, outside the vocabulary")
  if vocab_size is not None and high >= vocab_size:
    raise ValueError(f"{name} holds id {high} outside the vocabulary (vocab_size={vocab_size})")
  return array.astype(np.int32, copy=False)


def check_no_objective_ids(tokens: np.ndarray, special: SpecialIds, name: str = "tokens"):
  """ValueError if `tokens` contains an id that objectives insert (sentinel, mode, pad, ...)."""
  hits = special.objective_table[tokens]
  if hits.any():
    bad = int(tokens[np.argmax(hits)])
    raise ValueError(
        f"{name} holds id {bad}, which is reserved for objectives (pad, [MASK]/[CLS]/[SEP], "
        f"mode tokens or sentinels >= {special.vocab_size - special.num_sentinels})")
