"""Single-device attention (the reference every sharded kernel is checked against) and the one
mask rule every attention here uses.

Shapes: B batch, T query length, S key/value length, N query heads, K kv heads, G = N / K,
H head dim.

The decoder layer calls its attention as
  attention(q [B,T,N,H], k [B,S,K,H], v [B,S,K,H]) -> [B,T,N,H]
a closure over the call's positions and segment ids (modeling/layers.py); `dot_product_attention`
here, ring attention (parallel/ring_attention.py) and the KV cache (modeling/decode.py) all mask
with `mask`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite "minus infinity": a fully masked row (a ring block or cache shard whose keys a query cannot
# see) gets a finite log-sum-exp that a merge weighs by exp(NEG_INF - lse) = 0, not exp(-inf + inf)
# = nan.
NEG_INF = -1e30


def mask(q_pos: jax.Array | None, kv_pos: jax.Array | None, q_seg: jax.Array | None,
         kv_seg: jax.Array | None, causal: bool) -> jax.Array | None:
  """Boolean [B|1, 1, 1, T, S] (broadcasts over scores [B, K, G, T, S]): True where a query may
  attend to a key; None when nothing is masked.

  q_pos [B|1, T], kv_pos [B|1, S]: the tokens' order (global positions, or cache slots); causal
  keeps keys with kv_pos <= q_pos. q_seg [B, T], kv_seg [B, S]: tokens attend only within equal
  ids. Positions restart per document only under document masking, where the segment ids separate
  the documents, so within a segment positions are the token order.
  """
  visible = None
  if causal:
    visible = kv_pos[:, None, :] <= q_pos[:, :, None]
  if q_seg is not None:
    same = q_seg[:, :, None] == kv_seg[:, None, :]
    visible = same if visible is None else visible & same
  return None if visible is None else visible[:, None, None]


def natural_positions(length: int) -> jax.Array:
  """[1, length] int32: token order 0..length-1 (a batch in natural order)."""
  return jnp.arange(length, dtype=jnp.int32)[None]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None, causal: bool = True, scale: float | None = None,
) -> jax.Array:
  """Plain softmax self-attention with GQA (K/V never repeated), masks, float32 softmax.

  positions [B, T] (default 0..T-1) and segment_ids [B, T] give the mask (`mask`). Matches
  transformers' `eager_attention_forward` for Llama: scores in the compute dtype's matmul with
  float32 accumulation, softmax in float32, probabilities cast back before P @ V.
  """
  B, T, N, H = q.shape
  K = k.shape[2]
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}.")
  scale = H ** -0.5 if scale is None else scale
  positions = natural_positions(T) if positions is None else positions
  q = q.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  visible = mask(positions, positions, segment_ids, segment_ids, causal)
  if visible is not None:
    scores = jnp.where(visible, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(B, T, N, H).astype(q.dtype)
