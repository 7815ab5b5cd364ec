"""Crashes and preemption in real subprocesses: SIGKILL mid-step and mid-checkpoint-write, SIGTERM,
a corrupted checkpoint. After each, resuming loses nothing but the steps since the last complete
checkpoint, and the resumed losses equal an uninterrupted run's (same data, same state)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ultralong_jax.training import checkpointing, loop

DRIVER = os.path.join(os.path.dirname(__file__), "_driver.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows(workdir):
  """step -> metrics of the latest row for that step (a resumed run re-logs replayed steps)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def _complete_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())




def _spawn(config, workdir, fault, tmp_path):
  path = str(tmp_path / "config.json")
  with open(path, "w") as f:
    f.write(config.to_json())
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, DRIVER, path, workdir, fault], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_resume_matches(reference, workdir, start_step):
  rows = _rows(workdir)
  assert sorted(rows) == list(range(1, 7))
  for step in range(start_step + 1, 7):  # the steps the resumed run computed itself
    np.testing.assert_allclose(rows[step]["loss"], reference[step]["loss"], rtol=1e-6)
    assert rows[step]["loss_tokens"] == reference[step]["loss_tokens"]  # the same batches


@pytest.mark.parametrize("fault", ["kill_in_step:5", "kill_in_save:4"])
def test_sigkill_then_resume_from_newest_complete_checkpoint(fault, tiny_config, six_steps,
                                                            tmp_path,
                                                            reference_rows):
  c = six_steps(tiny_config)
  workdir = str(tmp_path / "killed")
  proc = _spawn(c, workdir, fault, tmp_path)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  complete = _complete_steps(workdir)
  entries = os.listdir(os.path.join(workdir, "checkpoints"))
  if fault.startswith("kill_in_save"):
    # Step 4 was being written: only its tmp directory exists, never a "4" Orbax would read.
    assert 4 not in complete and any(e.startswith("4.") for e in entries), entries
  summary = loop.run(c, workdir, progress=False)
  assert summary["complete"] and summary["start_step"] == max(complete), (complete, entries)
  assert summary["start_step"] >= 2  # lost: only the steps after the last complete checkpoint
  _assert_resume_matches(reference_rows, workdir, summary["start_step"])


def test_sigterm_in_a_subprocess_saves_the_last_step_and_exits_zero(tiny_config, six_steps,
                                                                    tmp_path):
  c = six_steps(tiny_config)
  c.train.steps, c.checkpoint.every_steps = 10_000, 0
  workdir = str(tmp_path / "term")
  proc = _spawn(c, workdir, "none", tmp_path)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not (
      os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["preempted"] and not summary["complete"]
  assert _complete_steps(workdir)[-1] == summary["end_step"] == max(_rows(workdir))


def test_sigterm_during_a_steps_unforced_save_is_answered_at_the_next_step(
    tiny_config, six_steps, tmp_path, monkeypatch):
  """SIGTERM lands inside step 2's (unforced, so empty) save call: the run must not stop there
  without a checkpoint of its last step; it trains step 3, saves it and stops."""
  c = six_steps(tiny_config)
  c.checkpoint.every_steps = 0
  real_save = checkpointing.RunCheckpointer.save

  def save(self, step, *args, **kwargs):
    started = real_save(self, step, *args, **kwargs)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler of loop._Preemption runs here
    return started
  monkeypatch.setattr(checkpointing.RunCheckpointer, "save", save)
  workdir = str(tmp_path / "run")
  summary = loop.run(c, workdir, progress=False)
  assert summary["preempted"] and summary["end_step"] == 3
  assert _complete_steps(workdir)[-1] == 3 == max(_rows(workdir))


def _truncate_largest_state_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  return victim


def test_corrupt_checkpoint_is_named_and_falls_back_when_asked(tiny_config, six_steps,
                                                               tmp_path,
                                                               reference_rows):
  c = six_steps(tiny_config)
  workdir = str(tmp_path / "corrupt")
  loop.run(c, workdir, max_steps=4, progress=False)
  assert _complete_steps(workdir)[-2:] == [2, 4]
  _truncate_largest_state_file(os.path.join(workdir, "checkpoints", "4"))
  newest = os.path.join(workdir, "checkpoints", "4")
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=rf"checkpoint {newest} could not be restored.*fallback_on_corrupt"):
    loop.run(c, workdir, progress=False)
  c.checkpoint.fallback_on_corrupt = True
  summary = loop.run(c, workdir, progress=False)
  assert summary["start_step"] == 2 and summary["complete"]
  assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", "4"))  # kept for a post-mortem
  _assert_resume_matches(reference_rows, workdir, 2)
  # A config that no longer matches (another depth) fails on *every* step: that is not
  # corruption, so even with the fallback nothing is moved aside.
  before = _complete_steps(workdir)
  c.model.overrides_json = '{"num_layers": 3}'
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=r"no checkpoint in .* could be restored.*Does the config match"):
    loop.run(c, workdir, progress=False)
  assert _complete_steps(workdir) == before
