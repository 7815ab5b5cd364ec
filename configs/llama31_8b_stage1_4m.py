"""Stage 1 at 4M tokens: Llama-3.1-8B-Instruct, llama3 RoPE factor 512 (arXiv 2504.06214).

~1B tokens: global batch 2 x 4,194,304 tokens x 150 steps (the paper's 4M run). LR 3e-5.
TP 8 x CP 16 (the paper's 256 H100s = 2 replicas).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "stage1_1m", os.path.join(os.path.dirname(__file__), "llama31_8b_stage1_1m.py"))
_stage1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage1)


def get_config():
  return _stage1.stage1_8b("4m")
