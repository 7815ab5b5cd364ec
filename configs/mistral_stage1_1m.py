"""Stage 1 at 1M tokens for Mistral-7B-Instruct-v0.3 (model_type mistral, 32K context).

The paper's recipe (LR 3e-5, 2 x 1M tokens per step, ~1B tokens) with yarn, factor 1M / 32K = 32,
ramp α=1 (beta_slow), β=4 (beta_fast) (`model.ultralong = "1m"`). Only checkpoints without an
active sliding window load (v0.2 and later: `sliding_window: null`); v0.1's 4K window is refused.
32 query / 8 KV heads: TP 8 x CP 4.

  python -m ultralong_jax.train --config=configs/mistral_stage1_1m.py --workdir=runs/mistral_1m \
      --config.init.path=/models/Mistral-7B-Instruct-v0.3 --config.data.domains.books.path=/data/books_tok
"""

import ml_collections

from ultralong_jax.training.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config(stage=1)
  c.model.preset = "mistral_7b"
  c.model.ultralong = "1m"
  c.model.remat_policy = "full"
  c.init.mode, c.init.path = "hf", ""  # set --config.init.path=<Mistral-7B-Instruct-v0.3 dir>
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = -1, 1, 4, 8
  c.data.seq_len, c.data.global_batch_size = 1 << 20, 2
  c.data.vocab_size = 32768
  c.data.separator_id = 2  # </s>
  c.data.domains = ml_collections.ConfigDict({"books": {"path": "", "weight": 1.0}})
  c.train.steps = 480
  c.checkpoint.every_steps = 25
  return c
