"""Ring / all-gather attention on 8 simulated CPU devices against single-device full attention.

Reference: `modeling.attention.dot_product_attention` on the natural token order. The sharded
call sees the batch in zigzag order (as the training step feeds it) and its output and gradients
are un-permuted before comparing. Tolerance: relative L2 error <= 1e-5 in float32 at highest matmul
precision (observed ~3e-7: the block merge only reorders float32 sums).
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np
import pytest

from ultralong_jax.modeling.attention import dot_product_attention
from ultralong_jax.parallel import layout
from ultralong_jax.parallel.ring_attention import ring_attention

MESHES = {
    "seq8": ((8,), ("sequence",)),
    "seq4_tp2": ((4, 2), ("sequence", "tensor")),
    "dp2_seq2_tp2": ((2, 2, 2), ("data", "sequence", "tensor")),
}
B, T, N, H = 4, 64, 8, 16
SCALE = 0.3  # not 1/sqrt(H): checks the scale is passed through
RTOL = 1e-5


@functools.cache
def _mesh(name):
  shape, names = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _inputs(kv_heads, with_segments, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, kv_heads, H))
  v = jax.random.normal(ks[2], (B, T, kv_heads, H))
  dout = jax.random.normal(ks[3], (B, T, N, H))
  seg = None
  if with_segments:
    # Documents of random lengths, some crossing device boundaries; id 0 first (padding-like).
    seg = jnp.cumsum(jax.random.bernoulli(ks[4], 0.08, (B, T)), axis=1).astype(jnp.int32)
  return q, k, v, dout, seg


@functools.cache
def _sharded_fn(mesh_name, causal, strategy, kernel="xla", layout_name="zigzag"):
  mesh = _mesh(mesh_name)

  def f(q, k, v, dout, seg):
    attend = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, segment_ids=seg, causal=causal,
                                            scale=SCALE, strategy=strategy, kernel=kernel,
                                            layout=layout_name)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)
  return jax.jit(f)


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _check(reference, mesh_name, strategy, causal, group, with_segments, kernel="xla",
           layout_name="zigzag"):
  n = dict(zip(*reversed(MESHES[mesh_name]))).get("sequence", 1)
  q, k, v, dout, seg = _inputs(N // group, with_segments)
  ref_out, ref_grads = reference(causal, SCALE)(q, k, v, dout, seg)
  permute = functools.partial(layout.zigzag_permute, n=n, layout=layout_name)
  unpermute = functools.partial(layout.zigzag_unpermute, n=n, layout=layout_name)
  out, grads = _sharded_fn(mesh_name, causal, strategy, kernel, layout_name)(
      *permute((q, k, v, dout, seg)))
  out, grads = unpermute((out, grads))
  errors = {"out": _rel_err(out, ref_out)}
  errors.update({f"d{x}": _rel_err(g, r) for x, g, r in zip("qkv", grads, ref_grads)})
  assert max(errors.values()) <= RTOL, errors


@pytest.mark.parametrize("group", [1, 4], ids=["G1", "G4"])
@pytest.mark.parametrize("with_segments", [False, True], ids=["noseg", "seg"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_matches_full_attention(attention_reference, mesh_name, strategy, causal, with_segments,
                                group):
  _check(attention_reference, mesh_name, strategy, causal, group, with_segments)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_public_kernel_adapter(attention_reference, causal):
  """The cuDNN kernel's math (jax.nn.dot_product_attention + log-sum-exp correction in the
  backward), run with implementation='xla' on CPU."""
  _check(attention_reference, "seq8", "ring", causal, 4, False, kernel="dpa_xla")


def test_contiguous_layout(attention_reference):
  _check(attention_reference, "seq8", "ring", True, 2, True, layout_name="contiguous")


def test_bfloat16_runs_close():
  q, k, v, _, _ = _inputs(2, False)
  mesh = _mesh("seq8")
  qb, kb, vb = (layout.zigzag_permute(x, 8).astype(jnp.bfloat16) for x in (q, k, v))
  out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, scale=SCALE))(qb, kb, vb)
  assert out.dtype == jnp.bfloat16
  ref = dot_product_attention(q, k, v, scale=SCALE)
  # bf16 inputs: ~3 significant digits.
  assert _rel_err(layout.zigzag_unpermute(out.astype(jnp.float32), 8), ref) < 2e-2


def test_length_not_divisible_by_2n():
  q = jnp.zeros((B, 40, N, H))  # 40 % 16 != 0
  k = jnp.zeros((B, 40, 2, H))
  with pytest.raises(ValueError, match="not divisible by 16"):
    ring_attention(q, k, k, mesh=_mesh("seq8"), causal=True)


def test_heads_not_divisible_by_tensor():
  q = jnp.zeros((B, T, 3, H))
  k = jnp.zeros((B, T, 1, H))
  with pytest.raises(ValueError, match="tensor"):
    ring_attention(q, k, k, mesh=_mesh("seq4_tp2"))


def test_batch_not_divisible_by_data():
  q = jnp.zeros((3, T, N, H))
  k = jnp.zeros((3, T, 2, H))
  with pytest.raises(ValueError, match="data"):
    ring_attention(q, k, k, mesh=_mesh("dp2_seq2_tp2"))


def test_bad_arguments():
  q = jnp.zeros((B, T, N, H))
  k = jnp.zeros((B, T, 2, H))
  mesh = _mesh("seq8")
  with pytest.raises(ValueError, match="strategy"):
    ring_attention(q, k, k, mesh=mesh, strategy="tree")
  with pytest.raises(ValueError, match="segment_ids"):
    ring_attention(q, k, k, mesh=mesh, segment_ids=jnp.zeros((B, T), jnp.int32), kernel="cudnn")
  with pytest.raises(ValueError, match="self-attention"):
    ring_attention(q, k[:, :32], k[:, :32], mesh=mesh)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    ring_attention(q, jnp.zeros((B, T, 3, H)), jnp.zeros((B, T, 3, H)), mesh=mesh)


def test_layout_permutation_and_balance():
  perm = layout.permutation(32, 4, "zigzag")
  # Device 1 of 4 holds chunks 1 and 6 (c = 4).
  np.testing.assert_array_equal(perm[8:16], [4, 5, 6, 7, 24, 25, 26, 27])
  x = {"tokens": np.arange(64).reshape(2, 32), "positions": jnp.arange(64).reshape(2, 32)}
  back = layout.zigzag_unpermute(layout.zigzag_permute(x, 4), 4)
  np.testing.assert_array_equal(back["tokens"], x["tokens"])
  np.testing.assert_array_equal(back["positions"], x["positions"])
  zig = layout.per_device_causal_pairs(1 << 20, 16, "zigzag")
  assert zig.max() == zig.min()
  contiguous = layout.per_device_causal_pairs(1 << 20, 16, "contiguous")
  assert contiguous.max() / contiguous.min() > 30  # (2n - 1) x the first device's work


def _restarting_positions(seg):
  """Positions that restart at 0 with every segment (document masking's packing), [B, T]."""
  seg = np.asarray(seg)
  idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
  first = np.maximum.accumulate(np.where(np.diff(seg, axis=1, prepend=-1) != 0, idx, 0), axis=1)
  return jnp.asarray(idx - first, jnp.int32)


ORDERS = {
    "natural": lambda: np.arange(T),
    "zigzag": lambda: layout.permutation(T, 8),
    "random": lambda: np.random.default_rng(1).permutation(T),
}


@functools.cache
def _positions_fn(kernel):
  """Jitted ring forward + vjp with positions as an input: one compile serves every order."""
  mesh = _mesh("seq8")

  @jax.jit
  def f(q, k, v, dout, seg, positions):
    attend = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, positions=positions,
                                            segment_ids=seg, scale=SCALE, kernel=kernel,
                                            chunk_size=2)  # chunked: 2 x 2 tiles per block
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)
  return f


@pytest.mark.parametrize("kernel, orders, with_segments", [
    ("xla", ("natural",), False), ("xla", ("natural", "zigzag", "random"), True),
    ("chunked", ("random",), True)])
def test_any_token_order_with_positions_matches_attention(attention_reference, kernel, orders,
                                                          with_segments):
  """The causal mask comes from the positions given: tokens in natural order, in the zigzag
  layout or randomly permuted (default layout="zigzag" in every case) all give single-device
  attention on the natural order, forward and gradients; packed documents carry positions that
  restart per document, as document masking packs them."""
  q, k, v, dout, seg = _inputs(2, with_segments)
  ref_out, ref_grads = attention_reference(True, SCALE)(q, k, v, dout, seg)
  positions = (_restarting_positions(seg) if with_segments
               else jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
  for order in orders:
    perm = ORDERS[order]()
    laid_out = jax.tree.map(lambda x: x[:, perm], (q, k, v, dout, seg, positions))
    out, grads = jax.tree.map(lambda x: x[:, np.argsort(perm)], _positions_fn(kernel)(*laid_out))
    errors = {"out": _rel_err(out, ref_out)}
    errors.update({f"d{x}": _rel_err(g, r) for x, g, r in zip("qkv", grads, ref_grads)})
    assert max(errors.values()) <= RTOL, (order, errors)


def test_fused_kernels_refuse_positions():
  """Kernels that mask by the layout's index order cannot honor arbitrary positions: refused."""
  q = jnp.zeros((B, T, N, H))
  k = jnp.zeros((B, T, 2, H))
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  with pytest.raises(ValueError, match="cannot take positions.*zigzag_permute"):
    ring_attention(q, k, k, mesh=_mesh("seq8"), positions=positions, kernel="dpa_xla")
