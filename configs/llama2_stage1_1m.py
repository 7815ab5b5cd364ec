"""Stage 1 at 1M tokens for Llama-2-7B-chat (model_type llama, 4K context, no GQA).

The paper names Llama-2-7B as a next base model. Llama 2 has plain RoPE (rope_theta 1e4), not
Llama 3's by-parts scaling, so the extension is yarn, factor 1M / 4K = 256, ramp α=1
(beta_slow), β=4 (beta_fast) (`model.ultralong = "1m"`). 32 query = 32 KV heads: TP 8 x CP 4;
without GQA its KV activations are 4x an 8-KV-head model's.

  python -m ultralong_jax.train --config=configs/llama2_stage1_1m.py --workdir=runs/llama2_1m \
      --config.init.path=/models/Llama-2-7b-chat-hf --config.data.domains.books.path=/data/books_tok
"""

import ml_collections

from ultralong_jax.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config(stage=1)
  c.model.preset = "llama2_7b"
  c.model.ultralong = "1m"
  c.model.remat_policy = "full"
  c.init.mode, c.init.path = "hf", ""  # set --config.init.path=<Llama-2-7b-chat-hf dir>
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = -1, 1, 4, 8
  c.data.seq_len, c.data.global_batch_size = 1 << 20, 2
  c.data.vocab_size = 32000
  c.data.separator_id = 2  # </s>
  c.data.domains = ml_collections.ConfigDict({"books": {"path": "", "weight": 1.0}})
  c.train.steps = 480
  c.checkpoint.every_steps = 25
  return c
