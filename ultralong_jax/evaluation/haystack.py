"""Haystacks, needles and prompts for retrieval tests, built at the token level.

A prompt is  prefix | context | suffix  where the context is haystack tokens with a needle spliced
in. Everything is assembled from token id lists (never re-tokenized), so a cell's prompt has exactly
the requested number of tokens, and the needle sits at the requested depth: the fraction of the
haystack tokens that come before it, moved back to the nearest sentence end within a small window
so that no word is cut (the `depth_actual` the results report).

Haystack text: the user's files (e.g. essays) or `filler_text`, an offline generator of varied
essay-like sentences (no downloads); either is tokenized once and repeated until long enough.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Sequence

from ultralong_jax.evaluation import prompt_style
from ultralong_jax.evaluation.prompt_style import PromptStyle

_SUBJECTS = ("The river", "A small company", "The old library", "Every good essay", "The city",
             "A careful reader", "The mountain road", "Our garden", "The committee", "A young painter",
             "The harbor", "Most startups", "The orchestra", "A quiet village", "The museum")
_VERBS = ("changes", "remembers", "follows", "builds", "questions", "describes", "watches",
          "improves", "collects", "explains", "ignores", "celebrates", "measures", "shapes")
_OBJECTS = ("the long summer", "every new idea", "the patient work of years", "a map of the coast",
            "the sound of rain", "its first customers", "the rules of the game", "a forgotten letter",
            "the evening light", "the price of bread", "a simple question", "the northern wind",
            "the shape of the hills", "an unfinished bridge", "the habits of its founders")
_TAILS = ("", " without any hurry", " for reasons nobody wrote down", " as the seasons turn",
          " in the way its teachers did", " more slowly than expected", " until the work is done",
          " while the town sleeps", " with surprising care")


def filler_text(n_words: int = 2000, seed: int = 0) -> str:
  """Deterministic essay-like prose of about `n_words` words: varied sentences, grouped into
  paragraphs, containing no digits (so a numeric passkey is the only number in the haystack)."""
  rng = random.Random(seed)
  sentences, words = [], 0
  while words < n_words:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
    sentences.append(s)
    words += len(s.split())
  paragraphs = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
  return "\n\n".join(paragraphs) + "\n\n"


def load_text_files(paths: Sequence[str], flag: str = "--haystack") -> str:
  """The files' text concatenated (blank line between); errors name the file and the flag."""
  texts = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{flag}: {path} is not a file.")
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"{flag}: {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if not text.strip():
      raise ValueError(f"{flag}: {path} is empty.")
    texts.append(text.strip())
  if not texts:
    raise ValueError(f"{flag}: no files given.")
  return "\n\n".join(texts) + "\n\n"


@dataclasses.dataclass(frozen=True)
class Needle:
  """What to hide and ask: `text` goes in the haystack, `question` is asked after it, `answer`
  is the reference, `kind` picks the scoring ("passkey": exact number, "sentence": word recall)."""
  text: str
  question: str
  answer: str
  kind: str = "sentence"


SENTENCE_NEEDLE = Needle(
    text=" The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
         "sunny day. ",
    question="What is the best thing to do in San Francisco? Answer using the document.",
    answer="eat a sandwich and sit in Dolores Park on a sunny day",
    kind="sentence")


def passkey_needle(seed: int, digits: int = 7) -> Needle:
  """The numeric passkey variant (Mohtashami & Jaggi 2023; RULER's "magic number")."""
  value = str(random.Random(seed).randrange(10 ** (digits - 1), 10 ** digits))
  return Needle(text=f" The special magic number is {value}. Remember it. ",
                question="What is the special magic number mentioned in the document? Answer "
                         "with the number only.",
                answer=value, kind="passkey")


class Haystack:
  """A tokenized haystack text, repeated as needed, with its sentence ends indexed."""

  def __init__(self, tokenizer, text: str):
    self.tokenizer = tokenizer
    self.ids = list(tokenizer.encode(text))
    if len(self.ids) < 16:
      raise ValueError("haystack text is shorter than 16 tokens; give more text.")
    ends, stops = {}, {}
    self.sentence_end = []  # True where a sentence ends with this token
    self.stop_end = []  # True where this token ends with . ! ? (not the whitespace after them)
    for t in self.ids:
      if t not in ends:
        piece = tokenizer.decode([t]).rstrip()
        stops[t] = piece.endswith((".", "!", "?"))
        ends[t] = stops[t] or piece == ""
      self.sentence_end.append(ends[t])
      self.stop_end.append(stops[t])

  def tokens(self, n: int) -> list[int]:
    reps = -(-n // len(self.ids))
    return (self.ids * reps)[:n]

  def cut_point(self, n: int, target: int, window: int) -> int:
    """The largest sentence end (index after the token) in [target - window, target], else target."""
    for i in range(target, max(target - window, 0) - 1, -1):
      if i == 0 or i == n or self.sentence_end[(i - 1) % len(self.ids)]:
        return i
    return target


  def stop_point(self, target: int) -> int:
    """The largest index i <= target right after a . ! ? token (0 when there is none)."""
    for i in range(target, 0, -1):
      if self.stop_end[(i - 1) % len(self.ids)]:
        return i
    return 0


@dataclasses.dataclass
class Prompt:
  ids: list[int]
  needle_start: int    # token index of the needle in `ids`
  depth_actual: float  # fraction of the haystack tokens before the needle


def build_prompt(haystack: Haystack, needle_ids: Sequence[int], prefix: Sequence[int],
                 suffix: Sequence[int], length: int, depth: float,
                 window_fraction: float = 0.01) -> Prompt:
  """A prompt of exactly `length` tokens with the needle at `depth` (0..1) of the haystack.

  The cut may move back by up to `window_fraction` of the haystack (to a sentence end).
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}.")
  n = length - len(prefix) - len(suffix) - len(needle_ids)
  if n < 1:
    raise ValueError(f"length {length} leaves no room for the haystack: prefix, needle and "
                     f"question take {length - n} tokens; use longer lengths.")
  hay = haystack.tokens(n)
  cut = haystack.cut_point(n, round(depth * n), max(1, int(window_fraction * n)))
  ids = list(prefix) + hay[:cut] + list(needle_ids) + hay[cut:] + list(suffix)
  return Prompt(ids=ids, needle_start=len(prefix) + cut, depth_actual=cut / n)


def prompt_parts(tokenizer, question: str, *, chat: bool | PromptStyle = True,
                 intro: str = "Read the document below and answer the question after it.",
                 answer_prefix: str = "") -> tuple[list[int], list[int]]:
  """Token ids before and after the context.

  chat: a `prompt_style.PromptStyle` (a family's chat template, or its plain prompt), or True /
  False for Llama 3.1's: the chat template's user turn  intro \\n\\n context \\n\\n question
  (as `apply_chat_template(..., add_generation_prompt=True)` renders it, the text runs tokenized
  separately at the context boundaries), or for base models BOS + the same text + "\\nAnswer:".
  """
  style = prompt_style.as_style(chat)
  tail = "\n\n" + question + ("" if style.chat else "\nAnswer:")
  return style.wrap(tokenizer, intro + "\n\n", tail, answer_prefix)


def chat_turn(tokenizer) -> tuple[list[int], list[int]]:
  """The Llama 3.1 chat prompt of one user message around the message: (ids up to and including
  the user header's <|end_header_id|>, ids from the message's <|eot_id|> through the assistant
  header and its "\\n\\n"). The message text goes between, tokenized as "\\n\\n" + text."""
  from ultralong_jax.evaluation.generate import chat_prompt  # pylint: disable=g-import-not-at-top
  start, end, eot = (tokenizer.token_id(t) for t in
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
  full = chat_prompt(tokenizer, [{"role": "user", "content": "x"}])
  user_header = [start, *tokenizer.encode("user"), end]
  n_user = len(user_header) + len(tokenizer.encode("\n\nx")) + 1
  n_assistant = 2 + len(tokenizer.encode("assistant")) + len(tokenizer.encode("\n\n"))
  system = full[:len(full) - n_user - n_assistant]
  return system + user_header, [eot] + full[len(full) - n_assistant:]
