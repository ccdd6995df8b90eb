"""Tiny models trained on the Python standard library (byte-level) or on scikit-learn's digits.

Run:     seqlab train --config experiments/configs/tiny.py --workdir /tmp/tiny
         seqlab train --config experiments/configs/tiny.py:encoder_decoder --workdir /tmp/tiny_ed
         seqlab generate --workdir /tmp/tiny --prompt "def "
Time:    about 20 s on a 2-core CPU (40 steps of gpt-tiny, two evaluations, two checkpoints).
Expect:  training loss falls from ~6.2 (log 512) to below ~3.8 nats per byte, eval perplexity
         ~25; a second run on the same workdir resumes at the last checkpoint (and, with the
         same `train.steps`, has nothing left to do).
Args:    "decoder" (default, gpt-tiny, full causal LM), "prefix" (prefix decoder, prefix-LM
         objective), "encoder_decoder" (t5-tiny, span corruption), "mae" (mae-tiny on 8x8
         digits, pixel loss on 75% masked patches).
Knobs:   --config.mesh.strategy=fsdp --config.mesh.fsdp=2 (FSDP over 2 devices; add
         --config.mesh.rules='(("embed", "fsdp"),)' for logical-axis rules),
         --config.mesh.strategy=fsdp --config.mesh.data=2 --config.mesh.fsdp=2
         --config.mesh.model=2 (8 devices: tensor parallelism in pairs, FSDP, data),
         --config.model.overrides.dtype=bfloat16 (bfloat16 compute, float32 parameters),
         --config.train.accum_steps=4 (gradient accumulation over 4 micro-batches).
"""

import ml_collections

ARGS = ("decoder", "prefix", "encoder_decoder", "mae")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arch = arg or "decoder"
  if arch not in ARGS:
    raise ValueError(f"config arg={arch!r} is not one of {', '.join(ARGS)}")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.preset = {"encoder_decoder": "t5-tiny", "mae": "mae-tiny"}.get(arch, "gpt-tiny")
  config.model.overrides = ml_collections.ConfigDict(
      {"attention": "prefix"} if arch == "prefix" else {})

  config.data = ml_collections.ConfigDict()
  config.data.source = "digits" if arch == "mae" else "stdlib"
  config.data.source_kwargs = ml_collections.ConfigDict(
      {"image_size": 8} if arch == "mae" else {})
  config.data.tokenizer = "byte"
  config.data.tokenizer_kwargs = ml_collections.ConfigDict()
  config.data.objective = {"decoder": "full_lm", "prefix": "prefix_lm",
                           "encoder_decoder": "span_corruption", "mae": "mae"}[arch]
  config.data.objective_kwargs = ml_collections.ConfigDict()
  config.data.seq_length = 128
  config.data.inputs_length = 128
  config.data.targets_length = 32
  config.data.batch_size = 16       # global, over all devices and processes
  config.data.packing = True

  # total_steps=0: the schedule spans train.steps (and stretches when a resume raises it).
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=10, total_steps=0,
      end_learning_rate_fraction=0.1, weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-9,
      clip_norm=1.0))

  config.train = ml_collections.ConfigDict(dict(
      steps=40, log_every=10, eval_every=20, eval_batches=2, checkpoint_every=20,
      max_to_keep=2, best_metric="", best_mode="min", accum_steps=1, progress=True,
      stop_check_every=1))
  config.train.task_kwargs = ml_collections.ConfigDict()

  # strategy "data" (replicated state, shard_map + psum) or "fsdp" (sharded state, jit);
  # data / fsdp / model are mesh sizes (-1 = the remaining devices, data or fsdp only); model
  # > 1 is tensor parallelism (heads, d_ff and vocabulary split Megatron-style; "fsdp" only,
  # and it must divide them); rules = logical-axis rules, empty for the largest-divisible-
  # dimension FSDP heuristic (plus the tensor-parallel defaults when model > 1).
  config.mesh = ml_collections.ConfigDict(dict(strategy="data", data=-1, fsdp=1, model=1,
                                               rules=()))
  # initialize=True: jax.distributed.initialize() with no arguments (TPU pods, SLURM find the
  # processes themselves); or an explicit coordinator with num_processes > 1.
  # heartbeat_timeout_s: how soon the other processes stop (exit non-zero) when one dies.
  config.distributed = ml_collections.ConfigDict(dict(
      initialize=False, coordinator_address="", num_processes=0, process_id=0,
      heartbeat_timeout_s=30))
  return config
