"""Stage 2: chat SFT of the stage-1 Qwen3-8B (1M) on short (< 8K) chats, LR 5e-6.

The recipe of llama31_8b_stage2_sft.py with Qwen3's own chat format: data.chat.template "qwen3",
ChatML without a default system prompt whose final assistant turn carries a `<think>...</think>`
block (empty unless the reply holds its reasoning as `<think>...</think>`); loss on assistant
tokens only, think block included. The RoPE scaling stays that of the stage-1 checkpoint.

  python -m ultralong_jax.train --config=configs/qwen3_stage2_sft.py --workdir=runs/qwen3_stage2 \
      --config.init.path=runs/qwen3_1m/final --config.data.chat_files='/data/sft/*.jsonl' \
      --config.data.tokenizer=/models/Qwen3-8B/tokenizer.json
"""

from ultralong_jax.training.config import base_config


def get_config():
  c = base_config(stage=2)
  c.model.preset = "qwen3_8b"
  c.model.ultralong = ""  # keep the checkpoint's (stage 1's) RoPE
  c.init.mode, c.init.path = "checkpoint", ""  # set --config.init.path=<stage-1 workdir>/final
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 1, -1, 1, 8
  c.data.seq_len, c.data.global_batch_size = 8192, 32
  c.data.max_example_len = 8192
  c.data.vocab_size = 151936
  c.data.chat.template = "qwen3"
  c.model.remat_policy = "dots_no_batch"
  c.train.steps = 600
  c.optim.warmup_steps = 20
  c.checkpoint.every_steps = 100
  return c
