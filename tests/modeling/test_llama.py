"""Flax Llama against transformers' LlamaForCausalLM (float32, eager attention, CPU).

Tolerance: max|Δ| / max|logits| ≤ 1e-4 (the issue's bound). Both sides are float32 with the same
operation order, so the observed error is ~1e-6; 1e-4 leaves room for BLAS reduction order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ultralong_jax
from ultralong_jax.modeling import llama, presets, rope

TOL = 1e-4


def _rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


ROPE_CASES = {
    "default": dict(),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama31": dict(rope_theta=500000.0, max_position_embeddings=131072,
                    rope_scaling=dict(presets.LLAMA31_ROPE)),
    "yarn_4": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 2048},
                   max_position_embeddings=8192),
    "yarn_16_mscale": dict(rope_scaling={"rope_type": "yarn", "factor": 16.0, "mscale": 1.0,
                                         "mscale_all_dim": 0.8, "beta_fast": 24,
                                         "original_max_position_embeddings": 1024},
                           max_position_embeddings=16384),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_logits_match_transformers_for_each_rope_type(case, make_hf_llama, hf_logits):
  hf_model, path = make_hf_llama(**ROPE_CASES[case])
  model = ultralong_jax.from_pretrained(path)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, 256, (2, 24))
  positions = np.stack([np.arange(24), 3 * np.arange(24) + 5000])  # explicit, and past 4K
  err = _rel_err(model(jnp.asarray(ids), positions=jnp.asarray(positions)),
                 hf_logits(hf_model, ids, positions))
  assert err <= TOL, f"{case}: relative error {err:.2e}"


def test_ultralong_1m_far_past_8k(make_hf_llama, hf_logits):
  """The paper's 1M setting (llama3, factor 128) at positions up to ~1M, with a full head_dim."""
  scaling = rope.ultralong_rope_scaling(128)
  hf_model, path = make_hf_llama(rope_theta=500000.0, rope_scaling=scaling, head_dim=64,
                                 max_position_embeddings=1 << 20, hidden_size=128)
  model = ultralong_jax.from_pretrained(path)
  ids = np.random.RandomState(1).randint(0, 256, (2, 32))
  positions = np.stack([np.arange(32) + 1_000_000, np.arange(32) * 30_000 + 17])
  err = _rel_err(model(jnp.asarray(ids), positions=jnp.asarray(positions)),
                 hf_logits(hf_model, ids, positions))
  assert err <= TOL


def test_dynamic_ntk_beyond_max_positions(make_hf_llama, hf_logits):
  # transformers grows the base once max(position_ids) + 1 > max_position_embeddings.
  hf_model, path = make_hf_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                 max_position_embeddings=64)
  model = ultralong_jax.from_pretrained(path)
  ids = np.random.RandomState(2).randint(0, 256, (1, 100))
  err = _rel_err(model(jnp.asarray(ids)), hf_logits(hf_model, ids))
  assert err <= TOL


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("tied", [False, True])
def test_gqa_and_tied_embeddings(num_kv_heads, tied, make_hf_llama, hf_logits):
  hf_model, path = make_hf_llama(num_key_value_heads=num_kv_heads, tie_word_embeddings=tied,
                                 head_dim=24)  # head_dim != hidden / heads (64 / 4)
  model = ultralong_jax.from_pretrained(path)
  assert model.config.tie_word_embeddings == tied
  assert hasattr(model, "lm_head") == (not tied)
  ids = np.random.RandomState(3).randint(0, 256, (2, 16))
  assert _rel_err(model(jnp.asarray(ids)), hf_logits(hf_model, ids)) <= TOL


def test_attention_and_mlp_bias(make_hf_llama, hf_logits):
  hf_model, path = make_hf_llama(attention_bias=True, mlp_bias=True)
  model = ultralong_jax.from_pretrained(path)
  ids = np.random.RandomState(4).randint(0, 256, (1, 16))
  assert _rel_err(model(jnp.asarray(ids)), hf_logits(hf_model, ids)) <= TOL


def test_segment_ids_equal_separate_documents(make_hf_llama, hf_logits):
  """A packed row with document masking == each document run alone by transformers."""
  hf_model, path = make_hf_llama()
  model = ultralong_jax.from_pretrained(path)
  lengths = [7, 12, 5]
  ids = np.random.RandomState(5).randint(0, 256, (1, sum(lengths)))
  segment_ids = np.repeat(np.arange(1, 4), lengths)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  ours = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions),
                          segment_ids=jnp.asarray(segment_ids)))
  start = 0
  for n in lengths:
    ref = hf_logits(hf_model, ids[:, start:start + n])
    assert _rel_err(ours[:, start:start + n], ref) <= TOL
    start += n


def test_hidden_states_plus_head_is_forward_and_jit_matches_eager():
  model = llama.init_model(presets.tiny(tie_word_embeddings=True))
  ids = jnp.asarray(np.random.RandomState(6).randint(0, 512, (2, 16)))
  logits = model(ids)
  hidden = model.hidden_states(ids)
  assert hidden.shape == (2, 16, 64)
  np.testing.assert_array_equal(np.asarray(model.logits(hidden)), np.asarray(logits))
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_fp32_params():
  config = presets.tiny()
  model32 = llama.init_model(config)
  model16 = llama.init_model(config.replace(dtype="bfloat16"))
  ids = jnp.asarray(np.random.RandomState(7).randint(0, 512, (2, 16)))
  assert model16.embed[...].dtype == jnp.float32  # master weights stay fp32
  assert model16.hidden_states(ids).dtype == jnp.bfloat16
  logits16, logits32 = model16(ids), model32(ids)
  assert logits16.dtype == jnp.float32
  # bf16 has an 8-bit mantissa: agreement to a few percent of the logit range, not 1e-4.
  assert 0 < _rel_err(logits16, np.asarray(logits32)) < 5e-2


def _loss_and_grads(config, ids):
  model = llama.init_model(config)
  graphdef, state = nnx.split(model)

  def loss(s):
    logits = nnx.merge(graphdef, s)(ids[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

  return jax.jit(jax.value_and_grad(loss))(state)


def test_remat_policies_give_identical_gradients():
  ids = jnp.asarray(np.random.RandomState(8).randint(0, 512, (2, 17)))
  base_loss, base_grads = _loss_and_grads(presets.tiny(), ids)
  for policy in ("full", "dots", "dots_no_batch", "qkv_attention"):
    loss, grads = _loss_and_grads(presets.tiny(remat_policy=policy), ids)
    np.testing.assert_allclose(float(loss), float(base_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
  def hlo_ops(num_layers):
    model = llama.abstract_model(presets.tiny(num_layers=num_layers))
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, ids).as_text()
    return sum(1 for line in text.splitlines() if "stablehlo.dot_general" in line)

  assert hlo_ops(2) == hlo_ops(12) > 0


def test_parameters_carry_logical_axis_names():
  model = llama.abstract_model(presets.tiny(attention_bias=True, mlp_bias=True))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  leaves = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers"}
  assert len(leaves) == 3 + 9 + 7  # embed, final_norm, lm_head; 9 layer weights; 7 biases
  for path, spec in leaves:
    assert spec and set(spec) <= allowed, (path, spec)
  assert tuple(specs["layers"]["wq"]) == ("layers", "embed", "heads", "head_dim")
