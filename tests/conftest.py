"""Test setup: 8 simulated CPU devices for sharded code, float32 matmuls at full precision.

XLA_FLAGS must be set before JAX is imported anywhere, so this runs at collection time.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# The parity tests compare float32 against PyTorch float32; default TPU/GPU-style reduced
# matmul precision would hide real bugs behind tolerance.
jax.config.update("jax_default_matmul_precision", "highest")
