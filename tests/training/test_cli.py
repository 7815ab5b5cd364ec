"""`python -m ultralong_jax.train`: bad input is one clear line before anything compiles."""

import os
import subprocess
import sys

from ultralong_jax.parallel import host_devices

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _train(*flags, tmp_path):
  env = {**os.environ, "XLA_FLAGS": host_devices.xla_flags(8), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ultralong_jax.train",
                         "--config=configs/demo.py:stage1", f"--workdir={tmp_path}", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_checkpoint_names_init_path(tmp_path):
  result = _train(f"--config.init.path={tmp_path}/nowhere", tmp_path=tmp_path)
  assert result.returncode == 2
  assert "error: init.path (checkpoint)" in result.stderr and "nowhere" in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_config_key_is_rejected(tmp_path):
  result = _train("--config.data.seq_lenn=5", tmp_path=tmp_path)
  assert result.returncode != 0
  assert 'Did you mean "seq_len"' in result.stderr


def test_a_bad_enumerated_value_fails_before_the_checkpoint_is_read(tmp_path):
  """init.path does not exist: the kernel error must come first, naming the full key."""
  result = _train("--config.attention.kernel=flash3", f"--config.init.path={tmp_path}/nowhere",
                  tmp_path=tmp_path)
  assert result.returncode == 2, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: attention.kernel='flash3' is not one of")
  assert "'chunked'" in errors[0] and "nowhere" not in result.stderr
  assert "Traceback" not in result.stderr
