"""The train-throughput benchmark's matmul floor does the step's dense matmuls, and only those."""

from __future__ import annotations

import numpy as np

from seqlab import flops
from tests import _helpers


def test_matmul_floor_covers_the_dense_matmuls_of_a_step():
  bench = _helpers.load_script("experiments/benchmarks/train_throughput.py", "bench_throughput")
  cfg = bench._model_config(16, 2, 2, 24, 8, "float32")
  shapes = bench.dense_matmul_shapes(cfg, 12)
  dense = sum(m.flops for m in flops.config_matmuls(cfg, 8) if not m.name.startswith("attn_"))
  # q 16x16, k+v 16x32, out 16x16, MLP 16x64 and 64x16 per layer; the LM head 16x24.
  assert sorted(shapes) == sorted([(12, 16, 16), (12, 16, 32), (12, 16, 16), (12, 16, 64),
                                   (12, 64, 16)] * 2 + [(12, 16, 24)])
  fns, floor_flops = bench.matmul_floor_fns(shapes, with_torch=True)
  assert floor_flops == 3 * 12 * dense   # forward + two gradients, 12 tokens
  # The XLA program's products against NumPy float64 on the same operands.
  rng = np.random.default_rng(0)
  operands = [tuple(rng.standard_normal(s, np.float32) for s in ((m, k), (k, n), (m, n)))
              for m, k, n in shapes]
  for (a, w, dy), got in zip(operands, fns["xla matmuls"]()):
    a, w, dy = (x.astype(np.float64) for x in (a, w, dy))
    for want, value in zip((a @ w, dy @ w.T, a.T @ dy), got):
      np.testing.assert_allclose(np.asarray(value), want, rtol=1e-4, atol=1e-4)
  assert fns["torch matmuls"]() is None
