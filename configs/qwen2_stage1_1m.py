"""Stage 1 at 1M tokens for Qwen2.5-7B-Instruct (model_type qwen2, 32K native context).

The paper's recipe (LR 3e-5, 2 x 1M tokens per step, ~1B tokens) with the RoPE extension for a
model without llama3 scaling: yarn, factor 1M / 32K = 32, ramp α=1 (beta_slow), β=4 (beta_fast),
attention temperature 0.1·ln 32 + 1 (`model.ultralong = "1m"`, rope.long_context_rope_scaling).
Qwen2.5-7B has 28 query and 4 KV heads: tensor parallelism divides 4, so TP 4 x CP 8.

  python -m ultralong_jax.train --config=configs/qwen2_stage1_1m.py --workdir=runs/qwen2_1m \
      --config.init.path=/models/Qwen2.5-7B-Instruct --config.data.domains.books.path=/data/books_tok
"""

import ml_collections

from ultralong_jax.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config(stage=1)
  c.model.preset = "qwen25_7b"
  c.model.ultralong = "1m"
  c.model.remat_policy = "full"  # at 1M tokens activations, not FLOPs, are the limit
  c.init.mode, c.init.path = "hf", ""  # set --config.init.path=<Qwen2.5-7B-Instruct dir>
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = -1, 1, 8, 4
  c.data.seq_len, c.data.global_batch_size = 1 << 20, 2
  c.data.vocab_size = 152064
  c.data.separator_id = 151643  # <|endoftext|>, Qwen's document separator
  c.data.domains = ml_collections.ConfigDict(
      {"books": {"path": "", "weight": 1.0}})  # set --config.data.domains.books.path
  c.train.steps = 480
  c.checkpoint.every_steps = 25
  return c
