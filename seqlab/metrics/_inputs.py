"""Input checks and id-to-text conversion shared by the text and embedding metrics."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# seqlab's token-id conventions (docs/design.md): pad = 0, eos = 1.
PAD_ID = 0
EOS_ID = 1

Decode = Callable[[list[int]], str]


def check_corpus(items: Any, name: str) -> list[Any]:
  """Returns `items` as a non-empty list; a bare string is an error, not a corpus."""
  if isinstance(items, (str, bytes)):
    raise ValueError(f"{name} must be a sequence of texts, got the single string {items!r}")
  try:
    items = list(items)
  except TypeError:
    raise ValueError(f"{name} must be a sequence, got {type(items).__name__}") from None
  if not items:
    raise ValueError(f"{name} is empty ({name}=[]); need at least one item")
  return items


def check_pairs(hypotheses: Any, references: Any, hyp_name: str = "hypotheses",
                ref_name: str = "references") -> tuple[list[Any], list[Any]]:
  """Checks two parallel, non-empty corpora of equal length."""
  hypotheses = check_corpus(hypotheses, hyp_name)
  references = check_corpus(references, ref_name)
  if len(hypotheses) != len(references):
    raise ValueError(f"len({hyp_name})={len(hypotheses)} != len({ref_name})={len(references)}")
  return hypotheses, references


def trim_ids(ids: Any, *, eos_id: int | None = EOS_ID, pad_id: int | None = PAD_ID) -> list[int]:
  """Cuts a 1-D id sequence at its first `eos_id` and drops `pad_id`s (None disables either)."""
  ids_L = np.asarray(ids)
  if ids_L.ndim != 1 or not (ids_L.size == 0 or np.issubdtype(ids_L.dtype, np.integer)):
    raise ValueError(f"ids must be a 1-D integer sequence, got shape {ids_L.shape} "
                     f"dtype {ids_L.dtype}")
  out = ids_L.tolist()
  if eos_id is not None and eos_id in out:
    out = out[:out.index(eos_id)]
  if pad_id is not None:
    out = [i for i in out if i != pad_id]
  return out


def as_text(item: Any, decode: Decode | None, name: str, *, eos_id: int | None = EOS_ID,
            pad_id: int | None = PAD_ID) -> str:
  """A string passes through; a token-id sequence is trimmed (`trim_ids`) and decoded."""
  if isinstance(item, str):
    return item
  if decode is None:
    raise ValueError(f"{name}={_short(item)} is not a string and decode=None; pass decode "
                     "(e.g. a seqlab tokenizer's decode) to score token ids")
  try:
    ids = trim_ids(item, eos_id=eos_id, pad_id=pad_id)
  except ValueError as e:
    raise ValueError(f"{name}={_short(item)}: {e}") from None
  text = decode(ids)
  if not isinstance(text, str):
    raise ValueError(f"decode({name}) returned {type(text).__name__}, expected str")
  return text


def as_texts(items: Sequence[Any], decode: Decode | None = None, *, name: str = "texts",
             eos_id: int | None = EOS_ID, pad_id: int | None = PAD_ID) -> list[str]:
  """Strings, or token-id sequences (rows of an int array) decoded with `decode`.

  Id sequences are cut at the first `eos_id` and stripped of `pad_id` before `decode`
  sees them, so the padded output of `seqlab.decoding.generate` can be passed directly.
  """
  items = check_corpus(items, name)
  return [as_text(item, decode, f"{name}[{i}]", eos_id=eos_id, pad_id=pad_id)
          for i, item in enumerate(items)]


def as_reference_set(item: Any, decode: Decode | None, name: str) -> list[str]:
  """One hypothesis' references: a text, a list of texts, ids, or a list of id sequences."""
  if isinstance(item, str):
    return [item]
  try:
    elements = list(item)
  except TypeError:
    raise ValueError(f"{name}={_short(item)} is not a text, ids or a list of them") from None
  if not elements:
    raise ValueError(f"{name} is empty; need at least one reference")
  if all(isinstance(e, str) for e in elements):
    return elements
  if all(np.ndim(e) == 0 and not isinstance(e, str) for e in elements):
    return [as_text(item, decode, name)]  # one id sequence
  return [as_text(e, decode, f"{name}[{j}]") for j, e in enumerate(elements)]


def _short(item: Any) -> str:
  text = repr(item)
  return text if len(text) <= 60 else text[:57] + "..."
