"""The one-device ring decomposition equals one fused causal call (so its timing is fair)."""

import jax
import numpy as np
from ultralong_jax.bench import ring_overhead
from ultralong_jax.parallel import block_attention


def test_blockwise_equals_fused():
  # dpa_xla: the cuDNN kernel's adapter over jax.nn.dot_product_attention, testable on CPU.
  kernel = "dpa_xla"
  # float32 at highest matmul precision (conftest): the only differences are summation order.
  k = block_attention.KERNELS[kernel]
  x = ring_overhead.inputs(1, 64, 2, 2, 16, np.float32)
  want = jax.jit(lambda *a: ring_overhead.fused(k, *a, 0.25))(*x)
  got = jax.jit(lambda *a: ring_overhead.blockwise(k, *a, 0.25, n=4))(*x)
  for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), want, got):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5, err_msg=name)


def test_cli_reports_each_block_count(capsys):
  result = ring_overhead.main(["--length", "64", "--blocks", "2,4", "--heads", "4",
                               "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32",
                               "--repeats", "1"])
  assert [r["blocks"] for r in result["rows"]] == [2, 4]
  assert result["fused_seconds"] > 0
  assert "| 4 |" in capsys.readouterr().out
