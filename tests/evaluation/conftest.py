"""Fixtures for the evaluation tests: a tiny Llama-3-shaped tokenizer trained here (no network)."""

from __future__ import annotations

import pytest

from ultralong_jax.data.tokenizer import LLAMA3_SPECIAL_TOKENS

# Llama 3's pre-tokenizer split (meta-llama/Llama-3.1-8B-Instruct tokenizer.json).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _training_texts():
  from ultralong_jax.evaluation import haystack
  texts = [haystack.filler_text(n_words=400, seed=s) for s in range(20)]
  return texts + ["The special magic number is 12345. What is the special magic number?",
                  "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "\n\n",
                  "system", "user", "assistant", "0123456789"]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
  """A byte-level BPE (vocab 512) with Llama 3's split regex and special tokens."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=list(LLAMA3_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_training_texts(), trainer)
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tok.save(path)
  return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
  from ultralong_jax.data.tokenizer import load_tokenizer
  return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
  """A tiny random Llama (vocab 512, matching `tokenizer`) saved as a Hugging Face directory."""
  import ultralong_jax
  from ultralong_jax.modeling import llama
  from ultralong_jax.modeling.config import LlamaConfig
  config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, rope_theta=10000.0,
                       max_position_embeddings=4096)
  out = str(tmp_path_factory.mktemp("tiny_model"))
  ultralong_jax.save_pretrained(llama.init_model(config, seed=0), out)
  return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
  import ultralong_jax
  return ultralong_jax.from_pretrained(tiny_model_dir)


@pytest.fixture
def flag_error(capsys):
  """Function: runs a CLI's main(argv) that must stop at a flag check as argparse does (usage and
  `error: ...` on stderr, exit status 2, no traceback); returns the message after `error: `."""

  def run(main, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
      main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err.split("error: ", 1)[1].strip()

  return run
