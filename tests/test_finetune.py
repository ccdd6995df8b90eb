"""Multitask fine-tuning: the rows train exactly the scored answer text, the feed resumes and
shards exactly, and a fine-tuned model ranks held-out examples of its tasks correctly."""

import numpy as np
import pytest

from _scoring_oracle import decoder, init_params
from seqlab import tasks
from seqlab import train as train_lib
from seqlab.data import tokenizers
from seqlab.evaluation import finetune, harness
from seqlab.tasks import registry

TOKENIZER = tokenizers.ByteTokenizer()
LETTERS = "ABCDEFGH"


def _say_task(name, offset):
  """'say X.' -> X among four letters; train and validation from different seeds."""
  def load(split):
    rng = np.random.default_rng([offset, split == "train"])
    out = []
    for _ in range(40):
      letters = list(rng.choice(list(LETTERS), 4, replace=False))
      label = int(rng.integers(4))
      out.append({"prompt": f"{name} {letters[label]}.", "choices": letters, "label": label})
    return out
  return tasks.register(registry.Task(f"ft/{name}", "choice", load), replace=True)


def _model(kind):
  cfg = decoder(kind, vocab_size=512, max_length=48)
  fmt = "lm" if kind == "causal" else "seq2seq"
  return harness.LanguageModel(cfg, init_params(cfg), TOKENIZER, fmt, {"decoder": 48},
                               mode=None if kind == "causal" else "s2s")


@pytest.mark.parametrize("kind", ["causal", "prefix"])
def test_rows_train_exactly_the_answers_and_the_feed_resumes_and_shards(kind):
  _say_task("say", 1), _say_task("echo", 2)
  mixture = tasks.Mixture("ft/mix", ("ft/say", "ft/echo"), rates=(1.0, 1.0))
  model = _model(kind)
  feed = finetune.MixtureBatches(model, mixture, batch_size=4, num_examples=30, seed=3)
  # Oracle: the loss-weighted tokens of each packed segment spell " " + the answer, in the
  # order the mixture sampled them.
  want = [" " + registry.to_seq2seq(e)["targets"]
          for _, e in mixture.sample("train", 30, seed=3)]
  got = []
  for row in feed.rows:
    for segment in range(1, row["decoder_segment_ids"].max() + 1):
      mask = (row["decoder_segment_ids"] == segment) & (row["decoder_loss_weights"] > 0)
      got.append(TOKENIZER.decode(row["decoder_target_tokens"][mask]))
  assert got == want
  first = [next(feed) for _ in range(5)]  # cycles past the end of the rows
  n = len(feed.rows)
  for step, batch in enumerate(first):
    for k in range(4):
      np.testing.assert_array_equal(batch["decoder_target_tokens"][k],
                                    feed.rows[(4 * step + k) % n]["decoder_target_tokens"])
  resumed = finetune.MixtureBatches(model, mixture, batch_size=4, num_examples=30, seed=3)
  resumed.set_state({"step": 3})
  np.testing.assert_array_equal(next(resumed)["decoder_input_tokens"],
                                first[3]["decoder_input_tokens"])
  halves = [finetune.MixtureBatches(model, mixture, batch_size=4, num_examples=30, seed=3,
                                    shard_index=i, shard_count=2) for i in range(2)]
  for batch in first[:2]:
    np.testing.assert_array_equal(
        np.concatenate([next(h)["decoder_target_tokens"] for h in halves]),
        batch["decoder_target_tokens"])
  with pytest.raises(ValueError, match="batch_size=3 must be a positive multiple of the 2"):
    finetune.MixtureBatches(model, mixture, batch_size=3, num_examples=4, shard_count=2)


def test_finetuning_on_the_mixture_ranks_held_out_examples_correctly(tmp_path):
  _say_task("say", 1), _say_task("echo", 2)
  mixture = tasks.Mixture("ft/mix", ("ft/say", "ft/echo"))
  model = _model("causal")
  validation = tasks.get("ft/say").examples("validation")
  before = harness.rank_classification(model, validation)
  optimizer = train_lib.OptimizerConfig(name="adamw", learning_rate=3e-3, schedule="constant",
                                        warmup_steps=0, total_steps=120)
  tuned, result = finetune.finetune(model, mixture, steps=120, batch_size=8, seed=0,
                                    optimizer=optimizer, num_examples=80,
                                    workdir=str(tmp_path / "ft"))
  after = harness.rank_classification(tuned, validation)
  assert result.status == "finished" and result.step == 120
  assert before["acc"] < 0.5 and after["acc"] == 1.0, (before, after)
  assert after["chance"] == 0.25
