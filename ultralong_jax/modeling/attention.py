"""Single-device attention: the reference every sharded kernel is checked against.

Shapes: B batch, T query length, S key/value length, N query heads, K kv heads, G = N / K,
H head dim.

Each Llama layer calls its `attention_fn` as
  attention_fn(q [B,T,N,H], k [B,S,K,H], v [B,S,K,H], *, positions [B,T] | None,
               segment_ids [B,T] | None, causal: bool, scale: float) -> [B,T,N,H]
`ultralong_jax.parallel` provides sequence-sharded implementations with the same signature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row (never produced by causal + segment masks, whose diagonal is
# always visible) would give a uniform distribution rather than NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    T: int, S: int, segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
    causal: bool = True, q_offset: int = 0,
) -> jax.Array | None:
  """Boolean mask [B or 1, T, S]: True where a query may attend to a key.

  Causality is by array index (natural token order; `q_offset` shifts the queries, e.g. for a
  chunk of a longer sequence); tokens attend only within their segment. Positions play no part:
  they restart per document under document masking, while order does not.
  """
  mask = None
  if causal:
    q_idx = jnp.arange(T)[:, None] + q_offset
    mask = (q_idx >= jnp.arange(S)[None, :])[None]
  if segment_ids is not None:
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = same if mask is None else mask & same
  return mask


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None, causal: bool = True, scale: float | None = None,
) -> jax.Array:
  """Plain softmax attention with GQA (K/V never repeated), masks, float32 softmax.

  Matches transformers' `eager_attention_forward` for Llama: scores in the compute dtype's
  matmul with float32 accumulation, softmax in float32, probabilities cast back before P @ V.
  `positions` is accepted for the attention_fn signature and unused (see `attention_mask`).
  """
  del positions
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}.")
  scale = H ** -0.5 if scale is None else scale
  q = q.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(T, S, segment_ids, causal=causal)
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(B, T, N, H).astype(q.dtype)
