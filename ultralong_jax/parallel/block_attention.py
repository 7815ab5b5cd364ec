"""Per-block attention kernels for ring attention, and the log-sum-exp merge of partial results.

A block kernel attends one query block to one key/value block and returns the block-normalized
output with its log-sum-exp; blocks are merged by log-sum-exp (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax"; the flash-attention recurrence). Its backward takes the GLOBAL
output and log-sum-exp of the whole row (flash-attention 2, Dao 2023, Algorithm 2), so a block's
gradient is exact without ever holding the whole row.

Internal layout (GQA without repeating K/V: query heads grouped under their kv head):
  q, dq, out, dout  [B, T, K, G, H]      k, v, dk, dv  [B, S, K, H]
  lse, delta        [B, K, G, T] float32 q_seg [B, T], kv_seg [B, S] int or None
`causal=True` means the block is on the diagonal: T == S and query t sees keys s <= t.

Kernels:
  "xla"      einsum scores per block, explicit backward. Works everywhere; the CPU reference.
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn", return_residual=True)` (H100 flash
             attention). Its public vjp ignores the cotangent of the log-sum-exp the ring merge
             needs, so `_public_backward` adds that term with a second call (backward costs about
             two flash backwards). No segment ids (the public API takes none).
  "dpa_xla"  the same adapter over `implementation="xla"` with the residual's gradient stopped: the
             cuDNN path's math, testable on CPU.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite "minus infinity": a fully masked row then gives a finite lse that the merge weighs by
# exp(-1e30 - lse) = 0, instead of exp(-inf + inf) = nan.
NEG_INF = -1e30


class BlockKernel(NamedTuple):
  forward: callable   # (q, k, v, q_seg, kv_seg, *, causal, scale) -> (out f32, lse)
  backward: callable  # (q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal, scale) -> dq, dk, dv
  segment_ids: bool   # whether the kernel supports segment ids


def _mask(t: int, s: int, q_seg, kv_seg, causal: bool):
  """Boolean [B|1, 1, 1, T, S] mask (True = attend) or None when nothing is masked."""
  mask = None
  if causal:
    mask = (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None, None, None]
  if q_seg is not None:
    same = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
    mask = same if mask is None else mask & same
  return mask


def _scores(q, k, q_seg, kv_seg, causal, scale):
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  mask = _mask(q.shape[1], k.shape[1], q_seg, kv_seg, causal)
  return s if mask is None else jnp.where(mask, s, NEG_INF)


def xla_forward(q, k, v, q_seg, kv_seg, *, causal: bool, scale: float):
  """Block attention with materialized [B, K, G, T, S] scores; returns out f32, lse [B,K,G,T]."""
  s = _scores(q, k, q_seg, kv_seg, causal, scale)
  m = s.max(axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = p.sum(axis=-1, keepdims=True)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", (p / l).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out, (m + jnp.log(l))[..., 0]


def xla_backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal: bool, scale: float):
  """Flash-attention-2 block backward with the row's global lse and delta = rowsum(dout * out)."""
  del out  # only needed through delta
  p = jnp.exp(_scores(q, k, q_seg, kv_seg, causal, scale) - lse[..., None])
  dv = jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(dout.dtype), dout,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("BTKGH,BSKH->BKGTS", dout, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None]) * scale
  dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq, dk, dv


def _public_attention(q, k, v, *, causal, scale, implementation):
  """jax.nn.dot_product_attention on the internal layout: (out [B,T,K,G,H], lse [B,K,G,T])."""
  b, t, kh, g, h = q.shape
  out, lse = jax.nn.dot_product_attention(
      q.reshape(b, t, kh * g, h), k, v, scale=scale, is_causal=causal,
      implementation=implementation, return_residual=True)
  lse = lse.astype(jnp.float32).reshape(b, t, kh, g).transpose(0, 2, 3, 1)
  if implementation != "cudnn":
    # Emulates cuDNN, whose vjp drops the residual's cotangent, so CPU tests cover this path.
    lse = jax.lax.stop_gradient(lse)
  return out.reshape(b, t, kh, g, h), lse


def _public_forward(q, k, v, q_seg, kv_seg, *, causal, scale, implementation):
  if q_seg is not None:
    raise ValueError(f"kernel {implementation!r} takes no segment ids; use kernel='xla'.")
  out, lse = _public_attention(q, k, v, causal=causal, scale=scale, implementation=implementation)
  return out.astype(jnp.float32), lse


def _public_backward(q, k, v, q_seg, kv_seg, out, lse, dout, delta, *, causal, scale,
                     implementation):
  """Block backward from a kernel whose vjp covers its output only (not its log-sum-exp).

  With block-local softmax p_j, weight w = exp(lse_j - lse), the exact score gradient is
  w p_j (dout v^T - delta); the kernel's vjp at cotangent w * dout gives w p_j (dout v^T -
  rowsum(dout * out_j)), so the missing term is p_j * c with c = w (rowsum(dout * out_j) - delta):
  dq += scale c (p_j k) = scale c attn(q, k, k), dk += scale p_j^T (c q) = the v-gradient of
  attn(q, k, .) at cotangent scale c q.
  """
  del q_seg, kv_seg, out
  attend = functools.partial(_public_attention, causal=causal, scale=scale,
                             implementation=implementation)
  (out_j, lse_j), vjp = jax.vjp(attend, q, k, v)
  w = jnp.exp(lse_j - lse)                                   # [B, K, G, T]
  w_t = w.transpose(0, 3, 1, 2)[..., None]                   # [B, T, K, G, 1]
  dq, dk, dv = vjp(((w_t * dout).astype(out_j.dtype), jnp.zeros_like(lse_j)))
  c = w * (jnp.einsum("BTKGH,BTKGH->BKGT", dout.astype(jnp.float32),
                      out_j.astype(jnp.float32)) - delta)
  c_t = (c * scale).transpose(0, 3, 1, 2)[..., None]
  (pk, _), vjp_v = jax.vjp(lambda v_: attend(q, k, v_), k)
  (dk_extra,) = vjp_v(((c_t * q).astype(pk.dtype), jnp.zeros_like(lse_j)))
  return (dq.astype(jnp.float32) + c_t * pk.astype(jnp.float32),
          dk.astype(jnp.float32) + dk_extra.astype(jnp.float32), dv.astype(jnp.float32))


def _public_kernel(implementation: str) -> BlockKernel:
  return BlockKernel(
      functools.partial(_public_forward, implementation=implementation),
      functools.partial(_public_backward, implementation=implementation), segment_ids=False)


KERNELS = {
    "xla": BlockKernel(xla_forward, xla_backward, segment_ids=True),
    "cudnn": _public_kernel("cudnn"),
    "dpa_xla": _public_kernel("xla"),
}


def select_kernel(kernel: str, *, has_segment_ids: bool, platform: str | None = None) -> str:
  """Resolves kernel="auto" by backend; validates an explicit choice.

  auto: cuDNN flash attention on GPU when there are no segment ids, else the XLA kernel. The
  GPU Pallas `mha` (jax.experimental.pallas.ops.gpu.attention) takes ONE segment_ids array for
  queries and keys alike, which fits only the diagonal ring block, so it is not used; TPU splash
  attention is not wired yet (XLA kernel there).
  """
  platform = platform or jax.default_backend()
  if kernel == "auto":
    kernel = "cudnn" if platform == "gpu" and not has_segment_ids else "xla"
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}: expected 'auto' or one of {sorted(KERNELS)}.")
  if has_segment_ids and not KERNELS[kernel].segment_ids:
    raise ValueError(f"kernel={kernel!r} does not support segment_ids; use kernel='xla' or 'auto'.")
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
