"""The "splash" block kernel: Pallas splash attention (TPU) behind block_attention.BlockKernel.

Built on `jax.experimental.pallas.ops.tpu.splash_attention` (ships with jax):
  forward   the public kernel (`make_splash_mha(..., save_residuals=True)`), whose residual is
            the row's float32 log-sum-exp. GQA without repeating K/V: splash's multi-head kernel
            takes K < N key/value heads and maps query head h to kv head h // G, which is our
            [B, T, K, G, H] order flattened to N = K G heads. Segment ids: `SegmentIds(q, kv)`,
            separate arrays for queries and keys, so off-diagonal ring blocks work. Causal
            (diagonal) blocks use `CausalMask`, off-diagonal blocks `FullMask`; the batch is a vmap.
  backward  splash's own dq and dk/dv Pallas kernels (`_splash_attention_bwd_dq`,
            `_splash_attention_bwd_dkv`) called with the row's GLOBAL log-sum-exp and
            delta = rowsum(dout * out) (flash-attention 2), so ring gradients are exact. The public
            vjp cannot do this: it refuses to differentiate `save_residuals=True` ("Higher-order AD
            not supported") and would use the block's own statistics. These two functions are
            private API, so the kernel runs only on the JAX versions in SUPPORTED_JAX (tested with
            0.12.0.1; 0.11.2 has the same source for both functions and the masks) and fails with
            a clear message elsewhere.

Tiles: splash's q/kv blocks (forward, dq and dkv kernels alike) are the largest multiple of 128
that divides the block length and is at most min(chunk_size, MAX_TILE); block lengths and
`chunk_size` must be multiples of 128 (check_lengths).

Platforms: the Pallas call is lowered for TPU as a Mosaic custom call; on any other platform it
runs in Pallas interpret mode (`jax.lax.platform_dependent` picks per lowering platform), which is
how the CPU tests exercise the kernel's own code. Scaling: splash does not scale scores, so q is
multiplied by `scale` first (in q's dtype, as MaxText does) and dq by `scale` after. Outputs and
gradients come back in the inputs' dtype and are widened to float32 for the merge.

A row that sees no key of the block (segment ids) gets splash's finite mask value as its score
everywhere (lse ~ -2.4e38 < NEG_INF); it is mapped to out = 0, lse = NEG_INF like the other kernels.
"""

import functools

import jax
import jax.numpy as jnp

from ultralong_jax.modeling import attention
from ultralong_jax.parallel import block_attention, chunked_attention

LANES = 128     # splash's q/kv blocks are multiples of the TPU's 128 lanes
MAX_TILE = 512  # MaxText's default splash block sizes; larger tiles are unmeasured on TPU
# JAX versions whose private splash backward functions this kernel calls: [min, max).
SUPPORTED_JAX = ((0, 11, 2), (0, 13))


def _jax_version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def unsupported_reason() -> str | None:
  """Why splash cannot run with the installed JAX, or None when it can."""
  low, high = SUPPORTED_JAX
  if low <= _jax_version() < high:
    return None
  return (f"kernel 'splash' calls splash attention's private backward kernels, tested with JAX "
          f">= {'.'.join(map(str, low))} and < {'.'.join(map(str, high))}; this is JAX "
          f"{jax.__version__}. Use attention.kernel='chunked' (or 'auto'), or install a JAX in "
          "that range.")


def check_lengths(block_length: int, chunk_size: int) -> None:
  """Raises ValueError unless the ring block length and chunk_size are multiples of 128."""
  if chunk_size % LANES:
    raise ValueError(f"attention.chunk_size={chunk_size}: kernel 'splash' tiles blocks in "
                     f"multiples of {LANES} tokens; use a multiple of {LANES} (e.g. "
                     f"{max(LANES, chunk_size - chunk_size % LANES)}).")
  if block_length % LANES:
    raise ValueError(f"kernel 'splash' needs ring blocks of a multiple of {LANES} tokens; a block "
                     f"here is {block_length} (data.seq_len / mesh.sequence, halved under the "
                     f"zigzag layout). Make data.seq_len a multiple of {LANES} x mesh.sequence "
                     "(x 2 under zigzag) or use attention.kernel='chunked'.")


def tile(length: int, chunk_size: int) -> int:
  """The largest multiple of 128 dividing `length` that is at most min(chunk_size, MAX_TILE)."""
  check_lengths(length, chunk_size)
  cap = min(chunk_size, MAX_TILE, length)
  return max(d for d in range(LANES, cap + 1, LANES) if length % d == 0)


def _library():
  # Imported on first use: the Pallas TPU modules are only needed where the kernel runs.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask  # pylint: disable=g-import-not-at-top
  return splash_attention_kernel, splash_attention_mask


def _make(t: int, s: int, heads: int, causal: bool, chunk_size: int, interpret: bool):
  """The splash kernel object for one [heads, t, s] block (forward + backward mask infos)."""
  kernel_lib, mask_lib = _library()
  bq, bkv = tile(t, chunk_size), tile(s, chunk_size)
  mask = mask_lib.CausalMask((t, s)) if causal else mask_lib.FullMask((t, s))
  sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                block_q_dq=bq, block_kv_dq=bkv)
  return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, save_residuals=True,
                                    interpret=interpret)


def _on_platform(run):
  """run(interpret) lowered as a Mosaic kernel for TPU, in Pallas interpret mode elsewhere."""
  return jax.lax.platform_dependent(tpu=functools.partial(run, False),
                                    default=functools.partial(run, True))


def _check_jax() -> None:
  reason = unsupported_reason()
  if reason:
    raise RuntimeError(reason)


def _heads_major(q, k, v, dout=None):
  """[B, T, K, G, H] -> [B, N, T, H] (N = K G, kv head h // G); [B, S, K, H] -> [B, K, S, H]."""
  b, t, kh, g, h = q.shape
  to_heads = lambda x: x.transpose(0, 2, 3, 1, 4).reshape(b, kh * g, t, h)
  kv = lambda x: x.transpose(0, 2, 1, 3)
  return to_heads(q), kv(k), kv(v), None if dout is None else to_heads(dout)


def _segments(q_seg, kv_seg):
  if q_seg is None:
    return None
  kernel_lib, _ = _library()
  return kernel_lib.SegmentIds(q=q_seg, kv=kv_seg)


def splash_forward(q, k, v, q_seg, kv_seg, *, causal: bool, scale: float,
                   chunk_size: int = chunked_attention.CHUNK_SIZE):
  """Block attention by splash: out f32 [B, T, K, G, H], lse f32 [B, K, G, T]."""
  _check_jax()
  b, t, kh, g, h = q.shape
  qn, kn, vn, _ = _heads_major(q * jnp.asarray(scale, q.dtype), k, v)

  def run(interpret):
    kernel = _make(t, k.shape[1], kh * g, causal, chunk_size, interpret)
    one = lambda q, k, v, segs: kernel(q, k, v, segment_ids=segs)
    out, (lse,) = jax.vmap(one)(qn, kn, vn, _segments(q_seg, kv_seg))
    return out, lse

  out, lse = _on_platform(run)                           # [B, N, T, H], [B, N, T] f32
  out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).astype(jnp.float32)
  lse = lse.reshape(b, kh, g, t)
  seen = lse > attention.NEG_INF
  out = jnp.where(seen.transpose(0, 3, 1, 2)[..., None], out, 0.0)
  return out, jnp.where(seen, lse, attention.NEG_INF)


def splash_backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal: bool, scale: float,
                    chunk_size: int = chunked_attention.CHUNK_SIZE):
  """Flash-attention-2 block backward by splash's dq and dk/dv kernels with the row's global lse
  [B, K, G, T] and delta = rowsum(dout * out) [B, K, G, T]; returns dq, dk, dv in float32."""
  del out  # only needed through delta
  _check_jax()
  kernel_lib, _ = _library()
  b, t, kh, g, h = q.shape
  n = kh * g
  qn, kn, vn, doutn = _heads_major(q * jnp.asarray(scale, q.dtype), k, v, dout.astype(q.dtype))
  lse_n, delta_n = (x.astype(jnp.float32).reshape(b, n, t) for x in (lse, delta))

  def run(interpret):
    kernel = _make(t, k.shape[1], n, causal, chunk_size, interpret)
    sizes = kernel.kwargs["block_sizes"]
    # Causal and full masks carry no partial mask blocks (the causal one is a mask function over
    # q_sequence), so the mask infos go in as made, without the public path's block reshape.
    options = dict(is_mqa=False, mask_value=kernel.kwargs["mask_value"],
                   attn_logits_soft_cap=None, q_layout=sizes.q_layout, k_layout=sizes.k_layout,
                   v_layout=sizes.v_layout, mask_function=kernel.kwargs["mask_function"],
                   interpret=interpret)

    def one(q, k, v, segs, lse, do, di):
      _, dk, dv = kernel_lib._splash_attention_bwd_dkv(  # pylint: disable=protected-access
          q, k, v, segs, None, lse, do, di, bq=sizes.block_q_dkv, bkv=sizes.block_kv_dkv,
          bkv_compute=sizes.block_kv_dkv_compute, mask_info=kernel.dkv_mask_info,
          use_fused_bwd_kernel=False, **options)
      dq = kernel_lib._splash_attention_bwd_dq(  # pylint: disable=protected-access
          q, k, v, segs, None, lse, do, di, bq=sizes.block_q_dq, bkv=sizes.block_kv_dq,
          mask_info=kernel.dq_mask_info, **options)
      return dq, dk, dv

    return jax.vmap(one)(qn, kn, vn, _segments(q_seg, kv_seg), lse_n, doutn, delta_n)

  dq, dk, dv = _on_platform(run)                         # [B, N, T, H], [B, K, S, H] x 2
  dq = dq.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).astype(jnp.float32) * scale
  dk, dv = (x.transpose(0, 2, 1, 3).astype(jnp.float32) for x in (dk, dv))
  return dq, dk, dv


def splash_kernel(chunk_size: int = chunked_attention.CHUNK_SIZE) -> block_attention.BlockKernel:
  """The "splash" kernel with tiles of at most min(chunk_size, MAX_TILE) tokens."""
  return block_attention.BlockKernel(
      functools.partial(splash_forward, chunk_size=chunk_size),
      functools.partial(splash_backward, chunk_size=chunk_size), segment_ids=True)
