"""Flax NNX Llama-architecture models (Llama, Mistral, Qwen2, Qwen3): config, RoPE scaling,
attention reference, layers, presets."""
