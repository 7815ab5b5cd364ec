"""AdamW with warmup + constant / cosine / linear / wsd decay, global-norm clipping (optax).

Paper (arXiv 2504.06214, Sec. 4.1): Adam, LR 3e-5 for stage 1 and 5e-6 for stage 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ultralong_jax.training.run_config import OptimConfig

SCHEDULES = ("constant", "cosine", "linear", "wsd")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup over `cfg.warmup_steps` to `cfg.learning_rate`, then `cfg.schedule` down to
  `cfg.learning_rate * cfg.final_lr_fraction` at `total_steps`.

  `wsd` (warmup-stable-decay): the peak held, then a linear cooldown over the last
  `cfg.cooldown_steps` steps: a constant rate's progress until the end, and weights that settle
  instead of one noisy iterate of a constant rate. (On the demo's stage 1 a 40-step cooldown
  scored lower than the constant rate; docs/demo.md.)"""
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  warm = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup, 1))
  decay_steps = max(total_steps - warmup, 1)
  end = peak * cfg.final_lr_fraction
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_fraction)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif cfg.schedule == "wsd":
    stable = max(total_steps - warmup - cfg.cooldown_steps, 0)
    after = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, end, cfg.cooldown_steps)],
        [stable])
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}; use one of {SCHEDULES}.")
  if warmup == 0:
    return after
  return optax.join_schedules([warm, after], [warmup])


def _decay_mask(params):
  """True where weight decay applies: matrices, not norm scales or biases (Llama practice).

  Decided by name, not rank: stacked norms [L, D] are 2-D too."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name.endswith("norm") or name in _BIASES)
  return jax.tree_util.tree_map_with_path(decays, params)


_BIASES = {"bq", "bk", "bv", "bo", "b_gate", "b_up", "b_down"}


def make_optimizer(cfg: OptimConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain for the optim section; returns (transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  # bf16 optimizer state stores Adam's first moment in bf16 (optax mu_dtype); the second moment
  # stays fp32, whose squared-gradient range bf16's 8-bit mantissa handles poorly.
  mu_dtype = jnp.bfloat16 if cfg.state_dtype == "bfloat16" else None
  chain = []
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mu_dtype=mu_dtype,
                           mask=_decay_mask))
  return optax.chain(*chain), schedule
