"""The decode benchmark runs end to end at tiny sizes: three decoders, the same greedy tokens."""

from ultralong_jax.bench import decode


def test_cli_times_three_decoders_on_the_same_tokens(capsys):
  result = decode.main(["--batch", "2", "--prompt", "8", "--new-tokens", "4", "--layers", "1",
                        "--hidden", "32", "--mlp", "64", "--heads", "4", "--kv-heads", "2",
                        "--vocab", "64", "--repeats", "1"])
  names = [r["decoder"] for r in result["rows"]]
  assert names == ["ultralong_jax, device loop", "ultralong_jax, host loop",
                   "transformers generate"]
  for row in result["rows"]:
    # float32 on both sides: greedy tokens equal transformers' in every row.
    assert row["rows_equal_transformers"] == 2 and len(row["wall_seconds"]) == 1
  assert result["rows"][-1]["vs_transformers"] == 1.0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| transformers")]
  assert len(lines) == 1 and "| 1.00x |" in lines[0] and lines[0].endswith("| 2/2 |")
