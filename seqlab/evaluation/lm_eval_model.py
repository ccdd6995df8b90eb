"""seqlab models in EleutherAI's lm-evaluation-harness: the model type `seqlab`.

Importing this module registers `SeqlabLM` as `seqlab`, so after `import
seqlab.evaluation.lm_eval_model`, `lm_eval.simple_evaluate(model="seqlab",
model_args="workdir=DIR", tasks=[...])` scores the newest checkpoint of a `seqlab train` work
directory; `seqlab lm-eval --workdir DIR --tasks ...` does exactly that from the command line.

Unlike the harness's own models, it serves all three text architectures: a causal decoder,
a prefix decoder (the context is its bidirectional prefix) and an encoder-decoder (context ->
encoder, continuation -> decoder), each in the format it was trained in (`scoring`'s module
doc), with the UL2 mode token where the model was trained with one.

  loglikelihood          `Scorer.loglikelihood` of lm-evaluation-harness's `_encode_pair`
  loglikelihood_rolling  disjoint windows, each with `context_len` tokens of context
  generate_until         greedy decoding up to `max_gen_toks`, cut at the first `until` string

model_args: workdir (required), batch_size (8), mode ("auto", or a mode name, or "none"),
max_gen_toks (256), context_len (1, the rolling windows' context).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from seqlab.evaluation import harness


@register_model("seqlab")
class SeqlabLM(LM):
  """An lm-evaluation-harness `LM` over a `harness.LanguageModel` (module doc)."""

  def __init__(self, workdir: str | None = None, *, model: harness.LanguageModel | None = None,
               batch_size: int | str = 8, mode: str = "auto", max_gen_toks: int = 256,
               context_len: int = 1, **unused: Any):
    super().__init__()
    del unused  # lm-eval passes device / dtype options that a JAX model does not take
    if model is None:
      if not workdir:
        raise ValueError("model_args needs workdir=DIR (a `seqlab train` work directory)")
      mode_arg = None if str(mode).lower() == "none" else mode
      model = harness.LanguageModel.from_workdir(workdir, mode=mode_arg)
    self.model = model
    self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
    self.max_gen_toks = int(max_gen_toks)
    self.context_len = int(context_len)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [self.model.encode_pair(*request.args) for request in requests]
    return self.model.scorer(batch_size=self.batch_size).loglikelihood(pairs)

  def loglikelihood_rolling(self, requests) -> list[float]:
    texts = [self.model.tokenizer.encode(request.args[0]) for request in requests]
    return self.model.scorer(batch_size=self.batch_size).loglikelihood_rolling(
        texts, context_len=self.context_len)

  def generate_until(self, requests) -> list[str]:
    out: list[str | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
      context, kwargs = request.args
      kwargs = dict(kwargs or {})
      if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
        raise ValueError(f"generate_until: seqlab decodes greedily; gen_kwargs={kwargs} asks "
                         "for sampling")
      until = kwargs.get("until") or ()
      until = (until,) if isinstance(until, str) else tuple(until)
      key = (until, int(kwargs.get("max_gen_toks", self.max_gen_toks)))
      groups.setdefault(key, []).append(i)
    for (until, max_new), indices in groups.items():
      texts = self.model.generate([requests[i].args[0] for i in indices],
                                  max_new_tokens=max_new, until=until,
                                  batch_size=self.batch_size)
      for i, text in zip(indices, texts):
        out[i] = text
    return out  # type: ignore[return-value]


def evaluate(workdir: str, tasks: list[str], *, num_fewshot: int | None = None,
             include_path: str | None = None, limit: int | float | None = None,
             batch_size: int = 8, mode: str = "auto", seed: int = 1234,
             include_defaults: bool = True) -> dict[str, Any]:
  """`lm_eval.simple_evaluate` of a work directory's model: {task: {metric: value}}.

  `include_defaults=False` indexes only the tasks under `include_path` (lm-evaluation-harness
  otherwise indexes its thousands of built-in task files first).
  """
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  model = SeqlabLM(workdir, batch_size=batch_size, mode=mode)
  manager = TaskManager(include_path=include_path,
                        include_defaults=include_defaults or not include_path)
  results = lm_eval.simple_evaluate(
      model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
      task_manager=manager, random_seed=seed, numpy_random_seed=seed,
      fewshot_random_seed=seed, log_samples=False, bootstrap_iters=0)
  return {task: {k: v for k, v in values.items() if k != "alias"}
          for task, values in (results or {}).get("results", {}).items()}
