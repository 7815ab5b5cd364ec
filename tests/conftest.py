"""Test setup: 8 simulated CPU devices for sharded code, float32 matmuls at full precision.

XLA_FLAGS must be set before JAX is imported anywhere, so this runs at collection time.
"""

from ultralong_jax.parallel import host_devices  # imports no JAX

host_devices.simulate(8, cpu=True)

import jax  # noqa: E402

# The parity tests compare float32 against PyTorch float32; default TPU/GPU-style reduced
# matmul precision would hide real bugs behind tolerance.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture
def make_hf_llama(tmp_path):
  """Factory: a tiny random transformers LlamaForCausalLM saved (safetensors) under tmp_path.

  Returns (torch model in eval mode, directory). Eager attention: the plain reference.
  """
  import torch
  import transformers

  counter = iter(range(1000))

  def make(seed=0, **config_kwargs):
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=2048, rope_theta=10000.0)
    kwargs.update(config_kwargs)
    config = transformers.LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    # transformers initializes norms to 1 and biases to 0; randomize them so the parity tests
    # would notice a swapped or dropped norm/bias.
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith(".bias"):
          p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / f"hf_{next(counter)}"
    model.save_pretrained(out)
    return model, str(out)

  return make


# Tiny shapes per family, each with what sets it apart (see modeling/config.py FAMILIES).
HF_FAMILY_DEFAULTS = {
    # Llama-2-7B-like: rope_theta 1e4, no GQA.
    "llama": dict(num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=4096),
    # Mistral-7B-v0.3-like: head_dim independent of the width, no sliding window.
    "mistral": dict(head_dim=24, rope_theta=1000000.0, max_position_embeddings=32768,
                    sliding_window=None),
    # Qwen2.5-0.5B-like: q/k/v biases, rope_theta 1e6, tied embeddings, no sliding window.
    "qwen2": dict(rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
                  use_sliding_window=False, rms_norm_eps=1e-6),
    # Qwen3-like: q/k norms, head_dim independent of the width.
    "qwen3": dict(head_dim=24, rope_theta=1000000.0, max_position_embeddings=40960,
                  use_sliding_window=False, rms_norm_eps=1e-6),
}


@pytest.fixture
def make_hf_model(tmp_path):
  """Factory: a tiny random transformers model of `family` (llama, mistral, qwen2, qwen3) saved
  (safetensors) under tmp_path, norms and biases randomized. Returns (torch model, directory)."""
  import torch
  import transformers

  classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
  counter = iter(range(1000))

  def make(family, seed=0, **config_kwargs):
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    kwargs.update(HF_FAMILY_DEFAULTS[family])
    kwargs.update(config_kwargs)
    config_cls, model_cls = classes[family]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith(".bias"):
          p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / f"hf_{family}_{next(counter)}"
    model.save_pretrained(out)
    return model, str(out)

  return make


@pytest.fixture
def hf_logits():
  """Function: logits of a transformers model for numpy ids/positions, as float32 numpy."""
  import torch

  def run(model, input_ids, positions=None):
    with torch.no_grad():
      pos = None if positions is None else torch.as_tensor(positions)
      return model(torch.as_tensor(input_ids), position_ids=pos).logits.float().numpy()

  return run


@pytest.fixture(scope="session")
def attention_reference():
  """reference(causal, scale) -> jitted f(q, k, v, dout, segment_ids) = (out, (dq, dk, dv)) of the
  plain single-device attention: what every sharded/blocked attention is compared against."""
  import functools  # pylint: disable=import-outside-toplevel
  from ultralong_jax.modeling.attention import dot_product_attention  # pylint: disable=import-outside-toplevel

  @functools.cache
  def reference(causal: bool, scale: float):
    def f(q, k, v, dout, seg):
      attend = lambda q, k, v: dot_product_attention(q, k, v, segment_ids=seg, causal=causal,
                                                     scale=scale)
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(dout)
    return jax.jit(f)

  return reference
