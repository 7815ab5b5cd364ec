"""Fixtures for training tests: a generated corpus, tokenizer and chats, and tiny-model configs."""

import os

import ml_collections
import pytest

from ultralong_jax.data import prepare, synthetic
from ultralong_jax.data.tokenizer import load_tokenizer
from ultralong_jax.training import config as config_lib


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("corpus"))
  tok = synthetic.build_tokenizer(os.path.join(d, "tokenizer.json"), vocab_size=512)
  synthetic.write_documents(os.path.join(d, "docs.jsonl"), 200, seed=0)
  prepare.prepare([os.path.join(d, "docs.jsonl")], os.path.join(d, "prepared"), tok,
                  num_shards=2, num_workers=1, progress=False)
  synthetic.write_chats(os.path.join(d, "chats.jsonl"), 200, seed=1)
  return {"dir": d, "tokenizer": tok, "prepared": os.path.join(d, "prepared"),
          "chats": os.path.join(d, "chats.jsonl")}


@pytest.fixture
def tiny_config(corpus):
  """Factory: a tiny-model config for `stage` on the generated corpus, 8 simulated devices."""

  def make(stage=1, steps=4, seq_len=128, batch=2, mesh=None):
    tokenizer = load_tokenizer(corpus["tokenizer"])
    c = config_lib.base_config(stage)
    c.model.preset, c.model.dtype, c.model.remat_policy, c.model.ultralong = (
        "tiny", "float32", "none", "")
    c.model.rope_scaling_json = ('{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, '
                                 '"high_freq_factor": 4.0, "original_max_position_embeddings": 64}')
    c.init.mode = "random"
    for axis, size in (mesh or dict(data=2, fsdp=1, sequence=2, tensor=2)).items():
      c.mesh[axis] = size
    c.data.seq_len, c.data.global_batch_size, c.data.vocab_size = seq_len, batch, 512
    c.data.tokenizer = corpus["tokenizer"]
    if stage == 1:
      c.data.separator_id = tokenizer.token_id("<|end_of_text|>")
      c.data.domains = ml_collections.ConfigDict(
          {"synthetic": {"path": corpus["prepared"], "weight": 1.0}})
    else:
      c.data.chat_files = corpus["chats"]
      c.data.max_example_len = seq_len
    c.train.steps, c.train.loss_chunk_size = steps, 32
    c.optim.learning_rate, c.optim.warmup_steps = 3e-3, 1
    c.checkpoint.every_steps, c.checkpoint.async_save = 2, True
    c.export.dtype = "float32"
    return c

  return make
