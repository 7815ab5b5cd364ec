"""The "chunked" block kernel against the "xla" kernel, through the ring, and its memory.

Kernel level: forward (out, lse) and backward (dq, dk, dv) of `chunked_forward/backward` equal
`xla_forward/backward` on the same block. Tolerance for float32 inputs: relative L2 <= 1e-6 at
highest matmul precision (observed ~1e-7: tiling only reorders float32 sums). bfloat16 inputs:
the backward casts the same probabilities as the xla kernel (the row's global lse is given), so it
is held to 1e-4 (observed <= 2e-5: a tile's float32 sum order can flip a bfloat16 rounding of p
or ds); the forward casts the tile's unnormalized exp(s - running max) to bfloat16 where the xla
kernel casts the normalized p (every flash kernel does the former), so the two differ by
bfloat16 rounding of p: held to 1e-2, and to no worse than 1.5x the xla kernel's own error
against a float32 computation on the same (bf16-valued) inputs.

Ring level: ring_attention(kernel="chunked") with chunks smaller than the ring blocks on the 8
simulated CPU devices equals single-device attention like test_ring_attention's "xla" cases.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np
import pytest

from ultralong_jax.modeling import attention
from ultralong_jax.parallel import block_attention, layout
from ultralong_jax.parallel.ring_attention import ring_attention

SCALE = 0.3


def _rel_err(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _block(t, s, with_segments, dtype, seed=0, batch=2, kv_heads=2, group=3, head_dim=8):
  """q [B,T,K,G,H], k, v [B,S,K,H], segment ids, and a ring row's global lse/delta and dout."""
  ks = jax.random.split(jax.random.key(seed), 8)
  q = jax.random.normal(ks[0], (batch, t, kv_heads, group, head_dim)).astype(dtype)
  k = jax.random.normal(ks[1], (batch, s, kv_heads, head_dim)).astype(dtype)
  v = jax.random.normal(ks[2], (batch, s, kv_heads, head_dim)).astype(dtype)
  dout = jax.random.normal(ks[3], q.shape).astype(dtype)
  q_seg = kv_seg = None
  if with_segments:
    # Independent query and key documents (an off-diagonal ring block); the queries' first
    # document (id 0) has no key in the block (key ids start at 1): rows with no visible key.
    docs = lambda key, n: jnp.cumsum(
        jax.random.bernoulli(key, 0.15, (batch, n)).at[:, 0].set(False), axis=1).astype(jnp.int32)
    q_seg, kv_seg = docs(ks[4], t), docs(ks[5], s) + 1
  # The rest of the row lives in other ring blocks: a finite global lse and delta, as the ring
  # hands the backward.
  other_lse = jax.random.normal(ks[6], (batch, kv_heads, group, t))
  delta = jax.random.normal(ks[7], (batch, kv_heads, group, t))
  return q, k, v, q_seg, kv_seg, dout, other_lse, delta


@functools.cache
def _run(kernel_name, causal, chunk_size):
  kernel = block_attention.get_kernel(kernel_name, chunk_size=chunk_size)

  def f(q, k, v, q_seg, kv_seg, dout, other_lse, delta):
    out, lse = kernel.forward(q, k, v, q_seg, kv_seg, causal=causal, scale=SCALE)
    grads = kernel.backward(q, k, v, q_seg, kv_seg, out, jnp.logaddexp(lse, other_lse), dout,
                            delta, causal=causal, scale=SCALE)
    return out, lse, grads
  return jax.jit(f)


F32, BF16 = jnp.float32, jnp.bfloat16
# (T, S, chunk, causal, segment ids, dtype). 40 / 16 pads to 48 (uneven chunks); 64 / 16 divides;
# 24 x 40 is a non-square (off-diagonal) block; a chunk longer than the block is one tile.
CASES = [
    (40, 40, 16, True, True, F32), (40, 40, 16, True, False, F32),
    (40, 40, 16, False, True, F32), (40, 40, 16, False, False, F32),
    (64, 64, 16, True, True, F32), (64, 64, 16, False, False, F32),
    (24, 40, 16, False, True, F32), (12, 12, 64, True, True, F32),
    (40, 40, 16, True, True, BF16), (64, 64, 16, False, False, BF16),
]


@pytest.mark.parametrize("t,s,chunk,causal,with_segments,dtype", CASES,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_matches_xla_kernel(t, s, chunk, causal, with_segments, dtype):
  inputs = _block(t, s, with_segments, dtype)
  out_x, lse_x, grads_x = _run("xla", causal, None)(*inputs)
  out_c, lse_c, grads_c = _run("chunked", causal, chunk)(*inputs)
  assert out_c.dtype == lse_c.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in grads_c)
  assert bool(jnp.isfinite(lse_c).all()) and bool(jnp.isfinite(out_c).all())

  blind = lse_x <= attention.NEG_INF  # rows that see no key of the block
  if with_segments:
    assert bool(blind.any()), "the segment ids should leave some rows without a visible key"
    np.testing.assert_array_equal(lse_c <= attention.NEG_INF, blind)
    seen = ~blind.transpose(0, 3, 1, 2)[..., None]
    assert not bool(jnp.where(seen, 0.0, jnp.abs(out_c)).any()), "a blind row's output is 0"
  # lse: absolute error (a log of O(1) values; observed <= 5e-7); NEG_INF rows are equal exactly.
  np.testing.assert_allclose(lse_c, lse_x, rtol=0, atol=1e-5)
  grad_errors = {f"d{x}": _rel_err(c, r) for x, c, r in zip("qkv", grads_c, grads_x)}
  if dtype == jnp.float32:
    assert _rel_err(out_c, out_x) <= 1e-6
    assert max(grad_errors.values()) <= 1e-6, grad_errors
  else:
    assert max(grad_errors.values()) <= 1e-4, grad_errors
    assert _rel_err(out_c, out_x) <= 1e-2
    # Both against float32 math on the same bf16-valued inputs.
    exact, _, _ = _run("xla", causal, None)(*(x if x is None or x.dtype != jnp.bfloat16
                                              else x.astype(jnp.float32) for x in inputs))
    assert _rel_err(out_c, exact) <= 1.5 * _rel_err(out_x, exact) + 1e-4


def test_fully_masked_rows_and_padding_are_finite():
  """A block whose queries share no segment with its keys: out 0, lse NEG_INF, zero gradients."""
  q, k, v, _, _, dout, other_lse, delta = _block(20, 20, False, jnp.float32)
  q_seg = jnp.ones((2, 20), jnp.int32)
  kv_seg = jnp.full((2, 20), 2, jnp.int32)
  out, lse, grads = _run("chunked", False, 8)(q, k, v, q_seg, kv_seg, dout, other_lse, delta)
  assert not bool(out.any())
  assert bool((lse == attention.NEG_INF).all())
  assert not any(bool(g.any()) for g in grads)
  merged, merged_lse = block_attention.merge(jnp.zeros_like(out), jnp.full_like(lse, -3.0),
                                             out, lse)
  assert bool(jnp.isfinite(merged).all()) and bool((merged_lse == -3.0).all())


# --- through the ring on 8 simulated devices -------------------------------------------------

B, T, N, H = 2, 64, 8, 16
RTOL = 1e-5  # as test_ring_attention: relative L2, float32 at highest precision


@functools.cache
def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


@functools.cache
def _ring_fn(mesh, causal, strategy, chunk_size):
  def f(q, k, v, dout, seg):
    attend = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, segment_ids=seg, causal=causal,
                                            scale=SCALE, strategy=strategy, kernel="chunked",
                                            chunk_size=chunk_size)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)
  return jax.jit(f)


# Zigzag blocks are T / 2n = 4 tokens (causal) or T / n = 8 (full) with n = 8: chunk 2 tiles them
# 2 x 2 or 4 x 4, chunk 3 pads them to 6 or 9. (causal, segment ids, G, chunk)
@pytest.mark.parametrize("causal,with_segments,group,chunk_size", [
    (True, True, 4, 3), (True, False, 1, 2), (False, True, 1, 2), (False, False, 4, 3)])
def test_ring_matches_full_attention(attention_reference, causal, with_segments, group,
                                     chunk_size):
  _check_ring(attention_reference, ((8,), ("sequence",)), "ring", causal, with_segments, group,
              chunk_size)


def test_allgather_tensor_parallel_matches_full_attention(attention_reference):
  _check_ring(attention_reference, ((4, 2), ("sequence", "tensor")), "allgather", True, True, 4, 2)


def _check_ring(reference, mesh_spec, strategy, causal, with_segments, group, chunk_size):
  mesh = _mesh(*mesh_spec)
  n = mesh.shape["sequence"]
  ks = jax.random.split(jax.random.key(1), 5)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k = jax.random.normal(ks[1], (B, T, N // group, H))
  v = jax.random.normal(ks[2], (B, T, N // group, H))
  dout = jax.random.normal(ks[3], (B, T, N, H))
  seg = None
  if with_segments:
    seg = jnp.cumsum(jax.random.bernoulli(ks[4], 0.08, (B, T)), axis=1).astype(jnp.int32)
  ref_out, ref_grads = reference(causal, SCALE)(q, k, v, dout, seg)
  out, grads = _ring_fn(mesh, causal, strategy, chunk_size)(
      *layout.zigzag_permute((q, k, v, dout, seg), n))
  out, grads = layout.zigzag_unpermute((out, grads), n)
  errors = {"out": _rel_err(out, ref_out)}
  errors.update({f"d{x}": _rel_err(g, r) for x, g, r in zip("qkv", grads, ref_grads)})
  assert max(errors.values()) <= RTOL, errors


def test_select_kernel_auto():
  select = block_attention.select_kernel
  for platform in ("cpu",):  # TPU: tests/parallel/test_splash_kernel.py
    for seg in (False, True):
      assert select("auto", has_segment_ids=seg, platform=platform, block_length=4096) == "chunked"
      assert select("auto", has_segment_ids=seg, platform=platform, block_length=512) == "xla"
      assert select("auto", has_segment_ids=seg, platform=platform) == "xla"
  assert select("auto", has_segment_ids=False, platform="gpu", block_length=65536) == "cudnn"
  assert select("auto", has_segment_ids=True, platform="gpu", block_length=65536) == "cudnn_packed"
  with pytest.raises(ValueError, match="chunk_size"):
    select("chunked", has_segment_ids=True, platform="cpu", chunk_size=0)


# --- memory: a compile-time property, not a timing -------------------------------------------

def _temp_bytes(kernel_name, t, causal=True):
  """XLA's temporary bytes for one block's forward + backward (B=1, K=2, G=4, H=64, f32)."""
  kernel = block_attention.KERNELS[kernel_name]

  def fwd_bwd(q, k, v, seg, dout):
    out, lse = kernel.forward(q, k, v, seg, seg, causal=causal, scale=SCALE)
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", dout, out)
    return out, kernel.backward(q, k, v, seg, seg, out, lse, dout, delta, causal=causal,
                                scale=SCALE)

  q = jax.ShapeDtypeStruct((1, t, 2, 4, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  compiled = jax.jit(fwd_bwd).lower(q, kv, kv, seg, q).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_temporaries_are_tiles_not_the_block():
  """At a block of 8192 tokens the xla kernel holds [1, 2, 4, 8192, 8192] f32 scores (2 GiB each;
  observed 8228 MiB of temporaries) where the chunked kernel holds a few 1024 x 1024 tiles (32 MiB
  each; observed 135 MiB, the same at 16K and 32K tokens)."""
  xla, chunked = _temp_bytes("xla", 8192), _temp_bytes("chunked", 8192)
  assert xla > 4 * 2**30
  assert chunked < xla / 16


def test_one_sequence_shard_runs_long_sequences_through_the_chunked_kernel(monkeypatch,
                                                                           attention_reference):
  """make_attention_fn with sequence = 1: T > chunk_size takes the chunked kernel as a one-block
  ring (no [T, T] scores), T <= chunk_size the plain attention; both equal full attention."""
  from ultralong_jax.parallel import ring_attention as ring_lib  # pylint: disable=import-outside-toplevel
  kernels = []
  real_ring = ring_lib.ring_attention

  def spy(*args, **kwargs):
    kernels.append(kwargs["kernel"])
    return real_ring(*args, **kwargs)

  monkeypatch.setattr(ring_lib, "ring_attention", spy)
  mesh = _mesh((2, 1, 4), ("data", "sequence", "tensor"))
  ks = jax.random.split(jax.random.key(2), 5)
  q = jax.random.normal(ks[0], (2, T, 4, H))
  k, v = (jax.random.normal(kk, (2, T, 4, H)) for kk in ks[1:3])
  dout = jax.random.normal(ks[3], (2, T, 4, H))
  seg = jnp.cumsum(jax.random.bernoulli(ks[4], 0.08, (2, T)), axis=1).astype(jnp.int32)
  ref_out, ref_grads = attention_reference(True, SCALE)(q, k, v, dout, seg)
  for chunk_size, expected in ((T // 4, ["chunked"]), (T, [])):
    kernels.clear()
    attend_fn = ring_lib.make_attention_fn(mesh, kernel="auto", chunk_size=chunk_size)

    def f(q, k, v, dout, attend_fn=attend_fn):
      attend = lambda q, k, v: attend_fn(q, k, v, segment_ids=seg, causal=True, scale=SCALE)
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(dout)

    out, grads = jax.jit(f)(q, k, v, dout)
    assert kernels == expected, (chunk_size, kernels)  # [] = the plain attention ran
    errors = {"out": _rel_err(out, ref_out)}
    errors.update({f"d{x}": _rel_err(g, r) for x, g, r in zip("qkv", grads, ref_grads)})
    assert max(errors.values()) <= RTOL, (chunk_size, errors)
