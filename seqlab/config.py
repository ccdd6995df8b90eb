"""Experiment configs: `get_config(arg)` files plus `--config.a.b=value` overrides.

A config file is a Python file defining `get_config(arg: str | None) -> ml_collections.ConfigDict`
(big_vision's habit: its docstring says how to run it, how long it takes and what to expect).
`path/to/file.py:quick` passes "quick" as `arg`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `file.py[:arg]` and returns `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if os.path.isdir(path):
    raise ValueError(f"--config {path!r} is a directory; give a config file (file.py[:arg])")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      f"_seqlab_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key of `config` as a dotted path."""
  keys = []
  for k, v in config.items():
    path = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flat_keys(v, path + "."))
    else:
      keys.append(path)
  return keys


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"cannot read {text!r} as a bool")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


OPEN_SUFFIXES = ("overrides", "kwargs")
# Keys any config may set although its file does not define them, with their type's default:
# engine options that change how a run is observed, never its numbers (so a config file, and
# the fingerprints taken of it, need not change to offer them).
OPTIONAL_KEYS = {"train.profile_steps": ""}


def _is_open(key: str) -> bool:
  """Keys inside a dict named `*overrides` / `*kwargs` may be new (the receiver validates)."""
  parent = key.rpartition(".")[0]
  return bool(parent) and parent.rpartition(".")[2].endswith(OPEN_SUFFIXES)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=value` strings (a leading `--config.` or `config.` is allowed).

  The value is read as the type of the current value (bool, int, float, str), else as a
  Python literal, else as a string. An unknown key raises ValueError listing the nearest
  existing keys; only dicts named `*overrides` / `*kwargs` (model overrides, objective or
  source arguments) accept new keys, which their consumer validates, and `OPTIONAL_KEYS` may
  be added to any config with a section for them.
  """
  config = ml_collections.ConfigDict(config.to_dict()) if config.is_locked else config
  for item in overrides:
    known = flat_keys(config) + list(OPTIONAL_KEYS)
    key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep or not key:
      raise ValueError(f"override {item!r} is not of the form --config.key=value")
    *path, leaf = key.split(".")
    parent = config
    for part in path:
      child = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
      if not isinstance(child, ml_collections.ConfigDict):
        parent = None
        break
      parent = child
    exists = parent is not None and leaf in parent and not isinstance(
        parent[leaf], ml_collections.ConfigDict)
    may_be_new = parent is not None and leaf not in parent and (
        _is_open(key) or key in OPTIONAL_KEYS)
    if not exists and not may_be_new:
      near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
      hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
      raise ValueError(f"unknown config key {key!r} in override {item!r}{hint}")
    current = parent[leaf] if exists else OPTIONAL_KEYS.get(key)
    try:
      value = _parse_value(text, current)
    except ValueError as e:
      raise ValueError(f"override {key}={text!r}: {e} (current value {current!r})") from None
    with parent.ignore_type():
      parent[leaf] = value
  return config
