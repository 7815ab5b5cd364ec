"""The train-step benchmark on a tiny model: HLO checks of the sharded step, memory, JSON fields.

All compiles are abstract (nothing allocated) on the 8 simulated CPU devices of tests/conftest.py,
except the CLI test, which also runs two real steps. T = 1024 is chosen so that no other dimension
of the tiny model (V 512, D 64, F 128, N 4, H 32) equals it: an all-gather result with a
dimension of 1024 can only be a whole-sequence activation.
"""

import json
import pathlib
import re

import pytest

from ultralong_jax.bench import memory
from ultralong_jax.bench import train_step as bench
from ultralong_jax.parallel import block_attention
from ultralong_jax.training import config as config_lib

T = 1024


@pytest.fixture(scope="module")
def compiled():
  """Cache: (sequence size, strategy, layers, kernel) -> (result dict, compiled HLO text)."""
  cache = {}

  def get(n, strategy="ring", layers=2, kernel="auto"):
    key = (n, strategy, layers, kernel)
    if key not in cache:
      setup = bench.Setup(preset="tiny", seq_len=T, mesh=(("sequence", n), ("tensor", 2)),
                          strategy=strategy, num_layers=layers, kernel=kernel, batch=1)
      built = bench.build(setup)
      exe, _ = bench.compile_abstract(built)
      cache[key] = (bench.analyse(exe), exe.as_text())
    return cache[key]

  return get


def test_ring_step_gathers_no_full_length_activation(compiled):
  # Ring attention moves K/V by ppermute; with TP 2 x CP 2 nothing of length T may be all-gathered.
  _, hlo = compiled(2)
  assert "collective-permute" in hlo  # the ring is really there
  assert bench.full_length_all_gathers(hlo, T) == []


def test_check_catches_a_full_length_all_gather(compiled):
  # Positive control: the all-gather strategy gathers K/V [B, T, K, H] whole on purpose.
  _, hlo = compiled(2, strategy="allgather")
  gathered = bench.full_length_all_gathers(hlo, T)
  assert gathered and all(T in shape for shape in gathered)


def test_hlo_size_flat_in_layer_count(compiled):
  # Layers are one lax.scan: 4x the layers must not grow the program (only the [L, ...] shapes).
  _, hlo2 = compiled(1, layers=2)
  _, hlo8 = compiled(1, layers=8)
  assert abs(len(hlo8) - len(hlo2)) / len(hlo2) < 0.02


def test_per_device_memory_falls_as_sequence_axis_grows(compiled):
  temps = [compiled(n)[0]["temp_bytes"] for n in (1, 2)]
  # Scores of the reference kernel are O((T/n)^2) and dominate at this T: CP 2 must more than
  # halve the temporaries (measured: 0.15x).
  assert temps[1] < 0.5 * temps[0], temps


def test_standin_kernel_keeps_memory_below_reference(compiled):
  # The flash stand-in holds no [c, c] score block, so its plan must be smaller than xla's.
  xla = compiled(2)[0]  # auto = the xla kernel on CPU
  standin = compiled(2, kernel=bench.STANDIN)[0]
  assert standin["temp_bytes"] < xla["temp_bytes"]
  assert standin["argument_bytes"] == xla["argument_bytes"]  # same params + AdamW state
  # Passed to the ring as an explicit kernel: the config's kernel table stays as it is.
  assert bench.STANDIN not in block_attention.KERNELS


def test_the_library_never_imports_the_benchmarks():
  """Benchmarks call the library, never the other way (the estimate's --xla uses compile_plan)."""
  package = pathlib.Path(__file__).parents[2] / "ultralong_jax"
  imports_bench = re.compile(r"^\s*(from ultralong_jax\.bench\b|import ultralong_jax\.bench\b"
                             r"|from ultralong_jax import bench\b)", re.M)
  importers = [str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.parent.name != "bench" and imports_bench.search(p.read_text())]
  assert importers == []
  assert imports_bench.search("  from ultralong_jax.bench import train_step as bench")  # control


def test_all_gather_shape_parser():
  hlo = ("  %all-gather.1 = bf16[2,1024,4,32]{3,2,1,0} all-gather(bf16[2,256,4,32]{3,2,1,0} %p), "
         "dimensions={1}\n"
         "  %ags = (f32[8,64]{1,0}, f32[32,64]{1,0}) all-gather-start(f32[8,64]{1,0} %x), "
         "dimensions={0}\n"
         "  %heads = f32[1,1024,2]{2,1,0} all-gather(f32[1,1024,1]{2,1,0} %y), dimensions={2}\n"
         "  %add = f32[1024]{0} add(f32[1024]{0} %a, f32[1024]{0} %b)\n")
  assert bench.all_gather_shapes(hlo) == [((2, 1024, 4, 32), 1), ((8, 64), 0), ((32, 64), 0),
                                          ((1, 1024, 2), 2)]
  # The heads gather has a length-sized dimension but gathers over heads: not a sequence gather.
  assert bench.full_length_all_gathers(hlo, 1024) == [(2, 1024, 4, 32)]


def test_cli_runs_steps_and_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  # data x fsdp: a real multi-device step without another ring compile (the HLO tests have it).
  # (With tensor > 1 and sequence = 1 the residual stream's sequence parallelism all-gathers the
  # full length over `tensor` by design, Megatron-style.)
  bench.main(["--preset", "tiny", "--seq-len", "256", "--mesh", "data=2,fsdp=2",
              "--steps", "2", "--warmup", "1", "--json", str(out)])
  (r,) = json.loads(out.read_text())
  for key in ("compile_s", "step_s", "tokens_per_s_per_device", "tflops_per_device",
              "peak_estimate_bytes", "temp_bytes", "model_flops_per_token", "xla_flops",
              "full_length_all_gathers", "mfu", "memory_stats"):
    assert key in r, key
  assert r["devices"] == 4 and r["global_batch"] == 4 and r["tokens_per_step"] == 1024
  assert len(r["step_times_s"]) == 2 and r["step_s"] > 0
  # tokens/s per device and TFLOP/s per device are the same measurement in two units.
  assert r["tokens_per_s_per_device"] == pytest.approx(1024 / 4 / r["step_s"])
  assert r["tflops_per_device"] == pytest.approx(
      r["model_flops_per_token"] * r["tokens_per_s_per_device"] / 1e12)
  assert r["mfu"] is None and r["memory_stats"] is None  # CPU: no peak, no allocator stats
  assert r["full_length_all_gathers"] == []
  assert "| tiny | 2 | 256 |" in capsys.readouterr().out  # preset, layers, length


@pytest.mark.parametrize("name", ["llama31_8b_stage1.py:1m", "llama31_8b_stage1.py:2m",
                                  "llama31_8b_stage1.py:4m", "llama32_1b_stage1_1m.py"])
def test_memory_plan_uses_the_configs_meshes(name):
  # The memory table claims to be "the planned meshes": keep it in step with configs/.
  c = config_lib.load_config_file(str(pathlib.Path(__file__).parents[2] / "configs" / name))
  rows = [dict(mesh) for _, preset, t, mesh in memory.PLAN
          if t == c.data.seq_len and preset.startswith(c.model.preset)]
  assert {"sequence": c.mesh.sequence, "tensor": c.mesh.tensor} in [
      {"sequence": m.get("sequence", 1), "tensor": m.get("tensor", 1)} for m in rows]
