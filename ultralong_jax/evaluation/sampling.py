"""Next-token choice from logits: greedy (a fast first-maximum argmax) or temperature + top-p
(nucleus) sampling, as transformers' TopPLogitsWarper does; used by evaluation/generate.py's
device and host decode loops."""

import jax
import jax.numpy as jnp


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Logits [B,V] with every token outside the smallest set of probability >= top_p at -inf.

  The most likely token is always kept (transformers' TopPLogitsWarper keeps min 1 token).
  """
  if top_p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < top_p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
      keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def argmax_first(logits: jax.Array) -> jax.Array:
  """jnp.argmax(logits, -1) (the first maximal index) as two plain reductions, which XLA on CPU
  runs ~2.5x faster than argmax's (value, index) reduction (0.5 vs 1.2 ms per decode step at
  8 x 32,000)."""
  V = logits.shape[-1]
  top = logits.max(axis=-1, keepdims=True)
  return jnp.min(jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Next tokens [B] from logits [B,V]: argmax at temperature 0, else softmax(logits / T) sampling
  restricted to the top-p nucleus."""
  if temperature == 0.0:
    return argmax_first(logits)
  filtered = top_p_filter(logits.astype(jnp.float32) / temperature, top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


# One compiled call per token in the host loop (eagerly, each of top-p's ops compiles on its own).
sample_jit = jax.jit(sample, static_argnums=(2, 3))
