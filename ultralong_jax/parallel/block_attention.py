"""Per-block attention kernels for ring attention, and the log-sum-exp merge of partial results.

A block kernel attends one query block to one key/value block and returns the block-normalized
output with its log-sum-exp; blocks are merged by log-sum-exp (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax"; the flash-attention recurrence). Its backward takes the GLOBAL
output and log-sum-exp of the whole row (flash-attention 2, Dao 2023, Algorithm 2), so a block's
gradient is exact without ever holding the whole row.

Internal layout (GQA without repeating K/V: query heads grouped under their kv head):
  q, dq, out, dout  [B, T, K, G, H]      k, v, dk, dv  [B, S, K, H]
  lse, delta        [B, K, G, T] float32 q_seg [B, T], kv_seg [B, S] int or None
`causal=True` masks causally (modeling.attention.mask): by the q_pos/kv_pos [B|1, T|S] positions
that the "xla" and "chunked" kernels take (BlockKernel.positions), else by index order within the
block, i.e. the block is on the diagonal: T == S and query t sees keys s <= t.

A row that sees no key of the block (causal or segment mask) gets out = 0 and lse = NEG_INF, so
its weight in the merge is exp(NEG_INF - lse) = 0 and the merge stays finite.

Kernels:
  "xla"      einsum scores per block, explicit backward. Works everywhere; the CPU reference. Its
             temporaries are [B, K, G, T, S] float32: O(block length^2).
  "chunked"  the same math tiled flash-style in plain XLA (parallel/chunked_attention.py): lax
             loops over query and key chunks of `chunk_size` (default
             chunked_attention.CHUNK_SIZE) tokens with an online softmax (forward) and the
             flash-attention-2 backward per tile, so temporaries are O(chunk^2 + block length).
             Causal blocks skip the tiles above the diagonal. Segment ids; any platform.
  "cudnn"    one cuDNN flash-attention call per block through JAX's cuDNN entry point
             (parallel/cudnn_attention.py), with cuDNN's float32 log-sum-exp. Its vjp ignores the
             cotangent of the log-sum-exp the ring merge needs, so the backward adds that term
             with a second call (backward costs about two flash backwards). No segment ids.
  "cudnn_packed"  the same on cuDNN's packed layout (Hopper+): segment ids as per-segment
             offsets; a block with more runs of ids than the layout holds runs "chunked".
  "dpa_xla", "dpa_xla_packed"  their twins over XLA (same contract, same dtype handling, same
             backward): the cuDNN paths' math, testable on CPU.
  "splash"   Pallas splash attention (TPU; Pallas interpret mode elsewhere), in parallel/splash.py:
             float32 log-sum-exp, segment ids, GQA, splash's own backward kernels with the global
             lse/delta. Block lengths and chunk_size must be multiples of 128.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ultralong_jax.modeling import attention
from ultralong_jax.parallel import chunked_attention, cudnn_attention


class BlockKernel(NamedTuple):
  forward: callable   # (q, k, v, q_seg, kv_seg, *, causal, scale) -> (out f32, lse)
  backward: callable  # (q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal, scale) -> dq, dk, dv
  segment_ids: bool   # whether the kernel supports segment ids
  # Whether forward/backward take q_pos [B|1, T], kv_pos [B|1, S] (keywords) and mask by their
  # order (modeling.attention.mask); the others mask by index order within the block.
  positions: bool = False
  # What its buffers grow with, as training/memory.py estimates them: "xla" materializes the
  # block's [T, S] float32 scores, "chunked" one [chunk, chunk] tile, "flash" O(T) (fused kernels).
  memory: str = "xla"


def _scores(q, k, q_seg, kv_seg, causal, scale, q_pos, kv_pos):
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  order = chunked_attention.order
  mask = attention.mask(order(q_pos, q.shape[1]), order(kv_pos, k.shape[1]), q_seg, kv_seg, causal)
  return s if mask is None else jnp.where(mask, s, attention.NEG_INF)


def xla_forward(q, k, v, q_seg, kv_seg, *, causal: bool, scale: float, q_pos=None, kv_pos=None):
  """Block attention with materialized [B, K, G, T, S] scores; returns out f32, lse [B,K,G,T]."""
  s = _scores(q, k, q_seg, kv_seg, causal, scale, q_pos, kv_pos)
  m = s.max(axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = p.sum(axis=-1, keepdims=True)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", (p / l).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  seen = (m[..., 0] > attention.NEG_INF).transpose(0, 3, 1, 2)[..., None]  # [B, T, K, G, 1]
  return jnp.where(seen, out, 0.0), (m + jnp.log(l))[..., 0]


def xla_backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal: bool, scale: float,
                 q_pos=None, kv_pos=None):
  """Flash-attention-2 block backward with the row's global lse and delta = rowsum(dout * out)."""
  del out  # only needed through delta
  p = jnp.exp(_scores(q, k, q_seg, kv_seg, causal, scale, q_pos, kv_pos) - lse[..., None])
  dv = jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(dout.dtype), dout,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("BTKGH,BSKH->BKGTS", dout, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None]) * scale
  dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq, dk, dv


def chunked_kernel(chunk_size: int = chunked_attention.CHUNK_SIZE) -> BlockKernel:
  """The "chunked" kernel with query/key chunks of `chunk_size` tokens."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: expected a positive number of tokens")
  return BlockKernel(
      functools.partial(chunked_attention.chunked_forward, chunk_size=chunk_size),
      functools.partial(chunked_attention.chunked_backward, chunk_size=chunk_size),
      segment_ids=True, positions=True, memory="chunked")


# jax.nn.dot_product_attention's implementations: cuDNN's flash kernel, or XLA's, which
# materializes the scores.
_FUSED_MEMORY = {"cudnn": "flash", "xla": "xla"}


def _fused_kernel(implementation: str) -> BlockKernel:
  """One fused call per block (cudnn_attention), no segment ids."""
  return BlockKernel(
      functools.partial(cudnn_attention.forward, implementation=implementation),
      functools.partial(cudnn_attention.backward, implementation=implementation),
      segment_ids=False, memory=_FUSED_MEMORY[implementation])


def _packed_kernel(implementation: str,
                   chunk_size: int = chunked_attention.CHUNK_SIZE) -> BlockKernel:
  """The fused call on cuDNN's packed layout; blocks it cannot lay out run the chunked kernel."""
  fallback = chunked_kernel(chunk_size)
  return BlockKernel(
      functools.partial(cudnn_attention.packed_forward, implementation=implementation,
                        fallback=fallback.forward),
      functools.partial(cudnn_attention.packed_backward, implementation=implementation,
                        fallback=fallback.backward),
      segment_ids=True, memory=_FUSED_MEMORY[implementation])


def _splash_kernel(chunk_size: int) -> BlockKernel:
  """splash.splash_kernel(chunk_size), imported on first call (splash builds on this module)."""
  def call(part, *args, **kwargs):
    from ultralong_jax.parallel import splash  # pylint: disable=import-outside-toplevel
    return getattr(splash.splash_kernel(chunk_size), part)(*args, **kwargs)
  return BlockKernel(functools.partial(call, "forward"), functools.partial(call, "backward"),
                     segment_ids=True, memory="flash")


KERNELS = {
    "xla": BlockKernel(xla_forward, xla_backward, segment_ids=True, positions=True),
    "chunked": chunked_kernel(chunked_attention.CHUNK_SIZE),
    "cudnn": _fused_kernel("cudnn"),
    "dpa_xla": _fused_kernel("xla"),
    "cudnn_packed": _packed_kernel("cudnn"),
    "dpa_xla_packed": _packed_kernel("xla"),
    "splash": _splash_kernel(chunked_attention.CHUNK_SIZE),
}

_PACKED = {"cudnn_packed": "cudnn", "dpa_xla_packed": "xla"}


def get_kernel(kernel: str | BlockKernel, *,
               chunk_size: int = chunked_attention.CHUNK_SIZE) -> BlockKernel:
  """The BlockKernel named `kernel` (as select_kernel returns it); "chunked", "splash" and the
  packed kernels (whose fallback is "chunked") with `chunk_size`. A BlockKernel is returned as
  it is."""
  if isinstance(kernel, BlockKernel):
    return kernel
  if kernel in _PACKED:
    return _packed_kernel(_PACKED[kernel], chunk_size)
  if kernel == "splash":
    return _splash_kernel(chunk_size)
  return chunked_kernel(chunk_size) if kernel == "chunked" else KERNELS[kernel]


def select_kernel(kernel: str | BlockKernel, *, has_segment_ids: bool,
                  platform: str | None = None, block_length: int | None = None,
                  chunk_size: int = chunked_attention.CHUNK_SIZE) -> str | BlockKernel:
  """Resolves kernel="auto" by backend and block length; validates an explicit choice.

  A BlockKernel outside KERNELS (e.g. training.compile_plan.STANDIN_KERNEL) is the caller's
  explicit choice: it is returned as it is, after the segment-ids check.

  auto: cuDNN flash attention on GPU ("cudnn", or "cudnn_packed" with segment ids). Otherwise
  (CPU, TPU) "chunked" when a ring block is longer than one chunk (`block_length` >
  `chunk_size`; block_length = the kernel's query length, e.g. T / 2n under the zigzag layout),
  else "xla": a block that fits one chunk would be a single tile anyway, and the einsum kernel
  is simpler and what the small CPU tests exercise. Without `block_length`, "xla".
  On TPU, auto is "splash" (segment ids or not) when `block_length` and `chunk_size` are
  multiples of 128 and the installed JAX is one splash supports (splash.unsupported_reason);
  otherwise the rule above. An explicit "splash" validates the same conditions with an error
  that says the fix; on GPU it is refused (a TPU kernel; elsewhere it runs in Pallas interpret
  mode, which is what CPU tests use).
  The GPU Pallas `mha` (jax.experimental.pallas.ops.gpu.attention) takes ONE segment_ids array
  for queries and keys alike, which fits only the diagonal ring block, so it is not used.
  """
  from ultralong_jax.parallel import splash  # pylint: disable=import-outside-toplevel
  if isinstance(kernel, BlockKernel):
    if has_segment_ids and not kernel.segment_ids:
      raise ValueError("this block kernel does not support segment_ids; use kernel='chunked', "
                       "'xla' or 'auto'.")
    return kernel
  platform = platform or jax.default_backend()
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: expected a positive number of tokens.")
  if kernel == "auto":
    if platform == "gpu":
      kernel = "cudnn_packed" if has_segment_ids else "cudnn"
    elif (platform == "tpu" and block_length is not None and not block_length % splash.LANES
          and not chunk_size % splash.LANES and splash.unsupported_reason() is None):
      kernel = "splash"
    elif block_length is not None and block_length > chunk_size:
      kernel = "chunked"
    else:
      kernel = "xla"
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected 'auto' or one of {sorted(KERNELS)}.")
  if has_segment_ids and not KERNELS[kernel].segment_ids:
    raise ValueError(f"kernel={kernel!r} does not support segment_ids; use kernel='chunked', "
                     "'xla' or 'auto'.")
  if kernel == "splash":
    if platform == "gpu":
      raise ValueError("kernel='splash' is a TPU kernel (Pallas Mosaic); on GPU use 'cudnn', "
                       "'chunked' or 'auto'.")
    if splash.unsupported_reason():
      raise ValueError(splash.unsupported_reason())
    if block_length is not None:
      splash.check_lengths(block_length, chunk_size)
  return kernel


def merge(out_a, lse_a, out_b, lse_b):
  """Combines two partial attention results over disjoint key sets (all float32).

  out [B, T, K, G, H] normalized within its key set, lse [B, K, G, T]:
  lse = log(e^lse_a + e^lse_b), out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b.
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  wa = jnp.exp(lse_a - lse).transpose(0, 3, 1, 2)[..., None]
  wb = jnp.exp(lse_b - lse).transpose(0, 3, 1, 2)[..., None]
  return wa * out_a + wb * out_b, lse
