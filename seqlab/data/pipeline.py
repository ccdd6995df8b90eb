"""The grain text pipeline: source, tokenize, chunk, objective, convert, pack, batch.

    it = make_pipeline(StdlibSource(), ByteTokenizer(), "span_corruption", "encoder_decoder",
                       seq_lengths={"encoder": 512, "decoder": 114}, batch_size=8, seed=0)
    batch = next(it)            # dict of int32 [8, 512] / [8, 114] NumPy arrays
    state = it.get_state()      # JSON-serializable; it.set_state(state) resumes exactly here
    it.stats                    # {"documents": ..., "empty_documents": ..., ...}

Stages (each deterministic for a seed):

1. source: a random-access source is sharded by document index
   (`shard_index::shard_count`, before shuffling, so shards are disjoint and cover the data),
   shuffled per epoch and repeated `num_epochs` times (None = forever). A streaming source
   (only `__iter__`) is sharded round-robin and not shuffled.
2. tokenize: `tokenizer.encode(document)` + eos. Empty documents, non-text documents and
   documents with ids outside `[0, vocab_size)` are skipped and counted.
3. chunk: documents are concatenated (eos between them) and cut into chunks of exactly
   `chunk_length` raw tokens; the last chunk of a finite run may be shorter. With
   `concatenate=False` each document is one chunk, cut to `chunk_length`. ("mlm_nsp" splits
   and chunks by sentence instead, below.)
4. objective: grain `random_map` (one generator per chunk, seeded by the pipeline seed, the
   shard index and the chunk's position). A chunk the objective rejects (ValueError: too
   short, a sentinel inside the text, ...) is skipped and counted.
5. convert: `seqlab.features.convert_example` for the architecture.
6. pack: first-fit into `packing_bins` rows (or one example per row without packing), padded
   to `seq_lengths`; over-long examples are cut at the end and counted (`features` module doc).
7. batch: `batch_size` rows stacked.

The chunk length is derived from the objective and the row lengths so that examples fit
exactly (`seqlab.data.objective_plans`: T5's `span_corruption_lengths` / `denoiser_raw_length`):
full LM fills a decoder row; prefix LM, span corruption and UL2 budget the mode token,
sentinels and eos; MLM reserves [CLS] and [SEP]. Full LM appends no eos (the document
separators are its eos) and puts loss on every token. "mlm" is RoBERTa-style ([CLS] chunk
[SEP], no next-sentence pairs); "mlm_nsp" is BERT's pre-training data, below.

Next-sentence pairs ("mlm_nsp"): `seqlab.data.sentence_pairs` module doc.

Counters (`stats`) cover every element the packer has read, which can run up to one packing
group ahead of the batches returned; they are part of the iterator state. Bad input is skipped
and counted, never fatal, except when it cannot be bad luck: 2 x (documents per shard)
unusable documents in a row (e.g. an image source) or 1000 rejected chunks in a row raise
ValueError instead of spinning forever.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grain
import numpy as np

from seqlab import features as features_lib
from seqlab.data import documents, sentence_pairs
from seqlab.data.objective_plans import (  # noqa: F401  (re-exported)
    ENCODER_OBJECTIVES, MLM_OPTIONS, OBJECTIVES, ObjectivePlan, plan_objective)


def derive_seed(seed: int, *keys: int) -> int:
  """A 32-bit seed for one pipeline stage from the user's seed and integer keys."""
  return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint32)[0])


# ----------------------------------------------------------------------------- stages


def _read_and_tokenize(index: int, source: Any, tokenizer) -> dict[str, Any]:
  """Document `index` of a random-access source, tokenized (see `_tokenize`)."""
  try:
    document = source[index]
  except OSError:  # e.g. a file removed during the run: skip it, count it
    return {"tokens": None, "status": "unreadable_documents"}
  return _tokenize(document, tokenizer)


def _tokenize(document: Any, tokenizer) -> dict[str, Any]:
  """Document -> {"tokens": int32[n + 1] ending in eos, "status": why it is unusable or ""}."""
  if not isinstance(document, str):
    return {"tokens": None, "status": "bad_documents"}
  if not document:
    return {"tokens": None, "status": "empty_documents"}
  tokens = np.asarray(tokenizer.encode(document))
  if tokens.size == 0:
    return {"tokens": None, "status": "empty_documents"}
  if tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size:
    return {"tokens": None, "status": "out_of_vocabulary_documents"}
  tokens = np.append(tokens.astype(np.int32), np.int32(tokenizer.eos_id))
  return {"tokens": tokens, "status": ""}


class StreamSourceIterator(grain.DatasetIterator):
  """Round-robin shard of an iterable source; state = epoch and elements consumed."""

  def __init__(self, source: Iterable[Any], shard_index: int, shard_count: int,
               num_epochs: int | None):
    super().__init__()
    self._source = source
    self._shard_index, self._shard_count = shard_index, shard_count
    self._num_epochs = num_epochs
    self._epoch, self._position = 0, 0  # position: elements of this epoch taken from source
    self._iter = iter(source)

  def __next__(self):
    while True:
      if self._num_epochs is not None and self._epoch >= self._num_epochs:
        raise StopIteration
      try:
        element = next(self._iter)
      except StopIteration:
        if self._position == 0:
          raise ValueError("the streaming source yielded no elements") from None
        self._epoch, self._position = self._epoch + 1, 0
        self._iter = iter(self._source)
        continue
      self._position += 1
      if (self._position - 1) % self._shard_count == self._shard_index:
        return element

  def get_state(self):
    return {"epoch": self._epoch, "position": self._position}

  def set_state(self, state):
    self._epoch, self._position = state["epoch"], 0
    self._iter = iter(self._source)
    for _ in range(state["position"]):  # a stream cannot seek: replay
      next(self._iter)
      self._position += 1


class StreamSource(grain.IterDataset):
  """An iterable-only source as a grain `IterDataset`: round-robin shard, replayed on restore."""

  def __init__(self, source, shard_index, shard_count, num_epochs):
    super().__init__()
    self._args = (source, shard_index, shard_count, num_epochs)

  def __iter__(self):
    return StreamSourceIterator(*self._args)


class _ChunkIterator(documents.DocumentBufferIterator):
  """Concatenates tokenized documents and cuts `chunk_length` chunks (module doc, stage 3).

  After a chunk is emitted, the buffer holds the tail of at most one document, so the state is
  the parent state before that document plus the offset into it; restoring re-reads it.
  """

  def __init__(self, parent, chunk_length: int, concatenate: bool, max_bad_in_a_row: int):
    super().__init__(parent, max_bad_in_a_row)
    self._n = chunk_length
    self._concatenate = concatenate

  def _buffer(self, element):
    return element["tokens"]

  def __next__(self):
    counts = collections.Counter()
    if not self._concatenate:
      if not self._next_document(counts):
        if counts:  # trailing unusable documents still count
          return {"tokens": np.zeros(0, np.int32), "counts": dict(counts)}
        raise StopIteration
      tokens = self._doc[:self._n]
      if self._doc.size > self._n:
        counts["cut_documents"] += 1
      self._offset = self._doc.size
      return {"tokens": tokens, "counts": dict(counts)}
    pieces, size = [], 0
    while size < self._n:
      if self._doc is None or self._offset >= self._doc.size:
        if not self._next_document(counts):
          break
      take = min(self._n - size, self._doc.size - self._offset)
      pieces.append(self._doc[self._offset:self._offset + take])
      self._offset += take
      size += take
    if not pieces:
      if counts:  # trailing unusable documents still count
        return {"tokens": np.zeros(0, np.int32), "counts": dict(counts)}
      raise StopIteration
    return {"tokens": np.concatenate(pieces), "counts": dict(counts)}


class _Chunk(grain.IterDataset):

  def __init__(self, parent, chunk_length, concatenate, max_bad_in_a_row):
    super().__init__(parent)
    self._args = (chunk_length, concatenate, max_bad_in_a_row)

  def __iter__(self):
    return _ChunkIterator(self._parent.__iter__(), *self._args)


class _ObjectiveAndConvert(grain.transforms.RandomMap):
  """Chunk -> {"features": unpadded features or None, "counts": ...} (stages 4 and 5)."""

  def __init__(self, plan: ObjectivePlan, architecture: str, loss_on_targets_only: bool,
               pad_id: int):
    self._plan = plan
    self._convert = functools.partial(
        features_lib.convert_example, architecture=architecture, eos_id=plan.eos_id,
        loss_on_targets_only=loss_on_targets_only, pad_id=pad_id)

  def random_map(self, element, rng: np.random.Generator):
    counts = dict(element["counts"])
    tokens = element["tokens"]
    if tokens.size == 0:
      return {"features": None, "counts": counts}
    if tokens.size < self._plan.min_length:
      counts["short_chunks"] = counts.get("short_chunks", 0) + 1
      return {"features": None, "counts": counts}
    try:
      example = self._plan.fn(tokens, rng)
    except ValueError as e:  # bad input for this objective: skip it, count it
      counts["objective_errors"] = counts.get("objective_errors", 0) + 1
      return {"features": None, "counts": counts, "error": str(e)}
    return {"features": self._convert(example), "counts": counts}


class _PackIterator(grain.DatasetIterator):
  """First-fit packing into groups of rows, checkpointed by replay (module doc, stage 6).

  State: the parent state and the counters where the current group began, and how many of
  its rows were emitted; restoring re-reads the group's elements and skips those rows.
  """

  # Rejected chunks in a row after which the objective is taken to be misconfigured.
  MAX_ERRORS_IN_A_ROW = 1000

  def __init__(self, parent, lengths, num_bins, max_segments):
    super().__init__(parent)
    self._lengths = dict(lengths)
    self._num_bins, self._max_segments = num_bins, max_segments
    self.counts = collections.Counter()
    self._errors_in_a_row = 0
    self._reset(self._parent.get_state())

  def _reset(self, group_state, group_counts=None):
    self._group_state = group_state
    self._group_counts = dict(group_counts if group_counts is not None else self.counts)
    self._rows: list[dict[str, np.ndarray]] = []
    self._next_row = 0
    self._pending = None  # (features, parent state before it, counts before it)

  def _fill_group(self):
    packer = features_lib.FirstFitPacker(self._lengths, num_bins=self._num_bins,
                                         max_segments=self._max_segments)
    if self._pending is not None:
      packer.add(self._pending[0])
      self.counts["examples"] += 1
      self._pending = None
    while True:
      state, counts_before = self._parent.get_state(), dict(self.counts)
      try:
        element = next(self._parent)
      except StopIteration:
        break
      self.counts.update(element["counts"])
      features = element["features"]
      if features is None:
        self._errors_in_a_row += "error" in element
        if self._errors_in_a_row >= self.MAX_ERRORS_IN_A_ROW:
          raise ValueError(f"the objective rejected {self._errors_in_a_row} chunks in a row; "
                           f"last error: {element['error']}")
        continue
      self._errors_in_a_row = 0
      features, truncated = features_lib.truncate(features, self._lengths)
      if truncated:
        self.counts["truncated_examples"] += 1
      if not packer.add(features):
        self._pending = (features, state, counts_before)
        break
      self.counts["examples"] += 1
    self._rows = packer.flush()
    self._next_row = 0

  def __next__(self):
    if self._next_row >= len(self._rows):
      if self._pending is not None:
        # The group that starts with the pending element begins where it was read.
        _, state, counts = self._pending
        self._group_state, self._group_counts = state, counts
      else:
        self._group_state, self._group_counts = self._parent.get_state(), dict(self.counts)
      self._fill_group()
      if not self._rows:
        raise StopIteration
    row = self._rows[self._next_row]
    self._next_row += 1
    return row

  def get_state(self):
    return {"parent": self._group_state, "counts": dict(self._group_counts),
            "next_row": int(self._next_row)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.counts = collections.Counter(state["counts"])
    self._reset(state["parent"], state["counts"])
    self._fill_group()
    self._next_row = state["next_row"]


class _Pack(grain.IterDataset):

  def __init__(self, parent, lengths, num_bins, max_segments):
    super().__init__(parent)
    self._args = (lengths, num_bins, max_segments)

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), *self._args)


class PipelineIterator(grain.DatasetIterator):
  """Batches of model features, with `get_state` / `set_state` and skip counters (`stats`)."""

  def __init__(self, dataset: grain.IterDataset, *, chunk_length: int,
               lengths: Mapping[str, int]):
    batches = dataset.__iter__()
    super().__init__(batches)
    self.chunk_length = chunk_length
    self.lengths = dict(lengths)
    node = batches
    while not isinstance(node, _PackIterator):
      node = node._parents[0]  # pylint: disable=protected-access
    self._packer = node

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  @property
  def stats(self) -> dict[str, int]:
    """Counters: documents, empty/bad/unreadable/out_of_vocabulary documents, cut_documents,
    short_chunks, objective_errors, truncated_examples, examples; with NSP also
    single_sentence_documents and single_sentence_chunks."""
    return {k: int(v) for k, v in sorted(self._packer.counts.items())}


# ----------------------------------------------------------------------------- entry point


def make_pipeline(source: Any, tokenizer: Any, objective: str | Callable[..., dict],
                  architecture: str, *, seq_lengths: int | Mapping[str, int], batch_size: int,
                  seed: int, shard_index: int = 0, shard_count: int = 1, packing: bool = True,
                  num_epochs: int | None = None, shuffle: bool = True,
                  objective_kwargs: Mapping[str, Any] | None = None,
                  chunk_length: int | None = None, concatenate: bool = True,
                  loss_on_targets_only: bool = True, packing_bins: int | None = None,
                  drop_remainder: bool = False, read_threads: int = 1) -> PipelineIterator:
  """Builds the training input pipeline (module doc) and returns its batch iterator.

  Args:
    source: a random-access source (`__len__`, `__getitem__`) or an iterable of documents.
    tokenizer: a `seqlab.data.tokenizers` tokenizer (`encode`, `vocab_size`, `special_ids`).
    objective: one of `OBJECTIVES`, or a callable `(tokens, rng) -> {"inputs", "targets"}`
      (then `chunk_length` is required and eos is appended as for prefix LM). "mlm_nsp" needs
      a random-access source with at least 2 documents.
    architecture: "encoder", "decoder" or "encoder_decoder".
    seq_lengths: row length per stream, `{"encoder": Le, "decoder": Ld}` or one int.
    batch_size: rows per batch.
    seed: the one seed of shuffling and of every objective draw.
    shard_index, shard_count: this process's shard (e.g. `jax.process_index()/count()`).
    packing: pack several examples per row; False gives one example per row.
    num_epochs: passes over the source; None repeats forever.
    shuffle: shuffle documents (per epoch) before chunking.
    objective_kwargs: keyword arguments of the objective (see `plan_objective`).
    chunk_length: override of the raw tokens per chunk.
    concatenate: concatenate documents before chunking (else one chunk per document);
      "mlm_nsp" ignores it (its runs of sentences never cross documents).
    loss_on_targets_only: decoder loss on targets only (full LM always has loss everywhere).
    packing_bins: rows filled at once by first-fit packing (default `batch_size`).
    drop_remainder: drop a last partial batch of a finite run.
    read_threads: grain threads reading and tokenizing documents.
  """
  lengths = features_lib.stream_lengths(architecture, seq_lengths)
  for name, value in (("batch_size", batch_size), ("shard_count", shard_count)):
    if value < 1:
      raise ValueError(f"{name}={value} is not positive")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is outside [0, shard_count={shard_count})")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} is not positive (None repeats forever)")
  special = tokenizer.special_ids
  if callable(objective):
    if chunk_length is None:
      raise ValueError("a callable objective needs chunk_length=")
    plan = ObjectivePlan(objective, chunk_length, eos_id=special.eos)
  else:
    plan = plan_objective(objective, architecture, lengths, special, **(objective_kwargs or {}))
    if chunk_length is not None:
      plan = dataclasses.replace(plan, chunk_length=chunk_length)
  if plan.chunk_length < 1:
    raise ValueError(f"chunk_length={plan.chunk_length} is not positive for seq_lengths="
                     f"{lengths}")

  random_access = hasattr(source, "__len__") and hasattr(source, "__getitem__")
  if random_access and len(source) == 0:
    raise ValueError(f"source={source!r} is empty")
  if plan.sentence_pairs and not random_access:
    raise ValueError(f"objective={objective!r} draws each NotNext sentence B from a random "
                     "document and needs a random-access source (__len__ and __getitem__); "
                     f"source={source!r} is only iterable (e.g. write it to text files and "
                     "use a text-file source)")
  if plan.sentence_pairs and len(source) < 2:
    raise ValueError(f"objective={objective!r} needs a source of at least 2 documents (NotNext "
                     f"draws B from another document); source={source!r} has {len(source)}")

  if random_access:
    # Indices rather than documents flow through grain, which would silently drop a None.
    ds = grain.MapDataset.range(len(source))[shard_index::shard_count]
    if shuffle:
      ds = ds.shuffle(seed=derive_seed(seed, 0))
    read = sentence_pairs.read_and_split if plan.sentence_pairs else _read_and_tokenize
    ds = ds.repeat(num_epochs).map(functools.partial(read, source=source, tokenizer=tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=4 * max(read_threads, 1)))
  else:
    it = StreamSource(source, shard_index, shard_count, num_epochs).map(
        functools.partial(_tokenize, tokenizer=tokenizer))
  # 2 x (documents per shard) unusable documents in a row contain a whole pass over the shard:
  # a wrong source (e.g. images), not bad luck, and it would otherwise spin forever.
  max_bad = 2 * -(-len(source) // shard_count) if hasattr(source, "__len__") else 10_000
  seed_objective = derive_seed(seed, 1, shard_index)
  if plan.sentence_pairs:
    it = sentence_pairs.SentenceRuns(it, plan.chunk_length, max(max_bad, 1))
    it = it.random_map(sentence_pairs.SentencePairsAndConvert(plan.fn, source, tokenizer,
                                                              special.pad),
                       seed=seed_objective)
  else:
    it = _Chunk(it, plan.chunk_length, concatenate, max(max_bad, 1))
    is_full_lm = objective == "full_lm"
    it = it.random_map(
        _ObjectiveAndConvert(plan, architecture, loss_on_targets_only and not is_full_lm,
                             special.pad),
        seed=seed_objective)
  it = _Pack(it, lengths, (packing_bins or batch_size) if packing else 1,
             None if packing else 1)
  it = it.batch(batch_size, drop_remainder=drop_remainder)
  return PipelineIterator(it, chunk_length=plan.chunk_length, lengths=lengths)
