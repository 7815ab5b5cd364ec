"""Per-device memory of the real train step at 128K-4M tokens, from XLA's compiled analysis (CPU).

  python -m ultralong_jax.bench.memory                       # the planned meshes, 128 CPU devices
  python -m ultralong_jax.bench.memory --only 8b --lengths 1048576 --json runs/bench/memory.json

Every row compiles the full sharded training step (bench/train_step.py: AdamW state, donated,
ring attention over `sequence`, heads over `tensor`) for abstract arrays on simulated CPU devices:
nothing is allocated, so the 8B model at 4M tokens on TP8 x CP16 = 128 devices compiles on a
laptop. The numbers are XLA's plan for one device.

Two attention kernels per row, because the CPU compile cannot use the GPU's:
  xla      the CPU reference kernel: it materializes [B, K, G, c, c] float32 scores per ring
           block (c = T / 2n tokens), so its memory grows as T^2 / n^2 and dominates at long T.
  standin  a memory stand-in for a flash kernel (cuDNN on H100): same inputs, outputs and
           residuals (out, lse) with O(c) work and no score matrix, i.e. the memory of everything
           except the flash kernel's own O(c) workspace. Its FLOPs and outputs mean nothing; it
           exists only so the memory plan of the rest of the step can be read on CPU.
Per-device memory does not depend on the data axis (each replica holds the same shards), so rows
use data=1, one row of T tokens per replica (the paper's global batch 2 = two replicas).
"""

from __future__ import annotations

import os
import sys

_DEVICES = 128
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_DEVICES}").strip()

import argparse  # noqa: E402

import jax  # noqa: E402

from ultralong_jax.bench import train_step as bench  # noqa: E402

GiB = 2**30
STANDIN = bench.STANDIN

# (model, preset, T, mesh): the configs' meshes (configs/llama31_8b_stage1_{1m,2m,4m}.py: TP8 x
# CP4/8/16; configs/llama32_1b_stage1_1m.py: CP8), each also at the lengths around it.
K = 1024
PLAN = (
    # One device (one H100): what the longest trainable 1B sequence would be, per XLA's plan.
    [("1b", "llama32_1b_1m", t, (("sequence", 1),)) for t in (8 * K, 32 * K, 128 * K, 256 * K)] +
    [("1b", "llama32_1b_1m", t, (("sequence", 8),)) for t in (128 * K, 512 * K, 1024 * K,
                                                              2048 * K, 4096 * K)] +
    [("8b", "llama31_8b_1m", 128 * K, (("sequence", 4), ("tensor", 8))),
     ("8b", "llama31_8b_1m", 1024 * K, (("sequence", 4), ("tensor", 8))),
     ("8b", "llama31_8b_2m", 2048 * K, (("sequence", 8), ("tensor", 8))),
     ("8b", "llama31_8b_4m", 4096 * K, (("sequence", 16), ("tensor", 8)))])


def measure(model: str, preset: str, seq_len: int, mesh, kernel: str, *, num_layers: int = 0,
            remat: str = "full") -> dict:
  """One abstract compile -> the bench.train_step result dict plus the row's labels."""
  setup = bench.Setup(preset=preset, seq_len=seq_len, mesh=mesh, remat=remat, kernel=kernel,
                      batch=1, num_layers=num_layers)
  r = bench.run(setup, abstract=True)
  r["model"] = model
  return r


def _mesh_label(mesh) -> str:
  label = " x ".join(f"{'TP' if a == 'tensor' else 'CP'}{v}" for a, v in mesh if v > 1)
  return label or "1 device"


def _row(r: dict) -> str:
  s = r["setup"]
  mesh = _mesh_label(s["mesh"])
  state = r["argument_bytes"] / GiB
  return (f"| {r['model']} | {s['seq_len'] // K:,}K | {mesh} | {s['kernel']} | {r['num_layers']} | "
          f"{state:.1f} | {r['temp_bytes'] / GiB:.1f} | {r['peak_estimate_bytes'] / GiB:.1f} | "
          f"{r['compile_s']:.0f} |")


HEADER = ("| model | T | mesh | kernel | L | args GiB/dev | temp GiB/dev | peak GiB/dev | "
          "compile s |")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="1b or 8b (default both)")
  parser.add_argument("--lengths", default="", help="comma-separated T to keep (default all)")
  parser.add_argument("--kernels", default=f"{STANDIN},xla")
  parser.add_argument("--layers", type=int, default=0, help="override layer count (0: preset's)")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  keep = {int(t) for t in args.lengths.split(",") if t}
  plan = [p for p in PLAN if (not args.only or p[0] == args.only) and (not keep or p[2] in keep)]
  need = max(_prod(m) for *_, m in plan)
  if need > jax.device_count():
    sys.exit(f"needs {need} devices; set XLA_FLAGS=--xla_force_host_platform_device_count={need}")
  print(f"# {jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, "
        "full remat, bf16 compute / fp32 params + AdamW, one row per replica")
  print(HEADER)
  print("|" + "---|" * (HEADER.count("|") - 1))
  results = []
  for model, preset, t, mesh in plan:
    for kernel in args.kernels.split(","):
      if kernel == "xla" and _score_elements(preset, t, mesh) > 2**31:
        # XLA's CPU compiler died (SIGFPE) on 2^36-element score blocks; skip above 2^31, where
        # the reference kernel's memory is meaningless for a GPU anyway (hence the stand-in).
        print(f"| {model} | {t // K:,}K | {_mesh_label(mesh)} | xla | skipped: score block "
              "> 2^31 elements |")
        continue
      r = measure(model, preset, t, mesh, kernel, num_layers=args.layers)
      results.append(r)
      print(_row(r), flush=True)
  if args.json:
    bench.write_json(args.json, results)
  return results


def _score_elements(preset: str, seq_len: int, mesh) -> int:
  """Elements of one [B=1, N/tp, c, c] ring score block: c = T / (2 n) (zigzag chunk), or T on
  one device (bench.train_step runs a one-block ring there in the contiguous layout)."""
  sizes = dict(mesh)
  heads = bench.presets.get_preset(preset).num_heads // sizes.get("tensor", 1)
  n = sizes.get("sequence", 1)
  c = seq_len // (2 * n) if n > 1 else seq_len
  return heads * c * c


def _prod(mesh) -> int:
  n = 1
  for _, size in mesh:
    n *= size
  return n


if __name__ == "__main__":
  main()
