"""The analytic memory estimate (training/memory.py) against XLA's compiled memory analysis.

Each case compiles the real sharded train step (bench/train_step.py: AdamW state, donated, ring
attention) for abstract arrays on the 8 simulated CPU devices and holds the estimate to within
memory.TOLERANCE (20%) of XLA's per-device plan; the exact parts (parameters, optimizer, batch)
must match XLA's argument bytes to the byte, up to the three scalar counters.
"""

import dataclasses
import os
import subprocess
import sys

import pytest

from ultralong_jax.bench import memory as bench_memory
from ultralong_jax.bench import train_step as bench
from ultralong_jax.bench.memory import BASE_OPTIONS, PLAIN, shape_config
from ultralong_jax.modeling import presets
from ultralong_jax.training import memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Rows of `python -m ultralong_jax.bench.memory --calibration` (which compiles all of its grid and
# prints the table in docs/training.md), one per mechanism the estimate models.
CASES = {
    "one device, flash stand-in": ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, num_layers=2)),
    "CP8, XLA ring kernel": ("small", 16384, {"sequence": 8}, dict(BASE_OPTIONS, kernel="xla")),
    "CP2 x TP4": ("small", 16384, {"sequence": 2, "tensor": 4}, BASE_OPTIONS),
    "CP4 x FSDP2": ("small", 16384, {"sequence": 4, "fsdp": 2}, dict(BASE_OPTIONS, batch=2)),
    "dots remat": ("small", 8192, {"sequence": 1}, dict(BASE_OPTIONS, remat="dots")),
    "wide MLP, CP4 x TP2, XLA kernel": ("wide", 32768, {"sequence": 4, "tensor": 2},
                                        dict(BASE_OPTIONS, kernel="xla")),
    "large vocab (loss-bound)": ("vocab", 8192, {"sequence": 1}, dict(BASE_OPTIONS, loss_chunk=4096)),
    "DP4 x CP2, 2 microbatches": ("small", 8192, {"sequence": 2, "data": 4},
                                  dict(BASE_OPTIONS, batch=8, microbatches=2)),
    "plain attention, dots remat": ("small", 4096, {"sequence": 1},
                                    dict(PLAIN, kernel="auto", remat="dots")),
    "one device, T > chunk: one-block chunked ring": ("small", 8192, {"sequence": 1},
                                                      dict(BASE_OPTIONS, kernel="auto",
                                                           chunk_size=512)),
}
SMALL = shape_config("small", num_layers=2)


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_is_within_tolerance_of_xla(name):
  setup, shape = bench_memory.calibration_case(*CASES[name])
  xla = bench.run(setup, abstract=True)
  est = memory.estimate(shape)
  ratio = est["total"] / xla["peak_estimate_bytes"]
  assert abs(ratio - 1) <= memory.TOLERANCE, (name, ratio, est, xla["peak_estimate_bytes"])
  # The exact parts: the donated state and the batch are the step's arguments (three int32
  # scalars of the state: step, nonfinite_steps, first_nonfinite_step; Adam's count).
  exact = est["params"] + est["optimizer"] + est["batch"]
  assert 0 <= xla["argument_bytes"] - exact <= 64, (xla["argument_bytes"], exact)


def test_parts_scale_as_documented():
  shape = memory.StepShape(model=SMALL, mesh={"sequence": 4, "tensor": 2}, num_devices=8,
                           seq_len=16384, global_batch=1)
  base = memory.estimate(shape)
  longer = memory.estimate(dataclasses.replace(shape, seq_len=32768))
  assert longer["checkpoints"] == 2 * base["checkpoints"]
  assert longer["params"] == base["params"]  # weights do not depend on the length
  more_cp = memory.estimate(dataclasses.replace(shape, mesh={"sequence": 8, "tensor": 1}))
  norms = (2 * SMALL.num_layers + 1) * SMALL.hidden_size  # RMSNorm scales: never split by TP
  assert more_cp["params"] == 2 * base["params"] - 4 * norms  # TP shards the weights, CP not
  xla_kernel = memory.estimate(dataclasses.replace(shape, kernel="xla"))
  # zigzag ring: a step attends 2c queries to c keys, c = T / (2 CP); 8 heads over TP 2.
  c = 16384 // 8
  assert xla_kernel["attention"] == memory.COEFFICIENTS["scores"] * 4 * 4 * (2 * c) * c
  chunked = memory.estimate(dataclasses.replace(shape, kernel="chunked", kernel_chunk=256))
  assert chunked["attention"] == memory.COEFFICIENTS["scores"] * 4 * 4 * 256 * 256  # one tile


def test_params_per_device_follow_the_sharding_rules():
  # 8 kv heads cannot split 3 ways... use tensor 2: every [.., heads, ..] and vocab dimension
  # halves; norms stay whole.
  one = memory.params_per_device(SMALL, {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1})
  assert one == SMALL.num_params
  tp2 = memory.params_per_device(SMALL, {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 2})
  norms = (2 * SMALL.num_layers + 1) * SMALL.hidden_size
  assert tp2 == (SMALL.num_params - norms) // 2 + norms


def test_suggest_puts_fitting_meshes_first():
  model = presets.get_preset("llama31_8b_1m", remat_policy="full")
  shape = memory.StepShape(model=model, mesh={"data": 2, "sequence": 4, "tensor": 8},
                           num_devices=64, seq_len=1 << 20, global_batch=2)
  rows = memory.suggest(shape, "h100")
  capacity = memory.DEVICES["h100"][1] * memory.GiB * memory.USABLE
  fits = [est["total"] <= capacity for _, est in rows]
  assert fits[0] and fits == sorted(fits, reverse=True)
  for mesh, _ in rows:
    assert mesh["data"] * mesh["fsdp"] * mesh["sequence"] * mesh["tensor"] == 64
    assert 2 % (mesh["data"] * mesh["fsdp"]) == 0 and 8 % mesh["tensor"] == 0


def test_cli_reports_a_config_and_refuses_a_bad_one():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "ultralong_jax.estimate_memory",
         "--config=configs/llama31_8b_stage1.py:1m", "--devices=64", "--suggest"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "mesh DP2 × CP4 × TP8" in out.stdout and "h100: 79.6 GiB" in out.stdout
  assert "fits" in out.stdout and "checkpoints" in out.stdout
  bad = subprocess.run(cmd[:4] + ["--devices=48"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "mesh sizes" in bad.stderr


SHIPPED = {"llama31_8b_stage1.py:1m": 64, "llama31_8b_stage1.py:2m": 128,
           "llama31_8b_stage1.py:4m": 256, "llama31_8b_stage2_sft.py": 64,
           "llama32_1b_stage1_1m.py": 8, "llama32_1b_stage2_sft.py": 8}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_fit_an_h100(name):
  """The estimate caught three shipped configs that XLA plans above 80 GB (8B SFT with `dots`
  remat: 167 GiB; 1B SFT: ~630; 1B stage 1 with both rows at once: 100); they now fit."""
  out = subprocess.run(
      [sys.executable, "-m", "ultralong_jax.estimate_memory", f"--config=configs/{name}",
       f"--devices={SHIPPED[name]}", "--device=h100"], cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "-> fits" in out.stdout, out.stdout


def test_cli_estimates_a_custom_config_without_its_data(tmp_path):
  """A stage-1 config with no domains, tokenizer, separator or matching data.vocab_size: the
  estimate needs the model, mesh and step shape only, so it runs; a bad mesh still fails."""
  config = tmp_path / "custom.py"
  config.write_text(
      "from ultralong_jax.training.config import base_config\n"
      "def get_config():\n"
      "  c = base_config(1)\n"
      "  c.init.mode, c.model.ultralong, c.model.remat_policy = 'random', '1m', 'full'\n"
      "  c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 2, 1, 4, 8\n"
      "  c.data.seq_len, c.data.global_batch_size = 1048576, 2\n"
      "  return c\n")
  cmd = [sys.executable, "-m", "ultralong_jax.estimate_memory", f"--config={config}",
         "--devices=64"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "mesh DP2 × CP4 × TP8" in out.stdout and "-> fits" in out.stdout, out.stdout
  bad = subprocess.run(cmd + ["--config.attention.kernel=flash3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "attention.kernel='flash3'" in bad.stderr, bad.stderr
