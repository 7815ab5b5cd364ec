"""Stage 2: chat SFT of the stage-1 Qwen2.5-7B-Instruct (1M) on short (< 8K) chats, LR 5e-6.

The recipe of llama31_8b_stage2_sft.py with the base model's own chat format: data.chat.template
"chatml": ChatML (`<|im_start|>role ... <|im_end|>`), Qwen2.5's official template with its
default system prompt; loss on assistant tokens only.
The RoPE scaling stays that of the stage-1 checkpoint.

  python -m ultralong_jax.train --config=configs/qwen2_stage2_sft.py --workdir=runs/qwen2_stage2 \
      --config.init.path=runs/qwen2_1m/final --config.data.chat_files='/data/sft/*.jsonl' \
      --config.data.tokenizer=/models/Qwen2.5-7B-Instruct/tokenizer.json
"""

from ultralong_jax.training.config import base_config


def get_config():
  c = base_config(stage=2)
  c.model.preset = "qwen25_7b"
  c.model.ultralong = ""  # keep the checkpoint's (stage 1's) RoPE
  c.init.mode, c.init.path = "checkpoint", ""  # set --config.init.path=<stage-1 workdir>/final
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 1, -1, 1, 4
  c.data.seq_len, c.data.global_batch_size = 8192, 32
  c.data.max_example_len = 8192
  c.data.vocab_size = 152064
  c.data.chat.template = "chatml"
  c.model.remat_policy = "dots_no_batch"
  c.train.steps = 600
  c.optim.warmup_steps = 20
  c.checkpoint.every_steps = 100
  return c
