"""--checkpoint_dir: checkpoints outside the workdir (a gs:// bucket on a cluster; here a local
path through the same code path), resume from there, and URLs that cannot work fail at once."""

import importlib.util
import os

import pytest

from ultralong_jax.training import checkpointing, loop


def test_checkpoints_go_to_checkpoint_dir_and_resume_from_it(tiny_config, tmp_path):
  c = tiny_config(stage=1, steps=2, batch=8, mesh=dict(data=8))
  workdir, ckpt_dir = str(tmp_path / "work"), str(tmp_path / "elsewhere" / "ckpts")
  first = loop.run(c, workdir, max_steps=1, progress=False, checkpoint_dir=ckpt_dir)
  assert first["end_step"] == 1 and first["checkpoints"] == ckpt_dir
  assert "1" in os.listdir(ckpt_dir) and not os.path.exists(os.path.join(workdir, "checkpoints"))
  second = loop.run(c, workdir, progress=False, checkpoint_dir=ckpt_dir)
  assert second["start_step"] == 1 and second["complete"]
  assert os.path.exists(os.path.join(workdir, "final", "model_config.json"))


def test_checkpoint_url_without_its_filesystem_package_fails_fast(monkeypatch, tmp_path):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("gcsfs", "tensorflow", "s3fs")
                      else real_find_spec(name, *a))
  with pytest.raises(ValueError, match=r"--checkpoint_dir=gs://b/run: .*pip install gcsfs"):
    loop.run(None, str(tmp_path), checkpoint_dir="gs://b/run")  # before the config is read
  with pytest.raises(ValueError, match="gs:// and s3://"):
    checkpointing.check_directory("hdfs://b/run")
  checkpointing.check_directory(str(tmp_path))  # paths pass
