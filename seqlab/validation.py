"""The one integer-field validator behind seqlab's public boundaries (configs, options, masks)."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int = 1) -> int:
  """`int(value)`, or ValueError naming `name` and `value` unless it is an integer >= minimum.

  Booleans are refused (True is an int to Python, never a length or a count here).
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
  return int(value)
