"""ultralong-jax: Llama-3.1 from 128K to 1M/2M/4M tokens of context (UltraLong recipe) in JAX/Flax.

Public entry points: `from_pretrained`, `save_pretrained` (Hugging Face checkpoints in and out),
`python -m ultralong_jax.convert`, `python -m ultralong_jax.demo`.
"""

__version__ = "0.1.0"


def from_pretrained(*args, **kwargs):
  """See `ultralong_jax.convert.api.from_pretrained` (imported lazily: importing the package
  must not initialize JAX backends before e.g. XLA_FLAGS or jax.distributed are set up)."""
  from ultralong_jax.convert.api import from_pretrained as impl
  return impl(*args, **kwargs)


def save_pretrained(*args, **kwargs):
  """See `ultralong_jax.convert.api.save_pretrained`."""
  from ultralong_jax.convert.api import save_pretrained as impl
  return impl(*args, **kwargs)
