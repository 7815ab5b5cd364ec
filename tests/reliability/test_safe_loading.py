"""Safe loading: only safetensors, Orbax (TensorStore + JSON) and JSON are read; a pickle file
is refused without being opened; config strings are parsed as JSON, never evaluated; and a run
writes nothing outside its workdir."""

import json
import os
import pickle

import numpy as np
import pytest
from flax import nnx

from ultralong_jax.convert import api as convert_api
from ultralong_jax.modeling import llama
from ultralong_jax.training import config as config_lib
from ultralong_jax.training import loop

# Pickle streams start with PROTO (0x80) and a protocol number 2..5.
_PICKLE_HEADERS = tuple(bytes([0x80, p]) for p in range(2, 6))


class _Payload:
  """Unpickling this creates `marker`: proof that a loader executed code from the file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def test_a_pickle_checkpoint_is_refused_unread(tiny_config, tmp_path):
  c = tiny_config()
  model_cfg = config_lib.model_config(c)
  params = nnx.to_pure_dict(nnx.state(llama.init_model(model_cfg, seed=0), nnx.Param))
  hf_dir = str(tmp_path / "hf")
  convert_api.export_hf(hf_dir, model_cfg, convert_api.params_getter(params))
  for name in os.listdir(hf_dir):  # leave config.json and a malicious pytorch_model.bin
    if name.endswith(".safetensors") or name.endswith(".index.json"):
      os.remove(os.path.join(hf_dir, name))
  marker = str(tmp_path / "code_ran")
  with open(os.path.join(hf_dir, "pytorch_model.bin"), "wb") as f:
    pickle.dump(_Payload(marker), f)
  c.init.mode, c.init.path = "hf", hf_dir
  with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.*pickle-based files are never"):
    loop.run(c, str(tmp_path / "run"), progress=False)
  assert not os.path.exists(marker)


def test_damaged_safetensors_files_name_the_file(tiny_config, tmp_path):
  """A truncated weights file and a damaged index: one ValueError naming the file, before any
  training starts (loop.run is what `train` and the init path call)."""
  c = tiny_config()
  model_cfg = config_lib.model_config(c)
  params = nnx.to_pure_dict(nnx.state(llama.init_model(model_cfg, seed=0), nnx.Param))
  hf_dir = str(tmp_path / "hf")
  convert_api.export_hf(hf_dir, model_cfg, convert_api.params_getter(params))
  weights = os.path.join(hf_dir, "model.safetensors")
  os.truncate(weights, os.path.getsize(weights) // 2)
  c.init.mode, c.init.path = "hf", hf_dir
  with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file.*damaged"):
    loop.run(c, str(tmp_path / "run"), progress=False)
  with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
    f.write('{"weight_map": {"model.embed_tokens.weight": "model.safe')  # cut mid-write
  with pytest.raises(ValueError, match="model.safetensors.index.json is not a safetensors index"):
    convert_api.from_pretrained(hf_dir)


@pytest.mark.parametrize("key", ["overrides_json", "rope_scaling_json"])
def test_config_strings_are_json_not_code(key, tiny_config, tmp_path):
  c = tiny_config()
  marker = str(tmp_path / "code_ran")
  c.model[key] = f"__import__('os').makedirs({marker!r})"
  with pytest.raises(ValueError, match=f"model.{key} is not valid JSON"):
    config_lib.validate(c, num_devices=8)
  assert not os.path.exists(marker)


def test_a_run_writes_only_inside_its_workdir_and_no_pickle(tiny_config, tmp_path, monkeypatch):
  c = tiny_config(steps=2)  # with the HF export, loss plot, final checkpoint, TensorBoard
  outside = tmp_path / "cwd"
  outside.mkdir()
  monkeypatch.chdir(outside)  # a stray relative path would land here
  workdir = tmp_path / "run"
  before = set(os.listdir(tmp_path))
  summary = loop.run(c, str(workdir), progress=False)
  assert set(os.listdir(tmp_path)) == before | {"run"} and not os.listdir(outside)
  for key in ("final_checkpoint", "hf_export", "loss_plot", "checkpoints", "metrics"):
    path = os.path.realpath(summary[key])
    assert path.startswith(os.path.realpath(workdir) + os.sep), (key, path)
  written = [os.path.join(r, f) for r, _, fs in os.walk(workdir) for f in fs]
  assert written
  for path in written:
    with open(path, "rb") as f:
      assert not f.read(2).startswith(_PICKLE_HEADERS), f"{path} looks like a pickle"
  # The checkpointed config is JSON data: what a resume reads back is a plain dict.
  step_dir = os.path.join(summary["checkpoints"], "2", "config")
  stored = [os.path.join(step_dir, n) for n in os.listdir(step_dir)]
  assert any(json.load(open(p)).get("stage") == 1 for p in stored if not p.endswith(".tmp"))
  assert np.isfinite(summary["last_metrics"]["loss"])
