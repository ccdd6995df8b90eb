"""Log-likelihood scoring, rank classification and few-shot prompts against hand-built rows
(the oracle of tests/_scoring_oracle.py)."""

import numpy as np
import pytest

from _scoring_oracle import EOS, decoder, encoder_decoder, forward, init_params, oracle, padded
from seqlab.data import tokenizers
from seqlab.evaluation import harness, scoring
from seqlab.models.gpt import DecoderConfig


def _random_requests(rng, n, vocab=50, max_context=9, max_continuation=5, empty_context=True):
  out = []
  for i in range(n):
    c = int(rng.integers(0 if empty_context and i == 0 else 1, max_context + 1))
    t = int(rng.integers(1, max_continuation + 1))
    out.append(scoring.Request(rng.integers(3, vocab, c).astype(np.int32),
                               rng.integers(3, vocab, t).astype(np.int32)))
  return out


CASES = [
    ("causal lm", lambda: decoder("causal"), "lm", None),
    ("causal seq2seq", lambda: decoder("causal"), "seq2seq", None),
    ("prefix seq2seq", lambda: decoder("prefix"), "seq2seq", None),
    ("prefix seq2seq + mode", lambda: decoder("prefix"), "seq2seq", 47),
    ("causal lm + mode", lambda: decoder("causal"), "lm", 47),
    ("encoder-decoder", encoder_decoder, "seq2seq", None),
    ("encoder-decoder + mode", encoder_decoder, "seq2seq", 47),
]


@pytest.mark.parametrize("name, make, fmt, mode_id", CASES, ids=[c[0] for c in CASES])
def test_loglikelihood_equals_the_hand_built_rows(name, make, fmt, mode_id):
  # Packed rows for every case; one request per row for two of them.
  pack = name not in ("causal seq2seq", "encoder-decoder")
  cfg = make()
  params = init_params(cfg)
  rng = np.random.default_rng(0)
  requests = _random_requests(rng, 7)
  lengths = ({"decoder": 32} if isinstance(cfg, DecoderConfig)
             else {"encoder": 24, "decoder": 16})
  scorer = scoring.Scorer(cfg, params, fmt=fmt, lengths=lengths, mode_id=mode_id, batch_size=2,
                          pack=pack)
  got = scorer.score(requests)
  for request, score in zip(requests, got):
    want, greedy = oracle(cfg, params, fmt, request.context, request.continuation,
                          mode_id=mode_id)
    assert score.logprob == pytest.approx(want, abs=2e-5, rel=1e-5)
    assert score.greedy == greedy
    assert score.num_tokens == request.continuation.size
  assert scorer.truncated == 0


def test_a_packed_row_holds_several_requests_and_only_scored_tokens_count():
  cfg = decoder("prefix")
  params = init_params(cfg)
  requests = [scoring.Request(np.int32([5, 6, 7]), np.int32([8, 9, 10]),
                              scored=np.array([True, False, True])),
              scoring.Request(np.int32([11]), np.int32([12, 13]))]
  scorer = scoring.Scorer(cfg, params, fmt="seq2seq", lengths={"decoder": 32}, batch_size=1)
  rows = list(scorer._rows(requests))  # pylint: disable=protected-access
  assert [members for _, members in rows] == [[(0, 1), (1, 2)]]
  row = rows[0][0]
  # Hand-drawn layout: [5 6 7 eos | 8 9 10 eos] [11 eos | 12 13 eos] then padding.
  assert row["decoder_target_tokens"][:13].tolist() == [5, 6, 7, 1, 8, 9, 10, 1, 11, 1, 12, 13,
                                                        1]
  assert row["decoder_segment_ids"][:14].tolist() == [1] * 8 + [2] * 5 + [0]
  assert row["decoder_causal_attention"][:13].tolist() == [1] * 5 + [0] * 3 + [1] * 3 + [0] * 2
  assert row["decoder_loss_weights"][:13].tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0]
  got = scorer.score(requests)
  want0, _ = oracle(cfg, params, "seq2seq", [5, 6, 7], [8, 9, 10], scored=[True, False, True])
  want1, _ = oracle(cfg, params, "seq2seq", [11], [12, 13])
  assert got[0].logprob == pytest.approx(want0, abs=2e-5) and got[0].num_tokens == 2
  assert got[1].logprob == pytest.approx(want1, abs=2e-5)


def test_long_context_is_cut_from_the_left_and_a_long_continuation_is_an_error():
  cfg = decoder("causal")
  params = init_params(cfg)
  scorer = scoring.Scorer(cfg, params, fmt="lm", lengths={"decoder": 8}, batch_size=1)
  context, continuation = np.arange(3, 13, dtype=np.int32), np.int32([20, 21, 22])
  [score] = scorer.score([scoring.Request(context, continuation)])
  want, _ = oracle(cfg, params, "lm", context[-5:], continuation)
  assert score.logprob == pytest.approx(want, abs=2e-5) and scorer.truncated == 1
  with pytest.raises(ValueError, match="does not fit"):
    scorer.score([scoring.Request(np.int32([3]), np.arange(3, 12, dtype=np.int32))])


@pytest.mark.parametrize("make, fmt, lengths", [
    (lambda: decoder("causal"), "lm", {"decoder": 8}),
    (lambda: decoder("prefix"), "seq2seq", {"decoder": 10}),
    (encoder_decoder, "seq2seq", {"encoder": 6, "decoder": 7}),
], ids=["causal lm", "prefix", "encoder-decoder"])
def test_rolling_windows_score_every_token_once(make, fmt, lengths):
  cfg = make()
  params = init_params(cfg)
  scorer = scoring.Scorer(cfg, params, fmt=fmt, lengths=lengths, batch_size=3)
  tokens = np.random.default_rng(1).integers(3, 50, 23).astype(np.int32)
  windows = scorer.rolling_requests(tokens, context_len=2)
  assert np.array_equal(np.concatenate([w.continuation for w in windows]), tokens)
  assert windows[0].context.size == 0
  for previous, window in zip(windows, windows[1:]):
    assert np.array_equal(window.context, previous.continuation[-2:])
  want = sum(oracle(cfg, params, fmt, w.context, w.continuation)[0] for w in windows)
  [got] = scorer.loglikelihood_rolling([tokens], context_len=2)
  assert got == pytest.approx(want, abs=1e-4)
  assert scorer.loglikelihood_rolling([np.int32([])]) == [0.0]


def test_bad_scorer_arguments_name_the_field():
  cfg = decoder()
  params = init_params(cfg)
  with pytest.raises(ValueError, match="format='lm' needs architecture='decoder'"):
    scoring.Scorer(encoder_decoder(), None, fmt="lm", lengths={"encoder": 8, "decoder": 8})
  with pytest.raises(ValueError, match="format='mlm'"):
    scoring.Scorer(cfg, params, fmt="mlm", lengths={"decoder": 8})
  with pytest.raises(ValueError, match=r"lengths=\{'encoder': 8\}"):
    scoring.Scorer(cfg, params, fmt="lm", lengths={"encoder": 8})
  with pytest.raises(ValueError, match="batch_size=0"):
    scoring.Scorer(cfg, params, fmt="lm", lengths={"decoder": 8}, batch_size=0)


# ─── Rank classification and few-shot prompts, on text ──────────────────────────────────────

TOKENIZER = tokenizers.ByteTokenizer()

EXAMPLES = [
    {"prompt": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
    {"prompt": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"prompt": "def f(x):\n  return", "choices": ["x", "y", "x + 1", "None"], "label": 2},
    {"prompt": "Capital of France:", "choices": ["Paris", "Rome"], "label": 1},
]


def _language_model(kind):
  if kind == "encoder_decoder":
    cfg = encoder_decoder(vocab_size=512)
    return harness.LanguageModel(cfg, init_params(cfg), TOKENIZER, "seq2seq",
                                 {"encoder": 80, "decoder": 16}, mode="s2s")
  cfg = decoder("prefix" if kind == "prefix" else "causal", vocab_size=512, max_length=96)
  return harness.LanguageModel(cfg, init_params(cfg), TOKENIZER,
                               "lm" if kind == "causal" else "seq2seq", {"decoder": 96},
                               mode="s2s" if kind == "prefix" else None)


@pytest.mark.parametrize("kind, shots", [("causal", 2), ("prefix", 2), ("encoder_decoder", 0)])
def test_rank_classification_matches_hand_computed_loglikelihoods(kind, shots):
  model = _language_model(kind)
  pool = [{"prompt": f"{a} + {a} =", "choices": [str(2 * a), str(a)], "label": 0}
          for a in range(6)]
  got = harness.rank_classification(model, EXAMPLES, num_shots=shots, fewshot_pool=pool,
                                    seed=7)
  acc, acc_norm = [], []
  mode_id = model.mode_id
  for index, example in enumerate(EXAMPLES):
    picks = np.random.default_rng([7, index]).choice(len(pool), shots, replace=False)
    context = "\n\n".join([f"{pool[i]['prompt']} {pool[i]['choices'][0]}" for i in picks]
                          + [example["prompt"]])
    lls = [oracle(model.model_cfg, model.params, model.fmt,
                  TOKENIZER.encode(context).tolist(), TOKENIZER.encode(" " + c).tolist(),
                  mode_id=mode_id)[0] for c in example["choices"]]
    acc.append(np.argmax(lls) == example["label"])
    norm = [ll / len(" " + c) for ll, c in zip(lls, example["choices"])]
    acc_norm.append(np.argmax(norm) == example["label"])
  assert got["acc"] == pytest.approx(np.mean(acc))
  assert got["acc_norm"] == pytest.approx(np.mean(acc_norm))
  assert got["chance"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 4, 1 / 2]))
  assert got["majority"] == 0.25  # four different gold answers
  assert got["n"] == 4
  a = np.asarray(acc, float)
  assert got["acc_stderr"] == pytest.approx(np.std(a, ddof=1) / 2)


@pytest.mark.parametrize("kind", ["causal", "prefix", "encoder_decoder"])
def test_acc_mutual_info_subtracts_each_choices_unconditional_loglikelihood(kind):
  # lm-evaluation-harness's acc_mutual_info: argmax of ll(choice | prompt) - ll(choice | "").
  model = _language_model(kind)
  got = harness.rank_classification(model, EXAMPLES, mutual_info=True)
  correct, margins = [], []
  for example in EXAMPLES:
    def ll(context, choice):
      return oracle(model.model_cfg, model.params, model.fmt, TOKENIZER.encode(context).tolist(),
                    TOKENIZER.encode(" " + choice).tolist(), mode_id=model.mode_id)[0]
    mi = [ll(example["prompt"], c) - ll("", c) for c in example["choices"]]
    correct.append(np.argmax(mi) == example["label"])
    margins.append(np.sort(mi)[-1] - np.sort(mi)[-2])
  assert min(margins) > 1e-4  # no near-tie that float32 could flip
  assert got["acc_mutual_info"] == pytest.approx(np.mean(correct))
  c = np.asarray(correct, float)
  assert got["acc_mutual_info_stderr"] == pytest.approx(np.std(c, ddof=1) / 2)
  assert "acc_mutual_info" not in harness.rank_classification(model, EXAMPLES)


def test_majority_baseline_counts_gold_answers_by_text():
  yes_no = [{"prompt": str(i), "choices": ["no", "yes"], "label": int(i % 3 != 0)}
            for i in range(9)]  # labels 0,1,1,0,1,1,0,1,1: "yes" 6 of 9
  assert harness.majority_baseline(yes_no) == pytest.approx(6 / 9)
  shuffled = [{"prompt": "a", "choices": ["x", "y"], "label": 0},
              {"prompt": "b", "choices": ["y", "x"], "label": 1}]  # "x" both times
  assert harness.majority_baseline(shuffled) == 1.0
  assert harness.majority_baseline([{"inputs": "q", "targets": "t"}]) == 1.0


def test_fewshot_context_and_shots_follow_lm_eval():
  shots = [{"inputs": "a", "targets": "b"}, {"prompt": "c", "choices": ["d", "e"], "label": 1}]
  query = {"prompt": "q?", "choices": ["x", "y"], "label": 0}
  assert harness.fewshot_context(query, shots, description="Answer.\n") == (
      "Answer.\na b\n\nc e\n\nq?")
  assert harness.fewshot_context(query, []) == "q?"
  pool = [{"inputs": str(i), "targets": ""} for i in range(5)]
  drawn = harness.draw_shots(pool, 3, seed=1, index=4)
  again = harness.draw_shots(pool, 3, seed=1, index=4)
  assert drawn == again and len({d["inputs"] for d in drawn}) == 3
  assert pool[2] not in harness.draw_shots(pool, 4, seed=0, index=0, exclude=pool[2])
  with pytest.raises(ValueError, match="num_shots=5 but the few-shot split has 4"):
    harness.draw_shots(pool, 5, seed=0, index=0, exclude=pool[0])


def test_encode_pair_moves_trailing_space_into_the_continuation():
  model = harness.LanguageModel(None, None, TOKENIZER, "lm", {"decoder": 8})
  request = model.encode_pair("Question: ", "yes")
  assert TOKENIZER.decode(request.context) == "Question:"
  assert TOKENIZER.decode(request.continuation) == " yes"


def test_generation_is_greedy_decoding_cut_at_the_stop_string_and_scored():
  model = _language_model("causal")
  examples = [{"inputs": "x = 1", "targets": "y"}, {"inputs": "def", "targets": "z"}]
  got = harness.generation(model, examples, max_new_tokens=4, until=())
  # The oracle: repeated argmax of the full forward pass over the growing stream.
  predictions = []
  for example in examples:
    stream = TOKENIZER.encode(example["inputs"] + " ").tolist()
    new = []
    for _ in range(4):
      row = [0] + stream + new
      logits = forward(model.model_cfg, model.params, {"decoder_input_tokens": padded(row)})
      token = int(logits[len(row) - 1].argmax())
      new.append(token)
      if token == EOS:
        break
    predictions.append(TOKENIZER.decode(np.int32(new)))
  want = harness.score_generations(predictions, ["y", "z"])
  assert got == {**want, "n": 2.0}
  assert harness.cut_at("abc\n\ndef", ["\n\n", "c"]) == "ab"


def test_prompt_batch_pads_left_for_decoders_right_for_encoders():
  rows = [np.int32([5, 6, 1]), np.int32([8, 1])]
  np.testing.assert_array_equal(harness.prompt_batch(rows, "decoder", 4),
                                [[0, 5, 6, 1], [0, 0, 8, 1]])
  np.testing.assert_array_equal(harness.prompt_batch(rows, "encoder_decoder", 4),
                                [[5, 6, 1, 0], [8, 1, 0, 0]])
  with pytest.raises(ValueError, match="width=2"):
    harness.prompt_batch(rows, "decoder", 2)
