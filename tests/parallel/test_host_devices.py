"""parallel/host_devices: XLA_FLAGS for simulated devices; glibc malloc settings for XLA on CPU."""

import os
import platform
import subprocess
import sys

import pytest

from ultralong_jax.parallel import host_devices


def test_xla_flags_replaces_the_device_count_and_keeps_other_flags():
  flags = host_devices.xla_flags(4, "--xla_foo=1 --xla_force_host_platform_device_count=8")
  assert flags.split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_is_accepted_by_glibc_and_jax_runs_after_it():
  # A fresh process (the settings are process-wide); True: mallopt accepted every value.
  code = ("from ultralong_jax.parallel import host_devices as h; ok = h.keep_freed_memory(); "
          "import jax.numpy as jnp; x = jnp.ones((1024, 1024)); "
          "print(ok, float((x @ x).sum()))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split()
  assert out == ["True", str(float(1024 ** 3))]
