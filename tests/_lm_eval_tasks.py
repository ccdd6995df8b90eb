"""Local lm-evaluation-harness tasks (YAML + JSONL) that the tests write: no download."""

import json

CHOICE = [{"prompt": f"{a} + {a} =", "choices": [str(2 * a), str(a + 1), str(a)], "label": a % 3}
          for a in range(5)]
TEXTS = [{"text": "def f(x):\n    return x + 1\n" * 3}, {"text": "import os"}]
GENERATE = [{"inputs": "x = 1\ny =", "targets": "2"}, {"inputs": "a, b =", "targets": "b, a"}]

_METRIC = "  - metric: {name}\n    aggregation: {agg}\n    higher_is_better: {better}\n"


def write_tasks(folder):
  """JSONL data and YAML configs of three local tasks in `folder`: seqlab_choice
  (multiple_choice), seqlab_texts (loglikelihood_rolling), seqlab_gen (generate_until)."""
  for name, rows in (("choice", CHOICE), ("texts", TEXTS), ("gen", GENERATE)):
    with open(folder / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  head = ("task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
          "    validation: {path}\nvalidation_split: validation\n")
  (folder / "choice.yaml").write_text(
      head.format(task="seqlab_choice", path=folder / "choice.jsonl")
      + "output_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\n"
      + "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n"
      + _METRIC.format(name="acc", agg="mean", better="true")
      + _METRIC.format(name="acc_norm", agg="mean", better="true"))
  (folder / "texts.yaml").write_text(
      head.format(task="seqlab_texts", path=folder / "texts.jsonl")
      + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
      + "doc_to_target: \"{{text}}\"\nmetric_list:\n"
      + _METRIC.format(name="word_perplexity", agg="weighted_perplexity", better="false"))
  (folder / "gen.yaml").write_text(
      head.format(task="seqlab_gen", path=folder / "gen.jsonl")
      + "output_type: generate_until\ndoc_to_text: \"{{inputs}}\"\n"
      + "doc_to_target: \"{{targets}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
      + "  max_gen_toks: 5\n  do_sample: false\nmetric_list:\n"
      + _METRIC.format(name="exact_match", agg="mean", better="true"))
