"""Tokenizer interface (both backends), random-access JSONL, resampling rates, config checks."""

import os
import pickle

import numpy as np
import pytest

from ultralong_jax.data import config as config_lib
from ultralong_jax.data import jsonl_source
from ultralong_jax.data import resample
from ultralong_jax.data import tokenizer as tok_lib


@pytest.mark.parametrize("backend", ["hf", "sp"])
def test_tokenizer_round_trip_and_special_ids(backend, hf_tokenizer_path, sp_model_path):
  path = hf_tokenizer_path if backend == "hf" else sp_model_path
  tok = tok_lib.load_tokenizer(path)
  text = "the cat sat on a mat 12 345 ünïcödé 漢字 🙂"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  ids = {s: tok.token_id(s) for s in tok_lib.LLAMA3_SPECIAL_TOKENS}
  assert len(set(ids.values())) == 5 and all(0 <= i < tok.vocab_size for i in ids.values())
  # A special token written in text is that token (as apply_chat_template tokenizes it).
  # (SentencePiece may put its dummy-prefix piece "▁" first.)
  assert tok.encode("<|eot_id|>")[-1:] == [ids["<|eot_id|>"]]
  assert tok.decode([ids["<|eot_id|>"]]) == "<|eot_id|>"
  with pytest.raises(KeyError):
    tok.token_id("<|not_a_token|>")
  # Grain pickles tokenizers into worker processes.
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
  assert tok_lib.encode_batch(tok, [text, "cat"]) == [tok.encode(text), tok.encode("cat")]


def test_load_tokenizer_from_directory_and_missing(hf_tokenizer_path, tmp):
  assert isinstance(tok_lib.load_tokenizer(os.path.dirname(hf_tokenizer_path)),
                    tok_lib.HuggingFaceTokenizer)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tok_lib.load_tokenizer(tmp)


def test_damaged_tokenizer_files_name_the_file(hf_tokenizer_path, sp_model_path, tmp):
  for good, name, kind in ((hf_tokenizer_path, "tokenizer.json", "a tokenizer.json"),
                           (sp_model_path, "sp.model", "a SentencePiece .model")):
    with open(good, "rb") as f:
      head = f.read(200)  # truncated mid-file
    bad = os.path.join(tmp, name)
    with open(bad, "wb") as f:
      f.write(head)
    with pytest.raises(ValueError, match=f"tokenizer {bad} could not be read as {kind}"):
      tok_lib.load_tokenizer(bad)


@pytest.mark.parametrize("name", ["plain.jsonl", "zipped.jsonl.gz"])
def test_jsonl_source_random_access(name, tmp, jsonl_writer):
  lines = [{"i": i, "text": "x" * i} for i in range(50)]
  path = jsonl_writer(os.path.join(tmp, name), lines)
  with open(os.path.join(tmp, "no_newline.jsonl"), "wb") as f:
    f.write(b'{"a": 1}\n\n{"b": 2}')  # a blank line and no trailing newline
  src = jsonl_source.JsonlSource([path, os.path.join(tmp, "no_newline.jsonl")],
                                 cache_dir=os.path.join(tmp, "cache"))
  assert len(src) == 53
  assert src[7] == (b'{"i": 7, "text": "xxxxxxx"}', f"{path}:8")
  assert src[51] == (b"", f"{tmp}/no_newline.jsonl:2")
  assert src[52][0] == b'{"b": 2}'
  again = pickle.loads(pickle.dumps(src))
  assert [again[i] for i in range(53)] == [src[i] for i in range(53)]
  with pytest.raises(IndexError):
    src[53]


def test_resampling_rates_statistics():
  rates = resample.ResampleRates(short_threshold=100, short_rate=0.3, long_threshold=200,
                                 long_rate=2.5)
  lengths = np.array([50] * 20000 + [150] * 100 + [300] * 20000)
  plan = resample.plan_domain("web", lengths, rates, seed=0)
  short, long = plan.copies[:20000], plan.copies[-20000:]
  assert set(short) <= {0, 1} and set(long) <= {2, 3}
  assert (plan.copies[20000:20100] == 1).all()
  # Binomial(20000, p): 5 standard deviations is ~0.016 for p = 0.3 and 0.018 for p = 0.5.
  assert abs(short.mean() - 0.3) < 0.02 and abs(long.mean() - 2.5) < 0.02
  assert len(plan.doc_indices) == plan.copies.sum()
  assert (np.bincount(plan.doc_indices, minlength=len(lengths)) == plan.copies).all()
  same = resample.plan_domain("web", lengths, rates, seed=0)
  other = resample.plan_domain("books", lengths, rates, seed=0)
  assert (same.copies == plan.copies).all() and not (other.copies == plan.copies).all()
  assert resample.plan_domain("web", np.array([0, 5]), rates, 0).copies[0] == 0


@pytest.mark.parametrize("stage", [1, 2])
def test_default_configs_document_every_key(stage):
  cfg = config_lib.default_data_config(stage)
  doc = config_lib.default_data_config.__doc__
  for key in cfg.keys():
    assert f"{key}" in doc, key
  if stage == 1:
    cfg.domains.web = {"path": "/x", "weight": 1.0}
  else:
    cfg.chat_files, cfg.tokenizer = "/x.jsonl", "/t.json"
  config_lib.validate_data_config(cfg)


@pytest.mark.parametrize("stage,key,value,match", [
    (1, "seq_len", 1, "data.seq_len"),
    (1, "global_batch_size", 3, r"data.global_batch_size.*multiple of the JAX process count"),
    (1, "separator_id", 200_000, "data.separator_id"),
    (1, "bogus", 1, "data.bogus: got 'unknown key'"),
    (2, "over_limit", "cut", "data.over_limit"),
    (2, "packing", "greedy", "data.packing"),
    (2, "max_example_len", 10_000, "data.max_example_len"),
])
def test_validation_names_the_key(stage, key, value, match):
  cfg = config_lib.default_data_config(stage)
  if stage == 1:
    cfg.domains.web = {"path": "/x", "weight": 1.0}
  else:
    cfg.chat_files, cfg.tokenizer = "/x.jsonl", "/t.json"
  with cfg.unlocked():
    cfg[key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate_data_config(cfg, process_count=2)


def test_domain_validation():
  cfg = config_lib.default_data_config(1)
  with pytest.raises(ValueError, match="data.domains"):
    config_lib.validate_data_config(cfg)
  cfg.domains.web = {"path": "/x", "weight": 0.0}
  with pytest.raises(ValueError, match="data.domains.web.weight"):
    config_lib.validate_data_config(cfg)
  cfg.domains.web = {"path": "/x", "resample": {"short_rate": -1.0}}
  with pytest.raises(ValueError, match="data.domains.web.resample.short_rate"):
    config_lib.validate_data_config(cfg)
