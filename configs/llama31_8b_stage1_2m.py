"""Stage 1 at 2M tokens: Llama-3.1-8B-Instruct, llama3 RoPE factor 256 (arXiv 2504.06214).

~1B tokens: global batch 2 x 2,097,152 tokens x 240 steps. LR 3e-5.
TP 8 x CP 8 (between the paper's CP 4 and 16).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "stage1_1m", os.path.join(os.path.dirname(__file__), "llama31_8b_stage1_1m.py"))
_stage1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage1)


def get_config():
  return _stage1.stage1_8b("2m")
