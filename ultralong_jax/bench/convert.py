"""Peak host memory of checkpoint conversion and of multi-host loading/saving, against the size
of the weights.

  python -m ultralong_jax.bench.convert [--layers 8 --hidden 2048 --mlp 5632 --vocab 32000]
  python -m ultralong_jax.bench.convert --processes 2 [--check] [--compare-full]

Writes a random Llama of the given shape as a sharded HF safetensors directory (no torch needed).
One process: runs `hf-to-jax` and `jax-to-hf` in fresh subprocesses and prints their peak RSS (the
claim: conversion is tensor by tensor, so peak RSS stays near one copy of the weights plus the
JAX/Orbax runtime, never two). `--processes N`: N local processes (launch/multihost.sh --local N,
8 / N CPU devices each, parameters fsdp-sharded over all 8) load the HF directory the way a run
starts (`convert.api.load_params`: each reads only its devices' slices), write the final Orbax
checkpoint from the sharded arrays and export HF tensor by tensor, the way a run ends
(`training.export`); each prints how far its RSS rose above what it held before each phase
(the peak is reset per phase through /proc/self/clear_refs). On CPU the devices' buffers are host
memory, so the load row includes the process's own shards (1/N of the weights) on top of the
reading; on GPU/TPU hosts those live on the accelerators. `--compare-full` adds the same rows
for reading every tensor whole on every process and gathering the parameters to every host;
`--check` compares the checkpoint the processes wrote with a single-process load, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from ultralong_jax.bench import convert_multihost as multihost
from ultralong_jax.convert import api, hf
from ultralong_jax.modeling.config import LlamaConfig


def write_random_hf(out_dir: str, config: LlamaConfig, shard_bytes: int) -> int:
  """A random-weight HF Llama directory; returns the bytes of weights written."""
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  plan = dict(hf.hf_tensor_plan(config))

  def get(path):  # project-layout arrays, created on demand one stacked parameter at a time
    from ultralong_jax.modeling.llama import layer_param_shapes
    if path == ("embed",):
      return rng.standard_normal((config.vocab_size, config.hidden_size), np.float32)
    if path == ("final_norm",):
      return np.ones(config.hidden_size, np.float32)
    if path == ("lm_head",):
      return rng.standard_normal((config.hidden_size, config.vocab_size), np.float32)
    shape = layer_param_shapes(config)[path[1]][0]
    return rng.standard_normal((config.num_layers, *shape), np.float32)

  api.export_hf(out_dir, config, get, max_shard_bytes=shard_bytes)
  return sum(int(np.prod(s)) * 4 for s in plan.values())


def _peak_rss_of(cmd: list[str]) -> tuple[float, float]:
  """(peak RSS in bytes, seconds) of one child process (os.wait4 gives that child's own rusage)."""
  start = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
  return usage.ru_maxrss * 1024.0, time.time() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--mlp", type=int, default=5632)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--shard-gb", type=float, default=0.5)
  parser.add_argument("--processes", type=int, default=1,
                      help=">1: the multi-host load/save measurement with this many processes")
  parser.add_argument("--check", action="store_true",
                      help="with --processes: compare the written checkpoint with a 1-process load")
  parser.add_argument("--compare-full", action="store_true",
                      help="with --processes: also measure whole-tensor reads and a full gather")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)
  config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.mlp, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads)
  if args.processes > 1:
    return multihost.main(args, config, write_random_hf)
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, ckpt, back = (os.path.join(tmp, d) for d in ("hf", "ckpt", "back"))
    weights = write_random_hf(hf_dir, config, int(args.shard_gb * 1e9))
    # Baseline: the interpreter with JAX and Orbax imported, no weights.
    base, _ = _peak_rss_of([sys.executable, "-c",
                            "import jax, jax.numpy as jnp, orbax.checkpoint; jnp.zeros(1)"])
    rows = [("python + jax + orbax, no weights", base, 0.0)]
    for name, cmd in [
        ("hf-to-jax", ["hf-to-jax", "--hf-dir", hf_dir, "--out", ckpt]),
        ("jax-to-hf", ["jax-to-hf", "--ckpt", ckpt, "--out", back]),
    ]:
      peak, secs = _peak_rss_of([sys.executable, "-m", "ultralong_jax.convert", *cmd])
      rows.append((name, peak, secs))
  gb = 1e9
  print(f"\nweights: {config.num_params / 1e6:.0f}M parameters, {weights / gb:.2f} GB float32\n")
  print(f"| {'step':<34} | {'peak RSS (GB)':>13} | {'(peak - baseline) / weights':>27} | "
        f"{'time (s)':>8} |")
  print(f"|{'-' * 36}|{'-' * 15}|{'-' * 29}|{'-' * 10}|")
  for name, peak, secs in rows:
    ratio = (peak - base) / weights if name != rows[0][0] else 0.0
    print(f"| {name:<34} | {peak / gb:>13.2f} | {ratio:>27.2f} | {secs:>8.1f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"params": config.num_params, "weight_bytes": weights,
                 "rows": [{"step": n, "peak_rss_bytes": p, "seconds": s} for n, p, s in rows]},
                f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
