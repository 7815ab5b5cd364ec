"""Will it fit? Per-device memory of a training config, estimated before launching.

  python -m ultralong_jax.estimate_memory --config=configs/llama31_8b_stage1.py:1m --devices=64
  python -m ultralong_jax.estimate_memory --config=configs/llama31_8b_stage1.py:4m --devices=256 \
      --device=v5p --suggest                # the meshes that fit, best first
  python -m ultralong_jax.estimate_memory --config=configs/demo.py:stage1 --devices=8 --xla
  python -m ultralong_jax.estimate_memory --recipes   # the mesh table of docs/training.md
  python -m ultralong_jax.estimate_memory --eval --preset=llama31_8b_1m --context=1048576 \
      --mesh=tensor=8 --device=h100   # evaluation: parameters, KV cache, prefill / decode sets
  python -m ultralong_jax.estimate_memory --eval --niah    # NIAH 1M/2M/4M: the smallest meshes

Prints the estimate by part (training/memory.py: parameters, optimizer, gradients, remat
checkpoints, one layer's working set, attention buffers, loss chunk) against the device's memory.
`--config.key=value` overrides work as in `ultralong_jax.train`. `--xla` also compiles the real
train step for abstract arrays on `--devices` simulated CPU devices and prints XLA's per-device
plan next to the estimate (minutes for an 8B model; nothing is allocated). Without a checkpoint
at init.path the model's shape comes from model.preset.

`--eval` estimates evaluation instead (evaluation/memory_plan.py: generation with the KV cache, every
prefill chunk split over `sequence`) for the model of `--config` or `--preset`, a prompt of
`--context` tokens and `--mesh` (or every sequence x tensor split of `--devices`); with `--xla` it
also compiles CachedModel's prefill and decode steps on simulated CPU devices (the parameters are
initialized on the host: small models only).
"""

from __future__ import annotations

import os
import re
import sys


def _xla_devices_from_argv(argv: list[str]) -> None:
  """--xla and --calibrate need --devices (8) simulated CPU devices, set before JAX initializes (the
  config file imports JAX when the flags are parsed)."""
  if "--xla" not in argv and "--calibrate" not in argv:
    return
  from ultralong_jax.parallel import host_devices  # pylint: disable=import-outside-toplevel
  devices = next((m.group(1) for a in argv for m in [re.match(r"--devices=(\d+)$", a)] if m), "8")
  host_devices.simulate(int(devices), keep_count=True, cpu=True)


_xla_devices_from_argv(sys.argv)

import math  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file")
_DEVICES = flags.DEFINE_integer("devices", None, "devices in the job (default: the mesh's "
                                "product when it has no -1)")
_DEVICE = flags.DEFINE_enum("device", "h100", ["h100", "h200", "a100", "v5p", "v6e", "v5e", "cpu"],
                            "accelerator: its memory and which attention kernel `auto` picks")
_SUGGEST = flags.DEFINE_boolean("suggest", False, "list the meshes that fit, best first")
_XLA = flags.DEFINE_boolean("xla", False, "also compile on simulated CPU devices; print XLA's plan")
_RECIPES = flags.DEFINE_boolean("recipes", False, "print the 1M/2M/4M mesh table (markdown)")
_EVAL = flags.DEFINE_boolean("eval", False, "estimate evaluation (prefill + decode with the KV "
                             "cache) instead of training")
_CALIBRATE = flags.DEFINE_boolean("calibrate", False, "with --eval: XLA's plans of the models the "
                                  "evaluation estimate is fitted to, next to it (8 CPU devices)")
_NIAH = flags.DEFINE_boolean("niah", False, "with --eval: the smallest meshes for NIAH at 1M/2M/4M "
                             "with Llama-3.1-8B (markdown)")
_PRESET = flags.DEFINE_string("preset", None, "with --eval: a model preset instead of --config")
_CONTEXT = flags.DEFINE_integer("context", None, "with --eval: prompt tokens (default: the config's "
                                "data.seq_len, or the preset's max_position_embeddings)")
_MESH = flags.DEFINE_string("mesh", None, "with --eval: e.g. sequence=4,tensor=2 (default: every "
                            "sequence x tensor split of --devices)")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 8192, "with --eval: prompt tokens per "
                                      "prefill step (the eval CLIs' --prefill-chunk)")
_KV_BLOCK = flags.DEFINE_integer("kv_block", 512, "with --eval: cache slots per attention block")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "with --eval: tokens decoded per prompt")
_BATCH = flags.DEFINE_integer("batch", 1, "with --eval: prompts at once")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "with --eval: parameter, "
                           "activation and cache dtype")

GiB = 2**30
K = 1024
PARTS = ("params", "optimizer", "batch", "gradients", "weight_temps", "checkpoints",
         "layer_working_set", "attention", "loss")


def _estimable(c):
  """A copy of the config that validates without a checkpoint: a missing init.path falls back to
  model.preset's shape (the data is not validated at all: validate(..., data=False))."""
  c = c.copy_and_resolve_references()
  if c.init.mode != "random" and not (c.init.path and os.path.exists(c.init.path)):
    c.init.mode = "random"
  return c


def report(est: dict, device: str) -> str:
  from ultralong_jax.training import memory  # pylint: disable=import-outside-toplevel
  capacity = memory.DEVICES[device][1] * GiB
  lines = [f"  {'part':<18} {'GiB/device':>10}"]
  lines += [f"  {p:<18} {est[p] / GiB:>10.2f}" for p in PARTS if est[p]]
  lines.append(f"  {'total':<18} {est['total'] / GiB:>10.2f}   (peak: the loss and the layers' "
               "backward do not overlap)")
  if capacity:
    verdict = ("fits" if est["total"] <= memory.USABLE * capacity else "does NOT fit")
    lines.append(f"  {device}: {capacity / GiB:.1f} GiB, {memory.USABLE:.0%} usable -> {verdict} "
                 f"({est['total'] / capacity:.0%} of the device)")
  return "\n".join(lines)


def xla_plan(model, shape) -> dict:
  """XLA's compiled per-device plan of this config's train step (training/compile_plan.py)."""
  from ultralong_jax.training import compile_plan  # pylint: disable=import-outside-toplevel
  setup = compile_plan.Setup(model=model, seq_len=shape.seq_len, mesh=tuple(shape.mesh.items()),
                             remat=shape.remat, kernel=compile_plan.KERNEL_OF_CLASS[shape.kernel],
                             batch=shape.global_batch,
                             loss_chunk=shape.loss_chunk, dtype=shape.dtype,
                             microbatches=shape.microbatches, chunk_size=shape.kernel_chunk)
  return compile_plan.plan(setup)


# The recipe table: (T, hardware, devices). H100 rows use the configs' layout (2 replicas as in
# the paper's global batch of 2, TP 8 inside a node, CP the rest); TPU rows the best mesh found.
RECIPES = [(length, hw, n) for length in ("1m", "2m", "4m")  # presets.ULTRALONG_LENGTHS
           for hw, n in (("h100", 64), ("h100", 128), ("h100", 256),
                         ("v5p", 64), ("v5p", 128), ("v5p", 256),
                         ("v6e", 64), ("v6e", 128), ("v6e", 256))]
_SLICE = {"v5p": lambda n: f"v5p-{2 * n}", "v6e": lambda n: f"v6e-{n}",
          "h100": lambda n: f"{n // 8} nodes × 8"}


def recipes() -> list[dict]:
  """The 8B stage-1 mesh table at 1M/2M/4M on 64/128/256 H100s and TPU v5p / v6e chips."""
  from ultralong_jax.modeling import presets  # pylint: disable=import-outside-toplevel
  from ultralong_jax.training import memory  # pylint: disable=import-outside-toplevel
  rows = []
  print("| T | hardware | devices | mesh | kernel | weights: params+Adam+grads+copies | "
        "checkpoints | working set "
        "+ attention | total GiB/device | of HBM |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for length, hw, n in RECIPES:
    t = presets.ULTRALONG_LENGTHS[length]
    platform = memory.DEVICES[hw][0]
    model = presets.get_preset(f"llama31_8b_{length}", remat_policy="full")
    base = memory.StepShape(model=model, mesh={"data": 2, "tensor": 8, "sequence": -1},
                            num_devices=n, seq_len=t, global_batch=2,
                            kernel="flash" if platform == "gpu" else "chunked")
    if hw == "h100":  # the configs' mesh
      mesh, est = memory.resolve_axis_sizes(base.mesh, n), memory.estimate(base)
      if est["total"] > memory.USABLE * memory.DEVICES[hw][1] * GiB:
        mesh, est = memory.suggest(base, hw)[0]
    else:
      mesh, est = memory.suggest(base, hw)[0]
    frac = est["total"] / (memory.DEVICES[hw][1] * GiB)
    state = est["params"] + est["optimizer"] + est["gradients"] + est["weight_temps"]
    phase = max(est["layer_working_set"] + est["attention"], est["loss"])
    mark = "" if frac <= memory.USABLE else " ✗"
    print(f"| {t // (1024 * K)}M | {hw} ({_SLICE[hw](n)}) | {n} | {memory.mesh_label(mesh)} | "
          f"{base.kernel} | {state / GiB:.1f} | {est['checkpoints'] / GiB:.1f} | "
          f"{phase / GiB:.1f} | **{est['total'] / GiB:.1f}** | {frac:.0%}{mark} |", flush=True)
    rows.append({"seq_len": t, "hardware": hw, "devices": n, "mesh": mesh, "estimate": est})
  return rows


def main(argv) -> int:
  del argv
  from ultralong_jax.training import memory  # pylint: disable=import-outside-toplevel
  if _EVAL.value or _NIAH.value:
    return eval_main()
  if _RECIPES.value:
    recipes()
    return 0
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (or --recipes).")
  from ultralong_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from ultralong_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  c = _estimable(_CONFIG.value)
  n = _DEVICES.value
  if n is None:
    sizes = [c.mesh[a] for a in mesh_lib.MESH_AXES]
    if -1 in sizes:
      raise app.UsageError("the config's mesh has a -1 axis: pass --devices=N.")
    n = math.prod(sizes)
  try:
    run = config_lib.resolve(c, num_devices=n, data=False)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  model = run.model
  shape = memory.shape_from_config(run, memory.DEVICES[_DEVICE.value][0])
  print(f"{model.num_params / 1e9:.2f}B parameters, T={shape.seq_len:,}, global batch "
        f"{shape.global_batch}, {n} devices, mesh {memory.mesh_label(shape.mesh)}, remat "
        f"{shape.remat}, attention kernel {shape.kernel} ({_DEVICE.value})")
  est = memory.estimate(shape)
  print(report(est, _DEVICE.value))
  if _SUGGEST.value:
    capacity = memory.DEVICES[_DEVICE.value][1] * GiB
    print(f"\n  meshes for {n} devices, best first (see training/memory.suggest):")
    for mesh, e in memory.suggest(shape, _DEVICE.value)[:10]:
      ok = "fits" if e["total"] <= memory.USABLE * capacity else "no"
      print(f"  {memory.mesh_label(mesh):<24} {e['total'] / GiB:8.1f} GiB  {ok}")
  if _XLA.value:
    r = xla_plan(model, shape)
    xla = r["peak_estimate_bytes"]
    print(f"\n  XLA's compiled plan on {r['devices']} simulated {r['platform']} devices: "
          f"{xla / GiB:.2f} GiB/device (estimate {est['total'] / GiB:.2f}, "
          f"{est['total'] / xla - 1:+.0%}; compile {r['compile_s']:.0f} s)")
  return 0


def eval_main() -> int:
  """--eval: evaluation memory per device (evaluation/memory_plan.py)."""
  from ultralong_jax.evaluation import memory_plan  # pylint: disable=import-outside-toplevel
  from ultralong_jax.modeling import presets  # pylint: disable=import-outside-toplevel
  if _NIAH.value:
    memory_plan.niah_table()
    return 0
  if _CALIBRATE.value:
    memory_plan.calibrate()
    return 0
  try:
    if (_CONFIG.value is None) == (_PRESET.value is None):
      raise ValueError("--eval needs one of --config or --preset.")
    if _CONFIG.value is not None:
      from ultralong_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
      c = _estimable(_CONFIG.value)
      model = config_lib.model_config(c)
      context = c.data.seq_len
    else:
      model = presets.get_preset(_PRESET.value)
      context = model.max_position_embeddings
    model = model.replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
    context = _CONTEXT.value or context
    if _MESH.value:
      meshes = [memory_plan.parse_mesh_sizes(_MESH.value)]
      if _DEVICES.value and math.prod(meshes[0].values()) > _DEVICES.value:
        raise ValueError(f"--mesh={_MESH.value!r} needs {math.prod(meshes[0].values())} devices, "
                         f"more than --devices={_DEVICES.value}.")
    elif _DEVICES.value and _XLA.value:  # sequence = 1, 2, 4, ... up to --devices
      meshes = [memory_plan.parse_mesh_sizes(f"sequence={1 << k}")
                for k in range(_DEVICES.value.bit_length()) if (1 << k) <= _DEVICES.value]
    elif _DEVICES.value:
      meshes = [memory_plan.parse_mesh_sizes(f"sequence={m['sequence']},tensor={m['tensor']}")
                for m in memory_plan.candidate_meshes(model, _DEVICES.value)
                if m["sequence"] * m["tensor"] == _DEVICES.value]
    else:
      raise ValueError("--eval needs --mesh=AXIS=SIZE,... or --devices=N.")
    shapes = [memory_plan.EvalShape(model=model, mesh=mesh, context=context,
                                    new_tokens=_NEW_TOKENS.value, batch=_BATCH.value,
                                    prefill_chunk=_PREFILL_CHUNK.value, kv_block=_KV_BLOCK.value,
                                    dtype=_DTYPE.value) for mesh in meshes]
    for shape in shapes:
      memory_plan.check_shape(shape)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{model.num_params / 1e6:,.1f}M parameters ({_DTYPE.value}), context {context:,}, batch "
        f"{_BATCH.value}, {_NEW_TOKENS.value} new tokens, prefill chunk "
        f"{min(_PREFILL_CHUNK.value, context):,}")
  if _XLA.value:
    if model.num_params * 4 > 4 * GiB:
      print(f"error: --xla with --eval initializes the parameters on the host: "
            f"{model.num_params / 1e9:.1f}B is too many; use a small --preset.", file=sys.stderr)
      return 2
    memory_plan.xla_table(shapes)
    return 0
  for shape in shapes:
    print(f"\nmesh {memory_plan.mesh_label(shape.mesh)} ({_DEVICE.value})")
    print(memory_plan.report(shape, _DEVICE.value))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
