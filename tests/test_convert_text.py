"""Hugging Face PyTorch parity: GPT-2, BERT, T5 v1.0 / v1.1 converted into seqlab models, and
exported back bit for bit. Llama / Mistral: test_convert_llama.py."""

import contextlib
import dataclasses
import warnings
from unittest import mock

import jax
import numpy as np
import pytest
import torch
import transformers

from seqlab import attention_kernels, convert
from seqlab.convert import text

TOL = 1e-4


@pytest.fixture(autouse=True)
def _seed():
  torch.manual_seed(0)


def _logits_jit(model):
  return jax.jit(model.apply)


def _causal_chunk_rows(rows):
  """Context: causal self-attention splits its queries into chunks of about `rows`."""
  if rows is None:
    return contextlib.nullcontext()
  return mock.patch.object(attention_kernels, "_CAUSAL_CHUNK_ROWS", rows)


# ---------------------------------------------------------------------------------------------
# GPT-2.
# ---------------------------------------------------------------------------------------------


def _hf_gpt2():
  config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_head=4, n_layer=2, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)
  return transformers.GPT2LMHeadModel(config).eval()


def _gpt2_tokens():
  return np.random.RandomState(0).randint(0, 50, size=(2, 12))


@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["default", "causal-chunks"])
def test_gpt2_logits_match_hugging_face(chunk_rows):
  """chunk_rows=4 puts the 12 causal queries in 3 chunks (`attention_kernels._causal_chunks`)."""
  hf = _hf_gpt2()
  config = text.gpt2_config_from_hf(hf.config, dropout_rate=0.0)
  params = text.gpt2_from_hf(hf.state_dict(), config)
  tokens = _gpt2_tokens()
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  with _causal_chunk_rows(chunk_rows):
    logits = _logits_jit(config.build())({"params": params}, {"decoder_input_tokens": tokens})
  np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


def test_scanned_gpt2_matches_hugging_face_and_exports_the_same_state_dict():
  hf = _hf_gpt2()
  config = text.gpt2_config_from_hf(hf.config, dropout_rate=0.0, scan_layers=True,
                                    remat="full")
  params = text.gpt2_from_hf(hf.state_dict(), config)
  assert params["blocks"]["mlp"]["wi"]["kernel"].shape == (2, 32, 128)  # layers stacked
  tokens = _gpt2_tokens()
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  logits = _logits_jit(config.build())({"params": params}, {"decoder_input_tokens": tokens})
  np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)
  exported = text.gpt2_to_hf(params, config)
  for name, value in hf.state_dict().items():
    torch.testing.assert_close(exported[name], value, rtol=0, atol=0)


def test_gpt2_export_round_trips(tmp_path):
  hf = _hf_gpt2()
  state_dict = hf.state_dict()
  config = text.gpt2_config_from_hf(hf.config)
  params = text.gpt2_from_hf(state_dict, config)
  exported = text.gpt2_to_hf(params, config)
  assert set(exported) == set(state_dict)
  for name, value in state_dict.items():
    torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
  # The exported dict loads strictly into a fresh model, which then computes the same logits.
  fresh = transformers.GPT2LMHeadModel(hf.config).eval()
  fresh.load_state_dict(exported, strict=True)
  tokens = torch.tensor(_gpt2_tokens())
  with torch.no_grad():
    torch.testing.assert_close(fresh(tokens).logits, hf(tokens).logits, rtol=0, atol=0)
  # The same checkpoint read from a safetensors file (as saved by save_pretrained).
  from safetensors.torch import save_file
  path = tmp_path / "model.safetensors"
  save_file({k: v.clone().contiguous() for k, v in state_dict.items()}, str(path))
  from_file = text.gpt2_from_hf(path, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_file, params)
  # Re-exported through the package entry point, as NumPy.
  np.testing.assert_array_equal(convert.gpt2_to_hf(from_file, config, return_tensors="np")
                                ["transformer.wte.weight"], state_dict["transformer.wte.weight"])


# ---------------------------------------------------------------------------------------------
# BERT.
# ---------------------------------------------------------------------------------------------


def _bert_config():
  return transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=16)


def _bert_batch():
  rng = np.random.RandomState(1)
  tokens = rng.randint(1, 50, size=(2, 10))
  tokens[1, 7:] = 0  # [PAD]
  types = np.zeros((2, 10), np.int64)
  types[:, 5:] = 1
  return tokens, types


def test_bert_pretraining_heads_match_hugging_face():
  hf = transformers.BertForPreTraining(_bert_config()).eval()
  config = text.bert_config_from_hf(hf.config, dropout_rate=0.0)
  assert config.pretraining_heads
  params = text.bert_from_hf(hf.state_dict(), config)
  tokens, types = _bert_batch()
  valid = tokens != 0
  with torch.no_grad():
    expected = hf(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                  token_type_ids=torch.tensor(types), output_hidden_states=True)
  out = _logits_jit(config.build())({"params": params}, {"encoder_input_tokens": tokens,
                                                         "token_type_ids": types})
  # Padding positions are not compared: seqlab zeroes their attention, BERT attends from them.
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid],
                             expected.hidden_states[-1].numpy()[valid], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["mlm_logits"])[valid],
                             expected.prediction_logits.numpy()[valid], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["nsp_logits"][:, 0], expected.seq_relationship_logits.numpy(),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bert_model_without_heads_matches_hugging_face(scan_layers):
  hf = transformers.BertModel(_bert_config()).eval()
  config = text.bert_config_from_hf(hf.config, pretraining_heads=False, dropout_rate=0.0,
                                    scan_layers=scan_layers)
  params = text.bert_from_hf(hf.state_dict(), config)  # no "bert." prefix, no cls.* keys
  assert ("blocks" in params) == scan_layers
  tokens, types = _bert_batch()
  with torch.no_grad():
    expected = hf(torch.tensor(tokens[:1]), token_type_ids=torch.tensor(types[:1]))
  out = _logits_jit(config.build())({"params": params}, {"encoder_input_tokens": tokens[:1],
                                                         "token_type_ids": types[:1]})
  np.testing.assert_allclose(out["hidden"], expected.last_hidden_state.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(out["pooled"][:, 0], expected.pooler_output.numpy(), atol=TOL,
                             rtol=0)


def _assert_same_state_dict(exported: dict, original: dict) -> None:
  assert set(exported) == set(original)
  for name, value in original.items():
    torch.testing.assert_close(exported[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("architecture, scan_layers", [
    ("BertForPreTraining", True), ("BertModel", False), ("BertForMaskedLM", True)])
def test_bert_export_round_trips(architecture, scan_layers):
  hf = getattr(transformers, architecture)(_bert_config())
  config = text.bert_config_from_hf(hf.config, pretraining_heads=architecture != "BertModel",
                                    scan_layers=scan_layers)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # BertForMaskedLM: the pooler / NSP head are filled in
    params = text.bert_from_hf(hf.state_dict(), config)
  exported = convert.bert_to_hf(params, config, architecture=architecture)
  _assert_same_state_dict(exported, hf.state_dict())
  getattr(transformers, architecture)(hf.config).load_state_dict(exported, strict=True)


def test_bert_for_masked_lm_imports_with_a_fresh_pooler_and_nsp_head():
  hf = transformers.BertForMaskedLM(_bert_config()).eval()
  config = text.bert_config_from_hf(hf.config, dropout_rate=0.0)
  with pytest.warns(UserWarning, match=r"pooler\.dense.*cls\.seq_relationship"):
    params = text.bert_from_hf(hf.state_dict(), config)
  # Hugging Face's init of missing weights: normal(0, initializer_range), zero bias; seeded.
  kernel = np.asarray(params["pooler"]["kernel"])
  assert 0.015 < kernel.std() < 0.025 and not np.asarray(params["nsp"]["bias"]).any()
  with pytest.warns(UserWarning):
    again = text.bert_from_hf(hf.state_dict(), config)
  np.testing.assert_array_equal(again["nsp"]["kernel"], params["nsp"]["kernel"])
  tokens, types = _bert_batch()
  valid = tokens != 0
  with torch.no_grad():
    expected = hf(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                  token_type_ids=torch.tensor(types)).logits.numpy()
  out = _logits_jit(config.build())({"params": params}, {"encoder_input_tokens": tokens,
                                                         "token_type_ids": types})
  np.testing.assert_allclose(np.asarray(out["mlm_logits"])[valid], expected[valid], atol=TOL,
                             rtol=0)


def test_roberta_checkpoints_are_refused():
  roberta_config = transformers.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=4, intermediate_size=64,
                                              max_position_embeddings=18)
  with pytest.raises(ValueError, match="model_type='roberta'"):
    text.bert_config_from_hf(roberta_config)
  with pytest.raises(ValueError, match="model_type='roberta'"):
    text.bert_config_from_hf(roberta_config.to_dict())
  state_dict = transformers.RobertaForMaskedLM(roberta_config).state_dict()
  config = text.bert_config_from_hf(_bert_config(), num_layers=1, max_length=18,
                                    type_vocab_size=1)
  with pytest.raises(ValueError, match="RoBERTa checkpoint"):
    text.bert_from_hf(state_dict, config)


# ---------------------------------------------------------------------------------------------
# T5.
# ---------------------------------------------------------------------------------------------


def _hf_t5(version):
  v1_1 = version == "v1.1"
  config = transformers.T5Config(
      vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu" if v1_1 else "relu", tie_word_embeddings=not v1_1,
      dropout_rate=0.0, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if v1_1:
    # transformers 5 ties lm_head to the embedding even for v1.1; give it its own weights,
    # as in the released v1.1 checkpoints (the forward pass already skips the d^-0.5 rescale).
    model.lm_head.weight = torch.nn.Parameter(torch.randn(50, 32))
  return model


@pytest.mark.parametrize("version, chunk_rows, scan_layers", [
    ("v1.0", None, False), ("v1.0", 5, False), ("v1.1", None, False), ("v1.1", 5, False),
    ("v1.1", None, True)])
def test_t5_logits_match_hugging_face(version, chunk_rows, scan_layers):
  hf = _hf_t5(version)
  config = text.t5_config_from_hf(hf.config, scan_layers=scan_layers)
  assert config.tie_embeddings == (version == "v1.0")
  assert config.activation == ("gated_gelu" if version == "v1.1" else "relu")
  params = text.t5_from_hf(hf.state_dict(), config)
  rng = np.random.RandomState(2)
  # Lengths beyond max_distance exercise the logarithmic buckets; row 1 is padded.
  encoder_tokens = rng.randint(1, 50, size=(2, 20))
  encoder_tokens[1, 14:] = 0
  decoder_tokens = rng.randint(1, 50, size=(2, 18))
  decoder_tokens[:, 0] = 0  # start id
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(encoder_tokens),
                  attention_mask=torch.tensor((encoder_tokens != 0).astype(np.int64)),
                  decoder_input_ids=torch.tensor(decoder_tokens)).logits.numpy()
  with _causal_chunk_rows(chunk_rows):  # 5: the 18 decoder queries in 3 chunks of 6
    logits = _logits_jit(config.build())({"params": params}, {
        "encoder_input_tokens": encoder_tokens, "decoder_input_tokens": decoder_tokens})
  np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_t5_export_round_trips(version):
  hf = _hf_t5(version)
  config = text.t5_config_from_hf(hf.config, scan_layers=True)
  exported = convert.t5_to_hf(text.t5_from_hf(hf.state_dict(), config), config)
  _assert_same_state_dict(exported, hf.state_dict())
  if version == "v1.1":  # the untied head is exported as itself, not as the embedding
    assert not torch.equal(exported["lm_head.weight"], exported["shared.weight"])
  transformers.T5ForConditionalGeneration(hf.config).load_state_dict(exported, strict=True)


def test_t5_config_from_a_config_dict():
  as_dict = {"vocab_size": 50, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
             "num_heads": 4, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
  config = text.t5_config_from_hf(as_dict)
  assert (config.num_decoder_layers, config.tie_embeddings, config.rescale_tied_logits,
          config.activation, config.relative_num_buckets) == (2, False, False, "gated_gelu", 32)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def test_mismatched_or_incomplete_state_dicts_raise():
  hf = _hf_gpt2()
  state_dict = hf.state_dict()
  config = text.gpt2_config_from_hf(hf.config)
  with pytest.raises(ValueError, match="has no 'transformer.h.1.ln_2.weight'"):
    text.gpt2_from_hf({k: v for k, v in state_dict.items() if k != "transformer.h.1.ln_2.weight"},
                      config)
  with pytest.raises(ValueError, match="unexpected keys .*transformer.h.2.ln_1.weight"):
    text.gpt2_from_hf({**state_dict, "transformer.h.2.ln_1.weight": torch.ones(32)}, config)
  with pytest.raises(ValueError, match="shape .* but the config needs"):
    text.gpt2_from_hf(state_dict, dataclasses.replace(config, vocab_size=60))
  with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
    text.gpt2_from_hf(state_dict, dataclasses.replace(config, num_kv_heads=2))
  with pytest.raises(ValueError, match="config must be an EncoderDecoderConfig"):
    text.t5_from_hf(state_dict, config)
  with pytest.raises(ValueError, match="does not exist"):
    text.gpt2_from_hf("no/such/model.safetensors", config)
