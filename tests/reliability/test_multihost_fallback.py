"""fallback_on_corrupt on 2 processes x 4 CPU devices: a checkpoint damaged where only one process
reads (its iterator state) is refused, or skipped, by both processes alike (never one process on step 2 and the
other on step 1, nor one waiting forever in a collective)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_a_checkpoint_damaged_on_one_process_is_skipped_by_both(tmp_path):
  result = str(tmp_path / "seen.json")
  cmd = ["bash", os.path.join(REPO, "launch", "multihost.sh"), "--local", "2", "--log-dir",
         str(tmp_path / "logs"), "--", sys.executable,
         os.path.join(REPO, "tests", "reliability", "multihost_fallback_worker.py"),
         "--workdir", str(tmp_path / "run"), "--result", result]
  run = subprocess.run(cmd, env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=300)
  logs = "".join((tmp_path / "logs" / f"process_{i}.log").read_text()[-3000:] for i in range(2))
  assert run.returncode == 0, run.stderr + logs
  seen = [json.load(open(f"{result}.{i}")) for i in range(2)]
  # Process 1 reads the damaged files and reports its own error; process 0 restored its shards
  # but raises too, naming process 1.
  assert seen[1]["strict"].startswith("CorruptCheckpointError") and "checkpoints/2" in seen[1]["strict"]
  assert "process(es) [1] could not restore" in seen[0]["strict"]
  for s in seen:
    assert s["fallback_step"] == 1 and s["values"] == [1.0] and s["iterator_position"] == 1, s
    assert s["steps_left"] == [1], s
  assert os.listdir(tmp_path / "run" / "checkpoints_corrupt") == ["2"]
