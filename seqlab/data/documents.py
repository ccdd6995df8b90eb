"""A grain iterator stage that buffers one tokenized document at a time and resumes exactly.

Shared by the chunking stage (`pipeline`) and the sentence-run stage (`sentence_pairs`): both
read documents from the tokenizing stage, skip and count unusable ones, and cut pieces from the
document in the buffer. After a piece is emitted the buffer holds the rest of at most one
document, so the state is the parent state before that document plus the offset into it;
restoring re-reads the document.
"""

from __future__ import annotations

import collections
from typing import Any

import grain


class DocumentBufferIterator(grain.DatasetIterator):
  """Base class: `_next_document` fills `_doc` (what `_buffer` keeps of an element)."""

  def __init__(self, parent, max_bad_in_a_row: int):
    super().__init__(parent)
    self._max_bad_in_a_row = max_bad_in_a_row
    self._doc_state = None  # parent state before the document in the buffer
    self._doc = None
    self._offset = 0

  def _buffer(self, element: dict[str, Any]) -> Any:
    """What the buffer keeps of a usable element (the whole element by default)."""
    return element

  def _unusable_hint(self, status: str) -> str:
    del status
    return "is the source a text source?"

  def _next_document(self, counts: collections.Counter) -> bool:
    """Loads the next usable document into the buffer; False at the end of the parent."""
    bad_in_a_row = 0
    while True:
      state = self._parent.get_state()
      try:
        element = next(self._parent)
      except StopIteration:
        return False
      counts["documents"] += 1
      if element["status"]:
        counts[element["status"]] += 1
        bad_in_a_row += 1
        if bad_in_a_row >= self._max_bad_in_a_row:  # e.g. an image source: would spin forever
          raise ValueError(f"{bad_in_a_row} documents in a row are unusable "
                           f"({element['status']}); {self._unusable_hint(element['status'])}")
        continue
      self._doc_state, self._doc, self._offset = state, self._buffer(element), 0
      return True

  def get_state(self):
    return {"parent": self._doc_state if self._doc is not None else self._parent.get_state(),
            "offset": int(self._offset), "has_document": self._doc is not None}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._doc, self._offset, self._doc_state = None, 0, None
    if state["has_document"]:
      self._doc_state = state["parent"]
      self._doc = self._buffer(next(self._parent))
      self._offset = state["offset"]
