"""Architectures x pretraining objectives, compute-matched (UL2; Wang et al. 2022).

Run:     python experiments/compare_objectives.py \
             --config experiments/configs/compare_objectives.py:quick \
             --workdir results/compare_objectives
         (`make reproduce` runs exactly this; rerunning resumes finished cells.)
Args:    quick (default), smoke, standard, gpu, pod.

quick    Byte-level stdlib corpus, 128-token rows, d_model 96, 2 layers per stack, 10 cells
         (causal/prefix decoder and encoder-decoder x full LM / prefix LM / span corruption /
         UL2; a full LM fits only the causal decoder) x 2 seeds, 140 steps of batch 16; all
         five readouts, (d) zero-shot only (a 128-byte row holds no in-context example).
         Time: about 9.5 minutes on a 2-core CPU (9m34s measured with a cold compilation
         cache; 442 s of cell wall time with a warm one).
         Expect: on (a) continuation NLL the encoder-decoder prefix LM and the full-LM causal
         decoder tie (2.560 ± 0.003 and 2.584 ± 0.118; with 4-8x the steps the causal decoder
         leads clearly, results/compare_objectives/budget); span corruption (encoder-decoder)
         best on (b) read as T5's targets (sentinels scored), UL2 next and not separable at
         two seeds; (c) exact match 0 everywhere, chrF and the name NLL still separate the
         cells. (d) and (e) sit below chance for every cell (26-28% against chance 33.3%;
         next line 21.9% in every cell against 25%): at this size and row length no zero-shot
         ability exists to compare (the standard config shows it), and results.md says so
         type by type.
smoke    Two cells, one seed, a few steps, tiny model: checks the plumbing in ~30 s (tests).
standard The CPU study that can show zero-shot ability: 5 cells (causal decoder + full LM,
         prefix decoder + prefix LM, prefix decoder + span corruption ("non-causal MLM"),
         encoder-decoder + span corruption, causal decoder + UL2) x 2 seeds, 256-token rows,
         d_model 128, 4 layers per stack, 450 steps of batch 16 (1.8M tokens per cell); (d)
         and (e) on up to 200 examples per held-out type, reported per type with exact
         binomial tests against chance (pooled over seeds).
         Time: 76 minutes measured on a 2-core CPU shared with other jobs (4,557 s of cell
         wall time; decoder cells ~5 minutes each alone).
         Expect: (a) the full-LM causal decoder best on continuation NLL (2.295 ± 0.071),
         significantly ahead of encoder-decoder span corruption; (b) UL2 best on span tokens,
         encoder-decoder span corruption on T5's targets (2.387). (d) zero-shot ability exists
         and is significant on the held-out sentence-completion types in every cell: next
         line 35-37% (chance 25%, 200 examples, p <= 0.002) and next sentence 55% (chance 25%,
         20 examples, p = 0.004), zero-shot and after multitask fine-tuning (e); docstring and
         returns stay at or below chance. The cells' mean accuracies (37.1-37.9%) are not
         separable at two seeds: this scale shows the ability, not the papers' ordering.
gpu      d_model 512, 6 layers per stack (scanned, remat "dots"), 512-token rows, 12 cells
         incl. span_prefix_lm, 3 seeds, 3,000 steps of batch 64 (~98M tokens per cell).
         Time: about an hour on one H100-class GPU (bfloat16). Expect: the same ordering with
         clearer margins, and (c) exact match in the tens of percent.
pod      A TPU slice: SentencePiece vocabulary (32k, 256 sentinels) trained on the corpus,
         d_model 1024, 12 layers per stack (scanned, remat "full"), 1024-token rows, global
         batch 512, FSDP mesh, `jax.distributed` on every host (launch the same command on all hosts, see
         TPU_SETUP.md). Not runnable on a CPU; `plan()` validates it.
"""

import ml_collections

ARGS = ("quick", "smoke", "standard", "gpu", "pod")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "quick"
  if arg not in ARGS:
    raise ValueError(f"config arg={arg!r} is not one of {ARGS}")
  c = ml_collections.ConfigDict()

  c.grid = ml_collections.ConfigDict(dict(
      architectures="causal_decoder,prefix_decoder,encoder_decoder",
      objectives="full_lm,prefix_lm,span_corruption,ul2",
      # A full LM has no inputs: on a prefix decoder it trains exactly the causal decoder, and
      # an encoder-decoder would have nothing to encode.
      skip="prefix_decoder/full_lm,encoder_decoder/full_lm",
      num_seeds=2))

  c.data = ml_collections.ConfigDict(dict(
      source="stdlib", source_kwargs=ml_collections.ConfigDict(), tokenizer="byte",
      tokenizer_kwargs=ml_collections.ConfigDict(), seq_length=128, batch_size=16,
      packing=True, ul2_denoisers="ul2"))

  # Decoders mirror T5 v1.1 blocks (RMSNorm, gated GELU, no biases, untied head) with rotary
  # positions; the encoder-decoder is T5 v1.1 with relative position biases.
  c.model = ml_collections.ConfigDict(dict(
      decoder_preset="gpt-tiny", encoder_decoder_preset="t5-tiny",
      d_model=96, num_heads=3, head_dim=32, d_ff=288, num_layers=2, dropout_rate=0.0,
      dtype="float32",
      decoder_overrides=ml_collections.ConfigDict(dict(
          norm="rmsnorm", norm_eps=1e-6, activation="gated_gelu", position_embedding="rope",
          use_bias=False, tie_embeddings=False)),
      encoder_decoder_overrides=ml_collections.ConfigDict()))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, schedule="cosine", warmup_steps=20, end_learning_rate_fraction=0.1,
      weight_decay=0.0, b2=0.98, clip_norm=1.0))
  c.train = ml_collections.ConfigDict(dict(steps=140, checkpoint_every=0))

  c.readouts = ml_collections.ConfigDict(dict(
      chunk_length=44, num_sequences=128, batch_size=64, infill_seed=1234))
  c.finetune = ml_collections.ConfigDict(dict(
      steps=20, batch_size=16, learning_rate=1e-3, schedule="constant", warmup_steps=5,
      end_learning_rate_fraction=1.0, weight_decay=0.0, b2=0.98, clip_norm=1.0,
      max_body_bytes=96, max_name_bytes=24, num_eval=128, decode_batch_size=64,
      train_files=200))

  # (d) and (e): the corpus's built-in task suite (`seqlab.tasks.register_suite`), `limit`
  # validation examples per held-out type, `shots` in-context examples for the few-shot column,
  # then `multitask_steps` of fine-tuning on the training types (the `finetune` optimizer).
  # An answer must fit a row beside some context: choices of at most half a row.
  c.zero_shot = ml_collections.ConfigDict(dict(
      shots=0, limit=32, max_documents=80, max_examples=200, max_choice_chars=64, seed=1234,
      batch_size=64, multitask_steps=20, multitask_batch_size=16))

  c.mesh = ml_collections.ConfigDict(dict(strategy="data", data=-1, fsdp=1))
  # Several hosts: `seqlab.loop.join_processes` reads these fields (tiny.py explains them).
  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False, coordinator_address="", num_processes=0, process_id=0,
      heartbeat_timeout_s=30))
  c.output = ml_collections.ConfigDict(dict(run_name=arg, progress=True))

  if arg == "smoke":
    # One architecture: every further architecture adds its own compilations.
    c.grid.architectures = "causal_decoder"
    c.grid.objectives = "full_lm,span_corruption,ul2"
    c.grid.skip = ""
    c.grid.num_seeds = 1
    c.data.seq_length = 48
    c.data.batch_size = 4
    c.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=1))
    c.optimizer.warmup_steps = 1
    c.train.update(dict(steps=3, checkpoint_every=2))
    c.readouts.update(dict(chunk_length=40, num_sequences=6, batch_size=8))
    c.finetune.update(dict(steps=2, batch_size=4, max_body_bytes=24, max_name_bytes=12,
                           num_eval=6, decode_batch_size=8, train_files=8))
    c.zero_shot.update(dict(shots=1, limit=6, max_documents=40, max_examples=40,
                            max_choice_chars=20, batch_size=8, multitask_steps=2,
                            multitask_batch_size=4))
    c.output.progress = False
  elif arg == "standard":
    # Wang et al.'s three contenders (causal FLM, non-causal MLM, encoder-decoder MLM), the
    # prefix LM and UL2 on the causal decoder: the grid minus these seven cells.
    c.grid.skip = ",".join([
        "prefix_decoder/full_lm", "encoder_decoder/full_lm", "causal_decoder/prefix_lm",
        "encoder_decoder/prefix_lm", "causal_decoder/span_corruption", "prefix_decoder/ul2",
        "encoder_decoder/ul2"])
    c.data.seq_length = 256
    c.model.update(dict(d_model=128, num_heads=4, head_dim=32, d_ff=384, num_layers=4))
    c.optimizer.warmup_steps = 40
    c.train.steps = 450
    c.readouts.update(dict(chunk_length=88, num_sequences=256))
    c.finetune.update(dict(steps=40, max_body_bytes=192, num_eval=256))
    # Rows of 256 bytes hold a function but no in-context example beside it: zero-shot only.
    c.zero_shot.update(dict(shots=0, limit=200, max_documents=200, max_examples=300,
                            max_choice_chars=96, multitask_steps=60))
  elif arg == "gpu":
    c.grid.objectives = "full_lm,prefix_lm,span_corruption,ul2,span_prefix_lm"
    c.grid.num_seeds = 3
    c.data.seq_length = 512
    c.data.batch_size = 64
    c.model.update(dict(d_model=512, num_heads=8, head_dim=64, d_ff=1365, num_layers=6,
                        dtype="bfloat16"))
    # One compiled block per stack; "dots" keeps the matmul outputs and recomputes only the
    # cheap elementwise work in the backward pass (seqlab.layers.REMAT_POLICIES).
    for overrides in (c.model.decoder_overrides, c.model.encoder_decoder_overrides):
      overrides.update(dict(scan_layers=True, remat="dots"))
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=300))
    c.train.update(dict(steps=3000, checkpoint_every=1000))
    c.readouts.update(dict(chunk_length=184, num_sequences=1024, batch_size=64))
    c.finetune.update(dict(steps=500, batch_size=64, max_body_bytes=384, max_name_bytes=32,
                           num_eval=512, decode_batch_size=256, train_files=0))
    c.zero_shot.update(dict(shots=2, limit=200, max_documents=400, max_examples=500,
                            max_choice_chars=256, multitask_steps=300,
                            multitask_batch_size=64))
  elif arg == "pod":
    c.data.tokenizer = "sentencepiece"
    c.data.tokenizer_kwargs = ml_collections.ConfigDict(dict(vocab_size=32768,
                                                             num_sentinels=256))
    c.data.seq_length = 1024
    c.data.batch_size = 512
    c.grid.num_seeds = 3
    c.model.update(dict(d_model=1024, num_heads=16, head_dim=64, d_ff=2816, num_layers=12,
                        dtype="bfloat16"))
    # Rows of 1024 tokens keep every layer's attention logits if matmul outputs are saved:
    # "full" keeps only each block's input and recomputes the block in the backward pass.
    for overrides in (c.model.decoder_overrides, c.model.encoder_decoder_overrides):
      overrides.update(dict(scan_layers=True, remat="full"))
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=1000))
    c.train.update(dict(steps=20000, checkpoint_every=1000))
    c.readouts.update(dict(chunk_length=368, num_sequences=2048, batch_size=256))
    # SentencePiece pieces are several bytes: 384-byte bodies fit 1024 tokens with room.
    c.finetune.update(dict(steps=2000, batch_size=256, max_body_bytes=384, max_name_bytes=32,
                           num_eval=512, decode_batch_size=512, train_files=0))
    c.zero_shot.update(dict(shots=2, limit=500, max_documents=400, max_examples=500,
                            max_choice_chars=512, batch_size=256, multitask_steps=1000,
                            multitask_batch_size=256))
    c.mesh.update(dict(strategy="fsdp", data=-1, fsdp=8))
    c.distributed.initialize = True
  return c
