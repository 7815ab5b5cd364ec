"""Presets have the published shapes; configs validate and round-trip through both JSON forms."""

import pytest

from ultralong_jax.modeling import presets
from ultralong_jax.modeling.config import LlamaConfig


def test_parameter_counts_match_the_published_models():
  # Llama-3.1-8B: 8,030,261,248 parameters; Llama-3.2-1B (tied): 1,235,814,400 (HF model cards).
  assert presets.llama31_8b().num_params == 8_030_261_248
  assert presets.llama32_1b().num_params == 1_235_814_400


@pytest.mark.parametrize("name, count", [
    # safetensors totals of the published checkpoints (HF model pages / index.json total_size / 2).
    ("qwen25_7b", 7_615_616_512), ("qwen3_8b", 8_190_735_360), ("mistral_7b", 7_248_023_552),
    ("llama2_7b", 6_738_415_616)])
def test_other_families_parameter_counts(name, count):
  config = presets.get_preset(name)
  assert config.num_params == count
  assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
  extended = presets.get_preset(f"{name}_1m")
  assert extended.max_position_embeddings == 1 << 20
  assert extended.rope_scaling["rope_type"] == "yarn" and extended.rope_scaling["beta_fast"] == 4.0


@pytest.mark.parametrize("length, factor", [("1m", 128), ("2m", 256), ("4m", 512)])
def test_ultralong_presets_carry_the_papers_rope(length, factor):
  config = presets.get_preset(f"llama31_8b_{length}")
  assert config.rope_scaling == {"rope_type": "llama3", "factor": float(factor),
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}
  assert config.rope_theta == 500000.0 and config.max_position_embeddings == factor * 8192


def test_config_round_trips_through_hf_and_project_json():
  config = presets.get_preset("llama32_1b_1m", dtype="bfloat16", remat_policy="dots")
  assert LlamaConfig.from_json(config.to_json()) == config
  back = LlamaConfig.from_hf_dict(config.to_hf_dict(), param_dtype="float32", dtype="bfloat16",
                                  remat_policy="dots")
  assert back == config
  assert hash(back) == hash(config)  # static jit metadata needs a value hash


@pytest.mark.parametrize("change, key", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(head_dim=33), "head_dim"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(dtype="fp8"), "dtype"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_configs_name_the_key(change, key):
  with pytest.raises(ValueError, match=key):
    presets.tiny(**change)


def test_unknown_preset():
  with pytest.raises(ValueError, match="llama31_8b"):
    presets.get_preset("llama4")
