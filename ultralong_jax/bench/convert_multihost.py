"""Per-process host memory of a multi-host load and final save (`bench.convert --processes N`).

The parent writes the HF directory and starts N processes with launch/multihost.sh --local N;
each runs `worker` (this module's __main__, given the coordinator flags the launcher appends) and
writes its measurements as JSON. Run it through `python -m ultralong_jax.bench.convert`.
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASES = ("load", "save", "export")


class HostMemory:
  """This process's resident set from /proc/self/status; `reset_peak` restarts VmHWM at the
  current RSS (/proc/self/clear_refs, Linux >= 4.0), so each phase gets its own peak."""

  @staticmethod
  def _status(key: str) -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")

  def current(self) -> int:
    return self._status("VmRSS")

  def peak(self) -> int:
    return self._status("VmHWM")

  def reset_peak(self) -> int:
    """Resets the peak; returns the RSS it starts from."""
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return self.current()


def param_shardings(config, mesh):
  """The train step's parameter shardings (logical names -> mesh, parallel/sharding.py)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ultralong_jax.modeling.llama import abstract_model  # pylint: disable=import-outside-toplevel
  from ultralong_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  _, state = nnx.split(abstract_model(config))
  return nnx.to_pure_dict(sharding.state_shardings(mesh, state))


def worker(argv=None) -> int:
  """One process: load (sharded or whole), save final/ params, export HF; RSS rise per phase."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--hf-dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--mode", choices=["sharded", "full"], default="sharded")
  parser.add_argument("--result", required=True, help="writes RESULT.<process index>")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args(argv)
  from ultralong_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  mesh_lib.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax  # pylint: disable=import-outside-toplevel
  from ultralong_jax.convert import api, checkpoint, hf  # pylint: disable=import-outside-toplevel
  from ultralong_jax.training import export  # pylint: disable=import-outside-toplevel
  config = api.load_config(args.hf_dir)
  mesh = mesh_lib.make_mesh({"fsdp": -1})
  shardings = param_shardings(config, mesh)
  memory = HostMemory()
  jax.block_until_ready(jax.numpy.zeros(8) + 1)  # the runtime's own first allocations
  rise, seconds = {}, {}

  start, t0 = memory.reset_peak(), time.time()
  if args.mode == "sharded":
    params = api.load_params(args.hf_dir, config, shardings)
  else:  # every tensor read whole on every process, then placed
    params = jax.device_put(hf.load_hf_params(hf.SafetensorsReader(args.hf_dir), config),
                            shardings)
  jax.block_until_ready(params)
  rise["load"], seconds["load"] = memory.peak() - start, time.time() - t0

  start, t0 = memory.reset_peak(), time.time()
  if args.mode == "sharded":
    checkpoint.save_params(os.path.join(args.out, "final"), config, params)
  else:  # gathered to every host first
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    host = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        params)
    checkpoint.save_params(os.path.join(args.out, "final"), config, host)
    del host
  rise["save"], seconds["save"] = memory.peak() - start, time.time() - t0

  start, t0 = memory.reset_peak(), time.time()
  get = export.layer_getter(params)
  if jax.process_index() == 0:
    api.export_hf(os.path.join(args.out, "hf"), config, get)
  else:
    for _ in hf.iter_hf_tensors(config, get):
      pass
  rise["export"], seconds["export"] = memory.peak() - start, time.time() - t0
  with open(f"{args.result}.{jax.process_index()}", "w") as f:  # one file per process
    json.dump({"process": jax.process_index(), "rise": rise, "seconds": seconds}, f)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  multihost_utils.sync_global_devices("bench.convert_multihost: done")
  return 0


def run_processes(hf_dir: str, out: str, processes: int, mode: str, log_dir: str) -> list[dict]:
  """Runs `worker` on `processes` local processes (8 CPU devices in all); their results."""
  os.makedirs(out, exist_ok=True)
  cmd = ["bash", os.path.join(REPO, "launch", "multihost.sh"), "--local", str(processes),
         "--devices-per-process", str(8 // processes), "--log-dir", log_dir, "--",
         sys.executable, "-m", "ultralong_jax.bench.convert_multihost", "--hf-dir", hf_dir,
         "--out", out, "--mode", mode, "--result", os.path.join(out, "rss.json")]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO}
  result = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if result.returncode:
    logs = "".join(open(os.path.join(log_dir, n)).read()[-3000:] for n in sorted(os.listdir(log_dir))
                   if n.endswith(".log"))
    raise SystemExit(f"multihost run failed ({result.returncode}):\n{result.stderr}\n{logs}")
  return [json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out))
          if n.startswith("rss.json")]


def check_bit_exact(hf_dir: str, ckpt: str) -> int:
  """Compares the checkpoint the processes wrote with a 1-process whole-tensor load; returns the
  number of parameters compared (raises on a difference)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ultralong_jax.convert import api, checkpoint, hf  # pylint: disable=import-outside-toplevel
  from ultralong_jax.modeling.llama import abstract_model  # pylint: disable=import-outside-toplevel
  config = api.load_config(hf_dir)
  reference = hf.load_hf_params(hf.SafetensorsReader(hf_dir), config)
  written = checkpoint.load_params(ckpt, nnx.to_pure_dict(nnx.state(abstract_model(config),
                                                                    nnx.Param)))
  ref_leaves = jax.tree_util.tree_leaves_with_path(reference)
  got = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(written))
  for path, a in ref_leaves:
    b = np.asarray(got[jax.tree_util.keystr(path)])
    if b.dtype != a.dtype or not np.array_equal(a, b):
      raise SystemExit(f"{jax.tree_util.keystr(path)} differs from the 1-process load")
  return len(ref_leaves)


def main(args, config, write_random_hf) -> int:
  """`bench.convert --processes N`: the table of per-process RSS rises."""
  modes = ["sharded"] + (["full"] if args.compare_full else [])
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    weights = write_random_hf(hf_dir, config, int(args.shard_gb * 1e9))
    for mode in modes:
      out = os.path.join(tmp, mode)
      results[mode] = run_processes(hf_dir, out, args.processes, mode, os.path.join(tmp, f"{mode}_logs"))
      if args.check:
        n = check_bit_exact(hf_dir, os.path.join(out, "final"))
        print(f"{mode}: the {n} parameters written by {args.processes} processes equal a "
              "1-process load bit for bit")
  gb = 1e9
  print(f"\nweights: {config.num_params / 1e6:.0f}M parameters, {weights / gb:.2f} GB float32; "
        f"{args.processes} processes x {8 // args.processes} CPU devices, fsdp over all 8\n")
  print(f"| {'mode':<8} | {'phase':<6} | {'process':>7} | {'RSS rise (GB)':>13} | "
        f"{'rise / weights':>14} | {'time (s)':>8} |")
  print(f"|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 15}|{'-' * 16}|{'-' * 10}|")
  for mode in modes:
    for phase in PHASES:
      for r in sorted(results[mode], key=lambda r: r["process"]):
        rise = r["rise"][phase]
        print(f"| {mode:<8} | {phase:<6} | {r['process']:>7} | {rise / gb:>13.3f} | "
              f"{rise / weights:>14.2f} | {r['seconds'][phase]:>8.1f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"params": config.num_params, "weight_bytes": weights,
                 "processes": args.processes, "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(worker())
