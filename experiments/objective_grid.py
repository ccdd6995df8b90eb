"""The grid of the objective comparison: architectures, objectives, cells, and their checks.

A cell is one (architecture, objective) pair with its model config and row lengths. `plan`
builds and validates every cell of a config before anything trains (see
`compare_objectives.py` for the experiment).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections
import numpy as np

import objective_readouts as readouts

from seqlab import features as features_lib
from seqlab import flops, models
from seqlab import objectives as obj
from seqlab.data import pipeline as pipeline_lib
from seqlab.evaluation import scoring

# name -> (feature-converter architecture, decoder attention)
ARCHITECTURES = {
    "causal_decoder": ("decoder", "causal"),
    "prefix_decoder": ("decoder", "prefix"),
    "encoder_decoder": ("encoder_decoder", None),
}


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """A grid objective: the pipeline objective, its readout format, the encoder share.

  `encoder_share` says how an encoder-decoder splits the row budget L: "half" (L/2 + L/2, for
  objectives whose inputs and targets are comparable), "span" (T5's inputs/targets lengths for
  span corruption, filled exactly), "none" (no encoder-decoder form).
  """
  pipeline_objective: str
  readout: readouts.ReadoutFormat
  encoder_share: str


OBJECTIVES = {
    "full_lm": ObjectiveSpec("full_lm", readouts.ReadoutFormat(format="lm"), "none"),
    "prefix_lm": ObjectiveSpec("prefix_lm", readouts.ReadoutFormat(), "half"),
    "span_corruption": ObjectiveSpec(
        "span_corruption", readouts.ReadoutFormat(continuation_sentinel=True), "span"),
    "ul2": ObjectiveSpec("ul2", readouts.ReadoutFormat(
        continuation_mode="s2s", infill_mode="nlu", finetune_mode="s2s"), "half"),
    "span_prefix_lm": ObjectiveSpec("ul2", readouts.ReadoutFormat(), "half"),
}
SPAN_DENSITY, SPAN_LENGTH = 0.15, 3.0  # T5 span corruption, UL2's R-denoiser


@dataclasses.dataclass(frozen=True)
class Cell:
  """One grid cell: architecture x objective, with its model config and row lengths."""
  architecture: str
  objective: str
  model_config: Any
  lengths: tuple[tuple[str, int], ...]
  chunk_length: int  # raw corpus tokens per pretraining example

  @property
  def name(self) -> str:
    return f"{self.architecture}/{self.objective}"

  @property
  def streams(self) -> str:
    """The feature converter's architecture: "decoder" or "encoder_decoder"."""
    return ARCHITECTURES[self.architecture][0]

  @property
  def spec(self) -> ObjectiveSpec:
    return OBJECTIVES[self.objective]

  @property
  def lengths_dict(self) -> dict[str, int]:
    return dict(self.lengths)


# ─── Plan: names, lengths, models; every check before any training ──────────────────────────


def parse_names(text: str, allowed, field: str) -> list[str]:
  """A comma-separated list of names; ValueError naming `field` on an unknown one."""
  names = [n.strip() for n in str(text).split(",") if n.strip()]
  for name in names:
    if name not in allowed:
      raise ValueError(f"{field}: unknown name {name!r}; choose from {sorted(allowed)}")
  if not names:
    raise ValueError(f"{field}={text!r} names nothing")
  return names


def grid_names(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(architecture, objective) pairs of the grid in table order, without `grid.skip`."""
  architectures = parse_names(config.grid.architectures, ARCHITECTURES, "grid.architectures")
  objectives = parse_names(config.grid.objectives, OBJECTIVES, "grid.objectives")
  skip = [s.strip() for s in str(config.grid.skip).split(",") if s.strip()]
  for item in skip:
    arch, _, objective = item.partition("/")
    if arch not in ARCHITECTURES or objective not in OBJECTIVES:
      raise ValueError(f"grid.skip: {item!r} is not architecture/objective")
  return [(a, o) for o in objectives for a in architectures if f"{a}/{o}" not in skip]


def encoder_decoder_lengths(objective: str, total: int) -> dict[str, int]:
  """Encoder and decoder row lengths summing to `total` for an objective (ObjectiveSpec)."""
  share = OBJECTIVES[objective].encoder_share
  if share == "none":
    raise ValueError(f"objective={objective!r} has no inputs, so it does not fit "
                     "architecture='encoder_decoder'; add encoder_decoder/full_lm to grid.skip")
  if share == "half":
    return {"encoder": total - total // 2, "decoder": total // 2}
  for encoder in range(total - 1, 1, -1):  # the longest inputs whose targets still fit
    _, targets = obj.span_corruption_lengths(encoder, SPAN_DENSITY, SPAN_LENGTH)
    if encoder + targets <= total:
      return {"encoder": encoder, "decoder": total - encoder}
  raise ValueError(f"data.seq_length={total} is too short for span corruption")


def objective_kwargs(config: ml_collections.ConfigDict, objective: str) -> dict[str, Any]:
  if objective == "span_corruption":
    return {"noise_density": SPAN_DENSITY, "mean_noise_span_length": SPAN_LENGTH}
  if objective == "ul2":
    return {"denoisers": config.data.ul2_denoisers}
  if objective == "span_prefix_lm":
    return {"denoisers": ((obj.Denoiser.span(SPAN_LENGTH, SPAN_DENSITY, mode=None), 1.0),
                          (obj.Denoiser.prefix(mode=None), 1.0))}
  return {}


def model_config(config: ml_collections.ConfigDict, architecture: str, vocab_size: int):
  """The cell's model: shared sizes; the encoder-decoder has `num_layers` in EACH stack."""
  m = config.model
  common = dict(vocab_size=vocab_size, d_model=m.d_model, num_heads=m.num_heads,
                num_kv_heads=m.num_heads, head_dim=m.head_dim, d_ff=m.d_ff,
                dropout_rate=m.dropout_rate, dtype=m.dtype, max_length=config.data.seq_length)
  streams, attention = ARCHITECTURES[architecture]
  if streams == "decoder":
    return models.get_preset(m.decoder_preset, num_layers=m.num_layers, attention=attention,
                             **common, **dict(m.decoder_overrides))
  return models.get_preset(m.encoder_decoder_preset, num_encoder_layers=m.num_layers,
                           num_decoder_layers=m.num_layers, **common,
                           **dict(m.encoder_decoder_overrides))


def readout_lengths(cell: Cell, config: ml_collections.ConfigDict) -> dict[str, int]:
  """Padded rows for scoring (a), (b) and (c): L per stream, one shape per model (the examples
  themselves fit the cell's training rows, `plan` checks)."""
  length = int(config.data.seq_length)
  return {s: length for s in features_lib.STREAMS[cell.streams]}


def finetune_lengths(cell: Cell, config: ml_collections.ConfigDict) -> dict[str, int]:
  """Rows for (c): [mode] body ‖ eos and name ‖ eos, in one stream or two."""
  ft = config.finetune
  if cell.streams == "decoder":
    return {"decoder": int(config.data.seq_length)}
  return {"encoder": ft.max_body_bytes + 2, "decoder": ft.max_name_bytes + 1}


def plan(config: ml_collections.ConfigDict, special: obj.SpecialIds,
         names: list[tuple[str, str]] | None = None) -> list[Cell]:
  """The validated cells of the grid (or of `names`, (architecture, objective) pairs).

  Raises ValueError before any training on an unknown name, an objective that does not fit an
  architecture, or a cell whose pretraining examples, readouts or fine-tuning examples (when
  the config has a `finetune` section) do not fit its length budget."""
  length = int(config.data.seq_length)
  for name, value in (("data.seq_length", length), ("data.batch_size", config.data.batch_size),
                      ("train.steps", config.train.steps),
                      ("readouts.num_sequences", config.readouts.num_sequences)):
    if int(value) < 1:
      raise ValueError(f"{name}={value} must be >= 1")
  chunk = np.full(int(config.readouts.chunk_length), special.first_regular_id, np.int32)
  cells = []
  for architecture, objective in names or grid_names(config):
    name = f"{architecture}/{objective}"
    streams = ARCHITECTURES[architecture][0]
    lengths = ({"decoder": length} if streams == "decoder"
               else encoder_decoder_lengths(objective, length))
    spec = OBJECTIVES[objective]
    try:
      planned = pipeline_lib.plan_objective(spec.pipeline_objective, streams, lengths, special,
                                            **objective_kwargs(config, objective))
    except ValueError as e:
      raise ValueError(f"grid cell {name} cannot be built with data.seq_length={length}: "
                       f"{e}") from None
    cell = Cell(architecture, objective, model_config(config, architecture, special.vocab_size),
                tuple(sorted(lengths.items())), planned.chunk_length)
    # Readouts stay within the rows the cell trained on: a model is never scored at positions
    # (or, with relative biases, distances) it never saw, e.g. an encoder trained on 64 tokens.
    checks = {
        "(a) continuation": (readouts.continuation_examples(chunk[None], spec.readout, special),
                             spec.readout.format, cell.lengths_dict),
        "(b) infilling": (readouts.infill_examples(chunk[None], spec.readout, special, seed=0),
                          spec.readout.format, cell.lengths_dict),
    }
    if "finetune" in config:
      checks["(c) fine-tuning"] = (_longest_naming_example(config, spec, special), "seq2seq",
                                   {s: min(n, readout_lengths(cell, config)[s])
                                    for s, n in finetune_lengths(cell, config).items()})
    for what, (examples, fmt, budget) in checks.items():
      need = readouts.feature_lengths(examples, cell.streams, fmt, special.eos)
      for stream, n in need.items():
        if n > budget[stream]:
          raise ValueError(f"grid cell {name}: a {what} example needs {stream} length {n} > "
                           f"{budget[stream]}, its training row; lower readouts.chunk_length "
                           "/ finetune.max_body_bytes or raise data.seq_length")
    cells.append(cell)
  return cells


def _longest_naming_example(config, spec: ObjectiveSpec, special) -> list[scoring.Request]:
  ft = config.finetune
  filler = special.first_regular_id
  body = np.full(ft.max_body_bytes, filler, np.int32)
  example = scoring.Request(body, np.full(ft.max_name_bytes, filler, np.int32),
                             np.ones(ft.max_name_bytes, bool))
  if spec.readout.finetune_mode:
    example = scoring.Request(np.concatenate([[special.mode_id(spec.readout.finetune_mode)],
                                               body]).astype(np.int32),
                               example.continuation, example.scored)
  return [example]


def flops_per_token(cell: Cell) -> float:
  """Analytic training FLOPs per row token (6N + attention over the full score matrix)."""
  lengths = cell.lengths_dict
  if cell.streams == "decoder":
    return flops.training_flops(flops.config_matmuls(cell.model_config, lengths["decoder"]))
  table = flops.config_matmuls(cell.model_config, lengths["encoder"],
                               targets_length=lengths["decoder"])
  return flops.training_flops(table) / (lengths["encoder"] + lengths["decoder"])


def fingerprint(config: ml_collections.ConfigDict, extent: str = "grid") -> str:
  """Hash of everything a cell's numbers depend on (not the experiment's extent, the section
  `extent` names; nor the output options, how the processes join, the checkpoint frequency or
  which steps are profiled)."""
  relevant = {k: v for k, v in config.to_dict().items()
              if k not in (extent, "output", "distributed")}
  relevant["train"] = {k: v for k, v in relevant["train"].items()
                       if k not in ("checkpoint_every", "profile_steps")}
  text = json.dumps(relevant, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


