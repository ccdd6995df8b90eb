"""Tokenizers: id layout, encode/decode round trips, SentencePiece training cache and loading."""

import io

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab import objectives
from seqlab.data import StdlibSource
from seqlab.data import tokenizers as T


# ----------------------------------------------------------------------------- bytes


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_byte_round_trip_arbitrary_unicode(text):
  tok = T.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == [b + 3 for b in text.encode("utf-8")]  # docs/design.md: byte b is b + 3
  assert tok.decode(ids) == text


def test_byte_id_layout():
  tok = T.ByteTokenizer()
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert (tok.mask_id, tok.cls_id, tok.sep_id, tok.nlu_id, tok.nlg_id, tok.s2s_id) == (
      259, 260, 261, 262, 263, 264)
  assert tok.vocab_size == 512 and tok.num_sentinels == 512 - 265
  assert tok.sentinel_ids[:3] == (511, 510, 509) and tok.sentinel_ids[-1] == 265
  small = T.ByteTokenizer(vocab_size=384, num_sentinels=100)
  assert small.sentinel_ids[0] == 383 and small.sentinel_ids[-1] == 284
  with pytest.raises(ValueError, match="vocab_size=300 is too small"):
    T.ByteTokenizer(vocab_size=300, num_sentinels=100)


def test_byte_decode_stops_at_eos_skips_pad_and_names_reserved_ids():
  tok = T.ByteTokenizer()
  h, i = ord("h") + 3, ord("i") + 3
  assert tok.decode([h, 0, i, 0]) == "hi"
  assert tok.decode([h, 1, i]) == "h"
  assert tok.decode([tok.nlu_id, h, tok.sentinel_ids[0], i, tok.sentinel_ids[1]]) == (
      "[NLU]h<extra_id_0>i<extra_id_1>")
  with pytest.raises(ValueError, match="outside \\[0, 512\\)"):
    tok.decode([h, 512])


def test_byte_special_ids_for_objectives():
  tok = T.ByteTokenizer()
  special = tok.special_ids
  assert isinstance(special, objectives.SpecialIds)
  assert (special.vocab_size, special.num_sentinels, special.mask, special.s2s) == (
      512, 247, 259, 264)
  np.testing.assert_array_equal(special.sentinel_ids, tok.sentinel_ids)
  # MLM's random replacements are exactly the 256 byte ids.
  np.testing.assert_array_equal(special.regular_ids, np.arange(3, 259))


# ----------------------------------------------------------------------------- sentencepiece


def _corpus():
  src = StdlibSource("train")
  return [src[src.paths.index(p)] for p in ("textwrap.py", "json/decoder.py", "json/encoder.py",
                                            "bisect.py", "colorsys.py")]


@pytest.fixture(scope="module")
def sp_setup(tmp_path_factory):
  cache = tmp_path_factory.mktemp("spm_cache")
  texts = _corpus()
  tok = T.train_sentencepiece(texts, vocab_size=400, num_sentinels=20, cache_dir=cache,
                              max_chars=60_000)
  return tok, texts, cache


def test_sentencepiece_layout(sp_setup):
  tok, _, _ = sp_setup
  assert tok.vocab_size == 400 and tok.sp_size == 380 and tok.num_sentinels == 20
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert [tok.reserved_ids[t] for t in T.RESERVED_TOKENS] == [3, 4, 5, 6, 7, 8]
  assert tok.sentinel_ids[0] == 399 and tok.sentinel_ids[-1] == 380
  special = tok.special_ids
  assert (special.mask, special.nlu, special.num_sentinels) == (3, 6, 20)
  # Control symbols never come out of text: a literal "[MASK]" stays text.
  ids = tok.encode("x = '[MASK]'")
  assert tok.mask_id not in ids.tolist() and tok.decode(ids) == "x = '[MASK]'"


def test_sentencepiece_round_trip_on_stdlib_text(sp_setup):
  tok, texts, _ = sp_setup
  held_out = StdlibSource("train")[0]  # __future__.py, not in the training texts
  for text in texts + [held_out, "def f(x):\n\tif x:\n        return 'é ✓ 𝄞'\n"]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.sp_size
    assert tok.decode(ids) == text
  # A trained vocabulary compresses code: fewer ids than bytes.
  assert len(tok.encode(texts[0])) < 0.8 * len(texts[0].encode())
  assert tok.decode(np.concatenate([tok.encode("ab"), [tok.eos_id], tok.encode("cd")])) == "ab"


def test_sentencepiece_cache_hit_skips_training(sp_setup, monkeypatch):
  tok, texts, cache = sp_setup

  def no_training(**kwargs):
    raise AssertionError("trained again despite a cached model")

  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
  again = T.train_sentencepiece(texts, vocab_size=400, num_sentinels=20, cache_dir=cache,
                                max_chars=60_000)
  assert again.model_proto == tok.model_proto
  by_name = T.get_tokenizer("sentencepiece", corpus=texts, vocab_size=400, num_sentinels=20,
                            cache_dir=cache, max_chars=60_000)
  assert by_name.model_proto == tok.model_proto
  with pytest.raises(AssertionError, match="trained again"):  # other settings, other key
    T.train_sentencepiece(texts, vocab_size=410, num_sentinels=20, cache_dir=cache,
                          max_chars=60_000)
  with pytest.raises(AssertionError, match="trained again"):  # other corpus, other key
    T.train_sentencepiece(texts[:4], vocab_size=400, num_sentinels=20, cache_dir=cache,
                          max_chars=60_000)


def test_sentencepiece_load_model_file(sp_setup, tmp_path):
  tok, texts, _ = sp_setup
  path = tmp_path / "my.model"
  tok.save(path)
  loaded = T.get_tokenizer("sentencepiece", model=str(path), num_sentinels=20)
  np.testing.assert_array_equal(loaded.encode(texts[1]), tok.encode(texts[1]))
  assert loaded.vocab_size == tok.vocab_size
  with pytest.raises(ValueError, match="is not a file"):
    T.SentencePieceTokenizer(tmp_path / "missing.model")


def _raw_model(**kwargs):
  writer = io.BytesIO()
  text = "\n".join(_corpus()[:2]).splitlines()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=writer,
                                 vocab_size=150, minloglevel=2, num_threads=1, **kwargs)
  return writer.getvalue()


def test_foreign_model_gets_reserved_ids_appended():
  tok = T.SentencePieceTokenizer(_raw_model(pad_id=0, eos_id=1, unk_id=2, bos_id=-1),
                                 num_sentinels=10)
  assert tok.sp_size == 150
  assert [tok.reserved_ids[t] for t in T.RESERVED_TOKENS] == list(range(150, 156))
  assert tok.vocab_size == 166 and tok.sentinel_ids[0] == 165
  assert tok.special_ids.mask == 150
  with pytest.raises(ValueError, match=r"\(pad, eos, unk\) ids \(-1, 2, 0\)"):
    T.SentencePieceTokenizer(_raw_model(unk_id=0, bos_id=1, eos_id=2))


def test_train_sentencepiece_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=300 with num_sentinels=100"):
    T.train_sentencepiece(["abc"], vocab_size=300, num_sentinels=100, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="texts is empty"):
    T.train_sentencepiece([], vocab_size=400, num_sentinels=20, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="tokenizer name='gpt2'"):
    T.get_tokenizer("gpt2")
