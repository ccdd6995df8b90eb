"""Model families, named presets with exact reference sizes, and parameter counts.

Each family module (`transformer`, `vit`, `mae`, `swin`) defines frozen config dataclasses and a
`PRESETS` dict. Every config implements:

* `build() -> flax.linen.Module` — the model, whose `__call__(batch, *, train=False)` takes the
  feature dict of docs/design.md's feature contract;
* `dummy_batch(batch_size=1) -> dict` — a minimal feature dict used to trace shapes.

A Transformer config with `scan_layers` keeps its blocks' parameters stacked on a leading layer
axis (the stacks named by its `STACKS`); `match_layout` converts parameters of either layout
to a config's, so checkpoints and converted weights move between the two.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import jax

_FAMILIES = ("transformer", "vit", "mae", "swin")


def _family_presets() -> dict:
  presets = {}
  for family in _FAMILIES:
    try:
      module = importlib.import_module(f"{__name__}.{family}")
    except ModuleNotFoundError as e:  # a family not written yet
      if e.name == f"{__name__}.{family}":
        continue
      raise
    presets.update(getattr(module, "PRESETS", {}))
  return presets


def preset_names() -> list[str]:
  """All preset names, sorted."""
  return sorted(_family_presets())


def get_preset(name: str, **overrides):
  """Returns the config of preset `name`, with dataclass fields replaced by `overrides`."""
  presets = _family_presets()
  if name not in presets:
    raise ValueError(f"unknown preset name={name!r}; valid presets: {', '.join(sorted(presets))}")
  config = presets[name]
  if overrides:
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"unknown config field(s) {unknown} for preset {name!r}; "
                       f"fields: {', '.join(sorted(fields))}")
    config = dataclasses.replace(config, **overrides)
  return config


def build(config):
  """Returns the Flax module for `config` (a config dataclass or a preset name)."""
  if isinstance(config, str):
    config = get_preset(config)
  return config.build()


def param_shapes(name_or_config):
  """The `params` collection as a pytree of `jax.ShapeDtypeStruct`, without allocating it."""
  config = get_preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
  module = config.build()
  batch = config.dummy_batch(1)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), batch))
  return variables["params"]


def num_params(name_or_config) -> int:
  """Trainable parameters (the `params` collection), counted from shapes alone."""
  shapes = param_shapes(name_or_config)
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def unrolled(config):
  """`config` with its layers unrolled (itself when it has no `scan_layers` field)."""
  if getattr(config, "scan_layers", False):
    return dataclasses.replace(config, scan_layers=False)
  return config


def match_layout(params, config):
  """`params` of either layer layout -> the layout `config` builds: stacks (`config.STACKS`)
  stacked on a leading layer axis with `scan_layers`, one `{stack}_{i}` entry per layer
  without. Values are unchanged."""
  from seqlab import layers  # pylint: disable=g-import-not-at-top
  stacks = getattr(config, "STACKS", ())
  if getattr(config, "scan_layers", False):
    return layers.stack_params(params, stacks)
  return layers.unstack_params(params, stacks)
