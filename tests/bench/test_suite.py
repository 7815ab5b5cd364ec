"""The benchmark suite's smoke mode end to end on CPU (so the command cannot rot), its time guard,
and that it imports no test-only package."""

import json
import os
import subprocess
import sys

from ultralong_jax.bench import suite, suite_report


def test_smoke_run_writes_every_section(tmp_path):
  results = suite.main(["--out", str(tmp_path), "--smoke", "--budget-s", "240"])
  status = {r["name"]: r["status"] for r in results}
  assert status == {"kernels": "ok", "train_step_256": "ok", "ring_overhead": "ok",
                    "longest": "ok"}, status
  rows = {r["section"]: r["rows"] for r in results}
  assert [r["kernel"] for r in rows["kernels"]] == ["dpa_xla", "dpa_xla_packed", "chunked", "xla"]
  assert all(r["tflops"] > 0 and r["seconds"] > 0 for r in rows["kernels"])
  # The on-device layout check: every kernel's gradients against the chunked kernel's (bf16).
  fused = [r for r in rows["kernels"] if r["kernel"].startswith("dpa_xla")]
  assert len(fused) == 2 and all(r["rel_err_vs_chunked"] < 3e-2 for r in fused), fused
  (step,) = rows["train_step"]
  assert step["step_s"] > 0 and step["tokens_per_s_per_device"] > 0
  assert step["estimate_bytes"] > 0 and step["peak_estimate_bytes"] > 0
  assert [r["blocks"] for r in rows["ring_overhead"]] == [2]
  summary = rows["longest"][-1]
  assert summary["longest_trained"] and summary["longest_trained"] % 256 == 0
  saved = json.loads((tmp_path / "suite.json").read_text())
  assert [r["name"] for r in saved["results"]] == list(status)
  text = (tmp_path / "suite.md").read_text()
  for heading in ("| kernel | B | T | documents per row |", "| preset | L | T | kernel |",
                  "| kernel | T | n blocks |", "longest that trained"):
    assert heading in text


def test_a_section_over_budget_is_recorded_and_stopped(tmp_path):
  result = suite._run_task("kernels", {}, 0.5, str(tmp_path), ["--smoke"])
  assert result["status"].startswith("timed out"), result
  assert result["rows"] == [] and result["seconds"] < 30
  text = suite_report.markdown([result], "cmd")
  assert "**kernels: timed out" in text


def test_parent_imports_no_jax_and_sections_no_test_only_package():
  code = ("import sys\n"
          "for name in ('torch', 'transformers', 'pytest'): sys.modules[name] = None\n"
          "import ultralong_jax.bench.suite\n"
          "assert 'jax' not in sys.modules, 'the parent would hold accelerator memory'\n"
          "import ultralong_jax.bench.train_step, ultralong_jax.bench.ring_overhead\n"
          "import ultralong_jax.bench.attention, ultralong_jax.training.memory\n")
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
