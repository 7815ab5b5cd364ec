"""The watchdog's timeout rule and the time account's arithmetic, with a fake clock (the real
faults run in subprocesses in test_write_failure_hang_kill.py)."""

import json

import pytest

from ultralong_jax.training import goodput, watchdog


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_timeout_is_fixed_or_a_multiple_of_the_median_step_with_a_floor(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(watchdog.time, "monotonic", clock)
  dog = watchdog.Watchdog(timeout_s=0.0, startup_s=3600.0, where="here")
  assert dog.timeout() == 3600.0  # nothing measured yet: the startup allowance
  clock.now += 900.0  # compile: not a step time
  dog.beat(1)
  for step, seconds in zip(range(2, 7), (100.0, 120.0, 80.0, 5000.0, 110.0)):
    clock.now += seconds
    dog.beat(step)
  assert dog.timeout() == 10 * 110.0  # median of 100, 120, 80, 5000, 110
  clock.now += 7000.0  # a checkpoint write
  dog.beat(6, step_time=False)
  assert dog.timeout() == 10 * 110.0
  fast = watchdog.Watchdog(timeout_s=0.0, startup_s=3600.0, where="here")
  fast.beat(1)
  clock.now += 1.0
  fast.beat(2)
  assert fast.timeout() == watchdog.AUTO_FLOOR_S
  assert watchdog.Watchdog(timeout_s=42.0, startup_s=10.0, where="").timeout() == 42.0


def test_account_charges_each_iteration_once(monkeypatch, tmp_path):
  clock = _Clock()
  monkeypatch.setattr(goodput.time, "perf_counter", clock)
  account = goodput.TimeAccount()
  with account.timed("startup"):
    clock.now += 5.0
  account.replay_until = 3  # an earlier invocation logged steps up to 3
  account.start_steps()
  for step in (3, 4, 5):  # resumed from checkpoint 2
    with account.timed("data_wait"):
      clock.now += 0.5
    clock.now += 10.0 if step == 3 else 2.0  # the first iteration compiles
    with account.timed("checkpoint"):
      clock.now += 1.0
    account.step_done(step)
  summary = account.summary()
  assert summary["compile_s"] == 10.0 and summary["productive_step_s"] == 4.0
  assert summary["recomputed_step_s"] == 0.0  # step 3 was the compile iteration
  assert summary["recomputed_steps"] == 1 and summary["productive_steps"] == 2
  assert summary["data_wait_s"] == 1.5 and summary["checkpoint_s"] == 3.0
  assert summary["wall_s"] == 5.0 + 1.5 + 14.0 + 3.0
  assert summary["goodput"] == pytest.approx(4.0 / 23.5)
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("\n".join(json.dumps({"step": s}) for s in (1, 2, 3)) + '\n{"step": 4, "lo')
  assert goodput.last_logged_step(str(metrics)) == 3  # a line cut by a kill is ignored
  assert goodput.last_logged_step(str(tmp_path / "none.jsonl")) == 0
