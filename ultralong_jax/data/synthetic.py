"""A generated corpus for the offline demo and tests: filler prose with pass keys, chats, and a
byte-level BPE tokenizer shaped like Llama 3's (same special tokens), trained on it here.

Documents state a numeric pass key early and ask for it again at the end, so a model trained on
them has a retrieval task whose difficulty grows with the distance between the two: the same skill
the needle-in-a-haystack eval measures.
"""

from __future__ import annotations

import json
import os
import random

from ultralong_jax.data.tokenizer import LLAMA3_SPECIAL_TOKENS

_SUBJECTS = ("the river", "a small town", "the old library", "the mountain road", "a quiet garden",
             "the harbor", "an autumn market", "the northern forest", "a long train", "the bridge")
_VERBS = ("winds past", "looks over", "hides", "leads to", "waits beside", "opens onto",
          "turns toward", "shelters", "stretches across", "remembers")
_OBJECTS = ("the valley", "a field of wheat", "the sleeping city", "the grey sea", "a stone wall",
            "the evening sky", "an empty square", "the distant hills", "a row of houses",
            "the morning fog")
# Llama 3's pre-tokenizer split (meta-llama/Llama-3.1-8B-Instruct tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def filler_sentence(rng: random.Random) -> str:
  return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def filler(rng: random.Random, n_sentences: int) -> str:
  return " ".join(filler_sentence(rng) for _ in range(n_sentences))


# The retrieval format shared by the corpus, the chats and the demo's needle-in-a-haystack eval
# (ultralong_jax.evaluation: intro, document, question, then "Answer:" for base models).
INTRO = "Read the document below and answer the question after it."
QUESTION = "What is the pass key?"


def passkey_sentence(key: int) -> str:
  return f" The pass key is {key}. Remember it. "


def document_filler(rng: random.Random, n_sentences: int, repeat: float = 0.0) -> str:
  """`filler`, except that each sentence after the first repeats one of the document's earlier
  sentences with probability `repeat` (repeat=0 gives exactly `filler`'s text and random draws).

  Real text repeats its own names and phrases, so a model learns early that copying from its
  context pays; in independent random sentences only the pass key is worth copying."""
  if not repeat:
    return filler(rng, n_sentences)
  sentences = []
  for _ in range(n_sentences):
    reuse = sentences and rng.random() < repeat
    sentences.append(rng.choice(sentences) if reuse else filler_sentence(rng))
  return " ".join(sentences)


def passkey_document(rng: random.Random, n_sentences: int, repeat: float = 0.0) -> str:
  key = rng.randint(10000, 99999)
  before = rng.randint(0, n_sentences)
  return (f"{INTRO}\n\n{document_filler(rng, before, repeat)}{passkey_sentence(key)}"
          f"{document_filler(rng, n_sentences - before, repeat)}\n\n{QUESTION}\n"
          f"Answer: The pass key is {key}.")


def write_documents(path: str, n_docs: int, seed: int, min_sentences: int = 4,
                    max_sentences: int = 120, passkey_fraction: float = 0.5,
                    repeat: float = 0.0, tokens: int | tuple[int, int] = 0,
                    tokenizer: str | None = None, recalls: int = 0) -> str:
  """JSONL of {"text": ...}; about `passkey_fraction` of the documents carry a pass key; each
  sentence repeats an earlier one of its document with probability `repeat` (document_filler).

  tokens: 0 = documents of min..max_sentences sentences; n = every document exactly n tokens
  under the tokenizer file `tokenizer` (`ExactLength`); (lo, hi) = each document's length drawn
  uniformly from lo..hi tokens; `recalls` (exact lengths only): extra question-and-answer sentences
  per pass-key document (ExactLength.document)."""
  rng = random.Random(seed)
  lo, hi = (tokens, tokens) if isinstance(tokens, int) else tokens
  exact = ExactLength(tokenizer, hi) if hi > 0 else None
  with open(path, "w") as f:
    for i in range(n_docs):
      passkey = rng.random() < passkey_fraction
      if exact is not None:
        text = exact.document(rng, passkey, repeat, tokens=rng.randint(lo, hi), recalls=recalls)
      else:
        n = rng.randint(min_sentences, max_sentences)
        text = passkey_document(rng, n, repeat) if passkey else document_filler(rng, n, repeat)
      f.write(json.dumps({"text": text, "id": i}) + "\n")
  return path


class ExactLength:
  """Documents (`passkey_document` / `document_filler` text) of exactly `tokens` tokens.

  With documents of seq_len + 1 - (separator, BOS) tokens, concat-then-split packing puts one
  whole document in each row: no pass key is cut off from its question by a row boundary, and the
  key sits at every depth of the full context. Sentences are drawn at random until the rest fits
  one or two more sentences of the right lengths; the text is then tokenized to check the length
  (sentence token counts add up; a merge at a join is corrected for and the document redrawn).
  """

  def __init__(self, tokenizer_path: str, tokens: int):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    if not tokenizer_path:
      raise ValueError("synthetic.ExactLength: documents of an exact token length need the "
                       "tokenizer file (tokenizer=...).")
    self._tok = Tokenizer.from_file(tokenizer_path)
    self.tokens = tokens
    sentences = [f"{s.capitalize()} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS]
    encoded = self._tok.encode_batch([" " + x for x in sentences])
    self._length = {sentence: len(enc.ids) for sentence, enc in zip(sentences, encoded)}
    self._by_length: dict[int, list[str]] = {}
    for sentence, n in self._length.items():
      self._by_length.setdefault(n, []).append(sentence)
    self._shortest, self._longest = min(self._by_length), max(self._by_length)
    # Tokens the joins of a pass-key document's parts gain or lose ("it. \n\n" is one token
    # fewer than its parts apart), learned from the first miss.
    self._merges = 0

  def _count(self, text: str) -> int:
    return len(self._tok.encode(text).ids)

  def _sentences(self, rng: random.Random, budget: int, repeat: float) -> list[str] | None:
    """Sentences whose token lengths (each with its leading space) sum to exactly `budget`."""
    out, used = [], 0
    while budget - used > 2 * self._longest:
      reuse = out and rng.random() < repeat
      sentence = rng.choice(out) if reuse else filler_sentence(rng)
      out.append(sentence)
      used += self._length[sentence]
    rest = budget - used
    for _ in range(len(out) + 1):
      fill = self._fill(rng, rest)
      if fill is not None:
        return out + fill
      if not out:
        return None
      rest += self._length[out.pop()]  # too little left for one sentence: give one back
    return None

  def _fill(self, rng: random.Random, rest: int) -> list[str] | None:
    if rest == 0:
      return []
    if rest in self._by_length:
      return [rng.choice(self._by_length[rest])]
    pairs = [(a, rest - a) for a in self._by_length if rest - a in self._by_length]
    if not pairs:
      return None
    a, b = rng.choice(pairs)
    return [rng.choice(self._by_length[a]), rng.choice(self._by_length[b])]

  def document(self, rng: random.Random, passkey: bool, repeat: float = 0.0,
               tokens: int | None = None, recalls: int = 0) -> str:
    """A pass-key document (spaced as the needle eval splices its needle: the needle's trailing
    space stays a token of its own) or plain filler, of exactly `tokens` (default
    `self.tokens`) tokens. `recalls` more question-and-answer sentences ("What is the pass key?
    The pass key is K.") sit at random places after the key: more copies to learn from."""
    target = self.tokens if tokens is None else tokens
    for _ in range(20):
      if passkey:
        key = rng.randint(10000, 99999)
        intro, needle = f"{INTRO}\n\n", passkey_sentence(key)
        question = f"\n\n{QUESTION}\nAnswer: The pass key is {key}."
        recall = f"{QUESTION} The pass key is {key}."
        frame = self._count(intro + needle + question) + recalls * self._count(" " + recall)
        if target < frame + self._shortest:
          raise ValueError(f"synthetic.ExactLength: a pass-key document with {recalls} recalls "
                           f"needs at least {frame + self._shortest} tokens, asked for {target}; "
                           "raise the corpus's `tokens`.")
        sentences = self._sentences(rng, target - frame + self._merges, repeat)
        if sentences is None:
          continue
        before = rng.randint(0, len(sentences))
        after = sentences[before:]
        for _ in range(recalls):
          after.insert(rng.randint(0, len(after)), recall)
        text = (intro + " ".join(sentences[:before]) + needle
                + "".join(" " + x for x in after) + question)
      else:
        sentences = self._sentences(rng, target, repeat)
        if sentences is None:
          continue
        text = " ".join(sentences)
      count = self._count(text)
      if count == target:
        return text
      if passkey and 0 < before < len(sentences) and after[-1] != recall:
        self._merges += target - count
    raise RuntimeError(f"synthetic.ExactLength: no document of exactly {target} tokens after "
                       "20 draws; the tokenizer does not split this corpus additively.")


def write_chats(path: str, n_chats: int, seed: int, max_sentences: int = 30) -> str:
  """JSONL of {"messages": [...]} chats: pass-key questions about a text, and small sums."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n_chats):
      messages = []
      if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a helpful assistant."})
      if rng.random() < 0.6:
        key = rng.randint(10000, 99999)
        n = rng.randint(1, max_sentences)
        before = rng.randint(0, n)
        text = f"{filler(rng, before)}{passkey_sentence(key)}{filler(rng, n - before)}"
        messages += [{"role": "user", "content": f"{INTRO}\n\n{text}\n\n{QUESTION}"},
                     {"role": "assistant", "content": f"The pass key is {key}."}]
      else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        messages += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
      f.write(json.dumps({"messages": messages}) + "\n")
  return path


def build_tokenizer(path: str, vocab_size: int = 512, seed: int = 0,
                    texts: list[str] | None = None) -> str:
  """Trains a byte-level BPE (Llama 3's split regex and special tokens) on `texts` (default:
  generated documents and chat words) and saves it as a HF `tokenizer.json` at `path`."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  if texts is None:
    rng = random.Random(seed)
    texts = [passkey_document(rng, rng.randint(2, 20)) for _ in range(300)]
    texts += ["system", "user", "assistant", "You are a helpful assistant.", "What is 12 plus 7?",
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "\n\n"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAMA3_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return path
