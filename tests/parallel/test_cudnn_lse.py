"""The cuDNN kernels' log-sum-exp precision and wiring, through their XLA twins on CPU.

Precision: causal attention over T = 1024 bf16 tokens (N 4, K 1, H 64), split into n = 2, 4, 8
blocks merged by log-sum-exp as a ring merges them, against float32 attention of the same
(bf16-valued) inputs. The twin ("dpa_xla") makes one fused call per block with cuDNN's contract:
output rounded to bf16, statistic through `cudnn_attention.lse_from_stats`, the code the cuDNN
path runs too. With the float32 statistic the ring stays within 1.1x the relative RMS error of one
fused call of the same length (observed n = 1, 2, 4, 8: 2.28e-3, 2.28e-3, 2.27e-3, 2.28e-3; at
T = 2048 2.27e-3 -> 2.45e-3 at n = 8, each block's bf16 output rounding, which cuDNN has too).
Positive control: the same statistic rounded to bf16 (what
`jax.nn.dot_product_attention(return_residual=True)` returns) is measurably worse (observed
2.91e-3, 3.80e-3, 4.70e-3: 2x at n = 8).

Wiring: the cuDNN path calls JAX's private entry point; its signature is checked here, and the
call is exported for the CUDA platform from this CPU host (no GPU needed to lower), which shows
the custom call returns a float32 statistic that the kernel hands on uncast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultralong_jax.parallel import block_attention, cudnn_attention

T, K, G, H = 1024, 1, 4, 64


def _relative_rms(x, ref):
  x = x.astype(jnp.bfloat16).astype(jnp.float32)  # the ring returns the inputs' dtype
  return jnp.sqrt(jnp.mean((x - ref) ** 2) / jnp.mean(ref ** 2))


def _ring_of_blocks(forward, q, k, v, n):
  """Causal attention as n contiguous blocks, query block i merging key blocks j <= i."""
  c = q.shape[1] // n
  outs = []
  for i in range(n):
    out = lse = None
    for j in range(i + 1):
      o, l = forward(q[:, i * c:(i + 1) * c], k[:, j * c:(j + 1) * c], v[:, j * c:(j + 1) * c],
                     None, None, causal=i == j, scale=H ** -0.5)
      out, lse = (o, l) if out is None else block_attention.merge(out, lse, o, l)
    outs.append(out)
  return jnp.concatenate(outs, axis=1)


@functools.partial(jax.jit, static_argnames="n")
def _errors(q, k, v, n):
  """Relative RMS error of the twin's ring against float32 attention: (float32 lse, bf16 lse)."""
  ref, _ = block_attention.xla_forward(*(x.astype(jnp.float32) for x in (q, k, v)), None, None,
                                       causal=True, scale=H ** -0.5)
  twin = functools.partial(cudnn_attention.forward, implementation="xla")
  return tuple(_relative_rms(_ring_of_blocks(functools.partial(twin, residual_dtype=d), q, k, v,
                                             n), ref)
               for d in (jnp.float32, jnp.bfloat16))


def test_float32_lse_ring_is_as_accurate_as_one_fused_call():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, T, K, G, H), jnp.bfloat16)
  k, v = (jax.random.normal(key, (1, T, K, H), jnp.bfloat16) for key in keys[1:])
  fused, _ = _errors(q, k, v, 1)
  for n in (2, 4, 8):
    f32_lse, bf16_lse = (float(e) for e in _errors(q, k, v, n))
    assert f32_lse <= 1.1 * float(fused), (n, f32_lse, float(fused))
    assert bf16_lse >= 1.15 * f32_lse, (n, bf16_lse, f32_lse)   # the positive control
  assert bf16_lse >= 1.5 * float(fused)


def test_kernels_use_the_float32_statistic():
  stats = jnp.asarray([[[1.0 + 2 ** -12, 7.0078125 + 2 ** -10]]])   # [B=1, N=1, T=2]
  np.testing.assert_array_equal(cudnn_attention.lse_from_stats(stats, 1, jnp.float32)[0, 0, 0],
                                stats[0, 0])
  rounded = cudnn_attention.lse_from_stats(stats, 1, jnp.bfloat16)[0, 0, 0]
  np.testing.assert_array_equal(rounded, stats[0, 0].astype(jnp.bfloat16).astype(jnp.float32))
  for name in ("cudnn", "dpa_xla", "cudnn_packed", "dpa_xla_packed"):
    forward = block_attention.KERNELS[name].forward
    assert forward.keywords.get("residual_dtype", jnp.float32) == jnp.float32, name


def test_cudnn_entry_point_signature():
  entry = cudnn_attention.cudnn_entry()
  assert entry.MaskType.CAUSAL and entry.MaskType.NO_MASK


@pytest.fixture
def pretend_cuda(monkeypatch):
  """Lets the cuDNN entry point trace on a CPU host: it checks the cuDNN version and the GPU's
  compute capability in Python before lowering, which needs a GPU; the lowering itself does not."""
  entry = cudnn_attention.cudnn_entry()
  monkeypatch.setattr(entry, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(entry, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(entry, "is_cuda_compute_capability_equal", lambda capability: False)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_cudnn_kernel_exports_for_cuda(pretend_cuda, packed):
  b, t = 2, 256
  q = jax.ShapeDtypeStruct((b, t, 2, 2, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, 2, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  kernel = block_attention.KERNELS["cudnn_packed" if packed else "cudnn"]

  def step(q, k, v, seg):
    seg = seg if packed else None
    out, lse = kernel.forward(q, k, v, seg, seg, causal=True, scale=0.125)
    dout = out.astype(q.dtype)
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", out, out)
    grads = kernel.backward(q, k, v, seg, seg, out, lse, dout, delta, causal=True, scale=0.125)
    return out, lse, grads

  # cuDNN's custom call has no export-compatibility guarantee; this module is only inspected.
  unstable = [jax.export.DisabledSafetyCheck.custom_call(f"__cudnn$fmha{name}")
              for name in ("Softmax", "SoftmaxBackward")]
  exported = jax.export.export(jax.jit(step), platforms=("cuda",),
                               disabled_checks=unstable)(q, kv, kv, seg)
  text = exported.mlir_module()
  calls = [line for line in text.splitlines() if "__cudnn$fmha" in line]
  assert calls, "no cuDNN fused-attention custom call in the exported module"
  # The forward custom call returns (out bf16 [B, N, T, H], statistics f32, workspace).
  m = cudnn_attention.max_segments(t) if packed else 1
  assert any(f"tensor<{b * m}x4x{t}xf32>" in line for line in calls), calls
  assert any("fmhaSoftmaxBackward" in line for line in calls)
  assert exported.out_avals[1].dtype == jnp.float32
