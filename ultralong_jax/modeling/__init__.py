"""Flax NNX Llama: config, RoPE scaling, attention reference, layers, presets."""
