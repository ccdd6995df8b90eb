"""A built-in offline task suite derived from any text source: code tasks and prose tasks.

Every task is multiple choice, built deterministically from a source's documents (the task's
"train" split from the source's train split, "validation" from its validation split; the
generator of task `t`, split `s` is `numpy.random.default_rng([crc32(t), crc32(s)])`).
Distractors are drawn from the same split, never equal to the answer.

Code types (Python documents that parse; functions found with `ast`, dunders skipped):

  type            split    prompt                                         choices
  function_name   train    the function without its `def` line            4 names
  arg_count       train    the whole function                             "0" ... "4"
  module          train    the function (sources with file paths only)    4 module names
  next_line       heldout  a function's first lines                       4 lines (one is next)
  docstring       heldout  the function with its docstring taken out      4 docstring lines
  returns         heldout  the function without its `def` line            "no", "yes"

Prose types (sentences of any text: comment and docstring lines of code too; a sentence is
20-240 characters, 4+ words, 85%+ letters and spaces, none of \\ _ = < > { } [ ] | * `,
starts upper-case, ends in . ! ?):

  cloze           train    the sentence with one word (4+ letters) blanked   4 words
  sentence_order  train    the sentence before a pair                        the pair in 2 orders
  next_sentence   heldout  a sentence                                        4 sentences

"train" and "heldout" are tags: a multitask run fine-tunes on the train types and evaluates
zero-shot on the held-out ones (`register_suite` returns the names of both groups). As T0
(Sanh et al. 2022) holds out sentence completion, so does this suite (the next line, the next
sentence), with two types unlike any training one (docstring, returns): a held-out type a
language model can answer from its pretraining alone, and types that need the transfer
multitask fine-tuning is meant to give. A source
without Python functions yields only the prose types; a type with fewer than `min_examples`
examples in either split is not registered (and `register_suite` says which were skipped).
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import textwrap
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from seqlab.tasks import registry

CODE_TRAIN = ("function_name", "arg_count", "module")
CODE_HELDOUT = ("next_line", "docstring", "returns")
PROSE_TRAIN = ("cloze", "sentence_order")
PROSE_HELDOUT = ("next_sentence",)


# ─── Reading the corpus ──────────────────────────────────────────────────────────────────────


def _functions(text: str, max_body_chars: int) -> list[dict]:
  """The functions of one Python document: name, body (without the def line), source, number
  of arguments, docstring's first line, whether it returns a value."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return []
  lines = text.splitlines()
  out = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    name = node.name
    if name.startswith("__") and name.endswith("__") or node.end_lineno is None:
      continue
    first = node.body[0]
    if first.lineno <= node.lineno:
      continue
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    source = textwrap.dedent("\n".join(lines[start - 1:node.end_lineno]))
    body = textwrap.dedent("\n".join(lines[first.lineno - 1:node.end_lineno]))
    doc = ast.get_docstring(node)
    without_doc = body
    if doc is not None and isinstance(first, ast.Expr) and first.end_lineno is not None:
      rest = lines[first.end_lineno:node.end_lineno]
      without_doc = textwrap.dedent("\n".join(rest))
    args = node.args
    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
    returns = any(isinstance(n, ast.Return) and n.value is not None
                  for n in _own_nodes(node))
    out.append({
        "name": name, "body": body[:max_body_chars].strip(),
        "source": source[:max_body_chars].strip(),
        "without_doc": without_doc[:max_body_chars].strip(), "num_args": count,
        "doc": (doc or "").strip().split("\n")[0].strip(), "returns": returns,
        "lines": [l for l in body.splitlines() if l.strip()],
    })
  out.sort(key=lambda f: f["source"])  # ast.walk's order is breadth-first; sort for stability
  return out


def _own_nodes(function: ast.AST):
  """The nodes of a function's body, not descending into nested functions or classes."""
  stack = list(ast.iter_child_nodes(function))
  while stack:
    node = stack.pop()
    yield node
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
      stack.extend(ast.iter_child_nodes(node))


_COMMENT = re.compile(r"^\s*(?:#+|//+|\*+|/\*+|\"\"\"|''')?\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Characters of code or markup, not of prose (escaped strings, identifiers, operators).
_NOT_PROSE = re.compile(r"[\\_=<>{}\[\]|*`]|' '")


def sentences(text: str) -> list[list[str]]:
  """Paragraphs of sentences in `text` (module doc's filter); comment markers stripped."""
  paragraphs, current = [], []
  for line in text.splitlines():
    stripped = _COMMENT.sub("", line).strip()
    if stripped:
      current.append(stripped)
    elif current:
      paragraphs.append(" ".join(current))
      current = []
  if current:
    paragraphs.append(" ".join(current))
  out = []
  for paragraph in paragraphs:
    good = [s for s in _SENTENCE_END.split(paragraph) if _is_sentence(s)]
    if good:
      out.append(good)
  return out


def _is_sentence(s: str) -> bool:
  if not 20 <= len(s) <= 240 or not s[0].isupper() or s[-1] not in ".!?":
    return False
  if _NOT_PROSE.search(s):
    return False
  letters = sum(c.isalpha() or c == " " for c in s)
  return letters >= 0.85 * len(s) and len(s.split()) >= 4


# ─── Example builders, one per task type ─────────────────────────────────────────────────────


def _distractors(rng, pool: Sequence[Any], answer: Any, k: int) -> list[Any] | None:
  """`k` distinct items of `pool` different from `answer` (None if there are too few)."""
  seen, out = {answer}, []
  for i in rng.permutation(len(pool))[:8 * k + 8]:
    item = pool[int(i)]
    if item not in seen:
      seen.add(item)
      out.append(item)
      if len(out) == k:
        return out
  return None


def _choice(rng, prompt: str, answer: str, others: Sequence[str]) -> dict:
  choices = [answer, *others]
  order = rng.permutation(len(choices))
  return {"prompt": prompt, "choices": [choices[i] for i in order],
          "label": int(np.flatnonzero(order == 0)[0])}


def _build(kind: str, docs: list[dict], rng, limit: int) -> list[dict]:
  """Up to `limit` examples of task type `kind` from parsed documents."""
  functions = [f for d in docs for f in d["functions"]]
  out: list[dict] = []
  if kind in ("function_name", "returns", "arg_count", "docstring", "next_line", "module"):
    order = rng.permutation(len(functions))
    names = sorted({f["name"] for f in functions})
    docs_lines = sorted({f["doc"] for f in functions if f["doc"]})
    all_lines = sorted({l.strip() for f in functions for l in f["lines"][1:]})
    modules = sorted({d["module"] for d in docs if d["module"]})
    module_of = {id(f): d["module"] for d in docs for f in d["functions"]}
    for i in order:
      if len(out) >= limit:
        break
      f = functions[int(i)]
      if kind == "function_name":
        others = _distractors(rng, names, f["name"], 3)
        if others:
          out.append(_choice(rng, f"{f['body']}\n# The function above is named", f["name"],
                             others))
      elif kind == "returns":
        out.append({"prompt": f"{f['body']}\n# Does the function above return a value?",
                    "choices": ["no", "yes"], "label": int(f["returns"])})
      elif kind == "arg_count":
        if f["num_args"] <= 4:
          out.append({"prompt": f"{f['source']}\n# Number of parameters:",
                      "choices": ["0", "1", "2", "3", "4"], "label": f["num_args"]})
      elif kind == "docstring":
        others = _distractors(rng, docs_lines, f["doc"], 3) if f["doc"] else None
        if others and f["without_doc"]:
          out.append(_choice(rng, f"{f['without_doc']}\n# Summary of the code above:",
                             f["doc"], others))
      elif kind == "next_line":
        if len(f["lines"]) >= 3:
          cut = int(rng.integers(1, len(f["lines"]) - 1))
          answer = f["lines"][cut].strip()
          others = _distractors(rng, all_lines, answer, 3)
          if others:
            out.append(_choice(rng, "\n".join(f["lines"][:cut]) + "\n# Next line:", answer,
                               others))
      elif kind == "module":
        module = module_of[id(f)]
        others = _distractors(rng, modules, module, 3) if module else None
        if others:
          out.append(_choice(rng, f"{f['source']}\n# This function is defined in module",
                             module, others))
    return out
  paragraphs = [p for d in docs for p in d["sentences"]]
  every = sorted({s for p in paragraphs for s in p})
  words = sorted({w for s in every for w in re.findall(r"[A-Za-z]{4,}", s)})
  if kind == "cloze":
    for i in rng.permutation(len(every)):
      if len(out) >= limit:
        break
      s = every[int(i)]
      spans = [m.span() for m in re.finditer(r"[A-Za-z]{4,}", s)]
      a, b = spans[int(rng.integers(len(spans)))]
      others = _distractors(rng, words, s[a:b], 3)
      if others:
        out.append(_choice(rng, f"{s[:a]}___{s[b:]}\nThe missing word is", s[a:b], others))
  elif kind in ("next_sentence", "sentence_order"):
    pairs = [(p, j) for p in paragraphs for j in range(len(p) - 1)]
    for i in rng.permutation(len(pairs)):
      if len(out) >= limit:
        break
      p, j = pairs[int(i)]
      if kind == "next_sentence":
        others = _distractors(rng, every, p[j + 1], 3)
        if others:
          out.append(_choice(rng, f"{p[j]}\nThe next sentence is", p[j + 1], others))
      else:
        before = p[j - 1] if j > 0 else ""
        out.append(_choice(rng, f"{before}\nThe text continues:".lstrip("\n"),
                           f"{p[j]} {p[j + 1]}", [f"{p[j + 1]} {p[j]}"]))
  return out


# ─── The suite ───────────────────────────────────────────────────────────────────────────────


@functools.lru_cache(maxsize=8)
def _parsed(source_name: str, source_items: tuple, split: str, max_documents: int,
            max_body_chars: int) -> list[dict]:
  from seqlab.data import sources as sources_lib  # pylint: disable=g-import-not-at-top
  source = sources_lib.get_source(source_name, split=split, **dict(source_items))
  n = len(source)
  picks = (range(n) if n <= max_documents
           else np.linspace(0, n - 1, max_documents).round().astype(int))
  paths = getattr(source, "paths", None)
  docs = []
  for i in picks:
    text = source[int(i)]
    if not isinstance(text, str):
      continue
    module = None
    if paths is not None:
      module = re.sub(r"(/__init__)?\.py$", "", str(paths[int(i)])).replace("/", ".")
    docs.append({"functions": _functions(text, max_body_chars), "sentences": sentences(text),
                 "module": module})
  return docs


def _freeze(value: Any) -> Any:
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


def register_suite(source: str = "stdlib", source_kwargs: dict | None = None, *,
                   prefix: str = "builtin", max_documents: int = 400,
                   max_examples: int = 500, max_body_chars: int = 600,
                   min_examples: int = 20, max_choice_chars: int | None = None,
                   replace: bool = True) -> dict[str, list[str]]:
  """Registers the suite of `source` as `<prefix>/<type>` tasks.

  Returns {"train": [...], "heldout": [...], "skipped": [...]} task names (skipped: too few
  examples in this corpus). `max_documents` documents are read per split (spread evenly),
  `max_examples` examples kept per task and split; with `max_choice_chars`, only examples
  whose every choice has at most that many characters (for models with short rows: a
  continuation must fit a row, only the context can be cut).
  """
  items = _freeze(dict(source_kwargs or {}))

  def docs(split: str) -> list[dict]:
    return _parsed(source, items, split, max_documents, max_body_chars)

  out: dict[str, list[str]] = {"train": [], "heldout": [], "skipped": []}
  groups = [("code", "train", CODE_TRAIN), ("code", "heldout", CODE_HELDOUT),
            ("prose", "train", PROSE_TRAIN), ("prose", "heldout", PROSE_HELDOUT)]
  for family, group, kinds in groups:
    for kind in kinds:
      name = f"{prefix}/{kind}"

      def load(split: str, kind=kind, name=name) -> list[dict]:
        rng = np.random.default_rng([zlib.crc32(name.encode()), zlib.crc32(split.encode())])
        if max_choice_chars is None:
          return _build(kind, docs(split), rng, max_examples)
        # Every example in order, then the first that fit: the same examples as without the
        # limit wherever all of them fit.
        examples = _build(kind, docs(split), rng, sys.maxsize)
        return [e for e in examples
                if max(len(c) for c in e["choices"]) <= max_choice_chars][:max_examples]

      task = registry.Task(name, "choice", load, tags=(family, group, prefix))
      if min(len(task.examples(s)) for s in registry.SPLITS) < min_examples:
        out["skipped"].append(name)
        continue
      registry.register(task, replace=replace)
      out[group].append(name)
  return out
