"""Sequence-parallel attention benchmark: per-device compiled memory and FLOPs, optional timing.

  python -m ultralong_jax.bench.attention                      # CPU: 8 simulated devices
  python -m ultralong_jax.bench.attention --lengths 8192,32768 --sizes 1,2,4,8 --time

For each length T and sequence-axis size n it compiles forward+backward of causal attention
(ring, zigzag) WITHOUT running it and reports XLA's per-device memory analysis (temporaries,
arguments) and cost analysis (FLOPs), next to single-device full attention; it also reports the
useful causal work per device under the zigzag and contiguous layouts (max/min over devices).
`--time` also runs forward+backward and reports TFLOP/s of useful causal attention work against
`--peak` (989 dense bf16 TFLOP/s for an H100 SXM).
"""

import sys

from ultralong_jax.parallel import host_devices

host_devices.simulate(8, keep_count=True)  # before JAX initializes; GPU/TPU backends ignore it

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
import numpy as np  # noqa: E402

from ultralong_jax.modeling.attention import dot_product_attention  # noqa: E402
from ultralong_jax.parallel import layout, mesh as mesh_lib, sharding  # noqa: E402
from ultralong_jax.parallel.ring_attention import ring_attention  # noqa: E402
from ultralong_jax.training import compile_plan  # noqa: E402


def _useful_flops(b, t, n_heads, h):
  """Causal attention fwd+bwd matmul FLOPs without masked work: fwd 2 matmuls of 2*B*N*H*T^2/2,
  bwd 5 (flash-attention accounting: total 3.5 x forward)."""
  return 3.5 * 2 * 2 * b * n_heads * h * t * t / 2


def _grad_fn(attend):
  def loss(q, k, v):
    return jnp.sum(attend(q, k, v).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _abstract(mesh, b, t, n_heads, kv_heads, h, dtype):
  def spec(names, shape):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
        mesh, sharding.logical_to_spec(names, mesh)))
  return (spec(("batch", "length", "heads", "head_dim"), (b, t, n_heads, h)),
          spec(("batch", "length", "kv_heads", "head_dim"), (b, t, kv_heads, h)),
          spec(("batch", "length", "kv_heads", "head_dim"), (b, t, kv_heads, h)))


def _time(fn, args, repeats=3):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def run(lengths, sizes, *, batch, heads, kv_heads, head_dim, dtype, strategy, kernel, timing,
        peak):
  devices = jax.devices()
  print(f"# {devices[0].platform} x{len(devices)} ({devices[0].device_kind}), jax {jax.__version__}"
        f", B={batch} N={heads} K={kv_heads} H={head_dim} {dtype}, causal fwd+bwd, "
        f"{strategy} / zigzag / kernel={kernel}")
  header = ("| T | n | impl | temp MiB/dev | args MiB/dev | temp x n / full | GFLOP/dev | "
            "GFLOP x n / full | useful max/min zigzag | contiguous |")
  if timing:
    header += " ms | TFLOP/s | % peak |"
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  dt = jnp.dtype(dtype)
  for t in lengths:
    full = None
    for n in [None] + sizes:  # None: the single-device full-attention baseline
      baseline, n = n is None, n or 1
      mesh = mesh_lib.make_mesh({"sequence": n}, devices=devices[:n])
      args = _abstract(mesh, batch, t, heads, kv_heads, head_dim, dt)
      if baseline:
        fn = _grad_fn(lambda q, k, v: dot_product_attention(q, k, v, causal=True))
        impl = "full (1 device)"
      else:
        fn = _grad_fn(lambda q, k, v, mesh=mesh: ring_attention(
            q, k, v, mesh=mesh, causal=True, strategy=strategy, kernel=kernel))
        impl = strategy
      a = compile_plan.analyse(fn.lower(*args).compile())
      temp, arg, flops = a["temp_bytes"], a["argument_bytes"], a["xla_flops"]
      if full is None:
        full = (temp, flops)
      zig = layout.per_device_causal_pairs(t, n, "zigzag")
      con = layout.per_device_causal_pairs(t, n, "contiguous")
      row = (f"| {t} | {n} | {impl} | {temp / 2**20:.1f} | {arg / 2**20:.1f} | "
             f"{temp * n / full[0]:.2f} | {flops / 1e9:.2f} | {flops * n / full[1]:.2f} | "
             f"{zig.max() / zig.min():.3f} | {con.max() / con.min():.2f} |")
      if timing:
        values = [jax.device_put(jax.random.normal(jax.random.key(i), a.shape, a.dtype), a.sharding)
                  for i, a in enumerate(args)]
        seconds = _time(fn, values)
        tflops = _useful_flops(batch, t, heads, head_dim) / seconds / 1e12
        row += f" {seconds * 1e3:.1f} | {tflops:.2f} | {100 * tflops / peak:.1f} |"
      print(row, flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="4096,16384")
  parser.add_argument("--sizes", default="2,4,8",
                      help="sequence-axis sizes for ring rows (1 = the ring's kernel on one device)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--strategy", default="ring", choices=["ring", "allgather"])
  parser.add_argument("--kernel", default="auto")
  parser.add_argument("--time", action="store_true", help="also run and time fwd+bwd")
  parser.add_argument("--peak", type=float, default=989.0, help="peak TFLOP/s (H100 bf16)")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]
  if max(sizes) > jax.device_count():
    sys.exit(f"--sizes {args.sizes} needs {max(sizes)} devices; {jax.device_count()} present")
  run([int(t) for t in args.lengths.split(",")], sizes, batch=args.batch, heads=args.heads,
      kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, strategy=args.strategy,
      kernel=args.kernel, timing=args.time, peak=args.peak)


if __name__ == "__main__":
  main()
