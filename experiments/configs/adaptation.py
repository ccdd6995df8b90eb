"""Adapting a pretrained model to another objective vs training it from scratch (Wang et al. 2022).

Run:     python experiments/adaptation.py \
             --config experiments/configs/adaptation.py:quick \
             --workdir results/adaptation
         (rerunning resumes: finished trainings are read back from their records.)
Args:    quick (default), smoke, gpu.

The data, model, optimizer and readout sections are `compare_objectives.py`'s (the same
corpus, tokenizer and model sizes as the objective comparison), so an adaptation's from-scratch
runs are that grid's cells trained for `train.steps` steps.

quick    Byte-level stdlib corpus, 128-token rows, d_model 96, 2 layers; three adaptations
         (non-causal MLM, FLM, UL2R) x 3 seeds, 300 steps of batch 16 per training, held-out
         loss every 10 steps.
         Time: about 15 minutes on a 2-core CPU.
smoke    One adaptation (non-causal MLM), one seed, a tiny model, a few steps (tests).
gpu      compare_objectives:gpu's models and data (d_model 512, 6 layers, 512-token rows,
         batch 64), 3,000 steps per training, 3 seeds. Time: about an hour on one H100-class GPU.
"""

import os

import ml_collections

from seqlab import config as config_lib

ARGS = ("quick", "smoke", "gpu")

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "quick"
  if arg not in ARGS:
    raise ValueError(f"config arg={arg!r} is not one of {ARGS}")
  base = config_lib.load_config(os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "compare_objectives.py") + ":" + arg)
  c = ml_collections.ConfigDict()
  for section in ("data", "model", "optimizer", "readouts", "mesh", "distributed"):
    c[section] = base[section]
  if arg == "quick":  # readouts on twice the grid's held-out chunks: six targets, not twenty
    c.readouts.num_sequences = 256
  c.adaptation = ml_collections.ConfigDict(dict(names="nc_mlm,flm,ul2r", num_seeds=3))
  # Every training (from scratch or adapted) runs `steps` steps with the same optimizer and
  # schedule; a source model is its cell's from-scratch run. The held-out loss of the target
  # objective is measured every `eval_every` steps on `eval_batches` fixed batches.
  c.train = ml_collections.ConfigDict(dict(steps=300, checkpoint_every=0, eval_every=10,
                                           eval_batches=8, eval_seed=4321))
  c.output = ml_collections.ConfigDict(dict(run_name=arg, progress=True))
  if arg == "smoke":
    c.adaptation.update(dict(names="nc_mlm", num_seeds=1))
    c.train.update(dict(steps=4, checkpoint_every=2, eval_every=2, eval_batches=2))
    c.output.progress = False
  elif arg == "gpu":
    c.train.update(dict(steps=3000, checkpoint_every=1000, eval_every=100, eval_batches=16))
  return c
