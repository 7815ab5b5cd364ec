"""Hugging Face safetensors <-> project checkpoints (API in `api`, CLI in `__main__`)."""
