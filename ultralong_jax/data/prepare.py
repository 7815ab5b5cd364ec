"""Tokenize a corpus once into ArrayRecord shards: `python -m ultralong_jax.data.prepare`.

  python -m ultralong_jax.data.prepare --input='raw/books/*.jsonl.gz' --text_field=text \
      --tokenizer=/ckpt/Llama-3.1-8B-Instruct/tokenizer.json --domain=books \
      --output_dir=/data/books_tok --num_shards=64

Reads JSONL (plain/.gz), Parquet, ArrayRecord (JSON or text records) or a TFDS dataset from a
local data_dir in one streaming pass, tokenizes on all cores (a process pool with a bounded
number of batches in flight, so memory stays flat), and writes the format of `shards.py`.
Document k goes to shard k % num_shards, so the output does not depend on the worker count.
Bad records are counted by kind (and saved in the manifest) or, with --strict, fatal.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import multiprocessing as mp
import os
from typing import Iterable, Iterator

import numpy as np

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import readers
from ultralong_jax.data import shards
from ultralong_jax.data import tokenizer as tok_lib

log = logging.getLogger(__name__)

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
  global _worker_tokenizer
  # One core per worker: the HF backend would otherwise start its own thread pool in each.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  _worker_tokenizer = tok_lib.load_tokenizer(tokenizer_path)


def _tokenize(texts: list[str]) -> list[np.ndarray]:
  return [np.asarray(ids, np.int32) for ids in tok_lib.encode_batch(_worker_tokenizer, texts)]


def _batches(records: Iterable[readers.Record], log_: bi.BadInputLog, size: int
             ) -> Iterator[tuple[list[str], list[str]]]:
  texts, wheres = [], []
  for rec in records:
    if isinstance(rec, bi.Dropped):
      log_.add(rec)
      continue
    texts.append(rec[0])
    wheres.append(rec[1])
    if len(texts) == size:
      yield texts, wheres
      texts, wheres = [], []
  if texts:
    yield texts, wheres


def _all_records(inputs: list[str], fmt: str | None, field: str, strict: bool,
                 log_: bi.BadInputLog, tfds_spec: tuple[str, str, str] | None
                 ) -> Iterator[readers.Record]:
  sources: list[tuple[str, Iterator[readers.Record]]] = []
  if tfds_spec is not None:
    name, data_dir, split = tfds_spec
    sources.append((f"tfds:{name}/{split}", readers.read_tfds(name, data_dir, split, field, strict)))
  for path in inputs:
    sources.append((path, readers.read_records(path, fmt or readers.guess_format(path), field,
                                               strict)))
  for name, records in sources:
    empty = True
    for rec in records:
      empty = False
      yield rec
    if empty:
      log_.report(bi.EMPTY_SOURCE, f"{name}:0", "no records")


def prepare(inputs: list[str], output_dir: str, tokenizer_path: str, *, fmt: str | None = None,
            text_field: str = "text", domain: str | None = None, num_shards: int = 8,
            num_workers: int | None = None, vocab_size: int | None = None, strict: bool = False,
            tfds_spec: tuple[str, str, str] | None = None, batch_docs: int = 64,
            progress: bool = True) -> dict:
  """Tokenizes `inputs` into `output_dir`; returns the manifest (also written as JSON)."""
  if tfds_spec is not None:  # a missing package, dataset or split fails before any work
    readers.check_tfds(*tfds_spec)
  num_workers = os.cpu_count() if num_workers is None else num_workers
  domain = domain or os.path.basename(os.path.normpath(output_dir))
  tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  vocab_size = vocab_size or tokenizer.vocab_size
  os.makedirs(output_dir, exist_ok=True)
  bad = bi.BadInputLog(strict)
  from array_record.python import array_record_module as arm  # pylint: disable=import-outside-toplevel
  names = [shards.shard_name(i, num_shards) for i in range(num_shards)]
  # group_size:1 makes every record its own chunk: cheap random access for shuffled reads.
  writers = [arm.ArrayRecordWriter(os.path.join(output_dir, n), "group_size:1") for n in names]
  lengths: list[list[int]] = [[] for _ in range(num_shards)]
  crcs: list[list[int]] = [[] for _ in range(num_shards)]  # per record, checked when read
  max_id, n_docs, n_tokens = -1, 0, 0

  records = _all_records(inputs, fmt, text_field, strict, bad, tfds_spec)
  batches = _batches(records, bad, batch_docs)
  if num_workers <= 1:
    _init_worker(tokenizer_path)
    results = ((wheres, _tokenize(texts)) for texts, wheres in batches)
    pool = None
  else:
    pool = mp.get_context("spawn").Pool(num_workers, _init_worker, (tokenizer_path,))
    results = _bounded_imap(pool, batches, max_in_flight=2 * num_workers)
  bar = _progress_bar(progress, domain)
  try:
    for wheres, docs in results:
      for where, ids in zip(wheres, docs):
        if ids.size == 0:
          bad.report(bi.EMPTY_DOCUMENT, where, "no tokens")
          continue
        if ids.min() < 0 or ids.max() >= vocab_size:
          bad.report(bi.TOKEN_OUT_OF_VOCAB, where, f"ids in [{ids.min()}, {ids.max()}], "
                     f"vocab_size {vocab_size}")
          continue
        shard = n_docs % num_shards
        record = shards.encode_doc(ids)
        writers[shard].write(record)
        lengths[shard].append(ids.size)
        crcs[shard].append(shards.record_crc32(record))
        max_id = max(max_id, int(ids.max()))
        n_docs += 1
        n_tokens += ids.size
      if bar is not None:
        bar.update(len(docs))
        bar.set_postfix(tokens=n_tokens, refresh=False)
  finally:
    if pool is not None:
      pool.terminate()
    for w in writers:
      w.close()
    if bar is not None:
      bar.close()
  if n_docs == 0:
    raise ValueError(f"no usable documents in {inputs or tfds_spec}; bad input: {dict(bad.counts)}")
  shard_info = []
  for name, lens, crc in zip(names, lengths, crcs):
    np.save(os.path.join(output_dir, shards.lengths_name(name)), np.asarray(lens, np.int64))
    np.save(os.path.join(output_dir, shards.crc32_name(name)), np.asarray(crc, np.uint32))
    path = os.path.join(output_dir, name)
    shard_info.append(dict(file=name, lengths=shards.lengths_name(name), num_documents=len(lens),
                           num_tokens=int(sum(lens)), crc32=shards.crc32_name(name),
                           bytes=os.path.getsize(path), sha256=shards.file_sha256(path)))
  manifest = dict(
      format_version=shards.FORMAT_VERSION, domain=domain, tokenizer=os.path.abspath(tokenizer_path),
      vocab_size=vocab_size, max_token_id=max_id, num_documents=n_docs,
      num_tokens=sum(s["num_tokens"] for s in shard_info), shards=shard_info,
      bad_input=dict(sorted(bad.counts.items())), sources=list(inputs) + (
          [f"tfds:{tfds_spec[0]}/{tfds_spec[2]}"] if tfds_spec else []),
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  with open(os.path.join(output_dir, shards.MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  log.info("prepared %s: %d documents, %d tokens, bad input %s", domain, n_docs,
           manifest["num_tokens"], manifest["bad_input"])
  return manifest


def _bounded_imap(pool, batches, max_in_flight: int):
  """Ordered pool.imap with back-pressure (Pool.imap drains its input eagerly)."""
  pending: collections.deque = collections.deque()
  for texts, wheres in batches:
    pending.append((wheres, pool.apply_async(_tokenize, (texts,))))
    if len(pending) >= max_in_flight:
      wheres_, fut = pending.popleft()
      yield wheres_, fut.get()
  while pending:
    wheres_, fut = pending.popleft()
    yield wheres_, fut.get()


def _progress_bar(enabled: bool, domain: str):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(desc=f"prepare {domain}", unit="doc", smoothing=0.1)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--input", default="", help="comma-separated files or globs")
  p.add_argument("--format", default=None, choices=readers.FORMATS[:3],
                 help="default: from the file extension")
  p.add_argument("--text_field", default="text",
                 help="JSON key / Parquet column / TFDS feature holding the text "
                      "('' for ArrayRecord records that are plain UTF-8 text)")
  p.add_argument("--tfds_name", default="",
                 help="TFDS dataset name[/config][:version] prepared under --tfds_data_dir "
                      "(needs pip install -r requirements-tfds.txt; ArrayRecord datasets need "
                      "no TensorFlow)")
  p.add_argument("--tfds_data_dir", default="", help="local TFDS data_dir")
  p.add_argument("--tfds_split", default="train")
  p.add_argument("--tokenizer", required=True, help="SentencePiece .model or tokenizer.json")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--domain", default=None, help="domain name (default: output dir name)")
  p.add_argument("--num_shards", type=int, default=8)
  p.add_argument("--num_workers", type=int, default=os.cpu_count(), help="default: all cores")
  p.add_argument("--vocab_size", type=int, default=None,
                 help="model vocab size; ids >= it are bad input (default: tokenizer's)")
  p.add_argument("--strict", action="store_true", help="fail at the first bad record")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  inputs = readers.expand_paths(args.input) if args.input else []
  tfds_spec = (args.tfds_name, args.tfds_data_dir, args.tfds_split) if args.tfds_name else None
  if not inputs and tfds_spec is None:
    p.error("give --input or --tfds_name")
  manifest = prepare(inputs, args.output_dir, args.tokenizer, fmt=args.format,
                     text_field=args.text_field, domain=args.domain, num_shards=args.num_shards,
                     num_workers=args.num_workers, vocab_size=args.vocab_size, strict=args.strict,
                     tfds_spec=tfds_spec)
  print(json.dumps({k: manifest[k] for k in ("domain", "num_documents", "num_tokens",
                                             "bad_input")}))


if __name__ == "__main__":
  main()
