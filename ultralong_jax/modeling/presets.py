"""Model presets: Llama-3.1-8B and -70B (and their UltraLong 1M/2M/4M RoPE settings), Llama-3.2-1B,
tiny.

Shapes are those of the published Hugging Face config.json files; `get_preset(name)` returns a
LlamaConfig, and keyword overrides change numerics (dtype, remat) without a new preset.

Other families' 7B-class bases (Qwen2.5-7B, Qwen3-8B, Mistral-7B v0.3, Llama-2-7B) are presets at
their native context and, as `<name>_1m`, extended to 1M by `extended`.
"""

from __future__ import annotations

from typing import Callable

from ultralong_jax.modeling import rope
from ultralong_jax.modeling.config import LlamaConfig

_LLAMA3_EOS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>

# Llama 3.1's own 8K -> 128K extension; UltraLong replaces it with factor 128/256/512.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# The paper's target lengths (tokens): the `_1m/_2m/_4m` presets, model.ultralong in training
# configs and `convert --ultralong`. For Llama 3.x the RoPE factor is the length over the 8K
# original context (128 / 256 / 512).
ULTRALONG_LENGTHS = {"1m": 1 << 20, "2m": 1 << 21, "4m": 1 << 22}


def ultralong_length(length: str) -> int:
  """Tokens of an UltraLong length name ("1m" | "2m" | "4m")."""
  if length not in ULTRALONG_LENGTHS:
    raise ValueError(f"UltraLong length {length!r}: use one of {sorted(ULTRALONG_LENGTHS)}.")
  return ULTRALONG_LENGTHS[length]


def _preset(doc: str, **fields) -> Callable[..., LlamaConfig]:
  """A preset: `fields` (a published config.json's shape) with keyword overrides on top."""
  def make(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**fields, **overrides})
  make.__doc__ = doc
  return make


llama31_8b = _preset(
    "Llama-3.1-8B(-Instruct): 128K context by Llama 3.1's own llama3 RoPE (factor 8 over 8K).",
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=_LLAMA3_EOS)


llama31_70b = _preset(
    "Llama-3.1-70B(-Instruct): the 8B's RoPE and vocabulary at 80 layers of width 8192.",
    vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
    num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=_LLAMA3_EOS)


llama32_1b = _preset(
    "Llama-3.2-1B(-Instruct): tied embeddings, llama3 RoPE factor 32.",
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
    num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={**LLAMA31_ROPE, "factor": 32.0}, max_position_embeddings=131072,
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=_LLAMA3_EOS)


def ultralong(base: LlamaConfig, length: str) -> LlamaConfig:
  """`base` with the paper's RoPE for 1M / 2M / 4M tokens (factor 128 / 256 / 512 over 8K)."""
  target = ultralong_length(length)
  original = LLAMA31_ROPE["original_max_position_embeddings"]
  return base.replace(rope_scaling=rope.ultralong_rope_scaling(target // original),
                      max_position_embeddings=target)


qwen25_7b = _preset(
    "Qwen2.5-7B-Instruct: q/k/v biases, rope_theta 1e6, 32K native context.",
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
    num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645)


qwen3_8b = _preset(
    "Qwen3-8B: q/k RMSNorm, no biases, 32K native (config.json says 40960 = 32K + 8K output).",
    model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
    num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645)


mistral_7b = _preset(
    "Mistral-7B-Instruct-v0.3: Llama layout, rope_theta 1e6, 32K context, no sliding window.",
    model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2)


llama2_7b = _preset(
    "Llama-2-7B-chat: rope_theta 1e4, no GQA, 4K context.",
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2)


def extended(base: LlamaConfig, length: str, native: int | None = None) -> LlamaConfig:
  """`base` extended to 1M / 2M / 4M tokens by `rope.long_context_rope_scaling` (llama3 by parts
  for Llama 3.x, yarn α=1 β=4 otherwise); `native` overrides the context the factor is over."""
  target = ultralong_length(length)
  scaling = rope.long_context_rope_scaling(base.rope_scaling, native or base.max_position_embeddings,
                                           target)
  return base.replace(rope_scaling=scaling, max_position_embeddings=target)


tiny = _preset(
    "A few-hundred-K-parameter Llama for tests and the CPU demo (GQA 2, head_dim != D/N).",
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2)


PRESETS = {
    "llama31_8b": llama31_8b,
    "llama31_8b_1m": lambda **kw: ultralong(llama31_8b(**kw), "1m"),
    "llama31_8b_2m": lambda **kw: ultralong(llama31_8b(**kw), "2m"),
    "llama31_8b_4m": lambda **kw: ultralong(llama31_8b(**kw), "4m"),
    "llama31_70b": llama31_70b,
    "llama31_70b_1m": lambda **kw: ultralong(llama31_70b(**kw), "1m"),
    "llama31_70b_2m": lambda **kw: ultralong(llama31_70b(**kw), "2m"),
    "llama31_70b_4m": lambda **kw: ultralong(llama31_70b(**kw), "4m"),
    "llama32_1b": llama32_1b,
    "llama32_1b_1m": lambda **kw: ultralong(llama32_1b(**kw), "1m"),
    "qwen25_7b": qwen25_7b,
    "qwen25_7b_1m": lambda **kw: extended(qwen25_7b(**kw), "1m"),
    "qwen3_8b": qwen3_8b,
    "qwen3_8b_1m": lambda **kw: extended(qwen3_8b(**kw), "1m", native=32768),
    "mistral_7b": mistral_7b,
    "mistral_7b_1m": lambda **kw: extended(mistral_7b(**kw), "1m"),
    "llama2_7b": llama2_7b,
    "llama2_7b_1m": lambda **kw: extended(llama2_7b(**kw), "1m"),
    "tiny": tiny,
}


def get_preset(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    raise ValueError(f"model preset {name!r} is unknown; use one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)
