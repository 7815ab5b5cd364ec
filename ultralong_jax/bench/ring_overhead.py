"""The ring's cost as its parts on one device: n-block kernel + log-sum-exp merge vs one fused call.

  python -m ultralong_jax.bench.ring_overhead --length 131072 --blocks 2,4,8 --kernel cudnn  # H100
  python -m ultralong_jax.bench.ring_overhead --length 4096 --blocks 2,4 --kernel xla         # CPU

One device cannot form a ring, so this times what each ring device computes, all on one device:
causal attention of T tokens split into n contiguous blocks of c = T / n, every query block
attending to the key blocks at or before it with the per-block kernel of
`parallel/block_attention.py` and merging partial results by log-sum-exp (forward), then the
flash-attention-2 block backward with the row's global lse (backward) — against ONE fused kernel
call of length T (forward + backward). The difference is the blockwise/merge overhead (issue
target: <= 10% of attention time). No communication is included (that overlaps on a real ring).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from ultralong_jax.parallel import block_attention


def fused(kernel, q, k, v, dout, scale):
  """One causal call: q, dout [B,T,K,G,H], k, v [B,T,K,H] -> (out, lse, dq, dk, dv)."""
  out, lse = kernel.forward(q, k, v, None, None, causal=True, scale=scale)
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", dout.astype(jnp.float32), out)
  dq, dk, dv = kernel.backward(q, k, v, None, None, out, lse, dout, delta, causal=True,
                               scale=scale)
  return out, lse, dq, dk, dv


def blockwise(kernel, q, k, v, dout, scale, n: int):
  """The same result from n x n causal blocks (j <= i) merged by log-sum-exp."""
  t = q.shape[1]
  c = t // n
  qs = lambda x, i: x[:, i * c:(i + 1) * c]
  ls = lambda x, i: x[..., i * c:(i + 1) * c]
  outs, lses = [], []
  for i in range(n):
    out = lse = None
    for j in range(i + 1):
      o, l = kernel.forward(qs(q, i), qs(k, j), qs(v, j), None, None, causal=i == j, scale=scale)
      out, lse = (o, l) if out is None else block_attention.merge(out, lse, o, l)
    outs.append(out)
    lses.append(lse)
  out, lse = jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=-1)
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", dout.astype(jnp.float32), out)
  dq = [jnp.zeros(qs(q, 0).shape, jnp.float32) for _ in range(n)]
  dk = [jnp.zeros(qs(k, 0).shape, jnp.float32) for _ in range(n)]
  dv = [jnp.zeros(qs(v, 0).shape, jnp.float32) for _ in range(n)]
  for i in range(n):
    for j in range(i + 1):
      g = kernel.backward(qs(q, i), qs(k, j), qs(v, j), None, None, qs(out, i), ls(lse, i),
                          qs(dout, i), ls(delta, i), causal=i == j, scale=scale)
      dq[i], dk[j], dv[j] = dq[i] + g[0], dk[j] + g[1], dv[j] + g[2]
  cat = lambda xs: jnp.concatenate(xs, axis=1)
  return out, lse, cat(dq), cat(dk), cat(dv)


def inputs(b, t, kv_heads, groups, h, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, kv_heads, groups, h), dtype)
  k = jax.random.normal(keys[1], (b, t, kv_heads, h), dtype)
  v = jax.random.normal(keys[2], (b, t, kv_heads, h), dtype)
  dout = jax.random.normal(keys[3], (b, t, kv_heads, groups, h), dtype)
  return q, k, v, dout


def _median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--blocks", default="2,4")
  parser.add_argument("--kernel", default="xla", choices=sorted(block_attention.KERNELS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=32, help="query heads N")
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  kernel = block_attention.KERNELS[args.kernel]
  dtype = jnp.dtype(args.dtype)
  scale = args.head_dim ** -0.5
  x = inputs(args.batch, args.length, args.kv_heads, args.heads // args.kv_heads, args.head_dim,
             dtype)
  base = _median_seconds(jax.jit(lambda *a: fused(kernel, *a, scale)), x, args.repeats)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, T={args.length} "
        f"B={args.batch} N={args.heads} K={args.kv_heads} H={args.head_dim} {args.dtype}, "
        f"kernel={args.kernel}, causal fwd+bwd, median of {args.repeats}")
  print("| n blocks | ms | overhead vs fused |\n|---|---|---|")
  print(f"| 1 (fused) | {base * 1e3:.2f} | - |")
  rows = []
  for n in (int(s) for s in args.blocks.split(",")):
    seconds = _median_seconds(jax.jit(lambda *a, n=n: blockwise(kernel, *a, scale, n)), x,
                              args.repeats)
    rows.append({"blocks": n, "seconds": seconds, "overhead": seconds / base - 1})
    print(f"| {n} | {seconds * 1e3:.2f} | {100 * (seconds / base - 1):+.1f}% |", flush=True)
  return {"fused_seconds": base, "rows": rows}


if __name__ == "__main__":
  main()
