"""Data-pipeline throughput vs. what one training host consumes: `python -m ultralong_jax.bench.data`.

Measures, on synthetic data in a temp dir, packed tokens/s of one process (one core; Grain's
reader threads mostly wait on I/O) for
  prepare  tokenizing text into shards (python -m ultralong_jax.data.prepare, one worker)
  stage 1  prepared documents -> resampled, separator-joined rows of seq_len + 1 (1M default)
  stage 2  chat JSONL -> Llama 3.1 template -> tokens -> first-fit packed rows of 8K
and prints them next to the token rate one 8xH100 host trains Llama-3.1-8B at, from FLOPs at 40%
MFU (see `host_tokens_per_second`). Tokenization uses a byte-level BPE shaped like Llama 3's
trained here (offline) unless --tokenizer points at the real tokenizer.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import tempfile
import time

import ml_collections
import numpy as np

# Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B): parameters, layers, attention width.
LLAMA31_8B_PARAMS = 8_030_261_248
LLAMA31_8B_LAYERS = 32
LLAMA31_8B_ATTN_WIDTH = 32 * 128  # query heads x head dim
H100_BF16_DENSE_PEAK = 989e12     # FLOP/s, NVIDIA H100 SXM datasheet (dense, no sparsity)


def train_flops_per_token(seq_len: int, params: int = LLAMA31_8B_PARAMS,
                          layers: int = LLAMA31_8B_LAYERS,
                          attn_width: int = LLAMA31_8B_ATTN_WIDTH) -> float:
  """6·N for the weights (forward 2N + backward 4N) plus causal attention.

  Attention per layer and token, forward: QK^T and AV each take 2·S·d FLOPs against S keys;
  causal masking halves the keys on average -> 2·S·d; training triples it -> 6·S·d.
  """
  return 6.0 * params + 6.0 * layers * seq_len * attn_width


def host_tokens_per_second(seq_len: int, gpus: int = 8, mfu: float = 0.40,
                           attention: bool = True) -> float:
  flops = train_flops_per_token(seq_len) if attention else 6.0 * LLAMA31_8B_PARAMS
  return gpus * H100_BF16_DENSE_PEAK * mfu / flops


def _words(rng: random.Random, n: int) -> str:
  vocab = ("the of and to in a is that for it as was with be by on not he this are or his from "
           "at which but have an they you were her she there been one all we their has would "
           "when if so no will more can out up about into them than do only other time some "
           "could these two may first then like new 1984 3.14 42, river; book: context? long!")
  words = vocab.split()
  return " ".join(rng.choice(words) for _ in range(n))


def _build_tokenizer(path: str) -> str:
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  from ultralong_jax.data.tokenizer import LLAMA3_SPECIAL_TOKENS
  split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  rng = random.Random(0)
  tok.train_from_iterator(
      [_words(rng, 200) for _ in range(2000)],
      trainers.BpeTrainer(vocab_size=4000, special_tokens=list(LLAMA3_SPECIAL_TOKENS),
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                          show_progress=False))
  tok.save(path)
  return path


def _timed(iterator, seconds: float, count) -> tuple[float, int]:
  next(iterator)  # first batch: pipeline start-up, not throughput
  tokens, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    tokens += count(next(iterator))
  return tokens / (time.perf_counter() - start), tokens


def bench_prepare(tmp: str, tokenizer: str, docs: int) -> float:
  from ultralong_jax.data import prepare
  rng = random.Random(1)
  src = os.path.join(tmp, "text.jsonl")
  with open(src, "w") as f:
    for _ in range(docs):
      f.write(json.dumps({"text": _words(rng, rng.randint(200, 3000))}) + "\n")
  start = time.perf_counter()
  manifest = prepare.prepare([src], os.path.join(tmp, "prepared_text"), tokenizer, num_shards=4,
                             num_workers=1, progress=False)
  return manifest["num_tokens"] / (time.perf_counter() - start)


def _write_prepared(path: str, corpus_tokens: int, vocab_size: int) -> None:
  """A synthetic prepared domain: log-normal lengths around 8K tokens (long-document mix)."""
  from array_record.python import array_record_module as arm
  from ultralong_jax.data import shards
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  lengths = []
  while sum(lengths) < corpus_tokens:
    lengths.append(int(np.clip(rng.lognormal(np.log(6000), 1.0), 16, 400_000)))
  name = shards.shard_name(0, 1)
  writer = arm.ArrayRecordWriter(os.path.join(path, name), "group_size:1")
  for n in lengths:
    writer.write(shards.encode_doc(rng.integers(2, vocab_size, n, dtype=np.int32)))
  writer.close()
  np.save(os.path.join(path, shards.lengths_name(name)), np.asarray(lengths, np.int64))
  manifest = dict(format_version=shards.FORMAT_VERSION, domain="synthetic", tokenizer="none",
                  vocab_size=vocab_size, max_token_id=vocab_size - 1, num_documents=len(lengths),
                  num_tokens=int(sum(lengths)), bad_input={},
                  shards=[dict(file=name, lengths=shards.lengths_name(name),
                               num_documents=len(lengths), num_tokens=int(sum(lengths)))])
  with open(os.path.join(path, shards.MANIFEST), "w") as f:
    json.dump(manifest, f)


def run_stage1(tmp: str, seq_len: int, corpus_tokens: int, seconds: float,
               num_workers: int) -> float:
  from ultralong_jax.data import config, pretrain
  path = os.path.join(tmp, "prepared_tokens")
  _write_prepared(path, corpus_tokens, config.LLAMA3_VOCAB_SIZE)
  cfg = config.default_data_config(1)
  cfg.seq_len, cfg.global_batch_size, cfg.num_workers = seq_len, 1, num_workers
  cfg.domains.synthetic = ml_collections.ConfigDict(dict(path=path, weight=1.0))
  it = pretrain.build_pretrain_pipeline(config.resolve_data_config(cfg), process_index=0,
                                        process_count=1).iterator()
  rate, _ = _timed(it, seconds, lambda b: int((b["segment_ids"] > 0).sum()))
  it.close()
  return rate


def run_stage2(tmp: str, tokenizer: str, chats: int, seconds: float, num_workers: int) -> float:
  from ultralong_jax.data import config, sft
  rng = random.Random(2)
  path = os.path.join(tmp, "chats.jsonl")
  with open(path, "w") as f:
    for _ in range(chats):
      turns = [{"role": "system", "content": _words(rng, 20)}]
      for _ in range(rng.randint(1, 4)):
        turns += [{"role": "user", "content": _words(rng, rng.randint(10, 300))},
                  {"role": "assistant", "content": _words(rng, rng.randint(20, 600))}]
      f.write(json.dumps({"messages": turns}) + "\n")
  cfg = config.default_data_config(2)
  cfg.chat_files, cfg.tokenizer, cfg.num_workers = path, tokenizer, num_workers
  cfg.global_batch_size = 1
  it = sft.build_sft_pipeline(config.resolve_data_config(cfg), process_index=0, process_count=1,
                              cache_dir=os.path.join(tmp, "cache")).iterator()
  rate, _ = _timed(it, seconds, lambda b: int((b["segment_ids"] > 0).sum()))
  it.close()
  return rate


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seq_len", type=int, default=1_048_576, help="stage-1 row length")
  p.add_argument("--corpus_tokens", type=int, default=16_000_000,
                 help="synthetic stage-1 corpus size (repeated while measuring)")
  p.add_argument("--chats", type=int, default=2000)
  p.add_argument("--prepare_docs", type=int, default=400)
  p.add_argument("--seconds", type=float, default=10.0, help="measuring time per pipeline")
  p.add_argument("--tokenizer", default="", help="tokenizer.json (default: a BPE trained here)")
  p.add_argument("--num_workers", type=int, default=0,
                 help="mp_prefetch workers (0 = one process: the per-core figure)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: no Rust thread pool
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = args.tokenizer or _build_tokenizer(os.path.join(tmp, "tokenizer.json"))
    host_1 = host_tokens_per_second(args.seq_len)
    host_2 = host_tokens_per_second(8192, attention=False)
    rows = [
        dict(pipeline="prepare (tokenize to shards)", rate=bench_prepare(tmp, tokenizer,
                                                                         args.prepare_docs),
             host=host_1, note=f"stage-1 host rate at {args.seq_len} tokens"),
        dict(pipeline=f"stage 1 (rows of {args.seq_len}+1)",
             rate=run_stage1(tmp, args.seq_len, args.corpus_tokens, args.seconds,
                             args.num_workers),
             host=host_1, note="6N + causal attention, 40% MFU"),
        dict(pipeline="stage 2 (chat, 8K rows)",
             rate=run_stage2(tmp, tokenizer, args.chats, args.seconds, args.num_workers),
             host=host_2, note="6N only (attention ignored: an upper bound)"),
    ]
  per = "per process" if args.num_workers else "per core"
  print(f"\nData pipeline throughput vs. consumption of one 8xH100 host training Llama-3.1-8B "
        f"at 40% MFU ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, num_workers={args.num_workers})\n")
  header = (f"| {'pipeline':<30} | {'tokens/s ' + per:>18} | {'host consumes tokens/s':>22} | "
            f"{'x host':>10} | {'cores for 10x':>13} | note |")
  print(header)
  print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
  for r in rows:
    ratio = r["rate"] / r["host"]
    cores = str(max(1, int(np.ceil(10 / ratio)))) if not args.num_workers else "-"
    print(f"| {r['pipeline']:<30} | {r['rate']:>18,.0f} | {r['host']:>22,.0f} | "
          f"{ratio:>10,.1f} | {cores:>13} | {r['note']} |")
  return rows


if __name__ == "__main__":
  main()
