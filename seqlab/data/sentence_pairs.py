"""BERT next-sentence pairs for the grain pipeline: sentences, runs of sentences, NotNext draws.

Next-sentence pairs ("mlm_nsp", architecture "encoder") as Google BERT's
`create_pretraining_data.py` builds them; they replace stages 2 to 4 of `seqlab.data.pipeline`
(its module doc), which builds them with `read_and_split`, `SentenceRuns` and
`SentencePairsAndConvert`:

* stage 2 splits each document into sentences (`split_sentences`: its non-blank lines, each
  with its line break and the blank lines after it, so the sentences concatenate back to the
  document) and tokenizes each one, without eos. A document of fewer than 2 sentences can give
  no IsNext pair: it is skipped and counted (`single_sentence_documents`).
* stage 3 cuts each document (never across documents) into runs of whole sentences: a run
  takes sentences until it holds at least `row length - 3` tokens or the document ends. A run
  of one sentence (a document's last, or one longer than the row) is skipped and counted
  (`single_sentence_chunks`), so that IsNext stays at `is_next_prob` (Google forces such a run
  NotNext).
* stage 4 runs `objectives.nsp_pair` on the run: A = its first a_end sentences (a_end uniform
  in [1, n - 1]); with probability `is_next_prob` (0.5) B = the rest of the run (IsNext,
  nsp_label 0), otherwise B = sentences of another document from a random sentence on
  (NotNext, nsp_label 1); the pair is truncated to the row as Google's `truncate_seq_pair`
  ([CLS] A [SEP] B [SEP], token_type_ids 0 on [CLS] A [SEP] and 1 on B [SEP]); then `mlm`
  (15%, 80/10/10; [CLS] and [SEP] are never selected). The converter puts `nsp_label` at the
  segment's [CLS] (`features` module doc), where `train.mlm_task` reads it.

The NotNext document is uniform over the *whole* source other than the run's own document
(all shards, as Google draws from all documents), drawn with the run's own generator and read
and split on the spot; only the sentences B uses are tokenized. So the stage holds no state
and restore stays exact, but the source must be random-access with at least 2 documents
(a streaming source raises ValueError: keeping earlier documents in the iterator state would
make the checkpoint grow and the draw depend on the shard's past). Unreadable or sentence-less
random documents are redrawn, up to 10 times. Differences from Google, deliberately: no
`short_seq_prob` (every run aims at the full row; short runs come only from document ends),
no `dupe_factor` (each epoch draws new pairs and masks), and the unused sentences of a
NotNext run are not put back into the document (runs are cut before their draws, which keeps
stage 3 deterministic and its state small; about a quarter of an epoch's text goes unused).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from seqlab import features as features_lib
from seqlab import objectives as obj
from seqlab.data import documents

NSP_OPTIONS = ("is_next_prob",)
# A NotNext pair gives up after this many unusable random documents in a row (Google's loop
# also tries 10 times).
RANDOM_DOCUMENT_TRIES = 10


def make_mlm_nsp_fn(length: int, special: obj.SpecialIds, **kwargs: Any
                    ) -> Callable[..., dict[str, np.ndarray]]:
  """BERT pre-training examples for rows of `length`: `nsp_pair`, then `mlm` (module doc).

  Returns (sentences, random_sentences, rng) -> example dict (`ObjectivePlan.fn`). `kwargs`:
  `NSP_OPTIONS` go to `nsp_pair`, the others to `mlm` (the pipeline checks their names).
  """
  if length < 5:
    raise ValueError(f"seq_lengths['encoder']={length} is too short for objective='mlm_nsp': "
                     "[CLS] A [SEP] B [SEP] needs at least 5 positions")
  nsp_kwargs = {k: v for k, v in kwargs.items() if k in NSP_OPTIONS}
  mlm_kwargs = {k: v for k, v in kwargs.items() if k not in NSP_OPTIONS}
  is_next_prob = nsp_kwargs.get("is_next_prob", 0.5)
  if not 0.0 <= is_next_prob <= 1.0:
    raise ValueError(f"is_next_prob={is_next_prob!r} must be in [0, 1]")

  def mlm_nsp_fn(sentences, random_sentences, rng):
    pair = obj.nsp_pair(sentences, random_sentences, rng, special=special, max_length=length,
                        **nsp_kwargs)
    example = obj.mlm(pair["inputs"], rng, special=special, **mlm_kwargs)
    return {**example, "token_type_ids": pair["token_type_ids"],
            "nsp_label": pair["nsp_label"]}

  return mlm_nsp_fn


def split_sentences(document: str) -> list[str]:
  """A text document's "sentences": its non-blank lines (the NSP pipeline's splitter).

  Each sentence is one line holding a non-whitespace character, with its line break and the
  blank (whitespace-only) lines after it; blank lines before the first one join it. So
  `"".join(split_sentences(d)) == d` whenever d has a non-blank line (the byte tokenizer's
  sentences concatenate to the document's tokens exactly), and a document without one has
  no sentences. Lines are `str.splitlines` lines. For source code (the stdlib corpus) a line
  is the natural unit; for prose, store one sentence per line (Google BERT's input format).
  """
  sentences: list[str] = []
  blank_prefix = ""
  for line in document.splitlines(keepends=True):
    if not line.strip():
      if sentences:
        sentences[-1] += line
      else:
        blank_prefix += line
      continue
    sentences.append(blank_prefix + line if not sentences else line)
    blank_prefix = ""
  return sentences


def read_and_split(index: int, source: Any, tokenizer) -> dict[str, Any]:
  """Document `index` of a random-access source as tokenized sentences (stage 2).

  {"index", "tokens": int32[n] (the sentences' tokens, concatenated), "lengths": int32[s]
  (tokens per sentence), "status": why it is unusable or ""}; fewer than 2 sentences is
  unusable ("single_sentence_documents": no IsNext pair can be made).
  """
  try:
    document = source[index]
  except OSError:
    return {"index": index, "tokens": None, "status": "unreadable_documents"}
  if not isinstance(document, str):
    return {"index": index, "tokens": None, "status": "bad_documents"}
  sentences = [np.asarray(tokenizer.encode(s)) for s in split_sentences(document)]
  sentences = [s for s in sentences if s.size]
  if not sentences:
    return {"index": index, "tokens": None, "status": "empty_documents"}
  tokens = np.concatenate(sentences)
  if tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size:
    return {"index": index, "tokens": None, "status": "out_of_vocabulary_documents"}
  if len(sentences) < 2:
    return {"index": index, "tokens": None, "status": "single_sentence_documents"}
  return {"index": index, "tokens": tokens.astype(np.int32),
          "lengths": np.array([s.size for s in sentences], np.int32), "status": ""}


class _TokenizedSentences(Sequence):
  """A document's sentences, tokenized when read (B of a NotNext pair reads only a few)."""

  def __init__(self, sentences: list[str], tokenizer):
    self._sentences, self._tokenizer = sentences, tokenizer

  def __len__(self) -> int:
    return len(self._sentences)

  def __getitem__(self, j):
    return self._tokenizer.encode(self._sentences[j])


class SentenceRunIterator(documents.DocumentBufferIterator):
  """Cuts each document into runs of whole sentences (stage 3).

  As Google's `create_instances_from_document`: sentences join the run until it holds at
  least `run_length` tokens or the document ends. The state is `DocumentBufferIterator`'s
  (the parent state before the document in the buffer, and the offset into
  it), with the offset counting sentences; restoring re-reads the document.
  """

  def __init__(self, parent, run_length: int, max_bad_in_a_row: int):
    super().__init__(parent, max_bad_in_a_row)
    self._run_length = run_length

  def _unusable_hint(self, status: str) -> str:
    if status == "single_sentence_documents":
      return "next-sentence pairs need documents of at least 2 non-blank lines"
    return super()._unusable_hint(status)

  def __next__(self):
    counts = collections.Counter()
    if self._doc is None or self._offset >= self._doc["lengths"].size:
      if not self._next_document(counts):
        if counts:  # trailing unusable documents still count
          return {"tokens": np.zeros(0, np.int32), "lengths": np.zeros(0, np.int32),
                  "index": -1, "counts": dict(counts)}
        raise StopIteration
    lengths = self._doc["lengths"]
    first = last = self._offset
    size = 0
    while last < lengths.size and size < self._run_length:
      size += int(lengths[last])
      last += 1
    start = int(lengths[:first].sum())
    self._offset = last
    return {"tokens": self._doc["tokens"][start:start + size], "lengths": lengths[first:last],
            "index": int(self._doc["index"]), "counts": dict(counts)}


class SentenceRuns(grain.IterDataset):

  def __init__(self, parent, run_length, max_bad_in_a_row):
    super().__init__(parent)
    self._args = (run_length, max_bad_in_a_row)

  def __iter__(self):
    return SentenceRunIterator(self._parent.__iter__(), *self._args)


class SentencePairsAndConvert(grain.transforms.RandomMap):
  """Run of sentences -> BERT pre-training features (NSP pair + MLM; stage 4).

  The NotNext document is drawn with the element's generator and read from the source here,
  so the stage stays stateless: the same element and seed give the same pair, which is what
  makes restore exact. `fn` is `make_mlm_nsp_fn`'s.
  """

  def __init__(self, fn: Callable[..., dict[str, np.ndarray]], source: Any, tokenizer,
               pad_id: int):
    self._fn, self._source, self._tokenizer = fn, source, tokenizer
    self._pad_id = pad_id

  def _random_document(self, index: int, rng: np.random.Generator) -> _TokenizedSentences:
    """The sentences of a uniformly random document other than `index` (any shard)."""
    for _ in range(RANDOM_DOCUMENT_TRIES):
      other = int(rng.integers(len(self._source) - 1))
      other += other >= index
      try:
        document = self._source[other]
      except OSError:
        continue
      sentences = split_sentences(document) if isinstance(document, str) else []
      if sentences:
        return _TokenizedSentences(sentences, self._tokenizer)
    raise ValueError(f"{RANDOM_DOCUMENT_TRIES} random documents in a row had no sentence; "
                     "no NotNext pair")

  def random_map(self, element, rng: np.random.Generator):
    counts = dict(element["counts"])
    lengths = element["lengths"]
    if lengths.size == 0:
      return {"features": None, "counts": counts}
    if lengths.size < 2:  # a document's last sentence alone, or one over-long sentence
      counts["single_sentence_chunks"] = counts.get("single_sentence_chunks", 0) + 1
      return {"features": None, "counts": counts}
    sentences = np.split(element["tokens"], np.cumsum(lengths)[:-1])
    random_sentences = functools.partial(self._random_document, element["index"], rng)
    try:
      example = self._fn(sentences, random_sentences, rng)
    except ValueError as e:
      counts["objective_errors"] = counts.get("objective_errors", 0) + 1
      return {"features": None, "counts": counts, "error": str(e)}
    return {"features": features_lib.convert_encoder(example, pad_id=self._pad_id),
            "counts": counts}
