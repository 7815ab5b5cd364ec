"""HF <-> project conversion: bit-exact round trips, exports transformers loads, clear errors."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

import ultralong_jax
from ultralong_jax.convert import __main__ as cli
from ultralong_jax.convert import api, hf
from ultralong_jax.modeling import rope


def _tensors(path):
  reader = hf.SafetensorsReader(path)
  return {name: reader.get(name) for name in reader.keys()}


def test_hf_to_project_to_hf_round_trip_is_bit_exact(make_hf_llama, tmp_path):
  _, hf_dir = make_hf_llama(num_key_value_heads=1, attention_bias=True)
  ckpt, back = tmp_path / "ckpt", tmp_path / "back"
  assert cli.main(["hf-to-jax", "--hf-dir", hf_dir, "--out", str(ckpt)]) == 0
  assert cli.main(["jax-to-hf", "--ckpt", str(ckpt), "--out", str(back)]) == 0
  original, returned = _tensors(hf_dir), _tensors(str(back))
  assert sorted(original) == sorted(returned)
  for name, array in original.items():
    assert returned[name].dtype == array.dtype
    np.testing.assert_array_equal(returned[name], array, err_msg=name)


def test_bf16_round_trip_and_from_project_checkpoint(make_hf_llama, hf_logits, tmp_path):
  hf_model, hf_dir = make_hf_llama(tie_word_embeddings=True)
  hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  ckpt = tmp_path / "ckpt"
  assert cli.main(["hf-to-jax", "--hf-dir", str(tmp_path / "bf16"), "--out", str(ckpt)]) == 0
  assert json.loads((ckpt / "model_config.json").read_text())["param_dtype"] == "bfloat16"
  assert cli.main(["jax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "back")]) == 0
  for name, array in _tensors(str(tmp_path / "bf16")).items():
    np.testing.assert_array_equal(_tensors(str(tmp_path / "back"))[name], array, err_msg=name)
  # from_pretrained reads the project checkpoint too (upcast to fp32 master weights).
  model = ultralong_jax.from_pretrained(str(ckpt))
  assert model.embed[...].dtype == jnp.float32
  ids = np.random.RandomState(0).randint(0, 256, (1, 12))
  ref = hf_logits(hf_model.float(), ids)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref,
                             atol=5e-2 * np.abs(ref).max())


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_loads_in_transformers_with_same_logits(tied, make_hf_llama, hf_logits,
                                                                 tmp_path):
  _, hf_dir = make_hf_llama(tie_word_embeddings=tied, num_key_value_heads=2, mlp_bias=True)
  model = ultralong_jax.from_pretrained(hf_dir, rope_scaling=rope.ultralong_rope_scaling(128))
  assert model.config.max_position_embeddings == 128 * 8192
  # Tiny shards force the multi-file + index layout of a real 8B export.
  out = ultralong_jax.save_pretrained(model, str(tmp_path / "export"), max_shard_bytes=40_000)
  files = sorted(os.listdir(out))
  assert hf.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  index = json.loads((tmp_path / "export" / hf.INDEX_FILE).read_text())
  for shard in set(index["weight_map"].values()):
    with safe_open(os.path.join(out, shard), framework="numpy") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    assert sum(sizes) <= 40_000 or len(sizes) == 1  # only a lone oversized tensor may exceed it
  assert index["metadata"]["total_size"] == sum(
      a.nbytes for a in _tensors(out).values())
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert reloaded.config.rope_parameters["factor"] == 128.0
  assert reloaded.config.max_position_embeddings == 1 << 20
  ids = np.random.RandomState(1).randint(0, 256, (2, 20))
  positions = np.stack([np.arange(20) + 700_000, np.arange(20)])
  ours = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions)))
  ref = hf_logits(reloaded.eval(), ids, positions)
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4


def test_hub_style_config_json_with_rope_scaling_and_tokenizer_copy(make_hf_llama, tmp_path):
  """Llama-3.1 on the hub ships `rope_theta` + `rope_scaling`; transformers 5 writes
  `rope_parameters`. Both must give the same model."""
  _, hf_dir = make_hf_llama(rope_theta=500000.0, max_position_embeddings=131072,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
  config = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  assert "rope_parameters" in config  # transformers 5 form
  hub = dict(config)
  parameters = hub.pop("rope_parameters")
  hub["rope_theta"] = parameters.pop("rope_theta")
  hub["rope_scaling"] = parameters
  hub_dir = tmp_path / "hub"
  shutil.copytree(hf_dir, hub_dir)
  (hub_dir / "config.json").write_text(json.dumps(hub))
  (hub_dir / "tokenizer.json").write_text("{}")
  a = ultralong_jax.from_pretrained(hf_dir).config
  b = ultralong_jax.from_pretrained(str(hub_dir)).config
  assert a == b and b.rope_theta == 500000.0 and b.rope_scaling["factor"] == 8.0
  out = ultralong_jax.save_pretrained(ultralong_jax.from_pretrained(str(hub_dir)),
                                      str(tmp_path / "out"), tokenizer_dir=str(hub_dir))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  written = json.loads(open(os.path.join(out, "config.json")).read())
  assert written["rope_scaling"]["rope_type"] == "llama3" and written["rope_theta"] == 500000.0


# --- bad inputs -----------------------------------------------------------------------------


def test_missing_config_json(make_hf_llama):
  _, hf_dir = make_hf_llama()
  os.remove(os.path.join(hf_dir, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    ultralong_jax.from_pretrained(hf_dir)


def test_wrong_tensor_shape_names_file_and_tensor(make_hf_llama):
  _, hf_dir = make_hf_llama()
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = _tensors(hf_dir)
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.1\.self_attn\.k_proj.*\(8, 64\)"):
    ultralong_jax.from_pretrained(hf_dir)


def test_unknown_rope_type_names_the_field(make_hf_llama):
  _, hf_dir = make_hf_llama()
  path = os.path.join(hf_dir, "config.json")
  config = json.loads(open(path).read())
  config["rope_parameters"] = {"rope_type": "superlong", "factor": 2.0, "rope_theta": 1e4}
  open(path, "w").write(json.dumps(config))
  with pytest.raises(ValueError, match=r"config\.json.*rope_type='superlong'"):
    ultralong_jax.from_pretrained(hf_dir)


def test_pickle_checkpoints_are_refused(make_hf_llama):
  _, hf_dir = make_hf_llama()
  os.remove(os.path.join(hf_dir, "model.safetensors"))
  open(os.path.join(hf_dir, "pytorch_model.bin"), "wb").write(b"not loaded")
  with pytest.raises(FileNotFoundError, match="pickle"):
    ultralong_jax.from_pretrained(hf_dir)


def test_unexpected_tensors_are_reported_not_dropped(make_hf_llama):
  _, hf_dir = make_hf_llama()
  tensors = _tensors(hf_dir)
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
  save_file(tensors, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match="q_norm"):
    ultralong_jax.from_pretrained(hf_dir)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
  assert cli.main(["hf-to-jax", "--hf-dir", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "c")]) == 1
  assert "not a directory" in capsys.readouterr().err
