"""`seqlab.decoding.generate` vs Hugging Face `generate` on tiny random GPT-2 and T5 models
converted with `seqlab.convert`: the same tokens, and beam scores within 1e-4 of HF's
`sequences_scores`, for beam search (every `early_stopping` mode, several length penalties)
and each decoding option.

Each test compiles one seqlab loop and varies only traced knobs (length_penalty,
early_stopping, eos ids, min_new_tokens, repetition_penalty's value, decoder_start_id), so the
cases reuse it. Hugging Face runs every prompt alone (no padding); seqlab decodes them as one
left-padded batch.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import torch
import transformers

from seqlab import decoding
from seqlab.convert import text

EOS = 7
SCORE_TOL = 1e-4
PROMPTS = [np.array([0, 5, 9, 13, 2]), np.array([11, 3, 3]), np.array([3, 8, 4, 20])]


def _gpt2():
  """A random GPT-2 whose logits are spread (argmax is rarely a near-tie), whose blocks matter
  (greedy does not just repeat a token) and which favours eos (p ~ 0.1)."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_head=4, n_layer=2, n_positions=32,
                                   bos_token_id=EOS, eos_token_id=EOS)
  hf = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for name, weight in hf.named_parameters():
      if name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
        weight.normal_(0.0, 0.5)
    wte = hf.transformer.wte.weight  # tied: also the LM head
    wte.mul_(20.0)
    bias = torch.randn(32)
    hf.transformer.ln_f.bias.copy_(bias)  # every final hidden state leans along `bias` ...
    wte[EOS] += 0.03 * bias  # ... so eos gains about 1 nat everywhere
  config = text.gpt2_config_from_hf(hf.config, dropout_rate=0.0)
  return hf, config.build(), text.gpt2_from_hf(hf.state_dict(), config)


def _t5():
  """A random T5 v1.1 (untied head) whose head row for eos leans along the mean final state."""
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      decoder_start_token_id=0)
  hf = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    hf.lm_head.weight = torch.nn.Parameter(0.5 * torch.randn(50, 32))
    sources = torch.randint(1, 50, (8, 10))
    targets = torch.randint(1, 50, (8, 12))
    targets[:, 0] = 0
    final = hf(input_ids=sources, decoder_input_ids=targets,
               output_hidden_states=True).decoder_hidden_states[-1]
    mean = final.mean((0, 1))
    hf.lm_head.weight[EOS] += 2.0 * mean / mean.norm()
  config = text.t5_config_from_hf(hf.config, dropout_rate=0.0)
  return hf, config.build(), text.t5_from_hf(hf.state_dict(), config)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """Tiny torch ops on threads that compete with other processes run ~30x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2():
  return _gpt2()


@pytest.fixture(scope="module")
def t5():
  return _t5()


def hf_generate(hf, prompt, *, max_new_tokens, eos_id=EOS, strategy="greedy", prompt_valid=None,
                decoder_start_id=0, **options):
  """Hugging Face `generate` on one prompt, in seqlab's output convention:
  (tokens [n, max_new_tokens] cut after the first eos and padded with 0, scores [n] or None)."""
  eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
  kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                pad_token_id=eos_ids[0], return_dict_in_generate=True, output_scores=True)
  for name, hf_name in (("num_beams", "num_beams"), ("length_penalty", "length_penalty"),
                        ("early_stopping", "early_stopping"),
                        ("num_return_sequences", "num_return_sequences"),
                        ("repetition_penalty", "repetition_penalty"),
                        ("no_repeat_ngram_size", "no_repeat_ngram_size"),
                        ("min_new_tokens", "min_new_tokens")):
    if name in options:
      kwargs[hf_name] = options[name]
  if strategy == "greedy":
    kwargs["num_beams"] = 1
  tokens = np.asarray(prompt if prompt_valid is None else prompt[prompt_valid])[None]
  encoder_decoder = hf.config.is_encoder_decoder
  if encoder_decoder:
    kwargs["decoder_start_token_id"] = decoder_start_id
  with torch.no_grad():
    out = hf.generate(torch.tensor(tokens), attention_mask=torch.ones_like(torch.tensor(tokens)),
                      **kwargs)
  generated = out.sequences.numpy()[:, 1 if encoder_decoder else tokens.shape[1]:]
  rows = np.zeros((generated.shape[0], max_new_tokens), np.int64)
  for row, sequence in zip(rows, generated):
    ends = [i for i, token in enumerate(sequence) if token in eos_ids]
    length = ends[0] + 1 if ends else len(sequence)
    row[:length] = sequence[:length]
  scores = getattr(out, "sequences_scores", None)
  return rows, None if scores is None else scores.numpy()


def seqlab_generate(model, params, prompts, eos_id=EOS, **kwargs):
  """`decoding.generate` with NumPy outputs; decoder-only prompts go in as given (GPT-2)."""
  if not hasattr(model, "encode"):
    kwargs["bos_id"] = None
  return jax.tree_util.tree_map(np.asarray, decoding.generate(model, params, prompts,
                                                              eos_id=eos_id, **kwargs))


def assert_same_as_hf(hf, model, params, prompts, **kwargs):
  """Returns HF's outputs, concatenated over the prompts (tokens, scores or None)."""
  n = kwargs.get("num_return_sequences", 1)
  got = seqlab_generate(model, params, prompts, **kwargs)
  want = [hf_generate(hf, p, prompt_valid=None if kwargs.get("prompt_valid") is None
                      else kwargs["prompt_valid"][i], **{k: v for k, v in kwargs.items()
                                                         if k != "prompt_valid"})
          for i, p in enumerate(prompts)]
  tokens = np.concatenate([w[0] for w in want])
  np.testing.assert_array_equal(got.tokens, tokens, err_msg=str(kwargs))
  assert got.tokens.shape[0] == len(prompts) * n
  if want[0][1] is not None:
    scores = np.concatenate([w[1] for w in want])
    np.testing.assert_allclose(got.scores, scores, atol=SCORE_TOL, rtol=0, err_msg=str(kwargs))
    return tokens, scores
  return tokens, None


# ---------------------------------------------------------------------------------------------
# Beam search: Hugging Face's finishing rule and early stopping.
# ---------------------------------------------------------------------------------------------


def _check_beam_grid(hf, model, params, prompts, length_penalties, **kwargs):
  """Every (length_penalty, early_stopping) case equals HF; the cases must not all agree."""
  outputs = {}
  for alpha, early in itertools.product(length_penalties, (True, False, "never")):
    outputs[alpha, early] = assert_same_as_hf(
        hf, model, params, prompts, strategy="beam", length_penalty=alpha,
        early_stopping=early, **kwargs)
  distinct = {(t.tobytes(), s.round(4).tobytes()) for t, s in outputs.values()}
  assert len(distinct) > len(length_penalties), "early_stopping never mattered: a weak test"
  lengths = np.concatenate([(t != 0).sum(1) for t, _ in outputs.values()])
  assert np.mean(lengths < kwargs["max_new_tokens"]) > 0.25, "few eos: finishing is untested"


def test_gpt2_beam_search_equals_hugging_face(gpt2):
  """num_return_sequences=3 returns all beams, so every kept hypothesis is compared."""
  hf, model, params = gpt2
  _check_beam_grid(hf, model, params, PROMPTS, (0.0, 1.0, 2.5, -0.7), max_new_tokens=9,
                   num_beams=3, num_return_sequences=3)


def test_t5_beam_search_with_two_eos_ids_equals_hugging_face(t5):
  """Two eos ids: each step keeps 3·num_beams candidates, as Hugging Face."""
  hf, model, params = t5
  sources = [np.array([4, 9, 2, 31, 8, 5]), np.array([17, 3]), np.array([40, 12, 6, 6])]
  _check_beam_grid(hf, model, params, sources, (0.0, 1.0, 2.0), max_new_tokens=8, num_beams=3,
                   num_return_sequences=2, eos_id=(EOS, 11))


def test_t5x_rule_differs_from_hugging_face(gpt2):
  """beam_rule='t5x' also finalises eos candidates ranked num_beams+1 .. 2·num_beams."""
  hf, model, params = gpt2
  kwargs = dict(max_new_tokens=9, strategy="beam", num_beams=3, num_return_sequences=3,
                eos_id=EOS, early_stopping="never")
  differs = False
  for alpha in (0.0, 1.0, 2.5):
    hf_rule = seqlab_generate(model, params, PROMPTS, length_penalty=alpha, **kwargs)
    t5x = seqlab_generate(model, params, PROMPTS, length_penalty=alpha, beam_rule="t5x",
                          **kwargs)
    # With "never" the t5x rule only adds hypotheses: its best is at least as good.
    assert np.all(t5x.scores[::3] >= hf_rule.scores[::3] - 1e-6)
    differs |= not np.array_equal(t5x.tokens, hf_rule.tokens)
  assert differs


# ---------------------------------------------------------------------------------------------
# Decoding options.
# ---------------------------------------------------------------------------------------------


def _left_padded(prompts):
  """The prompts as one int array LEFT-padded with 0, and its `prompt_valid`."""
  length = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), length), np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    valid[i, length - len(p):] = True
  return tokens, valid


def _bites(hf, prompts, option, max_new_tokens, **kwargs):
  """Asserts that switching `option` (a dict) changes what HF generates for some prompt."""
  with_option = [hf_generate(hf, p, max_new_tokens=max_new_tokens, **kwargs, **option)[0]
                 for p in prompts]
  without = [hf_generate(hf, p, max_new_tokens=max_new_tokens, **kwargs)[0] for p in prompts]
  assert not np.array_equal(with_option, without), f"{option} changes nothing: a weak test"


def test_gpt2_greedy_repetition_penalty_min_new_tokens_eos_ids_prompt_valid(gpt2):
  hf, model, params = gpt2
  eos = (EOS, 39)
  common = dict(max_new_tokens=10, eos_id=eos)
  for option in ({"repetition_penalty": 1.6}, {"repetition_penalty": 0.6},
                 {"repetition_penalty": 1.6, "min_new_tokens": 5}):
    assert_same_as_hf(hf, model, params, PROMPTS, **common, **option)
    _bites(hf, PROMPTS, option, **common)
  _bites(hf, PROMPTS, {"min_new_tokens": 5}, repetition_penalty=1.6, **common)
  _bites(hf, PROMPTS, {"eos_id": eos}, max_new_tokens=10, repetition_penalty=1.6)
  # A real leading token 0 (row 0) survives in an int-array prompt given prompt_valid.
  tokens, valid = _left_padded(PROMPTS)
  from_array = assert_same_as_hf(hf, model, params, tokens, prompt_valid=valid,
                                 repetition_penalty=1.6, **common)[0]
  guessed = seqlab_generate(model, params, tokens, repetition_penalty=1.6, **common)
  assert not np.array_equal(guessed.tokens[0], from_array[0])  # 0 read as padding
  np.testing.assert_array_equal(guessed.tokens[1:], from_array[1:])


def test_gpt2_greedy_no_repeat_ngram_size(gpt2):
  hf, model, params = gpt2
  for option in ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 2, "min_new_tokens": 6}):
    assert_same_as_hf(hf, model, params, PROMPTS, max_new_tokens=12, **option)
    _bites(hf, PROMPTS, {"no_repeat_ngram_size": 2}, max_new_tokens=12,
           **{k: v for k, v in option.items() if k != "no_repeat_ngram_size"})


def test_gpt2_beam_search_with_processors(gpt2):
  """The processors act on beam search's log-probabilities, whose history follows the beams."""
  hf, model, params = gpt2
  common = dict(max_new_tokens=9, strategy="beam", num_beams=3, num_return_sequences=2,
                no_repeat_ngram_size=2)
  for option in ({"repetition_penalty": 1.4}, {"repetition_penalty": 1.4, "min_new_tokens": 4},
                 {"repetition_penalty": 0.8, "length_penalty": 2.0}):
    assert_same_as_hf(hf, model, params, PROMPTS, **common, **option)
  _bites(hf, PROMPTS, {"repetition_penalty": 1.4}, **common)
  _bites(hf, PROMPTS, {"no_repeat_ngram_size": 2}, repetition_penalty=1.4,
         **{k: v for k, v in common.items() if k != "no_repeat_ngram_size"})


def test_t5_greedy_decoder_start_id_and_repetition_penalty(t5):
  """The decoder's start id is part of the penalised sequence, as in Hugging Face."""
  hf, model, params = t5
  sources = [np.array([4, 9, 2, 31, 8, 5]), np.array([17, 3]), np.array([40, 12, 6, 6])]
  common = dict(max_new_tokens=8, eos_id=(EOS, 11), repetition_penalty=1.8)
  # The encoder input as an array whose padding holds a junk id: prompt_valid marks it.
  tokens = np.full((3, 7), 9, np.int32)
  valid = np.zeros((3, 7), bool)
  for i, source in enumerate(sources):
    tokens[i, 7 - len(source):] = source
    valid[i, 7 - len(source):] = True
  for start in (0, 3, 20):
    assert_same_as_hf(hf, model, params, tokens, prompt_valid=valid, decoder_start_id=start,
                      **common)
  _bites(hf, sources, {"decoder_start_id": 20}, **common)
  _bites(hf, sources, {"repetition_penalty": 1.8}, max_new_tokens=8, eos_id=(EOS, 11))
