"""One small tokenizer interface over SentencePiece models and Hugging Face `tokenizer.json`.

`encode` never adds BOS/EOS: the pipelines place special tokens themselves (separators in
stage 1, the chat template in stage 2). Special tokens written literally in the text (e.g.
"<|eot_id|>") are matched as special tokens by both backends, exactly as Hugging Face's
`apply_chat_template` tokenizes its rendered string.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

# Llama 3 special tokens the chat template needs (meta-llama/Llama-3.1-8B-Instruct).
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>")


class Tokenizer(Protocol):
  """What the data pipelines need from a tokenizer."""

  vocab_size: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`, special tokens included unless `skip_special_tokens` (as Hugging Face's
    `decode` does)."""

  def token_id(self, token: str) -> int:
    """Id of a special token such as "<|eot_id|>"; KeyError if the vocabulary lacks it."""


class SentencePieceTokenizer:
  """A SentencePiece `.model` file (the design card's tokenizer format)."""

  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    if skip_special_tokens:  # control pieces (<s>, </s>) and <unk>
      ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
    return self._sp.decode(ids)

  def token_id(self, token: str) -> int:
    i = self._sp.piece_to_id(token)
    # piece_to_id returns the unk id for unknown pieces rather than failing.
    if self._sp.id_to_piece(i) != token:
      raise KeyError(f"{token!r} is not a piece of {self.path}")
    return i

  def __reduce__(self):
    # Grain pickles pipelines into worker processes; reload the model there.
    return (SentencePieceTokenizer, (self.path,))


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` (Llama 3's byte-level BPE) via the `tokenizers` library."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
    self.path = path
    self._tok = HFTokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """ids and each token's (start, end) character span in `text`."""
    e = self._tok.encode(text, add_special_tokens=False)
    return e.ids, e.offsets

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"{token!r} is not a token of {self.path}")
    return i

  def __reduce__(self):
    return (HuggingFaceTokenizer, (self.path,))


def load_tokenizer(path: str) -> Tokenizer:
  """A `.model` file -> SentencePiece; `tokenizer.json` or a directory holding one -> HF."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer not found: {path} (give a SentencePiece .model file, a "
                            "tokenizer.json, or a directory holding tokenizer.json)")
  kind = HuggingFaceTokenizer if path.endswith(".json") else SentencePieceTokenizer
  try:
    return kind(path)
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises a bare Exception
    what = "tokenizer.json" if kind is HuggingFaceTokenizer else "SentencePiece .model"
    raise ValueError(f"tokenizer {path} could not be read as a {what} ({_first_line(e)}): a "
                     "truncated or damaged file? Copy it again from the model's files.") from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Batch encode where the backend has a native batch path (HF: Rust threads)."""
  if hasattr(tokenizer, "encode_batch"):
    return tokenizer.encode_batch(texts)
  return [tokenizer.encode(t) for t in texts]
