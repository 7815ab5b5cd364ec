"""Stage 1 at 1M tokens for Llama-3.2-1B-Instruct on one 8-GPU node: CP 8, no TP.

The single-node preset: the same recipe (llama3 factor 128, LR 3e-5, 2 x 1M tokens per step).
"""

import ml_collections

from ultralong_jax.training.config import base_config


def get_config():
  c = base_config(stage=1)
  c.model.preset = "llama32_1b"
  c.model.ultralong = "1m"
  c.model.remat_policy = "full"
  c.init.mode, c.init.path = "hf", ""  # set --config.init.path=<Llama-3.2-1B-Instruct dir>
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 1, 1, 8, 1
  c.data.seq_len, c.data.global_batch_size = 1 << 20, 2
  # The two 1M rows go through one at a time: both at once (262K tokens per device) plan at
  # 100 GiB per device in XLA; one row at a time at ~64 (python -m ultralong_jax.estimate_memory
  # --config=<this> --xla).
  c.train.microbatches = 2
  c.data.domains = ml_collections.ConfigDict({"books": {"path": "", "weight": 1.0}})
  c.train.steps = 480
  c.checkpoint.every_steps = 25
  return c
