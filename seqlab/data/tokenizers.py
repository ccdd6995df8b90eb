"""Tokenizers: byte-level (no training), SentencePiece trained offline and cached, or loaded.

Both share one interface:

* `encode(text) -> int32[N]` — never adds eos (the pipeline appends eos per document);
* `decode(ids) -> str` — stops at the first eos, skips pad, renders reserved ids by name
  (`[MASK]`, `[NLU]`, ...) and sentinel i as `<extra_id_i>` (T5's spelling);
* `vocab_size`, the reserved ids (`pad_id`, `eos_id`, `unk_id`, `mask_id`, `cls_id`, `sep_id`,
  `nlu_id`, `nlg_id`, `s2s_id`, `sentinel_ids`) and `special_ids` (the objectives' `SpecialIds`).

Id layout (docs/design.md): pad = 0, eos = 1, unk = 2; sentinel i = vocab_size - 1 - i.

Byte tokenizer: byte b is id b + 3 (3..258); [MASK] 259, [CLS] 260, [SEP] 261, [NLU] 262,
[NLG] 263, [S2S] 264. Default vocab_size = 512 (a multiple of 128) with every id above the
reserved block a sentinel: 247 sentinels, enough for UL2's densest X-denoiser
(mean span 3, rate 0.5) at 512 input tokens, which needs 128.

SentencePiece: pad/eos/unk at 0/1/2 and the six reserved tokens as *control symbols* at ids
3..8 (control symbols are never produced from text, so a literal "[MASK]" in a document stays
text); "\\n" is a user-defined symbol so code keeps its line breaks. The sentencepiece model
has `vocab_size - num_sentinels` pieces and the sentinels sit above it, as T5's extra ids do.
A foreign `.model` (e.g. T5's) that lacks the reserved tokens gets them appended above its
pieces, below the sentinels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
RESERVED_TOKENS = ("[MASK]", "[CLS]", "[SEP]", "[NLU]", "[NLG]", "[S2S]")
NUM_BYTE_IDS = 256
BYTE_OFFSET = 3


class _Tokenizer:
  """Shared decode logic and the reserved-id accessors; subclasses fill in the ids."""

  vocab_size: int
  num_sentinels: int
  reserved_ids: dict[str, int]  # "[MASK]" -> id, ...

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  mask_id = property(lambda self: self.reserved_ids["[MASK]"])
  cls_id = property(lambda self: self.reserved_ids["[CLS]"])
  sep_id = property(lambda self: self.reserved_ids["[SEP]"])
  nlu_id = property(lambda self: self.reserved_ids["[NLU]"])
  nlg_id = property(lambda self: self.reserved_ids["[NLG]"])
  s2s_id = property(lambda self: self.reserved_ids["[S2S]"])

  @property
  def sentinel_ids(self) -> tuple[int, ...]:
    """Sentinel i is `vocab_size - 1 - i`, for i < num_sentinels."""
    return tuple(self.vocab_size - 1 - i for i in range(self.num_sentinels))

  @property
  def special_ids(self):
    """The objectives' `SpecialIds` (every reserved id passed explicitly)."""
    from seqlab.objectives import SpecialIds  # pylint: disable=g-import-not-at-top
    return SpecialIds(
        vocab_size=self.vocab_size, pad=self.pad_id, eos=self.eos_id, unk=self.unk_id,
        mask=self.mask_id, cls=self.cls_id, sep=self.sep_id, nlu=self.nlu_id,
        nlg=self.nlg_id, s2s=self.s2s_id, num_sentinels=self.num_sentinels)

  def _check_ids(self, ids: Any) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"ids has shape {ids.shape}; decode takes a 1-D sequence")
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= self.vocab_size)
    if bad.any():
      raise ValueError(f"ids contains {int(ids[bad][0])}, outside [0, {self.vocab_size})")
    return ids

  def _render_special(self, i: int) -> str | None:
    """Text for a reserved id or sentinel; None for an ordinary id."""
    if i == UNK_ID:
      return "\ufffd"
    sentinel = self.vocab_size - 1 - i
    if 0 <= sentinel < self.num_sentinels:
      return f"<extra_id_{sentinel}>"
    return self._id_to_reserved.get(i)

  @property
  def _id_to_reserved(self) -> dict[int, str]:
    return {v: k for k, v in self.reserved_ids.items()}

  def _decode_run(self, run: list[int]) -> str:
    raise NotImplementedError

  def decode(self, ids: Any) -> str:
    """ids int[N] -> text: stops at the first eos, skips pad, names reserved ids."""
    ids = self._check_ids(ids)
    out, run = [], []
    for i in ids.tolist():
      if i == EOS_ID:
        break
      if i == PAD_ID:
        continue
      special = self._render_special(i)
      if special is None:
        run.append(i)
        continue
      if run:
        out.append(self._decode_run(run))
        run = []
      out.append(special)
    if run:
      out.append(self._decode_run(run))
    return "".join(out)


class ByteTokenizer(_Tokenizer):
  """UTF-8 bytes as ids: byte b -> b + 3; reserved ids 259..264; sentinels from the top.

  `num_sentinels=None` makes every id above 264 a sentinel. The constructor refuses a
  vocabulary that cannot hold the 265 fixed ids plus the sentinels.
  """

  def __init__(self, vocab_size: int = 512, num_sentinels: int | None = None):
    first_free = BYTE_OFFSET + NUM_BYTE_IDS + len(RESERVED_TOKENS)  # 265
    if num_sentinels is None:
      num_sentinels = vocab_size - first_free
    if num_sentinels < 0:
      raise ValueError(f"num_sentinels={num_sentinels} is negative")
    if vocab_size < first_free + num_sentinels:
      raise ValueError(
          f"vocab_size={vocab_size} is too small: the byte tokenizer needs {first_free} fixed "
          f"ids plus num_sentinels={num_sentinels}")
    self.vocab_size = vocab_size
    self.num_sentinels = num_sentinels
    self.reserved_ids = {t: BYTE_OFFSET + NUM_BYTE_IDS + k for k, t in enumerate(RESERVED_TOKENS)}

  def encode(self, text: str) -> np.ndarray:
    """text -> int32[len(text.encode("utf-8"))], byte b as b + 3; no eos."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET

  def _decode_run(self, run: list[int]) -> str:
    # Ids in the unused gap between the reserved block and the sentinels decode as U+FFFD.
    data = bytes(i - BYTE_OFFSET if i < BYTE_OFFSET + NUM_BYTE_IDS else 0xFF for i in run)
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"ByteTokenizer(vocab_size={self.vocab_size}, num_sentinels={self.num_sentinels})"


class SentencePieceTokenizer(_Tokenizer):
  """A SentencePiece model plus `num_sentinels` sentinel ids above its pieces.

  `model` is a path to a `.model` file or its serialized bytes. The model must put pad, eos
  and unk at 0, 1, 2. Reserved tokens missing from the model are appended above its pieces.
  """

  def __init__(self, model: str | os.PathLike | bytes, *, num_sentinels: int = 100):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if isinstance(model, bytes):
      proto = model
    else:
      path = pathlib.Path(model)
      if not path.is_file():
        raise ValueError(f"model={str(model)!r} is not a file")
      proto = path.read_bytes()
    if num_sentinels < 0:
      raise ValueError(f"num_sentinels={num_sentinels} is negative")
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.model_proto = proto
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f"model has (pad, eos, unk) ids {got}; seqlab needs (0, 1, 2)")
    self.sp_size = self._sp.get_piece_size()
    self.reserved_ids = {}
    next_id = self.sp_size
    for t in RESERVED_TOKENS:
      i = self._sp.piece_to_id(t)
      if i == UNK_ID or not self._sp.is_control(i):
        i, next_id = next_id, next_id + 1
      self.reserved_ids[t] = i
    self.num_sentinels = num_sentinels
    self.vocab_size = next_id + num_sentinels

  def encode(self, text: str) -> np.ndarray:
    """text -> int32[N] piece ids; no eos."""
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def _decode_run(self, run: list[int]) -> str:
    run = [i if i < self.sp_size else UNK_ID for i in run]
    return self._sp.decode(run)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the sentencepiece `.model` (the sentinels are a constructor argument)."""
    pathlib.Path(path).write_bytes(self.model_proto)

  def __repr__(self) -> str:
    return (f"SentencePieceTokenizer(sp_size={self.sp_size}, num_sentinels={self.num_sentinels}"
            f", vocab_size={self.vocab_size})")


def default_cache_dir() -> pathlib.Path:
  """`$SEQLAB_CACHE_DIR`, else `~/.cache/seqlab`."""
  return pathlib.Path(os.environ.get("SEQLAB_CACHE_DIR",
                                     pathlib.Path("~/.cache/seqlab").expanduser()))


def _training_sentences(texts: Iterable[str], max_chars: int | None,
                        chunk_chars: int) -> Iterator[str]:
  """Documents cut at line breaks into pieces of about `chunk_chars`, up to `max_chars` total.

  SentencePiece skips over-long "sentences", so documents are fed as groups of lines.
  """
  total = 0
  for text in texts:
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
      line = line[:chunk_chars]
      if size + len(line) > chunk_chars and buf:
        yield "".join(buf)
        buf, size = [], 0
      buf.append(line)
      size += len(line)
      total += len(line)
      if max_chars is not None and total >= max_chars:
        yield "".join(buf)
        return
    if buf:
      yield "".join(buf)


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int = 8192,
                        num_sentinels: int = 100, model_type: str = "unigram",
                        byte_fallback: bool = True, max_chars: int | None = 20_000_000,
                        cache_dir: str | os.PathLike | None = None,
                        num_threads: int = 1) -> SentencePieceTokenizer:
  """Trains (or loads from the cache) a SentencePiece tokenizer on `texts`.

  `texts` must be re-iterable (a list or a random-access source such as `StdlibSource`):
  it is read once to hash the corpus and, on a cache miss, once more to train. Only the first
  `max_chars` characters take part (the hash covers exactly those). The model is cached under
  `cache_dir` (default `default_cache_dir()`) as `spm-<hash>.model`, the hash being sha256 of
  the training text and every setting, so a second call with the same corpus and settings
  loads instead of training. Normalization is the identity and whitespace is kept, so code
  round-trips; `byte_fallback` maps characters unseen in training to byte pieces instead of
  unk (it needs 256 pieces of the vocabulary).
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if model_type not in ("unigram", "bpe", "char", "word"):
    raise ValueError(f"model_type={model_type!r} is not unigram, bpe, char or word")
  sp_vocab_size = vocab_size - num_sentinels
  minimum = 3 + len(RESERVED_TOKENS) + 1 + (NUM_BYTE_IDS if byte_fallback else 0) + 16
  if num_sentinels < 0 or sp_vocab_size < minimum:
    raise ValueError(
        f"vocab_size={vocab_size} with num_sentinels={num_sentinels} leaves {sp_vocab_size} "
        f"sentencepiece ids; at least {minimum} are needed (byte_fallback={byte_fallback})")
  chunk_chars = 2048
  settings = dict(
      vocab_size=sp_vocab_size, model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID,
      unk_id=UNK_ID, bos_id=-1, control_symbols=list(RESERVED_TOKENS),
      user_defined_symbols=["\n"], normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, split_by_whitespace=False,
      allow_whitespace_only_pieces=True, character_coverage=1.0, byte_fallback=byte_fallback,
      max_sentence_length=4 * chunk_chars + 16)
  if model_type in ("char", "word"):
    settings.pop("split_by_whitespace")
  digest = hashlib.sha256(json.dumps(
      dict(settings, max_chars=max_chars, chunk_chars=chunk_chars,
           sentencepiece=spm.__version__), sort_keys=True).encode())
  num_sentences = 0
  for sentence in _training_sentences(texts, max_chars, chunk_chars):
    digest.update(hashlib.sha256(sentence.encode("utf-8", "surrogatepass")).digest())
    num_sentences += 1
  if num_sentences == 0:
    raise ValueError("texts is empty: nothing to train sentencepiece on")
  cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  path = cache / f"spm-{digest.hexdigest()[:32]}.model"
  if not path.is_file():
    writer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_training_sentences(texts, max_chars, chunk_chars),
          model_writer=writer, num_threads=num_threads, minloglevel=2, **settings)
    except RuntimeError as e:
      raise ValueError(f"sentencepiece training with vocab_size={vocab_size} failed: {e}") from e
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(writer.getvalue())
    os.replace(tmp, path)  # atomic: concurrent trainers never see a partial file
  return SentencePieceTokenizer(path, num_sentinels=num_sentinels)


def get_tokenizer(name: str, **kwargs: Any) -> _Tokenizer:
  """A tokenizer by name.

  "byte": `ByteTokenizer(**kwargs)`. "sentencepiece": `SentencePieceTokenizer(**kwargs)` when
  `model=` (a `.model` path) is given; otherwise `train_sentencepiece` on `corpus` (a source
  name for `sources.get_source`, default "stdlib" -- its train split --, or a list of texts)
  with `corpus_kwargs` and the remaining kwargs, trained once and then loaded from the cache.
  """
  if name == "byte":
    return ByteTokenizer(**kwargs)
  if name == "sentencepiece":
    if "model" in kwargs:
      return SentencePieceTokenizer(**kwargs)
    corpus = kwargs.pop("corpus", "stdlib")
    corpus_kwargs = dict(kwargs.pop("corpus_kwargs", None) or {})
    if isinstance(corpus, str):
      from seqlab.data import sources  # pylint: disable=g-import-not-at-top
      corpus = sources.get_source(corpus, **corpus_kwargs)
    return train_sentencepiece(corpus, **kwargs)
  raise ValueError(f"tokenizer name={name!r} is not 'byte' or 'sentencepiece'")


Tokenizer = _Tokenizer  # the public name of the shared interface
