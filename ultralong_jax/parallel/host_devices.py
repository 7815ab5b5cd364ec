"""Simulated CPU devices: n host devices for sharded code on one machine (the tests, the demo,
the benchmarks and the memory estimate's --xla).

XLA reads XLA_FLAGS once, when JAX initializes its backends, so `simulate` must run before that;
this module imports no JAX for that reason. GPU and TPU backends ignore the flag.
"""

import ctypes
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


def keep_freed_memory() -> bool:
  """glibc's malloc: serve blocks up to 32 MiB from the heap (not mmap) and keep up to 1 GiB of
  freed heap instead of returning it to the OS at once. XLA's CPU runtime frees and reallocates
  its buffers every step; by default many are mapped and zero-filled afresh each time. On the
  demo's base model this cut page faults ~8x and step time 6-15% (docs/demo.md); results are
  unchanged. Blocks above 64 MiB allocated from threads are mmap-ed whatever the settings.
  Returns False (and changes nothing) where the C library has no mallopt (musl, macOS)."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
  return all(mallopt(option, value) == 1 for option, value in (
      (m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 256 << 20)))
