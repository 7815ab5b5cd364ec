"""Packed documents on the cuDNN path, through its XLA twin ("dpa_xla_packed") on CPU.

What runs here: segment ids -> cuDNN's packed layout (per-segment offsets and lengths, query run m
paired with the key run of the same id), the mask that layout means against the reference mask
of the other kernels, the statistics' packed [B * M, N, T] layout and back, blind rows, the
fallback for ids the layout cannot express, and the kernel's forward and backward against the
"xla" kernel (float32, relative L2 <= 1e-5) on diagonal (causal) and off-diagonal blocks and
through the ring. What cannot run without a GPU: cuDNN itself reading this layout (it is exported
for CUDA in test_cudnn_lse.py); docs/performance.md lists the GPU check.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultralong_jax.modeling import attention
from ultralong_jax.parallel import block_attention, cudnn_attention
from ultralong_jax.parallel.ring_attention import ring_attention

SCALE = 0.3
# Jitted: one compile instead of one per eager op.
_layout = jax.jit(cudnn_attention.packed_layout, static_argnums=2)


def _docs(key, b, n, p=0.15, first=0):
  """Increasing document ids (runs), as packing produces them."""
  starts = jax.random.bernoulli(key, p, (b, n)).at[:, 0].set(False)
  return (jnp.cumsum(starts, axis=1) + first).astype(jnp.int32)


def _rel(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_layout_of_a_packed_row():
  q_seg = jnp.asarray([[3, 3, 4, 4, 4, 0, 0, 0]], jnp.int32)
  kv_seg = jnp.asarray([[1, 3, 3, 3, 0, 0, 0, 0]], jnp.int32)
  layout = _layout(q_seg, kv_seg, 4)
  # As JAX's entry point takes it (its test_sdpa_packed_layout): -1 for unused entries.
  np.testing.assert_array_equal(layout.q_offsets, [[0, 2, 5, -1, -1]])
  np.testing.assert_array_equal(layout.q_seqlen, [[2, 3, 3, -1]])
  # id 3 -> key run at 1 (3 tokens); id 4 has no key (length 0); id 0 -> run at 4.
  np.testing.assert_array_equal(layout.kv_offsets, [[1, 0, 4, -1, -1]])
  np.testing.assert_array_equal(layout.kv_seqlen, [[3, 0, 4, -1]])
  np.testing.assert_array_equal(layout.q_run, [[0, 0, 1, 1, 1, 2, 2, 2]])
  assert bool(layout.fits)
  assert not bool(_layout(q_seg, kv_seg, 2).fits)      # 3 runs > 2
  split = jnp.asarray([[1, 1, 2, 2, 1, 1, 0, 0]], jnp.int32)                 # id 1 in two runs
  assert not bool(_layout(split, split, 4).fits)


@pytest.mark.parametrize("causal", [True, False], ids=["diagonal", "off_diagonal"])
def test_layout_mask_equals_reference_mask(causal):
  keys = jax.random.split(jax.random.key(1), 2)
  q_seg = _docs(keys[0], 3, 48)
  kv_seg = q_seg if causal else _docs(keys[1], 3, 40, first=1)

  @jax.jit
  def masks(q_seg, kv_seg):
    layout = cudnn_attention.packed_layout(q_seg, kv_seg, 48)
    order = attention.natural_positions  # a block's index order
    want = attention.mask(order(48), order(kv_seg.shape[1]), q_seg, kv_seg, causal)[:, 0, 0]
    return (layout.fits, cudnn_attention.packed_mask(layout, kv_seg.shape[1], causal),
            jnp.broadcast_to(want, (3, 48, kv_seg.shape[1])))

  fits, got, want = masks(q_seg, kv_seg)
  assert bool(fits)
  np.testing.assert_array_equal(got, want)


def test_statistics_layout_round_trip():
  """Rows with different segment counts: segment m of row b is row (segments before b) + m."""
  seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5, 6, 6]], jnp.int32)
  tokens = jax.random.normal(jax.random.key(2), (2, 3, 8))                    # [B, N, T]

  @jax.jit
  def round_trip(seg, tokens):
    layout = cudnn_attention.packed_layout(seg, seg, 4)
    segment, offset = cudnn_attention._token_index(layout, 4)
    packed = jnp.zeros((2 * 4, 8, 3)).at[segment, offset].set(tokens.transpose(0, 2, 1))
    back = cudnn_attention._token_stats(packed.transpose(0, 2, 1), layout, 4)
    return segment, offset, back

  segment, offset, back = round_trip(seg, tokens)
  np.testing.assert_array_equal(segment, [[0, 0, 1, 1, 1, 2, 2, 2], [3, 3, 3, 3, 3, 3, 4, 4]])
  np.testing.assert_array_equal(offset, [[0, 1, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
  np.testing.assert_array_equal(back, tokens)


@functools.cache
def _run(kernel_name, causal):
  kernel = block_attention.get_kernel(kernel_name, chunk_size=16)

  def f(q, k, v, q_seg, kv_seg, dout, other_lse, delta):
    out, lse = kernel.forward(q, k, v, q_seg, kv_seg, causal=causal, scale=SCALE)
    grads = kernel.backward(q, k, v, q_seg, kv_seg, out, jnp.logaddexp(lse, other_lse), dout,
                            delta, causal=causal, scale=SCALE)
    return out, lse, grads
  return jax.jit(f)


# (causal, query ids, key ids): "blind" gives the queries' first document no key in the block.
CASES = {
    "diagonal": (True, "same"),
    "off_diagonal_blind": (False, "other"),
    "split_ids_fallback": (True, "split"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_twin_equals_xla_kernel(case):
  causal, ids = CASES[case]
  b, t, kh, g, h = 2, 40, 2, 2, 8
  ks = jax.random.split(jax.random.key(3), 8)
  q = jax.random.normal(ks[0], (b, t, kh, g, h))
  k, v = (jax.random.normal(key, (b, t, kh, h)) for key in ks[1:3])
  dout = jax.random.normal(ks[3], q.shape)
  q_seg = _docs(ks[4], b, t)
  kv_seg = {"same": q_seg, "other": _docs(ks[5], b, t, first=1),
            "split": q_seg}[ids]
  if ids == "split":  # the last document reuses the first one's id: not expressible, fallback
    q_seg = kv_seg = jnp.where(q_seg == q_seg[:, -1:], 0, q_seg)
  layout = cudnn_attention.packed_layout(q_seg, kv_seg, cudnn_attention.max_segments(t))
  assert bool(layout.fits) == (ids != "split")
  other_lse = jax.random.normal(ks[6], (b, kh, g, t))
  delta = jax.random.normal(ks[7], (b, kh, g, t))
  args = (q, k, v, q_seg, kv_seg, dout, other_lse, delta)
  want_out, want_lse, want_grads = _run("xla", causal)(*args)
  out, lse, grads = _run("dpa_xla_packed", causal)(*args)
  assert _rel(out, want_out) <= 1e-5
  seen = want_lse > attention.NEG_INF / 2
  if ids == "other":
    assert not bool(seen.all())    # some rows see no key of this block
  np.testing.assert_array_equal(lse <= attention.NEG_INF / 2, ~seen)
  assert _rel(jnp.where(seen, lse, 0), jnp.where(seen, want_lse, 0)) <= 1e-5
  for got, want in zip(grads, want_grads):
    assert _rel(got, want) <= 1e-5


def test_packed_twin_through_the_ring(attention_reference_fn):
  mesh = jax.make_mesh((2,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
  b, t, n, kh, h = 2, 64, 4, 2, 8
  ks = jax.random.split(jax.random.key(4), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k, v = (jax.random.normal(key, (b, t, kh, h)) for key in ks[1:3])
  seg = _docs(ks[3], b, t, p=0.08)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
  ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, segment_ids=seg, layout="contiguous",
                                        kernel="dpa_xla_packed")
  ref = lambda q, k, v: attention_reference_fn(q, k, v, segment_ids=seg)
  got = jax.jit(jax.value_and_grad(loss(ring), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.value_and_grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  assert _rel(got[0], want[0]) <= 1e-5
  for a, w in zip(got[1], want[1]):
    assert _rel(a, w) <= 1e-5


@pytest.fixture
def attention_reference_fn():
  from ultralong_jax.modeling.attention import dot_product_attention  # pylint: disable=g-import-not-at-top
  return functools.partial(dot_product_attention, causal=True)
