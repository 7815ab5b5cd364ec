"""One run through four faults, each in a fresh `python -m ultralong_jax.train` process
(_faults.py), resumed each time from what the last one left:

  1. the disk fills up before the async save of step 3: the write fails in Orbax's background
     thread, the retry (with the step at hand) fails too, the run stops with one `error:` line
     naming the directory and the OS error, exit 2; step 1 (Orbax saves the first step) stays
     the newest complete checkpoint
  2. step 7 hangs: the watchdog prints the step, host, devices and every thread's stack, exit 75;
     checkpoints 3 and 6 were written
  3. SIGKILL in step 9: steps 7-8 are logged but never checkpointed
  4. the last resume, with synchronous saves: the disk is full at the save of step 9 and freed
     while the checkpointer backs off, so the retry completes the run. Its time account counts
     steps 7-8 (logged by run 3, before its kill) as recomputed and step 9 as productive.
"""

import glob
import json
import os
import signal
import struct
import subprocess
import sys

import pytest

FAULTS = os.path.join(os.path.dirname(__file__), "_faults.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(config, workdir, faults, tmp_path, name):
  path = str(tmp_path / f"{name}.json")
  with open(path, "w") as f:
    f.write(config.to_json())
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, FAULTS, path, workdir, faults], env=env,
                          capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout, result.stderr


def _complete_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def _tensorboard_scalars(path):
  """{tag: value} of one TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  values = {}
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      for v in event.summary.value:
        values[v.tag] = v.simple_value
  return values


def test_full_disk_hang_and_kill_each_lose_only_the_steps_since_the_last_checkpoint(
    session_config, tmp_path):
  c = session_config(steps=9)
  c.checkpoint.every_steps, c.checkpoint.keep = 3, 5
  c.checkpoint.retries, c.checkpoint.retry_backoff_s = 1, 0.1
  c.train.hang_timeout_s = 15.0  # past the async write of step 6, even on a busy machine
  c.export.hf = False
  workdir = str(tmp_path / "run")
  checkpoints = os.path.join(workdir, "checkpoints")

  # 1. A full disk: one error line, the last thing printed; exit 2; nothing newer than step 1.
  # (6 steps here: when the retry's failure is found depends on the background write's timing;
  # the later runs must get past the steps this one logged.)
  c.train.steps = 6
  rc, out, err = _train(c, workdir, "disk_full_at_save:3", tmp_path, "run1")
  last = err.strip().splitlines()[-1]
  assert rc == 2, err[-3000:]
  assert last.startswith(f"error: checkpoint write to {checkpoints} failed 2 times in a row"), last
  assert "File too large" in last and "The newest complete checkpoint is step 1" in last, last
  assert "Event loop is closed" not in err  # the failed background write ends quietly
  assert _complete_steps(workdir) == [1]
  assert "retry 1 of 1" in err  # the first failure was retried before the run stopped

  # 2. A hang in step 7 (the 6th step of this invocation, resumed from step 1).
  c.train.steps = 9
  rc, out, err = _train(c, workdir, "stall_in_step:6", tmp_path, "run2")
  assert rc == 75, err[-3000:]
  report = err[err.index("hang watchdog: "):]
  assert "the last completed step is 6" in report and "process 0 of 1" in report, report[:2000]
  assert "devices [cpu:0, cpu:1, " in report, report[:2000]
  assert 'thread "MainThread"' in report and "time.sleep(3600)" in report, report[-3000:]
  assert _complete_steps(workdir)[-2:] == [3, 6]

  # 3. SIGKILL in step 9: steps 7 and 8 ran and were logged, but are in no checkpoint.
  rc, out, err = _train(c, workdir, "kill_in_step:3", tmp_path, "run3")
  assert rc == -signal.SIGKILL, err[-3000:]
  assert max(_logged_steps(workdir)) == 8 and _complete_steps(workdir)[-1] == 6

  # 4. Synchronous saves; the disk is full at the save of step 9 and freed during the backoff.
  c.checkpoint.async_save = False
  rc, out, err = _train(c, workdir, "disk_full_at_save:9,disk_freed_on_retry", tmp_path, "run4")
  assert rc == 0, err[-3000:]
  assert f"checkpoint write {checkpoints}/9 failed" in err and "File too large" in err
  assert "retry 1 of 1" in err and _complete_steps(workdir)[-1] == 9
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["start_step"] == 6 and summary["complete"]
  account = summary["time"]
  assert account["recomputed_steps"] == 2 and account["productive_steps"] == 1, account
  for key in ("compile_s", "restore_s", "recomputed_step_s", "productive_step_s",
              "checkpoint_s", "data_wait_s", "export_s"):
    assert account[key] > 0, (key, account)
  assert account["checkpoint_s"] >= 0.1  # the backoff is time the run did not train
  parts = sum(v for k, v in account.items() if k.endswith("_s") and k != "wall_s")
  assert parts == pytest.approx(account["wall_s"], rel=1e-6)
  assert account["goodput"] == pytest.approx(account["productive_step_s"] / account["wall_s"])
  events = glob.glob(os.path.join(workdir, "tensorboard", "*.time"))
  assert len(events) == 1, events
  scalars = _tensorboard_scalars(events[0])
  assert scalars["time/goodput"] == pytest.approx(account["goodput"], rel=1e-5)
  assert scalars["time/recomputed_steps"] == 2


@pytest.mark.slow  # two processes, each compiling: ~40 s on 2 cores
def test_hang_on_one_of_two_processes_ends_the_job_with_the_stacks(session_config, tmp_path):
  """2 processes x 4 CPU devices (launch/multihost.sh --local 2): process 1 stalls in step 3,
  process 0 waits for it in the step's collectives. A watchdog fires, its log holds its
  process's report, and the job ends with 75."""
  c = session_config(steps=6)
  c.train.hang_timeout_s = 5.0
  c.export.hf = False
  path = str(tmp_path / "config.json")
  with open(path, "w") as f:
    f.write(c.to_json())
  logs = tmp_path / "logs"
  result = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "multihost.sh"), "--local", "2", "--log-dir",
       str(logs), "--", sys.executable, FAULTS, path, str(tmp_path / "run"), "stall_in_step:3@1"],
      env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=""), capture_output=True, text=True,
      timeout=300, cwd=REPO)
  log = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  assert result.returncode == 75, result.stderr + "\n".join(text[-3000:] for text in log)
  # Both watchdogs time out at about the same moment; the launcher stops the other process as
  # soon as the first exits, so whether the second also reports is a race: at least one does,
  # and every report names its process and shows where it waited.
  reported = [p for p, text in enumerate(log) if "hang watchdog: " in text]
  assert reported, "\n".join(text[-3000:] for text in log)
  for process in reported:
    report = log[process][log[process].index("hang watchdog: "):]
    assert "the last completed step is 2" in report, report[:2000]
    assert f"process {process} of 2, devices [cpu:" in report, report[:2000]
    assert report.count("--- thread") >= 2, report[-3000:]
    # process 1: the stalled call in its main thread; process 0: waiting for step 3's result
    waited = "time.sleep(3600)" if process == 1 else "jax.device_get(step_metrics)"
    assert waited in report, report[-3000:]
