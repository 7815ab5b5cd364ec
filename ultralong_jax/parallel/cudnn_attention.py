"""The fused-attention block kernels: cuDNN flash attention (H100) and its XLA twin for CPU tests.

Both kernels make ONE fused call per ring block and hand the ring (out, lse), where lse is the
softmax statistic of the call in float32. `jax.nn.dot_product_attention(..., return_residual=True)`
casts that statistic to the inputs' dtype (jax/_src/nn/functions.py), and a ring that merges
blocks by a bfloat16 log-sum-exp loses accuracy as the blocks grow in number. So the "cudnn"
kernel calls the entry point underneath it, `jax._src.cudnn.fused_attention_stablehlo.
dot_product_attention` (private API; `cudnn_entry` checks its signature), which returns cuDNN's
float32 statistics [B, N, T] uncast. The "xla" twin computes the same contract with XLA: the
output from `jax.nn.dot_product_attention(implementation="xla")` (rounded to the inputs' dtype like
cuDNN's) and the statistics in float32 from the scores. `lse_from_stats` is the one place where
the statistic becomes the kernel's lse, for both: its `residual_dtype` (float32; bfloat16
reproduces the public API's cast) is what tests/parallel/test_cudnn_lse.py compares.

Packed documents (segment ids): cuDNN's packed layout (Hopper or later) takes per-segment query
and key/value offsets and lengths; segment m of the queries attends to segment m of the keys.
`packed_layout` turns a block's segment ids into that layout by runs: the m-th run of equal ids
in the query block is paired with the run of the same id in the key block (length 0 when absent:
those query rows see no key; they get out = 0, lse = NEG_INF like the other kernels). A block
whose ids do not form at most `max_segments` runs, each id in one run, cannot be laid out so; it
runs the `fallback` kernel (the chunked XLA kernel) under `lax.cond`, so results are exact for
any ids. cuDNN's statistics in this layout are [B * M, N, T]: one row per segment, in order
over all rows, its tokens at their offset within the segment (`_token_index`).

The public vjp of the fused call covers the output only (not the statistic), so `backward` adds
the missing log-sum-exp term with a second call (see its docstring).
"""

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Parameters of the private cuDNN entry point this module passes (checked by `cudnn_entry`).
_ENTRY_PARAMS = ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type",
                 "qkv_layout", "return_residual")

# Packed blocks: cuDNN's statistics are [B * M, N, T] float32 for M segments per row, so M is
# bounded by tokens: M * T <= PACKED_STAT_TOKENS keeps them at 4 N MiB per row (M = 128 at
# T = 8K, 8 at 128K); a block with more runs takes the fallback kernel.
PACKED_STAT_TOKENS = 1 << 20


def max_segments(block_length: int) -> int:
  """The static number of segments per row of a packed block of `block_length` tokens.

  At 1 (blocks of 1M tokens) the entry point makes a dense call (it packs only for M > 1); that
  is still exact: a fitting block is one run, whose key run is the whole key block or absent
  (then `attend` blanks its rows)."""
  return max(1, min(block_length, PACKED_STAT_TOKENS // max(block_length, 1)))


def cudnn_entry():
  """JAX's cuDNN fused-attention module, checked to take the arguments this module passes."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as entry  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the installed jax
    raise RuntimeError(f"jax {jax.__version__} has no jax._src.cudnn.fused_attention_stablehlo; "
                       "the 'cudnn' kernels need it. Use attention.kernel=chunked.") from e
  params = inspect.signature(entry.dot_product_attention).parameters
  missing = [p for p in _ENTRY_PARAMS if p not in params]
  if missing or not hasattr(entry, "MaskType"):
    raise RuntimeError(
        f"jax {jax.__version__}: jax._src.cudnn.fused_attention_stablehlo.dot_product_attention "
        f"lacks {missing or 'MaskType'} (the 'cudnn' kernels are written for jax 0.11-0.12). "
        "Use attention.kernel=chunked.")
  return entry


class PackedLayout(NamedTuple):
  """cuDNN's packed layout of one block, as JAX's entry point takes it (M = segments per row;
  int32; -1 marks an unused entry, and the last offset column is always -1: the entry point
  compacts the used entries of all rows into one list of B-row-spanning segments)."""
  q_offsets: jax.Array    # [B, M + 1] start of query segment m
  q_seqlen: jax.Array     # [B, M] its length
  kv_offsets: jax.Array   # [B, M + 1] start of the key run with the same id (0 if none)
  kv_seqlen: jax.Array    # [B, M] its length (0: the query segment sees no key)
  q_run: jax.Array        # [B, T] the query segment of each query token
  fits: jax.Array         # [] bool: every row's ids form <= M runs, each id in one run


def _runs(seg, m: int):
  """Runs of equal ids along axis 1 of seg [B, L]: (run index [B, L], start, length, id [B, m],
  count [B], ids unique among runs [B])."""
  b, length = seg.shape
  new = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  run = jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], run.shape)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], run.shape)
  start = jnp.full((b, m), length, jnp.int32).at[rows, run].min(pos, mode="drop")
  size = jnp.zeros((b, m), jnp.int32).at[rows, run].add(1, mode="drop")
  ids = jnp.zeros((b, m), seg.dtype).at[rows, run].set(seg, mode="drop")
  count = run[:, -1] + 1
  used = jnp.arange(m)[None] < count[:, None]
  pairs = (ids[:, :, None] == ids[:, None, :]) & used[:, :, None] & used[:, None, :]
  unique = (pairs.sum(axis=(1, 2)) == jnp.minimum(count, m))
  return run, start, size, ids, count, unique


def packed_layout(q_seg, kv_seg, m: int) -> PackedLayout:
  """cuDNN's packed layout of a block with query ids q_seg [B, T] and key ids kv_seg [B, S]."""
  t, s = q_seg.shape[1], kv_seg.shape[1]
  q_run, q_start, q_len, q_ids, q_count, q_unique = _runs(q_seg, m)
  _, kv_start, kv_len, kv_ids, kv_count, kv_unique = _runs(kv_seg, m)
  kv_used = jnp.arange(m)[None] < kv_count[:, None]
  match = (q_ids[:, :, None] == kv_ids[:, None, :]) & kv_used[:, None, :]   # [B, M, M]
  q_used = jnp.arange(m)[None] < q_count[:, None]
  found = match.any(axis=2) & q_used
  unused = lambda x: jnp.where(q_used, x, -1).astype(jnp.int32)
  kv_off = unused(jnp.where(found, (match * kv_start[:, None, :]).sum(axis=2), 0))
  kv_sz = unused(jnp.where(found, (match * kv_len[:, None, :]).sum(axis=2), 0))
  end = lambda x: jnp.concatenate([x, jnp.full((x.shape[0], 1), -1, jnp.int32)], axis=1)
  fits = jnp.all((q_count <= m) & (kv_count <= m) & q_unique & kv_unique)
  return PackedLayout(end(unused(q_start)), unused(q_len), end(kv_off), kv_sz, q_run, fits)


def packed_mask(layout: PackedLayout, s: int, causal: bool):
  """The [B, T, S] boolean mask (True = attend) that the packed layout means: query token t of
  segment m sees key run m; causal counts positions within the two segments (cuDNN's rule)."""
  take = lambda x: jnp.take_along_axis(x, layout.q_run, axis=1)[:, :, None]   # [B, T, 1]
  kv_start, kv_len = take(layout.kv_offsets[:, :-1]), take(layout.kv_seqlen)
  key = jnp.arange(s)[None, None, :]
  mask = (key >= kv_start) & (key < kv_start + kv_len)
  if causal:
    query_in_segment = (jnp.arange(layout.q_run.shape[1])[None, :, None]
                        - take(layout.q_offsets[:, :-1]))
    mask &= query_in_segment >= key - kv_start
  return mask


def _token_index(layout: PackedLayout, m: int):
  """Where each query token's statistic lives in cuDNN's packed [B * M, N, T] statistics: the
  entry point compacts the used segments of all rows in order, so segment m of row b is row
  (segments of the rows before b) + m, and its tokens sit at their offset within the segment."""
  del m
  t = layout.q_run.shape[1]
  used = (layout.q_seqlen >= 0).sum(axis=1)
  segment = (jnp.cumsum(used) - used)[:, None] + layout.q_run
  offset = jnp.arange(t)[None] - jnp.take_along_axis(layout.q_offsets, layout.q_run, axis=1)
  return segment, offset


def _token_stats(stats, layout: PackedLayout, m: int):
  """Packed statistics [B * M, N, T] -> per token [B, N, T]."""
  segment, offset = _token_index(layout, m)
  return stats.transpose(0, 2, 1)[segment, offset].transpose(0, 2, 1)


def lse_from_stats(stats, kv_heads: int, residual_dtype):
  """Softmax statistics [B, N, T] (float32) -> the kernel's lse [B, K, G, T] float32.

  The one place the statistic's precision is set, for cuDNN and its twin alike: rounded through
  `residual_dtype` (float32 keeps it; bfloat16 is what the public API's return_residual gives).
  The gradient is stopped: cuDNN's vjp has no term for it (`backward` supplies it).
  """
  b, n, t = stats.shape
  lse = stats.astype(jnp.float32)
  if jnp.dtype(residual_dtype) != jnp.float32:
    # reduce_precision, not astype there and back: XLA may drop a float32 -> bfloat16 -> float32
    # round trip (xla_allow_excess_precision), which would hide the rounding being modelled.
    info = jnp.finfo(residual_dtype)
    lse = jax.lax.reduce_precision(lse, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return jax.lax.stop_gradient(lse.reshape(b, kv_heads, n // kv_heads, t))


def _cudnn_call(q, k, v, layout: PackedLayout | None, *, causal: bool, scale: float):
  """cuDNN's fused attention, q [B,T,N,H]: (out [B,T,N,H] q.dtype, stats [B(*M), N, T] f32)."""
  entry = cudnn_entry()
  mask = entry.MaskType.CAUSAL if causal else entry.MaskType.NO_MASK
  packed = {} if layout is None else dict(
      q_seqlen=layout.q_seqlen, kv_seqlen=layout.kv_seqlen, q_offsets=layout.q_offsets,
      kv_offsets=layout.kv_offsets)
  return entry.dot_product_attention(q, k, v, scale=scale, mask_type=mask, qkv_layout="BTNH",
                                     return_residual=True, **packed)


def _xla_call(q, k, v, layout: PackedLayout | None, *, causal: bool, scale: float):
  """_cudnn_call's contract computed by XLA (any platform): the CPU twin."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if layout is None:
    mask = jnp.tril(jnp.ones((t, s), bool)) if causal else None
  else:
    mask = packed_mask(layout, s, causal)
  out = jax.nn.dot_product_attention(
      q, k, v, mask=None if mask is None else jnp.broadcast_to(mask, (b, t, s))[:, None],
      scale=scale, implementation="xla")
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(b, t, kh, n // kh, h), k,
                      preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(jnp.broadcast_to(mask, (b, t, s))[:, None, None], scores, -jnp.inf)
  stats = jax.nn.logsumexp(scores, axis=-1).reshape(b, n, t)
  if layout is not None:  # scattered into cuDNN's packed statistics layout
    m = layout.q_seqlen.shape[1]
    segment, offset = _token_index(layout, m)
    stats = jnp.zeros((b * m, t, n), jnp.float32).at[segment, offset].set(
        stats.transpose(0, 2, 1)).transpose(0, 2, 1)
  return out, stats


_CALLS = {"cudnn": _cudnn_call, "xla": _xla_call}


def attend(q, k, v, layout: PackedLayout | None, *, causal: bool, scale: float,
           implementation: str, residual_dtype=jnp.float32):
  """One fused call on the block layout: (out [B,T,K,G,H] q.dtype, lse [B,K,G,T] float32)."""
  from ultralong_jax.modeling.attention import NEG_INF  # pylint: disable=g-import-not-at-top
  b, t, kh, g, h = q.shape
  out, stats = _CALLS[implementation](q.reshape(b, t, kh * g, h), k, v, layout, causal=causal,
                                      scale=scale)
  out = out.reshape(b, t, kh, g, h)
  if layout is not None:
    stats = _token_stats(stats, layout, layout.q_seqlen.shape[1])
  lse = lse_from_stats(stats, kh, residual_dtype)
  if layout is not None:
    # A query segment with no key run in this block: its rows see nothing.
    seen = jnp.take_along_axis(layout.kv_seqlen, layout.q_run, axis=1) > 0    # [B, T]
    out = jnp.where(seen[:, :, None, None, None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(seen[:, None, None, :], lse, NEG_INF)
  return out, lse


def _unpacked(q_seg, kernel: str):
  if q_seg is not None:
    raise ValueError(f"kernel {kernel!r} takes no segment ids; use '{kernel}_packed', 'chunked' "
                     "or 'auto'.")


def forward(q, k, v, q_seg, kv_seg, *, causal, scale, implementation, residual_dtype=jnp.float32):
  """Block forward without segment ids: out float32 [B,T,K,G,H], lse [B,K,G,T]."""
  del kv_seg
  _unpacked(q_seg, {"cudnn": "cudnn", "xla": "dpa_xla"}[implementation])
  out, lse = attend(q, k, v, None, causal=causal, scale=scale, implementation=implementation,
                    residual_dtype=residual_dtype)
  return out.astype(jnp.float32), lse


def backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal, scale, implementation,
             residual_dtype=jnp.float32, layout=None):
  """Block backward from a fused call whose vjp covers its output only (not its log-sum-exp).

  With block-local softmax p_j, weight w = exp(lse_j - lse), the exact score gradient is
  w p_j (dout v^T - delta); the kernel's vjp at cotangent w * dout gives w p_j (dout v^T -
  rowsum(dout * out_j)), so the missing term is p_j * c with c = w (rowsum(dout * out_j) - delta):
  dq += scale c (p_j k) = scale c attn(q, k, k), dk += scale p_j^T (c q) = the v-gradient of
  attn(q, k, .) at cotangent scale c q.
  """
  del q_seg, kv_seg, out
  fn = functools.partial(attend, layout=layout, causal=causal, scale=scale,
                         implementation=implementation, residual_dtype=residual_dtype)
  (out_j, lse_j), vjp = jax.vjp(lambda q_, k_, v_: fn(q_, k_, v_), q, k, v)
  w = jnp.exp(lse_j - lse)                                   # [B, K, G, T]
  w_t = w.transpose(0, 3, 1, 2)[..., None]                   # [B, T, K, G, 1]
  dq, dk, dv = vjp(((w_t * dout).astype(out_j.dtype), jnp.zeros_like(lse_j)))
  c = w * (jnp.einsum("BTKGH,BTKGH->BKGT", dout.astype(jnp.float32),
                      out_j.astype(jnp.float32)) - delta)
  c_t = (c * scale).transpose(0, 3, 1, 2)[..., None]
  (pk, _), vjp_v = jax.vjp(lambda v_: fn(q, k, v_), k)
  (dk_extra,) = vjp_v(((c_t * q).astype(pk.dtype), jnp.zeros_like(lse_j)))
  return (dq.astype(jnp.float32) + c_t * pk.astype(jnp.float32),
          dk.astype(jnp.float32) + dk_extra.astype(jnp.float32), dv.astype(jnp.float32))


def packed_forward(q, k, v, q_seg, kv_seg, *, causal, scale, implementation, fallback,
                   residual_dtype=jnp.float32):
  """Block forward with segment ids: the packed fused call, or `fallback` (a BlockKernel's
  forward) for a block that the packed layout cannot express."""
  if q_seg is None:
    return forward(q, k, v, None, None, causal=causal, scale=scale,
                   implementation=implementation, residual_dtype=residual_dtype)
  layout = packed_layout(q_seg, kv_seg, max_segments(q.shape[1]))

  def fused():
    out, lse = attend(q, k, v, layout, causal=causal, scale=scale,
                      implementation=implementation, residual_dtype=residual_dtype)
    return out.astype(jnp.float32), lse

  return jax.lax.cond(layout.fits, fused,
                      lambda: fallback(q, k, v, q_seg, kv_seg, causal=causal, scale=scale))


def packed_backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal, scale,
                    implementation, fallback, residual_dtype=jnp.float32):
  """packed_forward's backward: `backward` on the packed layout, or `fallback`'s."""
  args = (q, k, v, q_seg, kv_seg, out, lse, dout, delta)
  kw = dict(causal=causal, scale=scale)
  if q_seg is None:
    return backward(*args, **kw, implementation=implementation, residual_dtype=residual_dtype)
  layout = packed_layout(q_seg, kv_seg, max_segments(q.shape[1]))
  return jax.lax.cond(
      layout.fits,
      lambda: backward(*args, **kw, implementation=implementation,
                       residual_dtype=residual_dtype, layout=layout),
      lambda: fallback(*args, **kw))
