"""Train-step throughput: seqlab vs a plain Flax linen GPT vs Hugging Face GPT-2 in PyTorch.

Run:  python experiments/benchmarks/train_throughput.py           (~3 minutes on a 2-core CPU)
      python experiments/benchmarks/train_throughput.py --quick   (small shapes: a smoke run)
      python experiments/benchmarks/train_throughput.py --model gpt2-medium --dtype bfloat16
                                        (on a GPU: the gpt2-medium target, >= 40% MFU on an H100)

One GPT-style decoder (d_model 256, 4 layers, 4 heads of 64, d_ff 1024, learned positions,
tied embeddings, GELU-tanh, pre-LN, vocabulary 512, length 256, batch 16, no dropout), trained
with the same optimizer (global-norm clipping 1.0, AdamW b1 0.9, b2 0.98, eps 1e-9), three ways:

* seqlab: the training engine's step (`seqlab.trainer.train_step`: `lm_task()` on the
  `seqlab.models` "gpt" config, jitted with shardings and buffer donation) on one device, as
  `seqlab train` runs it;
* flax: the same model written here with plain `flax.linen` (`nn.MultiHeadDotProductAttention`,
  `nn.make_causal_mask`) and an optax step, no seqlab code;
* torch: `transformers.GPT2LMHeadModel` with the same `GPT2Config` sizes, eager PyTorch,
  `torch.optim.AdamW` + `clip_grad_norm_` (skipped when torch / transformers are missing).

Reports median tokens/s per step (and the process CPU time per step, which other processes on
a shared machine disturb much less than wall time) and MFU = (6N + attention) FLOPs per step (`seqlab.flops`,
the same count for all three) / step time / the matmul peak measured in the same rounds
(`seqlab.monitor.measure_matmul_peak`: a float32 1024^3 jitted matmul, best of 5). Variants run
in shuffled rounds so load from other processes on a shared machine hits them alike: compare
ratios within one run, not absolute numbers across runs.

In the same rounds it times the step's dense matmuls alone, forward and both gradients, as one
jitted XLA program and as eager PyTorch (`matmul_floor_fns`), and prints what the 1.2x-torch
target leaves for everything else once the matmuls are paid. All variants run after
`seqlab.host_memory.keep_freed_host_memory()`, as `seqlab train` does (SEQLAB_KEEP_HOST_MEMORY=0
runs them without it).
Targets (2-core CPU): seqlab >= 1.0x flax, >= 1.2x torch, MFU >= 45% of the matmul peak.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqlab import flops, host_memory, models, monitor, parallel, trainer
from seqlab import train as train_lib

LEARNING_RATE = 3e-4


@functools.lru_cache(maxsize=None)
def _model_config(d_model: int, num_layers: int, num_heads: int, vocab: int, length: int,
                  dtype: str):
  return models.get_preset(
      "gpt2-small", vocab_size=vocab, d_model=d_model, num_heads=num_heads,
      num_kv_heads=num_heads, head_dim=d_model // num_heads, d_ff=4 * d_model,
      num_layers=num_layers, max_length=length, dropout_rate=0.0, dtype=dtype)


def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab, (batch, length + 1)).astype(np.int32)


# ─── seqlab ──────────────────────────────────────────────────────────────────────────────────


def seqlab_step(cfg, tokens: np.ndarray):
  """Returns a zero-argument function running one seqlab train step (state carried inside).

  The step is the engine's (`seqlab.trainer.train_step`) on a one-device mesh; parameters are
  initialised from key 0, the dropout key is key 1.
  """
  model = cfg.build()
  tx = train_lib.make_optimizer(train_lib.OptimizerConfig(
      learning_rate=LEARNING_RATE, schedule="constant", warmup_steps=0, b1=0.9, b2=0.98,
      eps=1e-9, clip_norm=1.0))
  job = trainer.Job(train_lib.lm_task(), lambda: train_lib.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), cfg.dummy_batch(1))["params"],
      tx=tx, rng=jax.random.key(1)))
  mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
  options = trainer.Options(steps=1)
  state = jax.jit(job.init, out_shardings=trainer.state_sharding(job, mesh, options))()
  batch = parallel.global_batch({
      "decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": np.ones(tokens[:, 1:].shape, np.float32)}, mesh)
  step = trainer.train_step(job, mesh, options)
  box = {"state": state}

  def run():
    box["state"], metrics = step(box["state"], batch)
    return metrics["loss"]

  return run


# ─── plain Flax linen ────────────────────────────────────────────────────────────────────────


class FlaxBlock(nn.Module):
  d_model: int
  num_heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.d_model,
                                        dtype=self.dtype, deterministic=True)(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
    h = nn.Dense(4 * self.d_model, dtype=self.dtype)(h)
    h = nn.Dense(self.d_model, dtype=self.dtype)(nn.gelu(h, approximate=True))
    return x + h


class FlaxGPT(nn.Module):
  vocab: int
  length: int
  d_model: int
  num_layers: int
  num_heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.d_model, dtype=self.dtype)
    x = embed(tokens) + nn.Embed(self.length, self.d_model, dtype=self.dtype)(
        jnp.arange(tokens.shape[1])[None])
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_layers):
      x = FlaxBlock(self.d_model, self.num_heads, self.dtype)(x, mask)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)(x)
    return embed.attend(x).astype(jnp.float32)


def flax_step(cfg, tokens: np.ndarray):
  model = FlaxGPT(cfg.vocab_size, cfg.max_length, cfg.d_model, cfg.num_layers, cfg.num_heads,
                  jnp.dtype(cfg.dtype))
  inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
  params = jax.jit(model.init)(jax.random.key(0), inputs)["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(LEARNING_RATE, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  box = {"params": params, "opt_state": tx.init(params)}

  def run():
    box["params"], box["opt_state"], loss = step(box["params"], box["opt_state"])
    return loss

  return run


# ─── Hugging Face GPT-2 in PyTorch ───────────────────────────────────────────────────────────


def torch_step(cfg, tokens: np.ndarray, device: str = "cpu"):
  """Hugging Face GPT-2 on `device` ("cpu" or "cuda"); bfloat16 compute under autocast when
  the config's dtype is bfloat16 (float32 parameters, as seqlab's mixed precision)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_length, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=1, eos_token_id=1)
  model = transformers.GPT2LMHeadModel(config).to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.98),
                                eps=1e-9, weight_decay=0.0)
  inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64)).to(device)
  targets = torch.from_numpy(tokens[:, 1:].astype(np.int64)).to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

  def run():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if device != "cpu":
      torch.cuda.synchronize()
    return loss.detach()

  return run


# ─── The step's dense matmuls alone ─────────────────────────────────────────────────────────


def dense_matmul_shapes(cfg, tokens_per_step: int) -> list[tuple[int, int, int]]:
  """(M, K, N) of each dense forward matmul of one step, weights `[K, N]`: the q, k + v, output
  and MLP projections of every layer and the tied LM head (`seqlab.flops.config_matmuls` less
  the attention logits / values), the MLP's second matmul turned back to `[d_ff, d_model]`."""
  shapes = []
  for matmul in flops.config_matmuls(cfg, 1):
    if matmul.name.startswith("attn_"):
      continue
    for i in range(matmul.count):
      k, n = int(matmul.in_dim), int(matmul.out_dim)
      shapes.append((tokens_per_step, *((n, k) if matmul.name == "mlp" and i % 2 else (k, n))))
  return shapes


def matmul_floor_fns(shapes, with_torch: bool) -> tuple[dict, float]:
  """Zero-argument functions doing each shape's forward (A W), input-gradient (dY W^T) and
  weight-gradient (A^T dY) matmul once, in XLA (one jitted program) and in PyTorch; and their
  FLOPs. The time the step's matmuls take with nothing else around them."""
  rng = np.random.default_rng(0)
  operands = [tuple(rng.standard_normal(shape, np.float32) for shape in ((m, k), (k, n), (m, n)))
              for m, k, n in shapes]

  @jax.jit
  def xla_matmuls(ops):
    return [(a @ w, dy @ w.T, a.T @ dy) for a, w, dy in ops]

  device_ops = jax.device_put(operands)
  fns = {"xla matmuls": lambda: xla_matmuls(device_ops)}
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch_ops = [tuple(torch.from_numpy(x) for x in ops) for ops in operands]

    def torch_matmuls():  # eager and synchronous on CPU
      for a, w, dy in torch_ops:
        a @ w, dy @ w.t(), a.t() @ dy  # pylint: disable=pointless-statement

    fns["torch matmuls"] = torch_matmuls
  return fns, sum(3 * 2 * m * k * n for m, k, n in shapes)


# ─── Timing ──────────────────────────────────────────────────────────────────────────────────


def _block(x):
  return jax.block_until_ready(x) if isinstance(x, (jax.Array, list)) else x


def median_step_seconds(fns: dict, rounds: int, steps: int, seed: int = 0) -> tuple[dict, dict]:
  """Median wall and process-CPU seconds per call of each zero-argument step.

  Each round calls every variant `steps` times, in a fresh random order, so that load from
  other processes hits all variants alike. Process CPU time (all threads) is the work done,
  which other processes on a shared machine change much less than wall time.
  """
  for fn in fns.values():  # compile / warm up
    for _ in range(2):
      _block(fn())
  times = {name: [] for name in fns}
  cpu_times = {name: [] for name in fns}
  order = list(fns)
  rng = np.random.default_rng(seed)
  for _ in range(rounds):
    rng.shuffle(order)
    for name in order:
      for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        _block(fns[name]())
        times[name].append(time.perf_counter() - start)
        cpu_times[name].append(time.process_time() - cpu_start)
  median = lambda table: {name: statistics.median(values) for name, values in table.items()}
  return median(times), median(cpu_times)


MODELS = {  # d_model, layers, heads, vocab, length, batch
    "bench": (256, 4, 4, 512, 256, 16),          # the CPU targets' model
    "gpt2-medium": (1024, 24, 16, 50257, 1024, 8),  # the GPU target's (H100, bfloat16)
}


def _torch_device(platform: str) -> str | None:
  """Where the PyTorch baseline runs: beside JAX's backend, or nowhere (None)."""
  import torch  # pylint: disable=g-import-not-at-top
  if platform == "cpu":
    return "cpu"
  return "cuda" if platform == "gpu" and torch.cuda.is_available() else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, one round")
  parser.add_argument("--model", default="bench", choices=sorted(MODELS),
                      help="bench: the CPU targets' GPT; gpt2-medium: the GPU target's")
  parser.add_argument("--batch", type=int, default=None, help="override the model's batch")
  parser.add_argument("--length", type=int, default=None, help="override the model's length")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
  parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPU)")
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  kept = host_memory.keep_freed_host_memory()  # as `seqlab train` does; for all three impls
  d_model, layers, heads, vocab, length, batch = MODELS[args.model]
  rounds, steps = args.rounds, args.steps
  if args.quick:
    batch, length, rounds, steps = 2, 64, 1, 2
  batch, length = args.batch or batch, args.length or length
  device = jax.devices()[0]
  cfg = _model_config(d_model, layers, heads, vocab, length, args.dtype)
  tokens = _tokens(batch, length, vocab)
  fns = {"seqlab": seqlab_step(cfg, tokens), "flax": flax_step(cfg, tokens)}
  try:
    torch_device = None if args.no_torch else _torch_device(device.platform)
    if torch_device:
      fns["torch"] = torch_step(cfg, tokens, torch_device)
    elif not args.no_torch:
      print(f"PyTorch has no device beside JAX's {device.platform}; skipping its baseline")
  except ImportError as e:
    print(f"torch / transformers unavailable ({e}); skipping the PyTorch baseline")
  floor_fns, floor_flops = {}, 0.0
  if device.platform == "cpu":  # the matmul floor explains the CPU comparison with PyTorch
    floor_fns, floor_flops = matmul_floor_fns(dense_matmul_shapes(cfg, batch * length),
                                              with_torch="torch" in fns)
  peak_values = []  # on CPU the matmul peak is measured in the same rounds

  def peak():
    peak_values.append(monitor.measure_matmul_peak())

  timed = {**fns, **floor_fns, **({"peak": peak} if device.platform == "cpu" else {})}
  times, cpu_times = median_step_seconds(timed, rounds, steps)
  if device.platform == "cpu":
    peak_flops = statistics.median(peak_values)
    peak_note = "measured f32 1024^3 matmul"
  else:
    peak_flops = flops.peak_flops_per_second(device.device_kind)
    peak_note = f"dense bf16 table, {device.device_kind}"
  step_flops = flops.training_flops(flops.config_matmuls(cfg, length)) * length * batch
  tokens_per_step = batch * length
  print(f"backend {device.platform} ({device.device_kind}), {jax.device_count()} device(s); "
        f"{args.model}: batch {batch} x length {length}, d_model {d_model}, {layers} layers, "
        f"{heads} heads, vocab {vocab}, dtype {args.dtype}; {rounds} rounds x {steps} steps, "
        f"median")
  print(f"freed host memory kept (seqlab.host_memory, all impls): {'yes' if kept else 'no'} "
        f"(SEQLAB_KEEP_HOST_MEMORY=0 to turn off)")
  print(f"model FLOPs per step {step_flops / 1e9:.1f} G; peak {peak_flops / 1e9:.1f} GFLOP/s "
        f"({peak_note})")
  print(f"{'impl':8s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>7s} {'seqlab speedup':>15s} "
        f"{'CPU ms/step':>12s} {'CPU speedup':>12s}")
  for name in fns:
    seconds = times[name]
    print(f"{name:8s} {seconds * 1e3:9.1f} {tokens_per_step / seconds:10.0f} "
          f"{step_flops / seconds / peak_flops:7.1%} {times[name] / times['seqlab']:14.2f}x "
          f"{cpu_times[name] * 1e3:12.1f} {cpu_times[name] / cpu_times['seqlab']:11.2f}x")
  if floor_fns:
    print(f"the step's dense matmuls alone ({floor_flops / 1e9:.1f} GFLOP forward + backward, "
          f"no attention): " + ", ".join(
              f"{name} {times[name] * 1e3:.1f} ms ({floor_flops / times[name] / 1e9:.0f} "
              f"GFLOP/s)" for name in floor_fns))
  if "torch matmuls" in floor_fns:
    budget = times["torch"] / 1.2
    print(f"  1.2x torch means <= {budget * 1e3:.1f} ms/step: with the matmuls at their "
          f"stand-alone speed, {(budget - times['xla matmuls']) * 1e3:.1f} ms for all the rest "
          f"(attention, norms, GELU, loss, optimizer); seqlab spends "
          f"{(times['seqlab'] - times['xla matmuls']) * 1e3:.1f} ms on it, torch "
          f"{(times['torch'] - times['torch matmuls']) * 1e3:.1f} ms")
  mfu = step_flops / times["seqlab"] / peak_flops
  checks = [("seqlab >= 1.0x flax", times["flax"] / times["seqlab"], 1.0)]
  if device.platform == "cpu":
    if "torch" in fns:
      checks.append(("seqlab >= 1.2x torch", times["torch"] / times["seqlab"], 1.2))
    checks.append(("seqlab MFU >= 45% of peak", mfu, 0.45))
  else:
    checks.append(("seqlab MFU >= 40% of peak", mfu, 0.40))
  on_target = args.model == ("bench" if device.platform == "cpu" else "gpt2-medium")
  for label, value, target in checks:
    verdict = ("n/a (--quick)" if args.quick else "n/a (not the target's model)"
               if not on_target else "PASS" if value >= target else "FAIL")
    print(f"  {label:28s} {value:6.2f}  {verdict}")


if __name__ == "__main__":
  main()
