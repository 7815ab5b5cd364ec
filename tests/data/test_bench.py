"""The data benchmark: its FLOPs arithmetic by hand, and a tiny end-to-end run."""

import pytest

from ultralong_jax.bench import data as bench


def test_host_consumption_from_flops():
  # Llama-3.1-8B at 1M context: 6N = 4.818e10, causal attention 6*32*2^20*4096 = 8.246e11.
  per_token = 6 * 8_030_261_248 + 6 * 32 * 1_048_576 * 4096
  assert bench.train_flops_per_token(1_048_576) == per_token
  assert bench.host_tokens_per_second(1_048_576) == pytest.approx(8 * 989e12 * 0.4 / per_token)
  assert 3600 < bench.host_tokens_per_second(1_048_576) < 3650
  assert bench.host_tokens_per_second(8192, attention=False) == pytest.approx(65_685, rel=1e-3)


def test_benchmark_runs_and_prints_a_table(capsys):
  rows = bench.main(["--seq_len=4096", "--corpus_tokens=200000", "--seconds=0.2", "--chats=40",
                     "--prepare_docs=10"])
  out = capsys.readouterr().out
  assert "| stage 1 (rows of 4096+1)" in out and "| stage 2 (chat, 8K rows)" in out
  assert all(r["rate"] > 0 for r in rows)
