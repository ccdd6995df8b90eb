"""Hugging Face parity for Llama / Mistral: logits < 1e-4, bitwise export, refused configs."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from seqlab import convert  # noqa: E402
from seqlab.convert import text  # noqa: E402

TOL = 1e-4
TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def randomise(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
  """O(1) random weights (HF's init is near zero), so a wrong mapping shows in the logits."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
  return model.eval()


def _tokens():
  return np.random.RandomState(0).randint(0, 50, size=(2, 12))


def _check_logits_and_round_trip(hf, config):
  params = text.llama_from_hf(hf.state_dict(), config)
  tokens = _tokens()
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  assert expected.std() > 0.5
  logits = jax.jit(config.build().apply)({"params": params}, {"decoder_input_tokens": tokens})
  np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)
  exported = convert.llama_to_hf(params, config)
  assert set(exported) == set(hf.state_dict())
  for name, value in hf.state_dict().items():
    torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
  type(hf)(hf.config).load_state_dict(exported, strict=True)


def test_llama_gqa_untied_matches_hugging_face_and_round_trips():
  # rope_theta=500 turns every feature pair by a large angle within 12 positions, so a wrong
  # pairing (interleaved vs half-split) would show; 4 query heads share 2 kv heads.
  hf = randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=500.0,
                                                                        **TINY)))
  config = text.llama_config_from_hf(hf.config)
  assert (config.num_kv_heads, config.rope_base, config.tie_embeddings) == (2, 500.0, False)
  _check_logits_and_round_trip(hf, config)


def test_mistral_tied_scanned_matches_hugging_face_and_round_trips():
  hf_config = transformers.MistralConfig(sliding_window=None, tie_word_embeddings=True, **TINY)
  hf = randomise(transformers.MistralForCausalLM(hf_config), seed=1)
  config = text.llama_config_from_hf(hf_config.to_dict(), scan_layers=True)
  assert config.tie_embeddings and config.scan_layers
  _check_logits_and_round_trip(hf, config)


@pytest.mark.parametrize("hf_config, field", [
    (transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                               "rope_theta": 1e4}, **TINY), "rope_parameters"),
    ({"model_type": "llama", "rope_theta": 1e4, "rope_scaling": {"type": "dynamic",
                                                                "factor": 2.0}, **TINY},
     "rope_scaling"),  # transformers 4's dict layout
    (transformers.LlamaConfig(attention_bias=True, **TINY), "attention_bias"),
    (transformers.LlamaConfig(mlp_bias=True, **TINY), "mlp_bias"),
    (transformers.LlamaConfig(hidden_act="gelu", **TINY), "hidden_act"),
    (transformers.MistralConfig(**TINY), "sliding_window"),  # 4096 by default
    ({"model_type": "qwen2"}, "model_type"),
])
def test_configs_seqlab_cannot_express_are_refused_naming_the_field(hf_config, field):
  with pytest.raises(ValueError, match=field):
    text.llama_config_from_hf(hf_config)


def test_llama_state_dict_errors():
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
  config = text.llama_config_from_hf(hf.config)
  state_dict = hf.state_dict()
  with pytest.raises(ValueError, match="has no 'model.layers.1.mlp.up_proj.weight'"):
    text.llama_from_hf({k: v for k, v in state_dict.items()
                        if k != "model.layers.1.mlp.up_proj.weight"}, config)
  with pytest.raises(ValueError, match="key.*shape"):  # kv heads are part of the shape
    text.llama_from_hf(state_dict, text.llama_config_from_hf(hf.config, num_kv_heads=4))
  with pytest.raises(ValueError, match="RoPE, RMSNorm, SwiGLU"):
    text.llama_from_hf(state_dict, text.gpt2_config_from_hf(transformers.GPT2Config()))


def test_rope_theta_is_read_from_either_config_layout():
  # transformers >= 5 keeps it in rope_parameters, transformers 4 as a field of its own.
  assert text.llama_config_from_hf(transformers.LlamaConfig(rope_theta=123.0, **TINY)
                                   ).rope_base == 123.0
  assert text.llama_config_from_hf({"model_type": "llama", "rope_theta": 321.0,
                                    "rope_scaling": None, **TINY}).rope_base == 321.0
