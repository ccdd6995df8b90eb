"""Input-pipeline throughput vs what a train step consumes, for every objective at 512 tokens.

Run:  python experiments/benchmarks/data_pipeline.py           (about 4 minutes on a 2-core CPU)
      python experiments/benchmarks/data_pipeline.py --quick   (a smoke run, under a minute:
                                                               train-step columns for full LM only)

Three measurements per objective, in one run:

* pipeline examples/s: `seqlab.data.pipeline.make_pipeline` on the standard-library corpus with
  the byte tokenizer and its defaults (in-process: no worker processes, one grain reader thread
  for reading and tokenizing, the rest in the calling thread), pinned to one core; whole
  batches timed after a warm-up: source -> tokenize -> chunk -> objective -> convert -> pack ->
  batch. Also raw text tokens consumed per second and the fraction of row positions filled.
* step examples/s: the default small model of the architecture, built from
  `experiments/configs/tiny.py` with `seqlab.loop.build` (gpt-tiny for full LM; the "prefix"
  gpt-tiny for prefix LM and decoder UL2; t5-tiny for span corruption and enc-dec UL2;
  bert-tiny with its MLM / NSP heads for MLM, as tiny.py has no encoder entry), position table
  widened to 512; its train step (the engine's, `seqlab.trainer.train_step`, on a one-device
  mesh) timed on a real batch of the case's shapes on all cores, as training runs it (median
  over rounds, `train_throughput.median_step_seconds`). Feed ratio = pipeline / step examples/s;
  target >= 10x.
* data wait: the pipeline (built by `seqlab.loop.make_input` from the same config, so with its
  default worker count: in-process, see above) drives that train step for `--wait_steps` steps
  in `seqlab.loop`'s order (next batch, dispatch the step, then fetch the previous step's
  metrics), not pinned; data wait = time blocked in `next()` / wall time. Target < 5%.

Examples are rows of the given lengths (packed). On a shared machine the absolute numbers move
with the load; the step runs on all cores while the pipeline gets one, so the ratio is a lower
bound on the headroom of a host that gives the pipeline its own core.

`benchmark_rows()` and `train_step_rows()` return the measurements; `format_table(rows,
train_examples_per_s=..., data_wait=...)` prints them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Mapping

from seqlab.data import ByteTokenizer, StdlibSource
from seqlab.data.pipeline import make_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "experiments" / "configs" / "tiny.py"
FEED_TARGET = 10.0   # pipeline examples/s over step examples/s
WAIT_TARGET = 0.05   # fraction of training wall time blocked on the iterator

# (label, objective, architecture, seq_lengths, objective kwargs, model: a tiny.py argument,
# or "encoder" for bert-tiny with pre-training heads)
CASES = (
    ("full LM", "full_lm", "decoder", 512, {}, "decoder"),
    ("prefix LM", "prefix_lm", "decoder", 512, {}, "prefix"),
    ("MLM", "mlm", "encoder", 512, {}, "encoder"),
    ("MLM + NSP", "mlm_nsp", "encoder", 512, {}, "encoder"),
    ("span corruption", "span_corruption", "encoder_decoder", {"encoder": 512, "decoder": 114},
     {}, "encoder_decoder"),
    ("UL2 (decoder)", "ul2", "decoder", 512, {}, "prefix"),
    ("UL2 (enc-dec)", "ul2", "encoder_decoder", {"encoder": 512, "decoder": 512}, {},
     "encoder_decoder"),
)


def pin_to_one_core() -> str:
  """Restricts the calling thread (and threads it starts) to its first allowed core."""
  if not hasattr(os, "sched_setaffinity"):
    return "not pinned (no sched_setaffinity)"
  core = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {core})
  return f"pinned to core {core}"


# ─── Pipeline ────────────────────────────────────────────────────────────────────────────────


def benchmark_rows(*, batch_size: int = 16, seconds: float = 3.0, warmup_batches: int = 5,
                   cases=CASES) -> list[dict]:
  """One dict per case: label, objective, architecture, lengths, chunk, examples/s, ...."""
  source, tokenizer = StdlibSource("train"), ByteTokenizer()
  rows = []
  for label, objective, architecture, lengths, kwargs, _ in cases:
    it = make_pipeline(source, tokenizer, objective, architecture, seq_lengths=lengths,
                       batch_size=batch_size, seed=0, objective_kwargs=kwargs)
    for _ in range(warmup_batches):
      next(it)
    examples_before = it.stats.get("examples", 0)
    num_rows, filled, total = 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
      batch = next(it)
      num_rows += batch_size
      segments = [v for k, v in batch.items() if k.endswith("_segment_ids")]
      filled += sum(int((s > 0).sum()) for s in segments)
      total += sum(s.size for s in segments)
    elapsed = time.perf_counter() - start
    examples = it.stats.get("examples", 0) - examples_before  # packed examples read
    rows.append({
        "label": label, "objective": objective, "architecture": architecture,
        "lengths": it.lengths, "chunk_length": it.chunk_length,
        "rows_per_s": num_rows / elapsed,
        "examples_per_row": examples / max(num_rows, 1),
        "raw_tokens_per_s": examples * it.chunk_length / elapsed,
        "fill": filled / total,
    })
  return rows


# ─── Train step ──────────────────────────────────────────────────────────────────────────────


def case_config(case, batch_size: int):
  """The tiny.py config that trains `case`'s objective on its default small model."""
  from seqlab import config as config_lib  # pylint: disable=g-import-not-at-top
  _, objective, architecture, lengths, kwargs, model = case
  config = config_lib.load_config(f"{TINY_CONFIG}:{'decoder' if model == 'encoder' else model}")
  if model == "encoder":
    config.model.preset = "bert-tiny"
    config.model.overrides.pretraining_heads = True
  lengths = lengths if isinstance(lengths, Mapping) else {"encoder": lengths}
  if architecture == "encoder_decoder":
    config.data.inputs_length = lengths["encoder"]
    config.data.targets_length = lengths["decoder"]
  else:
    config.data.seq_length = next(iter(lengths.values()))
  config.model.overrides.max_length = max(lengths.values())
  config.data.objective = objective
  config.data.objective_kwargs = dict(kwargs)
  config.data.batch_size = batch_size
  return config


def _train_throughput():
  """The sibling train-step benchmark (its timing loop), importable from a script or a test."""
  here = str(pathlib.Path(__file__).resolve().parent)
  if here not in sys.path:
    sys.path.insert(0, here)
  import train_throughput  # pylint: disable=g-import-not-at-top
  return train_throughput


def _measure_data_wait(model: dict, it, steps: int) -> float:
  """Fraction of wall time blocked in `next(it)` while `it` feeds `steps` train steps."""
  import jax  # pylint: disable=g-import-not-at-top
  from seqlab import parallel  # pylint: disable=g-import-not-at-top
  waited, pending = 0.0, None
  start = time.perf_counter()
  for _ in range(steps):
    before = time.perf_counter()
    batch = next(it)
    waited += time.perf_counter() - before
    model["state"], metrics = model["step"](model["state"],
                                            parallel.global_batch(batch, model["mesh"]))
    if pending is not None:  # as seqlab.loop: step k's metrics after step k + 1 is dispatched
      jax.device_get(pending)
    pending = metrics
  jax.device_get(pending)
  return waited / (time.perf_counter() - start)


def train_step_rows(*, batch_size: int = 16, rounds: int = 3, steps: int = 2,
                    wait_steps: int = 10, cases=CASES) -> dict[str, dict]:
  """{label: {"step_s", "examples_per_s", "data_wait"}} of each case's default small model."""
  import jax  # pylint: disable=g-import-not-at-top
  from seqlab import loop, parallel, trainer  # pylint: disable=g-import-not-at-top
  median_step_seconds = _train_throughput().median_step_seconds
  models, out = {}, {}
  for case in cases:
    label, _, architecture, _, _, model_name = case
    config = case_config(case, batch_size)
    key = (model_name, config.model.overrides.max_length)
    if key not in models:  # cases on one model share its state and compiled step
      job = loop.job(loop.build(config), batch_size)
      mesh, options = parallel.make_mesh(1, 1, jax.devices()[:1]), loop.options(config)
      models[key] = {"mesh": mesh, "step": trainer.train_step(job, mesh, options),
                     "state": jax.jit(job.init, out_shardings=trainer.state_sharding(
                         job, mesh, options))()}
    model = models[key]
    it = loop.make_input(config, architecture, "train", batch_size=batch_size, shard_index=0,
                         shard_count=1)
    batch = next(it)

    def run(model=model, batch=batch):
      model["state"], metrics = model["step"](model["state"],
                                              parallel.global_batch(batch, model["mesh"]))
      return metrics["loss"]

    wall, _ = median_step_seconds({label: run}, rounds, steps)
    out[label] = {"step_s": wall[label], "examples_per_s": batch_size / wall[label],
                  "data_wait": _measure_data_wait(model, it, wait_steps)}
  return out


# ─── Table ───────────────────────────────────────────────────────────────────────────────────


def _verdict(ok: bool) -> str:
  return "PASS" if ok else "FAIL"


def format_table(rows: list[dict], train_examples_per_s: Mapping[str, float] | None = None,
                 data_wait: Mapping[str, float] | None = None) -> str:
  """A text table; `train_examples_per_s` ({label or objective: examples/s of a train step})
  adds the step's consumption, the feed ratio and its verdict (>= 10x), `data_wait` ({label:
  fraction of training time blocked on the iterator}) the data wait and its verdict (< 5%)."""
  header = ["objective", "architecture", "row lengths", "chunk", "examples/s", "ex/row",
            "raw tok/s", "fill"]
  if train_examples_per_s is not None:
    header += ["step ex/s", "feed ratio", f">={FEED_TARGET:.0f}x"]
  if data_wait is not None:
    header += ["data wait", f"<{WAIT_TARGET:.0%}"]
  lines = []
  for r in rows:
    lengths = "/".join(str(v) for v in r["lengths"].values())
    line = [r["label"], r["architecture"], lengths, str(r["chunk_length"]),
            f"{r['rows_per_s']:.0f}", f"{r['examples_per_row']:.2f}",
            f"{r['raw_tokens_per_s'] / 1e6:.2f}M", f"{r['fill']:.3f}"]
    if train_examples_per_s is not None:
      step = train_examples_per_s.get(r["label"], train_examples_per_s.get(r["objective"]))
      if step is None:
        line += ["-", "-", "-"]
      else:
        ratio = r["rows_per_s"] / step
        line += [f"{step:.1f}", f"{ratio:.1f}x", _verdict(ratio >= FEED_TARGET)]
    if data_wait is not None:
      wait = data_wait.get(r["label"])
      line += ["-", "-"] if wait is None else [f"{wait:.2%}", _verdict(wait < WAIT_TARGET)]
    lines.append(line)
  widths = [max(len(x) for x in col) for col in zip(header, *lines)]
  fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="0.3 s per pipeline case; train-step columns for full LM only")
  parser.add_argument("--seconds", type=float, default=3.0, help="timed pipeline seconds per case")
  parser.add_argument("--batch_size", type=int, default=16,
                      help="rows per batch (tiny.py's data.batch_size)")
  parser.add_argument("--rounds", type=int, default=3, help="train-step timing rounds")
  parser.add_argument("--steps", type=int, default=2, help="timed train steps per round")
  parser.add_argument("--wait_steps", type=int, default=10,
                      help="pipeline-driven train steps of the data-wait measurement")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  step_cases, rounds, steps, wait_steps = CASES, args.rounds, args.steps, args.wait_steps
  if args.quick:
    step_cases, rounds, steps, wait_steps = CASES[:1], 1, 2, 3
  # The train step first, on every core: XLA's threads start here, before the pinning below.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  steps_out = train_step_rows(batch_size=args.batch_size, rounds=rounds, steps=steps,
                              wait_steps=wait_steps, cases=step_cases)
  note = pin_to_one_core()
  rows = benchmark_rows(batch_size=args.batch_size, seconds=0.3 if args.quick else args.seconds)
  device = jax.devices()[0]
  print(f"pipeline: stdlib corpus, byte tokenizer, batch {args.batch_size}, make_pipeline "
        f"defaults (in-process, 1 reader thread), {note}; examples = rows of the given lengths")
  print(f"train step: tiny.py models (gpt-tiny, prefix gpt-tiny, bert-tiny + heads, t5-tiny; "
        f"positions to 512), batch {args.batch_size}, {device.platform} backend on {cores} "
        f"core(s), median of {rounds} x {steps} steps; data wait over {wait_steps} "
        f"pipeline-driven steps")
  print(format_table(rows, {k: v["examples_per_s"] for k, v in steps_out.items()},
                     {k: v["data_wait"] for k, v in steps_out.items()}))
  if args.quick:
    print("(--quick: a smoke run; train-step columns for full LM only)")


if __name__ == "__main__":
  main()
