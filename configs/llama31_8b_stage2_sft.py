"""Stage 2: chat SFT of the stage-1 model on short (< 8K) examples, LR 5e-6 (arXiv 2504.06214).

The paper tunes on ~100K general/math/code chats. Rows of 8,192 tokens packed first-fit, 32 rows
per step (our choice; the paper does not give its SFT batch): ~150M tokens -> ~600 steps, 1 epoch.
The RoPE scaling stays that of the stage-1 checkpoint.

  python -m ultralong_jax.train --config=configs/llama31_8b_stage2_sft.py --workdir=runs/stage2 \
      --config.init.path=runs/stage1_1m/final --config.data.chat_files='/data/sft/*.jsonl' \
      --config.data.tokenizer=/models/Llama-3.1-8B-Instruct/tokenizer.json
"""

from ultralong_jax.training.config import base_config


def get_config():
  c = base_config(stage=2)
  c.model.preset = "llama31_8b"
  c.model.ultralong = ""  # keep the checkpoint's (stage 1's) RoPE
  c.init.mode, c.init.path = "checkpoint", ""  # set --config.init.path=<stage-1 workdir>/final
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 1, -1, 1, 8
  c.data.seq_len, c.data.global_batch_size = 8192, 32
  c.data.max_example_len = 8192
  # "dots" would keep every layer's [8K, 8K] scores under plain attention at mesh.sequence == 1
  # (XLA's plan: 167 GiB per device on 64 devices); with the chunked kernel there the plan is
  # 28.9 GiB, and dots_no_batch keeps only the projections' outputs whatever the kernel
  # (python -m ultralong_jax.estimate_memory --config=<this> --devices=64 --xla).
  c.model.remat_policy = "dots_no_batch"
  c.train.steps = 600
  c.optim.warmup_steps = 20
  c.checkpoint.every_steps = 100
  return c
