"""Tasks and mixtures: seqio's idea as plain Python, without TensorFlow.

A `Task` is a name, a kind and a function from a split name to its examples (plain dicts):

  kind "choice"      {"prompt": str, "choices": [str, ...], "label": int}
  kind "generation"  {"inputs": str, "targets": str}

plus how it is scored (`metrics`; rank classification for "choice") and prompted
(`description`, `target_delimiter`). Examples are loaded once per split, then checked. A
`Mixture` is tasks with sampling rates; `Mixture.sample` draws a fixed multitask training set
from it. `to_seq2seq` turns any example into the `{"inputs", "targets"}` text pair a
fine-tuning run trains on (a choice task's target is its correct choice).

Tasks come from a local JSONL file per split (`jsonl_task`), Hugging Face `datasets`
(`hf_task`, where the network allows) or code (`seqlab.tasks.builtin` derives a suite from
any text source); all register in one registry (`register`, `get`, `names`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

KINDS = ("choice", "generation")
SPLITS = ("train", "validation")


def _check_example(task: str, split: str, index: int, example: Any, kind: str) -> dict:
  where = f"task {task!r} split {split!r} example {index}"
  if not isinstance(example, Mapping):
    raise ValueError(f"{where} is a {type(example).__name__}, not a dict")
  if kind == "choice":
    for field, kind_of in (("prompt", str), ("choices", (list, tuple)), ("label", int)):
      if not isinstance(example.get(field), kind_of) or isinstance(example.get(field), bool):
        raise ValueError(f"{where}: field {field!r}={example.get(field)!r} is missing or not "
                         f"a {kind_of}")
    if len(example["choices"]) < 2 or not all(isinstance(c, str) for c in example["choices"]):
      raise ValueError(f"{where}: choices={example['choices']!r} needs two or more strings")
    if not 0 <= example["label"] < len(example["choices"]):
      raise ValueError(f"{where}: label={example['label']} is not an index of its "
                       f"{len(example['choices'])} choices")
  else:
    for field in ("inputs", "targets"):
      if not isinstance(example.get(field), str):
        raise ValueError(f"{where}: field {field!r}={example.get(field)!r} is missing or not "
                         "a string")
  return dict(example)


@dataclasses.dataclass(frozen=True)
class Task:
  """One task (module doc). `load(split)` returns the split's examples; `tags` group tasks
  (for example "code", "prose", "train", "heldout")."""
  name: str
  kind: str
  load: Callable[[str], Sequence[Mapping[str, Any]]]
  metrics: tuple[str, ...] = ()
  description: str = ""
  target_delimiter: str = " "
  max_new_tokens: int = 32
  tags: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name!r}: kind={self.kind!r} is not one of {KINDS}")
    if not self.name:
      raise ValueError("a task needs a name")

  def examples(self, split: str) -> list[dict]:
    """The checked examples of `split` (loaded once)."""
    return _load(self, split)

  @property
  def chance(self) -> float | None:
    """The mean chance accuracy of the validation split (choice tasks)."""
    if self.kind != "choice":
      return None
    return float(np.mean([1.0 / len(e["choices"]) for e in self.examples("validation")]))


@functools.lru_cache(maxsize=None)
def _load_cached(task: Task, split: str) -> tuple[dict, ...]:
  return tuple(_check_example(task.name, split, i, e, task.kind)
               for i, e in enumerate(task.load(split)))


def _load(task: Task, split: str) -> list[dict]:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  return list(_load_cached(task, split))


def to_seq2seq(example: Mapping[str, Any]) -> dict[str, str]:
  """{"inputs", "targets"} text of an example: a choice task's target is its correct choice."""
  if "choices" in example:
    return {"inputs": example["prompt"], "targets": example["choices"][int(example["label"])]}
  return {"inputs": example["inputs"], "targets": example["targets"]}


# ─── Registry ────────────────────────────────────────────────────────────────────────────────

_TASKS: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
  """Adds `task` under its name (ValueError if taken, unless `replace`)."""
  if task.name in _TASKS and not replace:
    raise ValueError(f"task name={task.name!r} is already registered")
  _TASKS[task.name] = task
  return task


def get(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"task name={name!r} is not registered; known: {sorted(_TASKS)}")
  return _TASKS[name]


def names(tag: str | None = None) -> list[str]:
  """Registered task names (with `tag`, only those tagged so), sorted."""
  return sorted(n for n, t in _TASKS.items() if tag is None or tag in t.tags)


# ─── Mixtures ────────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Tasks sampled with `rates` (relative; None: proportional to each task's split size,
  seqio's `rate_num_examples`)."""
  name: str
  tasks: tuple[str, ...]
  rates: tuple[float, ...] | None = None

  def __post_init__(self):
    if not self.tasks:
      raise ValueError(f"mixture {self.name!r} has no tasks")
    if self.rates is not None:
      if len(self.rates) != len(self.tasks):
        raise ValueError(f"mixture {self.name!r}: {len(self.rates)} rates for "
                         f"{len(self.tasks)} tasks")
      if any(r < 0 for r in self.rates) or not sum(self.rates) > 0:
        raise ValueError(f"mixture {self.name!r}: rates={self.rates} must be >= 0, not all 0")

  def sample(self, split: str, num: int, *, seed: int) -> list[tuple[str, dict]]:
    """`num` (task name, example) pairs: a task by rate, then one of its examples, each
    drawn with replacement from `numpy.random.default_rng([seed, crc32(mixture name)])`."""
    pools = [get(name).examples(split) for name in self.tasks]
    for name, pool in zip(self.tasks, pools):
      if not pool:
        raise ValueError(f"mixture {self.name!r}: task {name!r} has no {split!r} examples")
    rates = np.asarray(self.rates if self.rates is not None else [len(p) for p in pools],
                       np.float64)
    rng = np.random.default_rng([seed, zlib.crc32(self.name.encode())])
    which = rng.choice(len(pools), size=num, p=rates / rates.sum())
    return [(self.tasks[t], pools[t][int(rng.integers(len(pools[t])))]) for t in which]


# ─── Loaders ─────────────────────────────────────────────────────────────────────────────────


def _kind_of(example: Mapping[str, Any]) -> str:
  return "choice" if "choices" in example else "generation"


def jsonl_task(name: str, paths: Mapping[str, str | os.PathLike], *, kind: str | None = None,
               **fields: Any) -> Task:
  """A task whose split `s` is the JSONL file `paths[s]` (kind from the first example)."""
  for split in paths:
    if split not in SPLITS:
      raise ValueError(f"task {name!r}: split={split!r} is not one of {SPLITS}")

  def load(split: str) -> list[dict]:
    if split not in paths:
      return []
    path = os.fspath(paths[split])
    if not os.path.isfile(path):
      raise ValueError(f"task {name!r}: {split} file={path!r} does not exist")
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]

  if kind is None:
    first = next((e for s in SPLITS for e in load(s)), None)
    if first is None:
      raise ValueError(f"task {name!r}: the files {dict(paths)} hold no examples")
    kind = _kind_of(first)
  return Task(name, kind, load, **fields)


def hf_task(name: str, path: str, *, convert: Callable[[Mapping[str, Any]], dict],
            kind: str, config: str | None = None,
            splits: Mapping[str, str] | None = None, **fields: Any) -> Task:
  """A task from Hugging Face `datasets` (`load_dataset(path, config)`), each row mapped to
  an example by `convert`; `splits` maps seqlab's split names to the dataset's."""
  splits = dict(splits or {"train": "train", "validation": "validation"})

  def load(split: str) -> list[dict]:
    if split not in splits:
      return []
    try:
      import datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(f"task {name!r} needs the `datasets` package (pip install "
                       "'seqlab[data]')") from e
    rows = datasets.load_dataset(path, config, split=splits[split])
    return [convert(row) for row in rows]

  return Task(name, kind, load, **fields)
