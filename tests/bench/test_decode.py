"""The decode benchmark runs end to end at tiny sizes: three decoders, the same greedy tokens, the
transformers baseline in its own process (benchmarks/hf_generate_baseline.py), and the library
itself never imports torch or transformers."""

import ast
import pathlib

import ultralong_jax
from ultralong_jax.bench import decode

TINY = ["--batch", "2", "--prompt", "8", "--new-tokens", "4", "--layers", "1", "--hidden", "32",
        "--mlp", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "64"]


def test_cli_times_three_decoders_on_the_same_tokens(capsys):
  result = decode.main(TINY + ["--repeats", "2"])
  names = [r["decoder"] for r in result["rows"]]
  assert names == ["ultralong_jax, device loop", "ultralong_jax, host loop",
                   "transformers generate"]
  for row in result["rows"]:
    # float32 on both sides: greedy tokens equal transformers' in every row.
    assert row["rows_equal_transformers"] == 2 and len(row["wall_seconds"]) == 2
  assert result["rows"][-1]["vs_transformers"] == 1.0
  assert result["baseline"]["versions"].startswith("torch ")
  out = capsys.readouterr().out
  assert "load average" in out and "interleaved" in out
  lines = [l for l in out.splitlines() if l.startswith("| transformers")]
  assert len(lines) == 1 and "| 1.00x |" in lines[0] and lines[0].endswith("| 2/2 |")


def test_missing_baseline_is_reported_and_the_jax_rows_still_run(tmp_path, capsys):
  # What the baseline script does without torch: exit 3 with the reason on stderr.
  fake = tmp_path / "baseline.py"
  fake.write_text("import sys\nprint('hf_generate_baseline: needs torch and transformers', "
                  "file=sys.stderr)\nsys.exit(3)\n")
  result = decode.main(TINY + ["--repeats", "1", "--baseline", str(fake)])
  assert [r["name"] for r in result["rows"]] == ["device", "host"]
  assert "needs torch and transformers" in result["baseline"]["unavailable"]
  captured = capsys.readouterr()
  assert "no transformers baseline: hf_generate_baseline: needs torch" in captured.err
  assert "| n/a |" in captured.out


def test_the_library_imports_neither_torch_nor_transformers():
  package = pathlib.Path(ultralong_jax.__file__).parent
  offenders = []
  for path in package.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f"{path.relative_to(package)}:{node.lineno} {n}" for n in names
                    if n.split(".")[0] in ("torch", "transformers")]
  assert not offenders, offenders
  assert decode.BASELINE.is_file(), decode.BASELINE  # the baseline ships with the repository
