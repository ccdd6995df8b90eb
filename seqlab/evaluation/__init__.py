"""Evaluation of trained text models: log-likelihood scoring (`scoring`), zero- and few-shot
tasks (`harness`) and an lm-evaluation-harness model (`lm_eval_model`, needs `lm_eval`)."""

from seqlab.evaluation.harness import (LanguageModel, fewshot_context, generation,
                                       rank_classification, score_generations)
from seqlab.evaluation.scoring import FORMATS, Request, Score, Scorer, request_features
