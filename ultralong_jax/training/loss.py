"""Cross-entropy computed in sequence chunks, so the [T, V] logits never exist at once.

At 1M tokens × 128K vocab, float32 logits are 512 GB; here at most [B, C, V] are live, where C is
`chunk_size`, in the forward and (through rematerialization) in the backward pass.

Shapes: B batch, T length, D width, V vocab, C tokens per chunk, n = T / C chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossSums(NamedTuple):
  """Sums over the tokens of a batch, so microbatches and hosts combine exactly."""
  loss: jax.Array     # Σ mask · (-log p(target))
  z_loss: jax.Array   # Σ mask · logsumexp(logits)²
  weight: jax.Array   # Σ mask (tokens that count)
  correct: jax.Array  # Σ mask · [argmax == target]


def _chunk_sums(hidden, lm_head, targets, mask):
  """hidden [B,C,D], lm_head [D,V], targets/mask [B,C] -> LossSums of this chunk."""
  logits = jnp.einsum("BCD,DV->BCV", hidden, lm_head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # The target logit through a one-hot contraction rather than a gather: with the vocabulary
  # sharded over `tensor` this stays a local multiply plus one reduction.
  target_logit = jnp.einsum("BCV,BCV->BC", logits,
                            jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return LossSums(loss=jnp.sum((lse - target_logit) * mask), z_loss=jnp.sum(lse * lse * mask),
                  weight=jnp.sum(mask), correct=jnp.sum(correct * mask))


def chunked_cross_entropy(
    hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, loss_mask: jax.Array,
    chunk_size: int = 4096,
) -> LossSums:
  """Token-level cross-entropy sums of hidden [B,T,D] @ lm_head [D,V] against targets [B,T].

  Chunks are strided, not contiguous: token t goes to chunk t mod n. With T sharded over the mesh's
  `sequence` axis, every chunk then holds an equal share of each device's tokens, so no chunk step
  gathers activations from another device. Each step is rematerialized: the backward pass
  recomputes one chunk's logits instead of keeping all of them.
  """
  B, T, D = hidden.shape
  C = min(chunk_size, T)
  if T % C:
    raise ValueError(f"loss chunk_size={chunk_size} must divide the sequence length {T} "
                     f"(or exceed it); e.g. use a power of two.")
  n = T // C
  mask = loss_mask.astype(jnp.float32)
  # [B, T, ...] -> [n, B, C, ...] with token t = c * n + i in chunk i.
  to_chunks = lambda x: jnp.moveaxis(x.reshape(B, C, n, *x.shape[2:]), 2, 0)

  @jax.checkpoint
  def body(acc, chunk):
    h, t, m = chunk
    return jax.tree.map(jnp.add, acc, _chunk_sums(h, lm_head, t, m)), None

  zero = LossSums(*(jnp.zeros((), jnp.float32) for _ in range(4)))
  sums, _ = jax.lax.scan(body, zero, (to_chunks(hidden), to_chunks(targets), to_chunks(mask)))
  return sums


def plain_cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> LossSums:
  """The unchunked reference: logits [B,T,V] already materialized."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  target_logit = jnp.take_along_axis(logits.astype(jnp.float32), targets[..., None], -1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return LossSums(loss=jnp.sum((lse - target_logit) * mask), z_loss=jnp.sum(lse * lse * mask),
                  weight=jnp.sum(mask), correct=jnp.sum(correct * mask))
