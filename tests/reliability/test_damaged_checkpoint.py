"""`python -m ultralong_jax.train` resuming from a damaged checkpoint: one `error:` line that names
the checkpoint and the fix, and nothing else from the failed restore (no background tracebacks),
on every run; with checkpoint.fallback_on_corrupt the run resumes from the previous step.

The failure this guards against was intermittent (background threads racing the exit), so each
damage is resumed several times in fresh processes; one trained workdir is copied per resume."""

import os
import shutil
import subprocess
import sys

import pytest

from ultralong_jax.parallel import host_devices

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPEATS = 5  # before the fix 23 of 26 such resumes printed tracebacks (10/13 and 13/13)

# The CLI takes a config file; this one hands it the test's tiny config (as _driver.py does).
_CONFIG_FILE = """import json
import ml_collections


def get_config():
  with open({path!r}) as f:
    return ml_collections.ConfigDict(json.load(f))
"""


def _train_cli(config_file, workdir, *flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=host_devices.xla_flags(8))
  result = subprocess.run([sys.executable, "-m", "ultralong_jax.train", f"--config={config_file}",
                           f"--workdir={workdir}", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout + result.stderr


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def trained(session_config, six_steps, tmp_path_factory):
  """(config file, workdir) of a finished 4-step run with checkpoints at steps 2 and 4."""
  d = tmp_path_factory.mktemp("damaged")
  c = six_steps(session_config)
  c.train.steps = 4
  (d / "config.json").write_text(c.to_json())
  config_file = d / "tiny_config.py"
  config_file.write_text(_CONFIG_FILE.format(path=str(d / "config.json")))
  workdir = str(d / "trained")
  rc, output = _train_cli(config_file, workdir)
  assert rc == 0, output[-3000:]
  assert _steps(workdir)[-2:] == [2, 4]
  return str(config_file), workdir


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _truncate_data_file(step_dir):
  data = os.path.join(step_dir, "state", "d")
  victim = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)


DAMAGES = {"manifest_deleted": _delete_manifest, "data_file_truncated": _truncate_data_file}


def _damaged_copy(trained_workdir, target, damage):
  shutil.copytree(trained_workdir, target)
  newest = os.path.join(target, "checkpoints", str(_steps(target)[-1]))
  DAMAGES[damage](newest)
  return newest


def _noise(output):
  """What must never reach the terminal: background-thread tracebacks."""
  return [line for line in output.splitlines()
          if "Traceback" in line or "Event loop is closed" in line]


@pytest.mark.slow  # 5 fresh processes per damage: ~30 s each on 2 cores
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_one_error_line_every_time(damage, trained, tmp_path):
  config_file, trained_workdir = trained
  bad = []
  for attempt in range(REPEATS):
    workdir = str(tmp_path / f"resume{attempt}")
    newest = _damaged_copy(trained_workdir, workdir, damage)
    rc, output = _train_cli(config_file, workdir)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    ok = (rc != 0 and not _noise(output) and len(errors) == 1
          and output.strip().splitlines()[-1] == errors[0]  # the last word, nothing after it
          and errors[0].startswith(f"error: checkpoint {newest} could not be restored")
          and "checkpoint.fallback_on_corrupt=True" in errors[0])
    if not ok:
      bad.append(f"run {attempt}: rc={rc}, {len(_noise(output))} traceback lines, "
                 f"error lines {errors!r}\n{output[-2000:]}")
  assert not bad, f"{len(bad)} of {REPEATS} runs:\n" + "\n".join(bad)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_fallback_moves_the_damaged_checkpoint_aside_and_resumes(damage, trained, tmp_path):
  config_file, trained_workdir = trained
  workdir = str(tmp_path / "resume")
  newest = _damaged_copy(trained_workdir, workdir, damage)
  rc, output = _train_cli(config_file, workdir, "--config.checkpoint.fallback_on_corrupt=True")
  assert rc == 0 and not _noise(output), output[-3000:]
  assert '"start_step": 2' in output and '"complete": true' in output
  step = os.path.basename(newest)
  assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", step))
  assert int(step) in _steps(workdir)  # rewritten by the resumed run
