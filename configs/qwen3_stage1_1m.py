"""Stage 1 at 1M tokens for Qwen3-8B (model_type qwen3: q/k RMSNorm, head_dim 128).

The paper's recipe (LR 3e-5, 2 x 1M tokens per step, ~1B tokens) with yarn: Qwen3 is pretrained
at 32K (its config.json's 40960 adds 8K of output room; Qwen's own yarn recipe is
original_max_position_embeddings 32768), so factor 1M / 32K = 32, ramp α=1 (beta_slow),
β=4 (beta_fast), attention temperature 0.1·ln 32 + 1. 32 query / 8 KV heads: TP 8 x CP 4.

  python -m ultralong_jax.train --config=configs/qwen3_stage1_1m.py --workdir=runs/qwen3_1m \
      --config.init.path=/models/Qwen3-8B --config.data.domains.books.path=/data/books_tok
"""

import json

import ml_collections

from ultralong_jax.modeling import rope
from ultralong_jax.training.config import base_config

NATIVE_CONTEXT = 32768


def get_config() -> ml_collections.ConfigDict:
  c = base_config(stage=1)
  c.model.preset = "qwen3_8b"
  c.model.ultralong = ""
  c.model.rope_scaling_json = json.dumps(
      rope.long_context_rope_scaling(None, NATIVE_CONTEXT, 1 << 20))
  c.model.remat_policy = "full"
  c.init.mode, c.init.path = "hf", ""  # set --config.init.path=<Qwen3-8B dir>
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = -1, 1, 4, 8
  c.data.seq_len, c.data.global_batch_size = 1 << 20, 2
  c.data.vocab_size = 151936
  c.data.separator_id = 151643  # <|endoftext|>
  c.data.domains = ml_collections.ConfigDict({"books": {"path": "", "weight": 1.0}})
  c.train.steps = 480
  c.checkpoint.every_steps = 25
  return c
