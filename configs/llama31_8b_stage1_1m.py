"""Stage 1 at 1M tokens: Llama-3.1-8B-Instruct, llama3 RoPE factor 128 (arXiv 2504.06214, Sec. 3-4).

~1B tokens: global batch 2 x 1,048,576 tokens x 480 steps. LR 3e-5. TP 8 x CP 4 per replica,
data = the rest (64 H100s -> 2 replicas, one row each).

  python -m ultralong_jax.train --config=configs/llama31_8b_stage1_1m.py --workdir=runs/stage1_1m \
      --config.init.path=/models/Llama-3.1-8B-Instruct --config.data.domains.books.path=/data/books_tok
"""

import ml_collections

from ultralong_jax.training.config import base_config

LENGTHS = {"1m": (1 << 20, 480, 4), "2m": (1 << 21, 240, 8), "4m": (1 << 22, 150, 16)}


def stage1_8b(length: str) -> ml_collections.ConfigDict:
  seq_len, steps, cp = LENGTHS[length]
  c = base_config(stage=1)
  c.model.preset = "llama31_8b"
  c.model.ultralong = length
  c.model.remat_policy = "full"  # at 1M+ tokens activations, not FLOPs, are the limit
  c.init.mode, c.init.path = "hf", ""  # set --config.init.path=<Llama-3.1-8B-Instruct dir>
  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = -1, 1, cp, 8
  c.data.seq_len, c.data.global_batch_size = seq_len, 2
  c.data.domains = ml_collections.ConfigDict(
      {"books": {"path": "", "weight": 1.0}})  # set --config.data.domains.books.path
  c.train.steps = steps
  c.checkpoint.every_steps = 25
  return c


def get_config():
  return stage1_8b("1m")
