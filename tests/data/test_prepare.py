"""prepare: every source format to the same shards, bad input counted, strict mode, workers."""

import json
import os

import numpy as np
import pytest

from ultralong_jax.data import bad_input as bi
from ultralong_jax.data import prepare
from ultralong_jax.data import readers
from ultralong_jax.data import shards
from ultralong_jax.data import tokenizer as tok_lib


def read_all(path: str) -> list[list[int]]:
  """Documents of a prepared directory, back in their input order (round-robin shards)."""
  corpus = shards.load_prepared(path)
  per_shard = []
  from array_record.python import array_record_module as arm
  for p in corpus.shard_paths:
    r = arm.ArrayRecordReader(p)
    per_shard.append([shards.decode_doc(x).tolist() for x in r.read_all()])
    r.close()
  out = []
  for k in range(corpus.manifest["num_documents"]):
    out.append(per_shard[k % len(per_shard)][k // len(per_shard)])
  return out


TEXTS = ["the cat sat on a mat", "long context 12 345", "ünïcödé 漢字 🙂", "rivers\nand books"]


def test_jsonl_gz_and_bad_lines(tmp, hf_tokenizer_path, jsonl_writer):
  good = [{"text": t} for t in TEXTS]
  jsonl_writer(os.path.join(tmp, "a.jsonl"), good[:2] + ["{broken", {"txt": "x"}])
  jsonl_writer(os.path.join(tmp, "b.jsonl.gz"), [b"\xc3\x28", {"text": ""}] + good[2:] +
               [{"text": 7}])
  jsonl_writer(os.path.join(tmp, "empty.jsonl"), [])
  inputs = readers.expand_paths(os.path.join(tmp, "*.jsonl*"))
  manifest = prepare.prepare(inputs, os.path.join(tmp, "out"), hf_tokenizer_path, num_shards=3,
                             num_workers=1, progress=False)
  tok = tok_lib.load_tokenizer(hf_tokenizer_path)
  assert read_all(os.path.join(tmp, "out")) == [tok.encode(t) for t in TEXTS]
  assert manifest["bad_input"] == {bi.MALFORMED_JSON: 1, bi.MISSING_FIELD: 1, bi.INVALID_UTF8: 1,
                                   bi.EMPTY_DOCUMENT: 1, bi.INVALID_FIELD: 1, bi.EMPTY_SOURCE: 1}
  assert manifest["num_tokens"] == sum(len(tok.encode(t)) for t in TEXTS)
  lengths = shards.load_prepared(os.path.join(tmp, "out")).lengths
  assert sorted(lengths.tolist()) == sorted(len(tok.encode(t)) for t in TEXTS)


def test_strict_mode_names_file_and_line(tmp, hf_tokenizer_path, jsonl_writer):
  path = jsonl_writer(os.path.join(tmp, "a.jsonl"), [{"text": "ok"}, {"text": "ok"}, "{bad"])
  with pytest.raises(bi.BadInputError, match=r"a\.jsonl:3: malformed_json"):
    prepare.prepare([path], os.path.join(tmp, "out"), hf_tokenizer_path, num_workers=1,
                    strict=True, progress=False)


def test_out_of_vocab_documents_dropped(tmp, hf_tokenizer_path, jsonl_writer):
  tok = tok_lib.load_tokenizer(hf_tokenizer_path)
  limit = sorted(max(tok.encode(t)) for t in TEXTS)[1] + 1  # two documents fit, two do not
  small = [t for t in TEXTS if max(tok.encode(t)) < limit]
  path = jsonl_writer(os.path.join(tmp, "a.jsonl"), [{"text": t} for t in TEXTS])
  manifest = prepare.prepare([path], os.path.join(tmp, "out"), hf_tokenizer_path, num_workers=1,
                             vocab_size=limit, progress=False)
  assert manifest["num_documents"] == len(small)
  assert manifest["bad_input"] == {bi.TOKEN_OUT_OF_VOCAB: len(TEXTS) - len(small)}


def test_parquet_and_arrayrecord_sources_match_jsonl(tmp, sp_model_path, jsonl_writer):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  from array_record.python import array_record_module as arm
  pq.write_table(pa.table({"content": TEXTS + [None]}), os.path.join(tmp, "t.parquet"))
  w = arm.ArrayRecordWriter(os.path.join(tmp, "t.arrayrecord"), "group_size:1")
  for t in TEXTS:
    w.write(json.dumps({"content": t}).encode())
  w.close()
  jsonl_writer(os.path.join(tmp, "t.jsonl"), [{"content": t} for t in TEXTS])
  docs = {}
  for name in ("t.parquet", "t.arrayrecord", "t.jsonl"):
    out = os.path.join(tmp, name + ".tok")
    m = prepare.prepare([os.path.join(tmp, name)], out, sp_model_path, text_field="content",
                        num_shards=2, num_workers=1, progress=False)
    docs[name] = read_all(out)
    if name == "t.parquet":
      assert m["bad_input"] == {bi.MISSING_FIELD: 1}
  assert docs["t.parquet"] == docs["t.arrayrecord"] == docs["t.jsonl"]
  tok = tok_lib.load_tokenizer(sp_model_path)
  assert [tok.decode(d) for d in docs["t.jsonl"]] == TEXTS


def test_cli_with_worker_pool_matches_single_process(tmp, hf_tokenizer_path, jsonl_writer):
  rng = np.random.default_rng(0)
  words = "the cat sat on a mat long context rivers".split()
  jsonl_writer(os.path.join(tmp, "a.jsonl"),
               [{"text": " ".join(rng.choice(words, rng.integers(1, 50)))} for _ in range(300)])
  prepare.main([f"--input={tmp}/a.jsonl", f"--tokenizer={hf_tokenizer_path}",
                f"--output_dir={tmp}/pool", "--num_shards=4", "--num_workers=2"])
  prepare.prepare([f"{tmp}/a.jsonl"], f"{tmp}/one", hf_tokenizer_path, num_shards=4,
                  num_workers=1, progress=False)
  assert read_all(f"{tmp}/pool") == read_all(f"{tmp}/one")
  assert shards.load_prepared(f"{tmp}/pool").domain == "pool"


def test_expand_paths_and_format():
  with pytest.raises(FileNotFoundError, match="match nothing"):
    readers.expand_paths("/nonexistent/*.jsonl")
  assert readers.guess_format("a.jsonl.gz") == "jsonl"
  assert readers.guess_format("a.parquet") == "parquet"
  assert readers.guess_format("x.array_record-00001-of-00002") == "arrayrecord"
  with pytest.raises(ValueError, match="--format"):
    readers.guess_format("a.txt")
