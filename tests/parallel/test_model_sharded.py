"""The whole model, sharded over data/fsdp x sequence x tensor with ring attention, against the
same parameters on one device: loss and every parameter gradient.

The sharded run sees the batch permuted into the zigzag layout once (tokens, targets, positions,
segment ids, loss mask together), exactly as the training step feeds it; the token-summed loss is
invariant to that permutation. Tolerance: relative 1e-5 in float32 (observed ~1e-6: sums reordered
across devices).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ultralong_jax.modeling import llama, presets
from ultralong_jax.parallel import layout, mesh as mesh_lib, sharding
from ultralong_jax.parallel.ring_attention import make_attention_fn

B, T = 2, 64
RTOL = 1e-5


def _batch(vocab, with_segments):
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  tokens = jax.random.randint(k1, (B, T + 1), 0, vocab)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": jax.random.bernoulli(k2, 0.9, (B, T)).astype(jnp.float32)}
  if with_segments:
    segment_ids = jnp.cumsum(jax.random.bernoulli(k3, 0.1, (B, T)), axis=1).astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    # Positions restart per document, as packing produces them.
    index = jnp.broadcast_to(jnp.arange(T), (B, T))
    batch["positions"] = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    batch["segment_ids"] = segment_ids
  else:
    batch["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return batch


def _loss(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  logits = model(batch["inputs"], batch["positions"], batch.get("segment_ids"))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(losses * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("sizes,strategy,with_segments", [
    ({"fsdp": 2, "sequence": 2, "tensor": 2}, "ring", True),
    ({"sequence": 4, "tensor": 2}, "allgather", False),
], ids=["fsdp2_seq2_tp2_ring_seg", "seq4_tp2_allgather"])
def test_sharded_loss_and_grads_match_single_device(sizes, strategy, with_segments):
  config = presets.tiny()
  batch = _batch(config.vocab_size, with_segments)

  graphdef, state = nnx.split(llama.init_model(config))
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(functools.partial(_loss, graphdef),
                                                   argnums=0))(state, batch)

  mesh = mesh_lib.make_mesh(sizes)
  model = llama.init_model(config, attention_fn=make_attention_fn(mesh, strategy=strategy))
  graphdef, state = nnx.split(model)
  state_sharding = sharding.state_shardings(mesh, state)
  sharded_batch = layout.zigzag_permute(batch, mesh.shape["sequence"])
  batch_sharding = sharding.batch_shardings(mesh, sharded_batch)
  step = jax.jit(jax.value_and_grad(functools.partial(_loss, graphdef), argnums=0),
                 in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(None, state_sharding))
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_sharding)
    sharded_batch = jax.device_put(sharded_batch, batch_sharding)
    loss, grads = step(state, sharded_batch)

  assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss))
  errors = jax.tree.map(_rel_err, grads, ref_grads)
  worst = max(jax.tree.leaves(errors))
  assert worst <= RTOL, errors
  # The parameters really are split (e.g. the MLP over fsdp x tensor).
  w_gate = grads["layers"]["w_gate"].get_value()
  assert w_gate.sharding.shard_shape(w_gate.shape)[1:] == (
      config.hidden_size // sizes.get("fsdp", 1), config.intermediate_size // 2)


def test_attention_fn_is_plain_for_short_rows_without_sequence_parallelism():
  """sequence = 1 and T <= attention.chunk_size: the plain attention itself (bit-equal output);
  longer rows take a one-block ring (tests/parallel/test_chunked_kernel.py)."""
  from ultralong_jax.modeling.attention import dot_product_attention
  attend = make_attention_fn(mesh_lib.make_mesh({"tensor": 2, "fsdp": -1}))
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (4, 64, 4, 8))
  k, v = (jax.random.normal(key, (4, 64, 2, 8)) for key in ks[1:])
  np.testing.assert_array_equal(np.asarray(attend(q, k, v, causal=True)),
                                np.asarray(dot_product_attention(q, k, v, causal=True)))
