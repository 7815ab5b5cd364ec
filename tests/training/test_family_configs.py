"""`python -m ultralong_jax.train --config=configs/<family>_stage1_1m.py --config.init.path=<HF
dir>`: each shipped config on its base model's published config.json (family, 1M RoPE, mesh), and
one real run of the command on a tiny random Qwen3 (the family that differs most: q/k norms,
head_dim independent of the width): one step on 8 simulated devices, exporting a config.json of
the same family; the other families' configs run the same step in this process (a fresh process
compiles everything, ~1 min on 2 cores)."""

import json
import os
import subprocess
import sys

import pytest

from ultralong_jax.data.tokenizer import load_tokenizer
from ultralong_jax.modeling import presets
from ultralong_jax.modeling.config import FAMILIES
from ultralong_jax.parallel import host_devices
from ultralong_jax.training import config as config_lib

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CONFIGS = {"llama": "llama2_stage1_1m", "mistral": "mistral_stage1_1m",
           "qwen2": "qwen2_stage1_1m", "qwen3": "qwen3_stage1_1m"}
# What each config's RoPE extension must be for the real base model (rope_type, factor).
EXPECTED_ROPE = {"llama": ("yarn", 256.0), "mistral": ("yarn", 32.0), "qwen2": ("yarn", 32.0),
                 "qwen3": ("yarn", 32.0)}
PRESETS = {"llama": "llama2_7b", "mistral": "mistral_7b", "qwen2": "qwen25_7b",
           "qwen3": "qwen3_8b"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_extends_the_real_base_model_to_1m(family, tmp_path):
  """The config on the published config.json of the base model (no weights needed)."""
  (tmp_path / "config.json").write_text(json.dumps(presets.get_preset(PRESETS[family]).to_hf_dict()))
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{CONFIGS[family]}.py"))
  c.init.path = str(tmp_path)
  c.data.domains.books.path, c.data.tokenizer = "books", "tokenizer.json"
  model = config_lib.validate(c, num_devices=64)
  assert model.model_type == family
  assert (model.rope_scaling["rope_type"], model.rope_scaling["factor"]) == EXPECTED_ROPE[family]
  assert model.rope_scaling["beta_fast"] == 4.0 and model.rope_scaling["beta_slow"] == 1.0
  assert model.max_position_embeddings == 1 << 20


def _overrides(family, hf_dir, corpus, workdir):
  """The flags that shrink a shipped config to the tiny model on 8 simulated devices."""
  tokenizer = load_tokenizer(corpus["tokenizer"])
  return [f"--config=configs/{CONFIGS[family]}.py", f"--workdir={workdir}",
          f"--config.init.path={hf_dir}",
          f"--config.data.domains.books.path={corpus['prepared']}",
          f"--config.data.tokenizer={corpus['tokenizer']}", "--config.data.vocab_size=512",
          f"--config.data.separator_id={tokenizer.token_id('<|end_of_text|>')}",
          "--config.data.seq_len=64", "--config.train.steps=1",
          "--config.train.loss_chunk_size=32", "--config.mesh.data=2",
          "--config.mesh.sequence=2", "--config.mesh.tensor=2", "--config.model.dtype=float32",
          "--config.checkpoint.async_save=False"]


def _check_export(family, summary):
  assert summary["complete"] and summary["end_step"] == 1
  with open(os.path.join(summary["hf_export"], "config.json")) as f:
    exported = json.load(f)
  assert exported["architectures"] == [FAMILIES[family].architecture]
  assert exported["max_position_embeddings"] == 1 << 20
  assert exported["rope_scaling"]["rope_type"] == EXPECTED_ROPE[family][0]


def test_train_cli_runs_the_qwen3_config(make_hf_model, corpus, tmp_path):
  _, hf_dir = make_hf_model("qwen3", vocab_size=512)
  env = {**os.environ, "XLA_FLAGS": host_devices.xla_flags(8), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "ultralong_jax.train",
       *_overrides("qwen3", hf_dir, corpus, tmp_path / "run")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  _check_export("qwen3", json.loads(result.stdout[result.stdout.index("{\n"):]))


def _set(c, flag):
  """Applies one `--config.a.b=value` flag to c, typed like the value it replaces (as the CLI)."""
  path, _, text = flag[len("--config."):].partition("=")
  *parents, key = path.split(".")
  for name in parents:
    c = c[name]
  old = c[key]
  c[key] = (text == "True" if isinstance(old, bool) else type(old)(text) if old is not None
            else text)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_each_other_family_config_trains_one_step(family, make_hf_model, corpus, tmp_path):
  """The same shrunken config in this process (the CLI's process start and compile are the
  Qwen3 test's): one step from the tiny HF model, sharded over data x sequence x tensor, and an
  export of the same class with the 1M RoPE."""
  from ultralong_jax.training import loop  # pylint: disable=import-outside-toplevel
  _, hf_dir = make_hf_model(family, vocab_size=512)
  flags = _overrides(family, hf_dir, corpus, tmp_path / "run")
  c = config_lib.load_config_file(os.path.join(ROOT, flags[0][len("--config="):]))
  for flag in flags[2:]:
    _set(c, flag)
  _check_export(family, loop.run(c, str(tmp_path / "run"), progress=False))


@pytest.mark.parametrize("family, template", [("qwen2", "chatml"), ("qwen3", "qwen3"),
                                              ("mistral", "mistral"), ("llama2", "llama2")])
def test_stage2_configs_use_the_family_chat_template(family, template, tmp_path):
  preset = {"qwen2": "qwen25_7b_1m", "qwen3": "qwen3_8b_1m", "mistral": "mistral_7b_1m",
            "llama2": "llama2_7b_1m"}[family]
  (tmp_path / "model_config.json").write_text(presets.get_preset(preset).to_json())
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{family}_stage2_sft.py"))
  c.init.path = str(tmp_path)
  c.data.chat_files, c.data.tokenizer = "chats.jsonl", "tokenizer.json"
  model = config_lib.validate(c, num_devices=64)
  assert c.data.chat.template == template and c.optim.learning_rate == 5e-6
  assert model.max_position_embeddings == 1 << 20  # the stage-1 RoPE is kept
