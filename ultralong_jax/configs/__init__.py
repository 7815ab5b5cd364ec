"""Configs that ship inside the package, so they load from an installed wheel: the demo's
(`ultralong_jax.configs.demo`). `configs/demo.py` at the repository root re-exports it for
`--config=configs/demo.py:stage1`."""
