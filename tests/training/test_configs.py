"""Every shipped config loads, carries the paper's numbers and validates for its intended mesh."""

import dataclasses
import json
import os

import pytest

from ultralong_jax.modeling import presets
from ultralong_jax.parallel import mesh as mesh_lib
from ultralong_jax.training import config as config_lib, run_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _load(name, arg=None):
  path = os.path.join(CONFIGS, f"{name}.py")
  return config_lib.load_config_file(f"{path}:{arg}" if arg else path)


@pytest.fixture
def hf_8b_dir(tmp_path):
  """A config.json of Llama-3.1-8B-Instruct (no weights needed to validate)."""
  (tmp_path / "config.json").write_text(json.dumps(presets.llama31_8b().to_hf_dict()))
  return str(tmp_path)


@pytest.mark.parametrize("length, seq_len, steps, cp, devices", [
    ("1m", 1 << 20, 480, 4, 64), ("2m", 1 << 21, 240, 8, 128), ("4m", 1 << 22, 150, 16, 256)])
def test_stage1_8b_configs(length, seq_len, steps, cp, devices, hf_8b_dir):
  c = _load("llama31_8b_stage1", length)
  assert (c.data.seq_len, c.train.steps, c.mesh.sequence, c.mesh.tensor) == (seq_len, steps, cp, 8)
  assert c.optim.learning_rate == 3e-5 and c.data.global_batch_size == 2
  # ~1B tokens per run, as in the paper (2 x 4M x 150 = 1.26B at 4M).
  assert 0.9e9 < seq_len * 2 * steps < 1.3e9
  c.init.path = hf_8b_dir
  model = config_lib.validate(c, num_devices=devices)
  assert model.rope_scaling["factor"] == {"1m": 128, "2m": 256, "4m": 512}[length]
  assert model.max_position_embeddings == seq_len


def test_stage2_and_1b_configs(hf_8b_dir, tmp_path):
  sft = _load("llama31_8b_stage2_sft")
  assert sft.optim.learning_rate == 5e-6 and sft.data.max_example_len == 8192
  ckpt = tmp_path / "stage1"
  ckpt.mkdir()
  (ckpt / "model_config.json").write_text(presets.get_preset("llama31_8b_1m").to_json())
  sft.init.path = str(ckpt)
  sft.data.chat_files, sft.data.tokenizer = "chats.jsonl", "tokenizer.json"
  assert config_lib.validate(sft, num_devices=64).rope_scaling["factor"] == 128
  one_b = _load("llama32_1b_stage1_1m")
  (tmp_path / "config.json").write_text(json.dumps(presets.llama32_1b().to_hf_dict()))
  one_b.init.path = str(tmp_path)
  assert config_lib.validate(one_b, num_devices=8).num_layers == 16


@pytest.mark.parametrize("arg", ["base", "stage1", "stage2"])
def test_demo_config_stages(arg):
  c = _load("demo", arg)
  assert c.stage == (2 if arg == "stage2" else 1)
  want = {"base": "base", "stage1": "stage 1", "stage2": "stage 2"}[arg]
  assert run_config.run_name(c.stage, run_config.TrainConfig.of(c)) == want
  if arg == "base":
    assert config_lib.validate(c, num_devices=8).vocab_size == 512


def test_demo_config_file_and_package_agree():
  """configs/demo.py re-exports ultralong_jax.configs.demo, the one the demo (and a wheel) uses."""
  from ultralong_jax.configs import demo  # pylint: disable=import-outside-toplevel
  for arg in ("base", "stage1", "stage2"):
    assert _load("demo", arg).to_dict() == demo.get_config(arg).to_dict()


def test_an_unknown_stage1_length_is_refused():
  with pytest.raises(ValueError, match=r"llama31_8b_stage1.py:8m: use one of 1m, 2m, 4m"):
    _load("llama31_8b_stage1", "8m")


def test_a_config_without_its_paths_says_which_key_to_set():
  c = _load("llama31_8b_stage1")  # 1m without an arg
  with pytest.raises(ValueError, match="init.path"):
    config_lib.validate(c, num_devices=64)


def test_resolve_gives_frozen_pieces_and_names_a_missing_or_unknown_key():
  c = _load("demo", "base")
  run = config_lib.resolve(c, num_devices=8)
  assert run.mesh.sizes == mesh_lib.resolve_axis_sizes(dict(c.mesh), 8)
  assert run.mesh.num_devices == 8 and run.attention.chunk_size == c.attention.chunk_size
  assert run.optim == run_config.OptimConfig(**c.optim.to_dict()) and run.raw is c
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.train.steps = 1  # type: ignore[misc]
  missing = _load("demo", "base")
  del missing.attention["chunk_size"]
  with pytest.raises(ValueError, match=r"no key attention\.chunk_size; build it on .*base_config"):
    config_lib.validate(missing, num_devices=8)
  unknown = _load("demo", "base")
  unknown.train.stesp = 5
  with pytest.raises(ValueError, match=r"train\.stesp is not a config key; train takes steps, "):
    config_lib.resolve(unknown, num_devices=8)
