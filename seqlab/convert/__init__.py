"""Import (and export) Hugging Face PyTorch checkpoints as seqlab parameters.

Optional: needs the `hf` extra (torch, transformers, safetensors). Weights are the user's own
files; nothing is downloaded. Text models (GPT-2, BERT, T5, Llama / Mistral) live in
`seqlab.convert.text`, vision models (ViT, Swin, MAE) in `seqlab.convert.vision`; their public
functions (`*_config_from_hf`, `*_from_hf`, `*_to_hf`) are re-exported here.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("text", "vision")


def __getattr__(name):
  for sub in _SUBMODULES:
    try:
      module = importlib.import_module(f"{__name__}.{sub}")
    except ModuleNotFoundError as e:
      if e.name == f"{__name__}.{sub}":
        continue
      raise
    if name in getattr(module, "__all__", ()):
      return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
