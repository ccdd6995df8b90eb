"""Task registry, mixtures, JSONL tasks and the built-in suite on a corpus whose facts are
known by construction (every label checked against the table that wrote the corpus)."""

import json
import re

import numpy as np
import pytest

from seqlab import tasks
from seqlab.tasks import builtin, registry

NUM_MODULES, NUM_FUNCTIONS = 12, 6
WORDS = ["river", "mountain", "garden", "window", "yellow", "silver", "forest", "candle",
         "morning", "harbor", "pencil", "meadow", "thunder", "castle", "orange", "planet"]


def _num_args(k, j):
  return (k + j) % 5


def _returns(j):
  return j % 2 == 0


def _sentence(k, i):
  """A distinct prose sentence (two words chosen by module and index)."""
  a, b = WORDS[(3 * k + i) % len(WORDS)], WORDS[(5 * k + 2 * i + 1) % len(WORDS)]
  return f"The {a} keeps the {b} warm in module {'abcdefghijkl'[k]} part {'xyzw'[i]}."


def _module_text(k):
  doc = " ".join(_sentence(k, i) for i in range(4))
  out = [f'"""{doc}\n"""', ""]
  for j in range(NUM_FUNCTIONS):
    args = ", ".join(f"a{i}" for i in range(_num_args(k, j)))
    out += [f"def fn_{k}_{j}({args}):",
            f'    """Compute thing number {j} of module {k}."""',
            f"    total = {j}",
            f"    total = total + {k}",
            "    print(total)",
            "    return total" if _returns(j) else "    total = None", ""]
  return "\n".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  for k in range(NUM_MODULES):
    (root / f"mod{k}.py").write_text(_module_text(k))
  return {"root": str(root), "validation_fraction": 0.5}


@pytest.fixture(scope="module")
def suite(corpus):
  return builtin.register_suite("stdlib", corpus, prefix="known", min_examples=5)


def _facts(prompt):
  """(module k, function j) from the lines the corpus wrote into a function."""
  j, k = re.search(r"total = (\d+)\s+total = total \+ (\d+)", prompt).groups()
  return int(k), int(j)


def test_the_suite_registers_every_type_in_two_groups(suite):
  assert suite["skipped"] == []
  assert suite["train"] == [f"known/{t}" for t in builtin.CODE_TRAIN + builtin.PROSE_TRAIN]
  assert suite["heldout"] == [f"known/{t}" for t in builtin.CODE_HELDOUT + builtin.PROSE_HELDOUT]
  assert tasks.names("known") == sorted(suite["train"] + suite["heldout"])
  assert set(tasks.names("heldout")) >= set(suite["heldout"])


@pytest.mark.parametrize("split", ["train", "validation"])
def test_code_labels_are_the_corpus_facts(suite, split):
  del suite
  # The sources' split: sha256 of "mod{k}.py" below 0.5 (computed by hand for these names).
  valid = {k for k in range(NUM_MODULES) if (split == "validation") == (k in (0, 1, 2, 4, 7, 8))}
  names = tasks.get("known/function_name").examples(split)
  assert len(names) == len(valid) * NUM_FUNCTIONS  # every function, once
  for e in names:
    k, j = _facts(e["prompt"])
    assert k in valid and e["choices"][e["label"]] == f"fn_{k}_{j}"
    assert len(set(e["choices"])) == 4 and "def " not in e["prompt"]
  for e in tasks.get("known/arg_count").examples(split):
    k, j = _facts(e["prompt"])
    assert e["label"] == _num_args(k, j) and e["choices"] == ["0", "1", "2", "3", "4"]
  for e in tasks.get("known/returns").examples(split):
    k, j = _facts(e["prompt"])
    assert e["choices"][e["label"]] == ("yes" if _returns(j) else "no")
  for e in tasks.get("known/docstring").examples(split):
    k, j = _facts(e["prompt"])
    assert e["choices"][e["label"]] == f"Compute thing number {j} of module {k}."
    assert "Compute thing" not in e["prompt"]
  for e in tasks.get("known/module").examples(split):
    k, _ = _facts(e["prompt"])
    assert e["choices"][e["label"]] == f"mod{k}"
  for e in tasks.get("known/next_line").examples(split):
    lines = e["prompt"].split("\n")[:-1]
    j, k = map(int, re.match(r'"""Compute thing number (\d+) of module (\d+)', lines[0]).groups())
    body = [lines[0], f"total = {j}", f"total = total + {k}", "print(total)",
            "return total" if _returns(j) else "total = None"]
    assert lines == body[:len(lines)] and e["choices"][e["label"]] == body[len(lines)]


def test_prose_labels_are_the_corpus_sentences(suite):
  del suite
  sentences = {_sentence(k, i): (k, i) for k in range(NUM_MODULES) for i in range(4)}
  for e in tasks.get("known/cloze").examples("train"):
    text = e["prompt"].split("\n")[0]
    assert text.replace("___", e["choices"][e["label"]]) in sentences
    assert all(text.replace("___", c) not in sentences
               for i, c in enumerate(e["choices"]) if i != e["label"])
  for e in tasks.get("known/next_sentence").examples("train"):
    k, i = sentences[e["prompt"].split("\n")[0]]
    assert e["choices"][e["label"]] == _sentence(k, i + 1)
  for e in tasks.get("known/sentence_order").examples("validation"):
    first, second = re.match(r"(.*?\.) (The .*)", e["choices"][e["label"]]).groups()
    (k1, i1), (k2, i2) = sentences[first], sentences[second]
    assert k1 == k2 and i2 == i1 + 1 and len(e["choices"]) == 2


def test_the_suite_is_deterministic_and_splits_are_fixed(corpus, suite):
  del suite
  a = tasks.get("known/cloze").examples("validation")
  old = tasks.get("known/cloze")
  builtin.register_suite("stdlib", corpus, prefix="known", min_examples=5)  # built again
  assert tasks.get("known/cloze") is not old
  assert tasks.get("known/cloze").examples("validation") == a
  assert tasks.get("known/cloze").chance == pytest.approx(0.25)
  assert tasks.get("known/returns").chance == pytest.approx(0.5)


def test_max_choice_chars_keeps_the_examples_whose_choices_fit_in_order(corpus, suite):
  del suite
  names = ("short/cloze", "short/function_name")
  builtin.register_suite("stdlib", corpus, prefix="short", min_examples=1, max_examples=10**6)
  full = {n: tasks.get(n).examples("train") for n in names}
  builtin.register_suite("stdlib", corpus, prefix="short", min_examples=1, max_examples=10**6,
                         max_choice_chars=6)
  for name, examples in full.items():
    want = [e for e in examples if all(len(c) <= 6 for c in e["choices"])]
    assert want and len(want) < len(examples)  # the limit bites, and leaves some
    assert tasks.get(name).examples("train") == want


def test_a_plain_english_corpus_yields_the_prose_types_only(tmp_path):
  for k in range(NUM_MODULES):
    (tmp_path / f"doc{k}.txt").write_text(" ".join(_sentence(k, i) for i in range(4)) + "\n")
  got = builtin.register_suite("text", {"pattern": str(tmp_path / "*.txt"),
                                        "validation_fraction": 0.5}, prefix="english",
                               min_examples=3)
  assert got["train"] == ["english/cloze", "english/sentence_order"]
  assert got["heldout"] == ["english/next_sentence"]
  assert set(got["skipped"]) == {f"english/{t}" for t in builtin.CODE_TRAIN +
                                 builtin.CODE_HELDOUT}


# ─── Registry, mixtures, JSONL ───────────────────────────────────────────────────────────────


def _static(name, examples, kind="choice"):
  return registry.Task(name, kind, lambda split: examples if split == "validation" else [])


def test_registry_refuses_duplicates_and_unknown_names():
  tasks.register(_static("reg/a", []))
  with pytest.raises(ValueError, match="name='reg/a' is already registered"):
    tasks.register(_static("reg/a", []))
  tasks.register(_static("reg/a", []), replace=True)
  with pytest.raises(ValueError, match="name='reg/nope' is not registered"):
    tasks.get("reg/nope")
  with pytest.raises(ValueError, match="kind='mcq'"):
    registry.Task("reg/b", "mcq", lambda s: [])


@pytest.mark.parametrize("example, message", [
    ({"prompt": "p", "choices": ["a", "b"], "label": 2}, "label=2"),
    ({"prompt": "p", "choices": ["a"], "label": 0}, "two or more"),
    ({"choices": ["a", "b"], "label": 0}, "field 'prompt'=None"),
    ({"prompt": "p", "choices": ["a", "b"], "label": True}, "field 'label'=True"),
    ("text", "is a str, not a dict"),
])
def test_bad_examples_name_the_task_split_and_field(example, message):
  task = _static("bad/x", [example])
  with pytest.raises(ValueError, match=f"task 'bad/x' split 'validation' example 0.*{message}"):
    task.examples("validation")


def test_jsonl_task_loads_each_split_and_detects_its_kind(tmp_path):
  rows = [{"inputs": "2+2", "targets": "4"}, {"inputs": "3+3", "targets": "6"}]
  (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  task = tasks.jsonl_task("json/gen", {"validation": tmp_path / "v.jsonl"})
  assert task.kind == "generation" and task.examples("validation") == rows
  assert task.examples("train") == []
  assert tasks.to_seq2seq({"prompt": "p", "choices": ["a", "b"], "label": 1}) == {
      "inputs": "p", "targets": "b"}
  with pytest.raises(ValueError, match="does not exist"):
    tasks.jsonl_task("json/none", {"validation": tmp_path / "none.jsonl"})


def test_mixture_samples_tasks_at_their_rates_reproducibly():
  small = [{"inputs": f"s{i}", "targets": ""} for i in range(10)]
  large = [{"inputs": f"l{i}", "targets": ""} for i in range(30)]
  tasks.register(_static("mix/small", small, "generation"), replace=True)
  tasks.register(_static("mix/large", large, "generation"), replace=True)
  by_size = tasks.Mixture("by_size", ("mix/small", "mix/large"))
  drawn = by_size.sample("validation", 4000, seed=0)
  assert drawn == by_size.sample("validation", 4000, seed=0)
  share = np.mean([name == "mix/small" for name, _ in drawn])
  assert abs(share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)  # sizes 10:30
  fixed = tasks.Mixture("fixed", ("mix/small", "mix/large"), rates=(3.0, 1.0))
  share = np.mean([n == "mix/small" for n, _ in fixed.sample("validation", 4000, seed=1)])
  assert abs(share - 0.75) < 4 * np.sqrt(0.25 * 0.75 / 4000)
  for name, example in drawn:
    assert example in (small if name == "mix/small" else large)
  with pytest.raises(ValueError, match="2 rates for 1 tasks"):
    tasks.Mixture("bad", ("mix/small",), rates=(1.0, 2.0))
