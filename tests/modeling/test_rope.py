"""RoPE frequencies and attention scaling against transformers' modeling_rope_utils."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ultralong_jax.modeling import rope

HEAD_DIM = 128

CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama31": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "ultralong_1m": rope.ultralong_rope_scaling(128),
    "ultralong_2m": rope.ultralong_rope_scaling(256),
    "ultralong_4m": rope.ultralong_rope_scaling(512),
    "yarn_4": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn_16_betas": {"rope_type": "yarn", "factor": 16.0, "beta_fast": 16, "beta_slow": 2,
                      "original_max_position_embeddings": 4096},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 4096},
    "yarn_attention_factor_no_truncate": {
        "rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3, "truncate": False,
        "original_max_position_embeddings": 2048},
}


def _hf(rope_scaling, theta=500000.0, max_pos=131072, seq_len=None):
  config = transformers.LlamaConfig(
      hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM, rope_theta=theta,
      rope_scaling=dict(rope_scaling), max_position_embeddings=max_pos)
  fn = ROPE_INIT_FUNCTIONS[rope_scaling["rope_type"]]
  inv_freq, scaling = fn(config, "cpu", seq_len=seq_len)
  return inv_freq.numpy(), float(scaling)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inverse_frequencies_bit_match_transformers(name):
  scaling = CASES[name]
  ref, ref_attention = _hf(scaling)
  ours, attention = rope.rope_parameters(HEAD_DIM, 500000.0, scaling, 131072)
  # Bit-exact, not just close: at position 1M one float32 ulp of an inverse frequency near 1 is
  # ~0.06 rad of rotation (see rope.py).
  np.testing.assert_array_equal(np.asarray(ours), ref)
  assert attention == pytest.approx(ref_attention, rel=1e-6)


def test_default_frequencies_bit_exact():
  config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=HEAD_DIM,
                                    rope_theta=500000.0)
  ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).inv_freq.numpy()
  ours, attention = rope.rope_parameters(HEAD_DIM, 500000.0, None, 131072)
  np.testing.assert_array_equal(np.asarray(ours), ref)
  assert attention == 1.0


@pytest.mark.parametrize("seq_len", [100, 2048, 3000, 10000])
def test_dynamic_follows_sequence_length(seq_len):
  scaling = {"rope_type": "dynamic", "factor": 2.0}
  ref, _ = _hf(scaling, theta=10000.0, max_pos=2048, seq_len=torch.tensor(seq_len))
  ours, _ = rope.rope_parameters(HEAD_DIM, 10000.0, scaling, 2048, seq_len=jnp.int32(seq_len))
  # The grown base depends on a traced length, so it is computed inside the jit with XLA's
  # arithmetic: a few ulp from torch (the static types above are bit-exact).
  np.testing.assert_array_max_ulp(np.asarray(ours), ref, maxulp=4)


def test_ultralong_llama3_shape_of_scaling():
  # Sec. 3.1 of the paper: wavelengths < 8K/4 untouched, > 8K divided by s, ramp in between.
  base, _ = rope.rope_parameters(HEAD_DIM, 500000.0, None, 131072)
  scaled, _ = rope.rope_parameters(HEAD_DIM, 500000.0, rope.ultralong_rope_scaling(128), 1 << 20)
  base, scaled = np.asarray(base), np.asarray(scaled)
  wavelen = 2 * np.pi / base
  high = wavelen < 2048
  low = wavelen > 8192
  np.testing.assert_array_equal(scaled[high], base[high])
  np.testing.assert_allclose(scaled[low], base[low] / 128, rtol=1e-6)
  mid = ~high & ~low
  assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 128)


def test_cos_sin_and_apply_rope_match_transformers():
  from transformers.models.llama import modeling_llama as ml
  config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                                    rope_theta=500000.0, rope_scaling=CASES["yarn_4"],
                                    max_position_embeddings=32768)
  emb = ml.LlamaRotaryEmbedding(config)
  positions = np.array([[0, 1, 7, 8191, 30000, 1_000_000]])
  x = np.random.RandomState(0).randn(1, 6, 2, 32).astype(np.float32)
  cos_ref, sin_ref = emb(torch.zeros(1), torch.as_tensor(positions))
  q_ref, _ = ml.apply_rotary_pos_emb(torch.as_tensor(x).transpose(1, 2),
                                     torch.as_tensor(x).transpose(1, 2), cos_ref, sin_ref)
  inv_freq, scaling = rope.rope_parameters(32, 500000.0, CASES["yarn_4"], 32768)
  cos, sin = rope.rope_cos_sin(jnp.asarray(positions), inv_freq, scaling)
  np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=2e-6)
  np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=2e-6)
  q = rope.apply_rope(jnp.asarray(x), cos, sin)
  np.testing.assert_allclose(np.asarray(q), q_ref.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("scaling, field", [
    ({"rope_type": "longrope", "factor": 2.0}, "rope_type"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, "high_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, "high_freq_factor"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 8}, "beta_fast"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factr": 1.0}, "low_freq_factr"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_bad_rope_scaling_names_the_field(scaling, field):
  with pytest.raises(ValueError, match=field):
    rope.rope_parameters(HEAD_DIM, 500000.0, scaling, 131072)


def test_legacy_type_key_and_theta_inside():
  canonical = rope.normalize_rope_scaling({"type": "linear", "factor": 2.0, "rope_theta": 1e4})
  assert canonical == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("name", ["ultralong_1m", "yarn_16_betas", "yarn_mscale", "linear"])
def test_frequencies_inside_jit_equal_eager(name):
  # The model computes the tables while tracing its jitted forward; XLA fusion must not change them.
  import jax
  eager, _ = rope.rope_parameters(HEAD_DIM, 500000.0, CASES[name], 131072)
  jitted, _ = jax.jit(lambda: rope.rope_parameters(HEAD_DIM, 500000.0, CASES[name], 131072))()
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
