"""Stage 1: Llama-3.1-8B-Instruct at 1M, 2M or 4M tokens (arXiv 2504.06214, Sec. 3-4).

`get_config("1m" | "2m" | "4m")`, default 1m. ~1B tokens per run at LR 3e-5, global batch 2, TP 8:
  1m: 1,048,576 tokens x 480 steps, llama3 RoPE factor 128, CP 4 (64 H100s -> 2 replicas);
  2m: 2,097,152 tokens x 240 steps, factor 256, CP 8 (between the paper's CP 4 and 16);
  4m: 4,194,304 tokens x 150 steps, factor 512, CP 16 (the paper's 4M run: 256 H100s = 2 replicas).
Data parallelism takes the remaining devices (one row per replica).

  python -m ultralong_jax.train --config=configs/llama31_8b_stage1.py:1m --workdir=runs/stage1_1m \
      --config.init.path=/models/Llama-3.1-8B-Instruct --config.data.domains.books.path=/data/books_tok
"""

import ml_collections

from ultralong_jax.training.config import base_config

LENGTHS = {"1m": (1 << 20, 480, 4), "2m": (1 << 21, 240, 8), "4m": (1 << 22, 150, 16)}


def get_config(length: str = "1m") -> ml_collections.ConfigDict:
  if length not in LENGTHS:
    raise ValueError(f"configs/llama31_8b_stage1.py:{length}: use one of {', '.join(LENGTHS)}.")
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
