"""The `seqlab` command (also `python -m seqlab`).

  seqlab train    --config experiments/configs/tiny.py[:arg] --workdir DIR [--config.a.b=v ...]
  seqlab eval     --workdir DIR [--split validation] [--batches N]
  seqlab generate --workdir DIR --prompt "def " [--max-new-tokens 64]
                  [--strategy greedy|sample|beam]
  seqlab zero-shot --workdir DIR [--tasks heldout|train|all|NAME,...] [--shots 0,2] [--limit N]
  seqlab lm-eval  --workdir DIR --tasks TASK[,TASK...] [--num-fewshot K] [--include-path DIR]
                  [--no-default-tasks] [--limit N] [--batch-size B] [--mode auto|none|s2s|...]

`train` resumes when DIR already holds checkpoints of the same model; `eval` and `generate`
read the config saved in DIR and restore its newest readable checkpoint; `zero-shot` scores that
checkpoint on the built-in task suite derived from the corpus it was trained on (held-out
split; few-shot examples from the train split), one JSON line per task and number of shots
plus a "mean" line; `lm-eval` scores that
checkpoint with EleutherAI's lm-evaluation-harness (`pip install 'seqlab[eval]'`; model type
`seqlab`, see seqlab/evaluation/lm_eval_model.py), one JSON line per task. Each prints one JSON
line per result on stdout and nothing else (whatever a library or the distributed runtime
prints goes to stderr); progress and notices go to stderr. Bad input (an unknown config key, a
batch size that does not divide over the devices, a workdir locked by another run or holding
another model, a config that drifted from the checkpoint's, no readable checkpoint, a loss that
stopped being finite, a work directory that cannot be written) exits with status 2 and a
one-line message. Compiled programs persist between runs in `~/.cache/seqlab/jax`
(`seqlab.compile_cache`: SEQLAB_COMPILATION_CACHE=DIR moves it, =off turns it off).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from seqlab import compile_cache, host_memory


def _parse(argv):
  parser = argparse.ArgumentParser(prog="seqlab", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  tr = sub.add_parser("train", help="train (or resume) a config in a work directory")
  tr.add_argument("--config", required=True, help="config file, optionally file.py:arg")
  tr.add_argument("--workdir", required=True)
  ev = sub.add_parser("eval", help="evaluate the newest checkpoint of a work directory")
  ev.add_argument("--workdir", required=True)
  ev.add_argument("--split", default="validation")
  ev.add_argument("--batches", type=int, default=None)
  ge = sub.add_parser("generate", help="generate text from the newest checkpoint")
  ge.add_argument("--workdir", required=True)
  ge.add_argument("--prompt", action="append", required=True,
                  help="a prompt (repeat the flag for a batch)")
  ge.add_argument("--max-new-tokens", type=int, default=64)
  ge.add_argument("--strategy", default="greedy", choices=("greedy", "sample", "beam"))
  ge.add_argument("--temperature", type=float, default=1.0)
  ge.add_argument("--top-k", type=int, default=None)
  ge.add_argument("--top-p", type=float, default=None)
  ge.add_argument("--num-beams", type=int, default=4)
  ge.add_argument("--seed", type=int, default=0)
  zs = sub.add_parser("zero-shot", help="the built-in task suite on the newest checkpoint")
  zs.add_argument("--workdir", required=True)
  zs.add_argument("--tasks", default="heldout",
                  help="heldout, train, all, or comma-separated suite task names")
  zs.add_argument("--shots", default="0", help="comma-separated numbers of shots")
  zs.add_argument("--limit", type=int, default=None, help="examples per task")
  zs.add_argument("--max-documents", type=int, default=400,
                  help="corpus documents read per split to build the suite")
  zs.add_argument("--batch-size", type=int, default=8)
  zs.add_argument("--seed", type=int, default=1234)
  le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on the newest checkpoint")
  le.add_argument("--workdir", required=True)
  le.add_argument("--tasks", required=True, help="comma-separated lm-evaluation-harness tasks")
  le.add_argument("--num-fewshot", type=int, default=None)
  le.add_argument("--include-path", default=None, help="a folder of task YAML files")
  le.add_argument("--no-default-tasks", action="store_true",
                  help="index only --include-path's tasks, not the harness's built-in ones")
  le.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
  le.add_argument("--batch-size", type=int, default=8)
  le.add_argument("--mode", default="auto", help="UL2 mode token: auto, none, s2s, nlu, nlg")
  le.add_argument("--seed", type=int, default=1234)
  return parser.parse_known_args(argv)


_RESULTS = None  # where the JSON lines go: the real stdout once `main` has taken it


def _emit(record: dict) -> None:
  out = _RESULTS or sys.stdout
  out.write(json.dumps(record) + "\n")
  out.flush()


def _round(values: dict) -> dict:
  return {k: round(v, 4) for k, v in values.items()
          if isinstance(v, float) and math.isfinite(v)}


def cmd_train(args, overrides) -> int:
  from seqlab import config as config_lib  # pylint: disable=g-import-not-at-top
  from seqlab import loop  # pylint: disable=g-import-not-at-top
  config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  result = loop.train_and_evaluate(config, args.workdir)
  last = loop.last_values(result["history"])
  keep = ("loss", "tokens_per_s", "images_per_s", "mfu")
  summary = {k: v for k, v in last.items() if k in keep or k.startswith("eval/")}
  _emit({"status": result["status"], "step": result["step"],
         "start_step": result["start_step"], **_round(summary)})
  return 0


def cmd_eval(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from seqlab import loop, parallel  # pylint: disable=g-import-not-at-top
  if args.batches is not None and args.batches < 1:
    raise ValueError(f"--batches={args.batches} must be >= 1")
  config = loop.saved_config(args.workdir)
  experiment, params, step = loop.restore_params(config, args.workdir)
  mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
  values = loop.evaluate(params, experiment, config, mesh, loop.make_eval_fn(experiment),
                         batch_size=int(config.data.batch_size), num_batches=args.batches,
                         split=args.split)
  _emit({"step": step, "split": args.split, **_round(values)})
  return 0


def cmd_generate(args) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seqlab import decoding, loop  # pylint: disable=g-import-not-at-top
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
  if args.num_beams < 1:
    raise ValueError(f"--num-beams={args.num_beams} must be >= 1")
  if args.temperature <= 0 or not math.isfinite(args.temperature):
    raise ValueError(f"--temperature={args.temperature} must be a finite number > 0")
  if args.top_k is not None and args.top_k < 1:
    raise ValueError(f"--top-k={args.top_k} must be >= 1")
  if args.top_p is not None and not 0 < args.top_p <= 1:
    raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")
  for prompt in args.prompt:
    try:
      prompt.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(f"--prompt={prompt!r} is not valid text ({e.reason} at position "
                       f"{e.start})") from None
  config = loop.saved_config(args.workdir)
  experiment, params, step = loop.restore_params(config, args.workdir)
  if experiment.architecture not in ("decoder", "encoder_decoder"):
    raise ValueError(f"seqlab generate needs a decoder or encoder-decoder; workdir="
                     f"{args.workdir!r} holds a {experiment.architecture} model")
  tokenizer = loop.make_tokenizer(config)
  prompts = [tokenizer.encode(p) for p in args.prompt]
  out = decoding.generate(experiment.model, params, prompts, max_new_tokens=args.max_new_tokens,
                          strategy=args.strategy, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                          eos_id=tokenizer.eos_id, rng=args.seed)
  for prompt, row in zip(args.prompt, np.asarray(out.tokens)):
    _emit({"step": step, "prompt": prompt, "completion": tokenizer.decode(row)})
  return 0


def _int_list(flag: str, text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag}={text!r} is not a comma-separated list of integers") from None
  if not values or min(values) < 0:
    raise ValueError(f"{flag}={text!r} needs one or more integers >= 0")
  return values


def cmd_zero_shot(args) -> int:
  from seqlab import loop  # pylint: disable=g-import-not-at-top
  from seqlab import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from seqlab.evaluation import harness  # pylint: disable=g-import-not-at-top
  shots = _int_list("--shots", args.shots)
  for flag, value in (("--limit", args.limit), ("--max-documents", args.max_documents),
                      ("--batch-size", args.batch_size)):
    if value is not None and value < 1:
      raise ValueError(f"{flag}={value} must be >= 1")
  config = loop.saved_config(args.workdir)
  model = harness.LanguageModel.from_workdir(args.workdir, config=config)
  suite = tasks_lib.register_suite(config.data.source, dict(config.data.get("source_kwargs", {})
                                                            or {}),
                                   max_documents=args.max_documents)
  groups = {"heldout": suite["heldout"], "train": suite["train"],
            "all": suite["train"] + suite["heldout"]}
  names = groups.get(args.tasks) or [t.strip() for t in args.tasks.split(",") if t.strip()]
  known = suite["train"] + suite["heldout"]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise ValueError(f"--tasks={args.tasks!r}: not in this corpus's suite: {unknown or names}; "
                     f"known: heldout, train, all, {', '.join(known)}")
  for row in harness.evaluate_tasks(model, names, shots=shots, limit=args.limit,
                                    seed=args.seed, batch_size=args.batch_size):
    _emit({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
  return 0


def cmd_lm_eval(args) -> int:
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not tasks:
    raise ValueError(f"--tasks={args.tasks!r} names no task")
  if args.num_fewshot is not None and args.num_fewshot < 0:
    raise ValueError(f"--num-fewshot={args.num_fewshot} must be >= 0")
  if args.batch_size < 1:
    raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
  if args.limit is not None and not args.limit > 0:
    raise ValueError(f"--limit={args.limit} must be > 0")
  if args.mode not in ("auto", "none", "s2s", "nlu", "nlg"):
    raise ValueError(f"--mode={args.mode!r} is not one of auto, none, s2s, nlu, nlg")
  if args.include_path is not None and not os.path.isdir(args.include_path):
    raise ValueError(f"--include-path={args.include_path!r} is not a directory")
  try:
    from seqlab.evaluation import lm_eval_model  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("seqlab lm-eval needs lm-evaluation-harness: pip install "
                     f"'seqlab[eval]' ({e})") from None
  limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
  try:
    results = lm_eval_model.evaluate(args.workdir, tasks, num_fewshot=args.num_fewshot,
                                     include_path=args.include_path, limit=limit,
                                     batch_size=args.batch_size, mode=args.mode,
                                     seed=args.seed,
                                     include_defaults=not args.no_default_tasks)
  except KeyError as e:  # lm-eval's error for a task it does not know
    raise ValueError(f"--tasks: lm-evaluation-harness does not know {e}") from None
  for task, values in results.items():
    _emit({"task": task, **{k: (round(v, 6) if isinstance(v, float) else v)
                            for k, v in values.items()}})
  return 0


def _results_to_real_stdout() -> None:
  """Keeps stdout for the JSON lines: file descriptor 1 is pointed at stderr, so whatever C++
  libraries print (the distributed runtime's gloo among them) lands there."""
  global _RESULTS
  if _RESULTS is not None or sys.stdout is not sys.__stdout__:
    return  # already done, or stdout is captured (tests): leave it alone
  try:
    sys.stdout.flush()
    _RESULTS = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
  except OSError:
    pass


def _ignore_closed_event_loops() -> None:
  """Drops one known line of noise: orbax's reader threads, after a damaged checkpoint, call
  into their already closed asyncio loop; Python then prints "Exception ignored ... Event loop
  is closed" tracebacks that bury the one warning that matters."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def main(argv=None) -> int:
  """Entry point of `seqlab` / `python -m seqlab`; returns the exit status."""
  host_memory.keep_freed_host_memory()  # before JAX starts: see seqlab/host_memory.py
  args, rest = _parse(sys.argv[1:] if argv is None else argv)
  compile_cache.enable()  # before the first compile: see seqlab/compile_cache.py
  if argv is None:
    _results_to_real_stdout()
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's routine INFO / WARNING lines
  _ignore_closed_event_loops()
  try:
    if args.command == "train":
      bad = [r for r in rest if not r.startswith(("--config.", "config."))]
      if bad:
        raise ValueError(f"seqlab train: unrecognised arguments {bad}")
      return cmd_train(args, rest)
    if rest:
      raise ValueError(f"seqlab {args.command}: unrecognised arguments {rest}")
    if args.command == "eval":
      return cmd_eval(args)
    if args.command == "lm-eval":
      return cmd_lm_eval(args)
    if args.command == "zero-shot":
      return cmd_zero_shot(args)
    return cmd_generate(args)
  except (ValueError, FloatingPointError) as e:  # bad input: a message, not a traceback
    print(f"seqlab {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except OSError as e:  # an unwritable or missing path
    where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
    print(f"seqlab {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
    return 2


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


if __name__ == "__main__":
  sys.exit(main())
