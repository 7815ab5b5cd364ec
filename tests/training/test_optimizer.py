"""The learning-rate schedules, the warmup-stable-decay one against its definition, and the
config checks of its cooldown."""

import os

import numpy as np
import pytest

from ultralong_jax.training import config as config_lib, optimizer, run_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _optim(**overrides) -> run_config.OptimConfig:
  c = config_lib.base_config(1)
  c.optim.update(overrides)
  return run_config.OptimConfig.of(c)


def test_wsd_warms_up_holds_the_peak_then_cools_down_linearly():
  cfg = _optim(learning_rate=1e-3, warmup_steps=4, schedule="wsd", cooldown_steps=10,
               final_lr_fraction=0.1)
  schedule = optimizer.learning_rate_schedule(cfg, total_steps=50)
  lr = np.array([float(schedule(s)) for s in range(51)])
  # warmup: linear from peak / warmup_steps (step 0) to the peak at step 4
  np.testing.assert_allclose(lr[:5], np.linspace(2.5e-4, 1e-3, 5), rtol=1e-6)
  np.testing.assert_allclose(lr[4:41], 1e-3, rtol=1e-6)  # stable until 10 steps before the end
  # then linearly from the peak to peak * final_lr_fraction at step 50
  np.testing.assert_allclose(lr[40:], np.linspace(1e-3, 1e-4, 11), rtol=1e-5)


def test_wsd_without_warmup_and_the_other_schedules_end_where_asked():
  schedule = optimizer.learning_rate_schedule(
      _optim(learning_rate=2e-3, schedule="wsd", cooldown_steps=5), total_steps=20)
  assert [float(schedule(s)) for s in (0, 14, 15, 20)] == pytest.approx([2e-3, 2e-3, 2e-3, 0.0])
  assert float(schedule(17)) == pytest.approx(2e-3 * 3 / 5)
  for name in ("cosine", "linear"):
    end = optimizer.learning_rate_schedule(
        _optim(learning_rate=1e-3, schedule=name, final_lr_fraction=0.5), total_steps=30)(30)
    assert float(end) == pytest.approx(5e-4)


@pytest.mark.parametrize("schedule, cooldown, match", [
    ("wsd", 0, r"optim\.cooldown_steps=0: schedule wsd .* use 1\.\.1500"),
    ("wsd", 1501, r"optim\.cooldown_steps=1501: .* use 1\.\.1500 \(train\.steps - "),
    ("constant", 100, r"optim\.cooldown_steps=100 applies to optim\.schedule=wsd only"),
])
def test_a_cooldown_that_does_not_fit_is_refused_naming_the_key(schedule, cooldown, match):
  c = config_lib.load_config_file(os.path.join(CONFIGS, "demo.py:base"))
  c.optim.warmup_steps, c.optim.schedule, c.optim.cooldown_steps = 0, schedule, cooldown
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c, num_devices=8)
  c.optim.schedule, c.optim.cooldown_steps = "wsd", 300
  assert config_lib.validate(c, num_devices=8).vocab_size == 512
