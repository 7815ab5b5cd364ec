"""Simulated CPU devices: n host devices for sharded code on one machine (the tests, the demo,
the benchmarks and the memory estimate's --xla).

XLA reads XLA_FLAGS once, when JAX initializes its backends, so `simulate` must run before that;
this module imports no JAX for that reason. GPU and TPU backends ignore the flag.
"""

import os
import re

FLAG = "--xla_force_host_platform_device_count"


def xla_flags(n: int, flags: str = "") -> str:
  """`flags` (an XLA_FLAGS value) with the host device count set to `n`, replacing any count
  it already sets."""
  rest = re.sub(rf"{FLAG}=\S*", "", flags).split()
  return " ".join(rest + [f"{FLAG}={n}"])


def simulate(n: int, *, keep_count: bool = False, cpu: bool = False) -> None:
  """Sets XLA_FLAGS in this process's environment for `n` host devices.

  keep_count: a device count XLA_FLAGS already sets wins (a command that lets the caller choose
  its own count). cpu: also JAX_PLATFORMS=cpu unless the environment sets a platform.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if not (keep_count and FLAG in flags):
    os.environ["XLA_FLAGS"] = xla_flags(n, flags)
  if cpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
