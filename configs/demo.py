"""The embedded demo's configs, `get_config("base" | "stage1" | "stage2")`: defined in
ultralong_jax/configs/demo.py (inside the package, so the demo runs from an installed wheel).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m ultralong_jax.train \
      --config=configs/demo.py:stage1 --workdir=runs/demo/stage1
"""

from ultralong_jax.configs.demo import BASE_LEN, CORPUS, DATA, LONG_LEN, MODEL, get_config

__all__ = ["BASE_LEN", "CORPUS", "DATA", "LONG_LEN", "MODEL", "get_config"]
