"""The `seqlab` model of lm-evaluation-harness, end to end on local tasks (YAML + JSONL written
here, no download): every per-request log-likelihood equals the hand-built oracle."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import lm_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top,wrong-import-position

from _lm_eval_tasks import CHOICE, write_tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
from _scoring_oracle import decoder, encoder_decoder, forward, init_params, oracle, padded  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab.data import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab.evaluation import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqlab.evaluation.lm_eval_model import SeqlabLM  # pylint: disable=g-import-not-at-top,wrong-import-position

TOKENIZER = tokenizers.ByteTokenizer()


def _evaluate(model, tasks, folder):
  result = lm_eval.simple_evaluate(model=SeqlabLM(model=model, batch_size=4), tasks=tasks,
                                   task_manager=TaskManager(include_path=str(folder),
                                                                include_defaults=False),
                                   log_samples=True, bootstrap_iters=0)
  return result["results"], result["samples"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  folder = tmp_path / "tasks"
  folder.mkdir()
  write_tasks(folder)
  return folder


def _choice_oracle(model, samples):
  acc = []
  for sample in samples:
    doc = sample["doc"]
    lls = []
    for (context, continuation), [(ll, greedy)] in zip(sample["arguments"], sample["resps"]):
      request = model.encode_pair(context, continuation)
      want, want_greedy = oracle(model.model_cfg, model.params, model.fmt,
                                 request.context.tolist(), request.continuation.tolist(),
                                 mode_id=model.mode_id)
      assert ll == pytest.approx(want, abs=1e-5) and greedy == want_greedy
      lls.append(want)
    acc.append(float(np.argmax(lls) == doc["label"]))
  return float(np.mean(acc))


def test_a_decoder_scores_choices_and_rolling_text_like_the_oracle(offline):
  cfg = decoder("causal", vocab_size=512, max_length=48)
  model = harness.LanguageModel(cfg, init_params(cfg), TOKENIZER, "lm", {"decoder": 16})
  results, samples = _evaluate(model, ["seqlab_choice", "seqlab_texts"], offline)
  assert len(samples["seqlab_choice"]) == len(CHOICE)
  assert results["seqlab_choice"]["acc,none"] == pytest.approx(
      _choice_oracle(model, samples["seqlab_choice"]))
  # Rolling: windows of 16 tokens; the first predicts 16 tokens from the start id, each later
  # one 15 tokens behind one token of context.
  for sample in samples["seqlab_texts"]:
    tokens = TOKENIZER.encode(sample["doc"]["text"]).tolist()
    want, start = 0.0, 0
    while start < len(tokens):
      size = 16 if start == 0 else 15
      want += oracle(cfg, model.params, "lm", tokens[max(0, start - 1):start],
                     tokens[start:start + size])[0]
      start += size
    assert sample["resps"][0][0] == pytest.approx(want, abs=1e-4)


def test_an_encoder_decoder_scores_choices_and_generates_like_the_oracle(offline):
  cfg = encoder_decoder(vocab_size=512)
  model = harness.LanguageModel(cfg, init_params(cfg), TOKENIZER, "seq2seq",
                                {"encoder": 24, "decoder": 8}, mode="s2s")
  results, samples = _evaluate(model, ["seqlab_choice", "seqlab_gen"], offline)
  assert results["seqlab_choice"]["acc,none"] == pytest.approx(
      _choice_oracle(model, samples["seqlab_choice"]))
  # generate_until: greedy argmax of the full forward pass, stopped at "\n" or 5 tokens.
  for sample in samples["seqlab_gen"]:
    encoder = [model.mode_id] + TOKENIZER.encode(sample["doc"]["inputs"]).tolist() + [1]
    new = []
    for _ in range(5):
      batch = {"encoder_input_tokens": padded(encoder),
               "encoder_segment_ids": padded([1] * len(encoder)),
               "decoder_input_tokens": padded([0] + new),
               "decoder_segment_ids": padded([1] * (len(new) + 1))}
      token = int(forward(cfg, model.params, batch)[len(new)].argmax())
      if token == 1:
        break
      new.append(token)
    want = TOKENIZER.decode(np.int32(new)).split("\n")[0]
    assert sample["resps"][0][0] == want
