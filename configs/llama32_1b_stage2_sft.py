"""Stage 2 SFT for the Llama-3.2-1B stage-1 model on one 8-GPU node (FSDP 8), LR 5e-6."""

from ultralong_jax.training.config import base_config


def get_config():
  c = base_config(stage=2)
  c.model.preset = "llama32_1b"
  c.model.ultralong = ""
  c.init.mode, c.init.path = "checkpoint", ""  # set --config.init.path=<stage-1 workdir>/final
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 1, 8, 1, 1
  c.data.seq_len, c.data.global_batch_size = 8192, 32
  c.data.max_example_len = 8192
  # No tensor parallelism: each device holds all 32 heads of its 4 rows. Two microbatches of two
  # rows and dots_no_batch plan at 39 GiB per device (chunked attention); all 4 rows at once at
  # 73 (python -m ultralong_jax.estimate_memory --config=<this> --devices=8 --xla).
  c.model.remat_policy = "dots_no_batch"
  c.train.microbatches = 2
  c.train.steps = 600
  c.optim.warmup_steps = 20
  c.checkpoint.every_steps = 100
  return c
