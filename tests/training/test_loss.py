"""Chunked cross-entropy equals the plain one (values and gradients) and bounds logits memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultralong_jax.training import loss as loss_lib


def _inputs(B=2, T=64, D=16, V=96, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  hidden = jax.random.normal(k[0], (B, T, D))
  lm_head = jax.random.normal(k[1], (D, V)) * 0.3
  targets = jax.random.randint(k[2], (B, T), 0, V)
  mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  return hidden, lm_head, targets, mask


@pytest.mark.parametrize("chunk_size", [8, 16, 64, 1000])
def test_chunked_equals_plain_values_and_gradients(chunk_size):
  hidden, lm_head, targets, mask = _inputs()

  def chunked(h, w):
    s = loss_lib.chunked_cross_entropy(h, w, targets, mask, chunk_size=chunk_size)
    return s.loss / s.weight + 1e-3 * s.z_loss / s.weight, s

  def plain(h, w):
    s = loss_lib.plain_cross_entropy(jnp.einsum("BTD,DV->BTV", h, w), targets, mask)
    return s.loss / s.weight + 1e-3 * s.z_loss / s.weight, s

  (v1, s1), g1 = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, lm_head)
  (v2, s2), g2 = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(hidden, lm_head)
  # float32 sums in a different order: agreement to ~1e-6 relative.
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
  for a, b in zip(s1, s2):
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert float(s1.weight) == float(mask.sum())


def test_hand_computed_case():
  # One token, vocab 2, logits (0, log 3): p(target=1) = 3/4.
  hidden = jnp.ones((1, 1, 1))
  lm_head = jnp.array([[0.0, np.log(3.0)]])
  s = loss_lib.chunked_cross_entropy(hidden, lm_head, jnp.array([[1]]), jnp.ones((1, 1)))
  np.testing.assert_allclose(float(s.loss), -np.log(0.75), rtol=1e-6)
  np.testing.assert_allclose(float(s.z_loss), np.log(4.0) ** 2, rtol=1e-6)
  assert float(s.correct) == 1.0


def test_logits_are_never_materialized_whole():
  B, T, D, V, C = 1, 4096, 8, 512, 256
  args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
          jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.float32))

  def grad_fn(chunk):
    f = lambda h, w, t, m: loss_lib.chunked_cross_entropy(h, w, t, m, chunk_size=chunk).loss
    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile()

  full_logits = B * T * V * 4
  temp = grad_fn(C).memory_analysis().temp_size_in_bytes
  assert temp < full_logits / 4, (temp, full_logits)
  # and it is the chunking that does it: one chunk of the whole length needs far more.
  assert grad_fn(T).memory_analysis().temp_size_in_bytes > full_logits


def test_chunk_size_must_divide_length():
  hidden, lm_head, targets, mask = _inputs(T=60)
  with pytest.raises(ValueError, match="chunk_size"):
    loss_lib.chunked_cross_entropy(hidden, lm_head, targets, mask, chunk_size=16)
