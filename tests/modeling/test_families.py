"""Llama, Mistral, Qwen2 and Qwen3 against transformers' own classes (float32, eager, CPU).

Tolerance: max|Δ| / max|logits| ≤ 1e-4 (the issue's bound); both sides are float32 with the same
operation order, so the observed error is ~1e-6. RoPE cases include each family's long-context
extension (`long_context_rope_scaling` to 1M: llama3 by parts for Llama 3.x, yarn α=1 β=4 for the
others) evaluated at positions near 1M, far past each base model's native context.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import ultralong_jax
from ultralong_jax.convert import api, hf
from ultralong_jax.modeling import rope
from ultralong_jax.modeling.config import FAMILIES, LlamaConfig

TOL = 1e-4
TARGET = 1 << 20


def _rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _extended(family_kwargs):
  """HF config kwargs extending a family's tiny model to 1M tokens the project's way."""
  scaling = rope.long_context_rope_scaling(family_kwargs.get("rope_scaling"),
                                           family_kwargs["max_position_embeddings"], TARGET)
  return dict(rope_scaling=scaling, max_position_embeddings=TARGET)


CASES = {
    # Llama-2: default RoPE (theta 1e4), no GQA; extended by yarn factor 256 over 4K.
    "llama2": ("llama", dict()),
    "llama2_yarn_1m": ("llama", _extended(dict(max_position_embeddings=4096))),
    # Llama-3.2/3.3: llama3 RoPE factor 32 over 8K, GQA, tied (3.2-1B); extended by parts to 1M.
    "llama32_1m": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=2,
                                 rope_theta=500000.0, head_dim=32,
                                 **_extended(dict(max_position_embeddings=131072,
                                                  rope_scaling={
                                                      "rope_type": "llama3", "factor": 32.0,
                                                      "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192})))),
    "mistral": ("mistral", dict()),
    "mistral_yarn_1m": ("mistral", _extended(dict(max_position_embeddings=32768))),
    "qwen2": ("qwen2", dict()),
    "qwen2_yarn_1m": ("qwen2", _extended(dict(max_position_embeddings=32768))),
    "qwen3": ("qwen3", dict()),
    "qwen3_yarn_1m": ("qwen3", _extended(dict(max_position_embeddings=40960))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, make_hf_model, hf_logits):
  family, kwargs = CASES[case]
  hf_model, path = make_hf_model(family, **kwargs)
  model = ultralong_jax.from_pretrained(path)
  assert model.config.model_type == family
  assert model.config.rope_scaling == rope.normalize_rope_scaling(kwargs.get("rope_scaling"))
  assert type(hf_model).__name__ == FAMILIES[family].architecture
  ids = np.random.RandomState(0).randint(0, 256, (2, 16))
  far = model.config.max_position_embeddings > 100_000
  positions = np.stack([np.arange(16) + (1_040_000 if far else 1000),
                        np.arange(16) * (60_000 if far else 100) + 3])
  err = _rel_err(model(jnp.asarray(ids), positions=jnp.asarray(positions)),
                 hf_logits(hf_model, ids, positions))
  assert err <= TOL, f"{case}: relative error {err:.2e}"


def _tensors(path):
  reader = hf.SafetensorsReader(path)
  return {name: reader.get(name) for name in reader.keys()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_exact_and_loads_as_the_same_class(family, make_hf_model, hf_logits,
                                                             tmp_path):
  hf_model, path = make_hf_model(family)
  model = ultralong_jax.from_pretrained(path)
  out = ultralong_jax.save_pretrained(model, str(tmp_path / "back"))
  original, returned = _tensors(path), _tensors(out)
  assert sorted(original) == sorted(returned)
  for name, array in original.items():
    assert returned[name].dtype == array.dtype
    np.testing.assert_array_equal(returned[name], array, err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(reloaded) is type(hf_model)
  ids = np.random.RandomState(1).randint(0, 256, (1, 12))
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids), hf_logits(hf_model, ids))
  # config.json survives: the project reads its own export back to the same config.
  assert api.load_config(out) == model.config


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_generation_equals_transformers_generate(family, make_hf_model):
  """Greedy decoding through the KV cache (prefill in chunks of 4, then one token per step) ==
  transformers' `generate` (Llama's is tests/evaluation/test_generate.py)."""
  from ultralong_jax.evaluation import generate  # pylint: disable=import-outside-toplevel

  hf_model, path = make_hf_model(family)
  rng = np.random.RandomState(2)
  prompts = [rng.randint(3, 256, n).tolist() for n in (5, 9)]
  ref = []
  for p in prompts:
    ids = torch.tensor([p])
    with torch.no_grad():
      o = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    ref.append(o[0, len(p):].tolist())
  model = generate.CachedModel(ultralong_jax.from_pretrained(path), kv_block=8)
  assert model.generate(prompts, max_new_tokens=6, prefill_chunk=4) == ref


def test_unknown_family_lists_the_supported_ones():
  with pytest.raises(ValueError, match=r"gemma2.*llama.*mistral.*qwen2.*qwen3"):
    LlamaConfig.from_hf_dict({"model_type": "gemma2", "vocab_size": 8, "hidden_size": 8,
                              "intermediate_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 1})


def _hf(model_type, **extra):
  return {"model_type": model_type, "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32768,
          **extra}


def test_active_sliding_window_is_refused_unless_it_covers_the_context():
  with pytest.raises(ValueError, match="sliding_window=4096 is active"):
    LlamaConfig.from_hf_dict(_hf("mistral", sliding_window=4096))  # Mistral-7B-v0.1
  with pytest.raises(ValueError, match="sliding_window=4096 is active"):
    LlamaConfig.from_hf_dict(_hf("qwen2", use_sliding_window=True, sliding_window=4096,
                                 max_window_layers=1))
  # Covered, disabled, or null: full attention, as transformers computes it.
  for hf_dict in (_hf("mistral", sliding_window=32768), _hf("mistral", sliding_window=None),
                  _hf("qwen2", use_sliding_window=False, sliding_window=4096),
                  _hf("qwen3", use_sliding_window=True, sliding_window=4096,
                      max_window_layers=2)):
    assert LlamaConfig.from_hf_dict(hf_dict).model_type == hf_dict["model_type"]


def test_bias_flags_a_family_does_not_have_are_refused():
  with pytest.raises(ValueError, match="attention_bias=true"):
    LlamaConfig.from_hf_dict(_hf("mistral", attention_bias=True))
  with pytest.raises(ValueError, match="model.mlp_bias"):
    LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                num_kv_heads=1, model_type="qwen2", mlp_bias=True)


def test_long_context_rope_scaling_per_family():
  llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  # Llama-3.1 to 1M is exactly the paper's factor-128 setting.
  assert rope.long_context_rope_scaling(llama31, 131072, TARGET) == \
      rope.ultralong_rope_scaling(128)
  assert rope.long_context_rope_scaling(None, 32768, TARGET) == {
      "rope_type": "yarn", "factor": 32.0, "beta_fast": 4.0, "beta_slow": 1.0,
      "original_max_position_embeddings": 32768}
  # A yarn-extended Qwen2.5 (factor 4 over 32K) is re-extended from its native 32K.
  qwen_128k = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
  assert rope.long_context_rope_scaling(qwen_128k, 131072, TARGET)["factor"] == 32.0
  with pytest.raises(ValueError, match="not longer"):
    rope.long_context_rope_scaling(None, 1 << 21, TARGET)


def test_exported_config_json_per_family(make_hf_model, tmp_path):
  _, path = make_hf_model("qwen2")
  model = ultralong_jax.from_pretrained(path, rope_scaling=rope.long_context_rope_scaling(
      None, 32768, TARGET))
  out = ultralong_jax.save_pretrained(model, str(tmp_path / "qwen2_1m"))
  config = json.loads(open(os.path.join(out, "config.json")).read())
  assert config["architectures"] == ["Qwen2ForCausalLM"]
  assert config["use_sliding_window"] is False and config["sliding_window"] is None
  assert config["max_position_embeddings"] == TARGET and config["rope_scaling"]["factor"] == 32.0
  reloaded = transformers.AutoConfig.from_pretrained(out)
  assert all(t == "full_attention" for t in reloaded.layer_types)


def test_convert_cli_ultralong_extends_by_family(make_hf_model, tmp_path):
  from ultralong_jax.convert import __main__ as cli  # pylint: disable=import-outside-toplevel

  _, path = make_hf_model("qwen2")
  out = tmp_path / "ckpt"
  assert cli.main(["hf-to-jax", "--hf-dir", path, "--out", str(out), "--ultralong", "1m"]) == 0
  config = LlamaConfig.from_json((out / "model_config.json").read_text())
  assert config.model_type == "qwen2" and config.max_position_embeddings == TARGET
  assert config.rope_scaling == rope.long_context_rope_scaling(None, 32768, TARGET)


def test_family_parameters_carry_logical_axis_names():
  """The parameters a family adds are sharded by the one rules table like the others."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ultralong_jax.modeling import llama, presets  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  for model_type, added in (("qwen2", {"bq": ("layers", "heads", "head_dim"),
                                       "bk": ("layers", "kv_heads", "head_dim"),
                                       "bv": ("layers", "kv_heads", "head_dim")}),
                            ("qwen3", {"q_norm": ("layers", "head_dim"),
                                       "k_norm": ("layers", "head_dim")})):
    config = presets.tiny(model_type=model_type)
    specs = nnx.get_partition_spec(nnx.state(llama.abstract_model(config), nnx.Param))
    layer_specs = {k: tuple(v) for k, v in specs["layers"].items()}
    assert {k: layer_specs[k] for k in added} == added
    assert len(layer_specs) == 9 + len(added)
    assert config.num_params == sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(llama.abstract_model(config))))
