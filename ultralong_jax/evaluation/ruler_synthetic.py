"""RULER's 11 synthetic tasks as token-exact samples: 8 needle-in-a-haystack variants, variable
tracking (vt), common words extraction (cwe) and frequent words extraction (fwe).

Each generator follows the RULER script of its family (github.com/NVIDIA/RULER,
scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction}.py):
the same haystacks, needle formats, counts, insertion rules and answers. Where RULER searches for
the number of haystack pieces that fits by re-tokenizing the whole prompt, we add up the token
counts of separately tokenized pieces, so the context fills the budget exactly (essay) or to
within one piece (the rest) in one pass even at millions of tokens.
"""

from __future__ import annotations

import math
import random
import string

import numpy as np

from ultralong_jax.data import tokenizer as tok_lib
from ultralong_jax.evaluation import haystack as hay, ruler_tasks as rt, ruler_words as rw
from ultralong_jax.evaluation.prompt_style import PromptStyle

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# The 40 needle depths (percent) RULER draws insertion points from.
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]


def make(task: str, tokenizer, length: int, seed: int, *, essay: hay.Haystack,
         chat: bool | PromptStyle = True, new_tokens: int | None = None) -> dict:
  """One sample of synthetic task `task` for a model context of `length` tokens: a prompt of at
  most length - new_tokens tokens (new_tokens: RULER's generation budget unless given)."""
  spec = rt.TASKS[task]
  new_tokens = spec.new_tokens if new_tokens is None else new_tokens
  rng = random.Random(f"{task}/{length}/{seed}")
  budget = length - new_tokens
  what = f"{task} at length {length} ({new_tokens} new tokens)"
  if budget < 1:
    raise ValueError(f"{what}: leaves no room for a prompt; use longer lengths.")
  build = {"niah": _niah, "vt": _vt, "cwe": _cwe, "fwe": _fwe}[spec.family]
  ids, answers = build(spec, tokenizer, budget, rng, essay=essay, chat=chat, what=what,
                       length=length)
  return rt.sample(task, length, ids, answers, new_tokens)


def _place(rng: random.Random, fillers: list[list[int]], pieces: list[list[int]]) -> list[int]:
  """Filler pieces with `pieces` inserted in order at uniformly random piece boundaries."""
  n = len(fillers) + len(pieces)
  slots = set(rng.sample(range(n), len(pieces)))
  out, f, p = [], iter(fillers), iter(pieces)
  for i in range(n):
    out += next(p) if i in slots else next(f)
  return out


def _niah(spec, tokenizer, budget, rng, *, essay, chat, what, length):
  del length
  a = spec.args
  num_k = max(a["num_needle_k"], a["num_needle_q"])
  keys, values, needles = [], [], []
  for _ in range(num_k):
    key = rw.needle_value(a["type_needle_k"], rng)
    while key in keys:
      key = rw.needle_value(a["type_needle_k"], rng)
    keys.append(key)
    values.append([rw.needle_value(a["type_needle_v"], rng) for _ in range(a["num_needle_v"])])
    needles += [NEEDLE.format(type_needle_v=a["type_needle_v"], key=key, value=v)
                for v in values[-1]]
  rng.shuffle(needles)
  asked = rng.sample(range(num_k), a["num_needle_q"])
  queries = [keys[i] for i in asked]
  answers = [v for i in asked for v in values[i]]
  query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
  template, answer_prefix, type_v = spec.template, spec.answer_prefix, a["type_needle_v"]
  if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER's singular wording for one answer
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
      template, answer_prefix = template.replace(old, new), answer_prefix.replace(old, new)
    type_v = type_v[:-1]
  fill = dict(type_needle_v=type_v, query=query)
  fr = rt.frame(tokenizer, template.replace("{context}", "\0").format(**fill).replace(
      "\0", "{context}"), answer_prefix.format(**fill), budget, chat=chat, what=what)
  kind = a["type_haystack"]
  if kind == "essay":  # " ".join(sentences + needles) in RULER: each needle after a space
    pieces = [tokenizer.encode(" " + n) for n in needles]
    n = fr.budget - sum(map(len, pieces))
    if n < 0:
      raise rt.too_short(what, sum(map(len, pieces)), fr.budget)
    hay_ids = essay.tokens(n)
    # RULER inserts at sentence int(n_sentences * depth / 100) for depths drawn from DEPTHS;
    # here right after the last . ! ? at or before that fraction of the haystack tokens.
    cuts = sorted(essay.stop_point(int(n * d / 100)) for d in rng.sample(DEPTHS, len(pieces)))
    context, last = [], 0
    for cut, piece in zip(cuts, pieces):
      context += hay_ids[last:cut] + piece
      last = cut
    context += hay_ids[last:]
  else:  # noise / needle haystacks: one sentence per line ("\n".join in RULER)
    pieces = [tokenizer.encode(n + "\n") for n in needles]
    room = fr.budget - sum(map(len, pieces))
    if room < 0:
      raise rt.too_short(what, sum(map(len, pieces)), fr.budget)
    if kind == "noise":
      line = tokenizer.encode(NOISE + "\n")
      fillers = [line] * (room // len(line))
    else:  # every line a needle of the same form, with other random keys and values
      fillers = _distractor_lines(tokenizer, rng, room, a, set(keys))
    context = _place(rng, fillers, pieces)
  return fr.prefix + context + fr.suffix, answers


def _distractor_lines(tokenizer, rng, room: int, a: dict, taken: set[str]) -> list[list[int]]:
  """Needle-shaped lines with fresh keys (never one of `taken`) filling up to `room` tokens."""
  lines, used = [], 0
  while True:
    batch = []
    for _ in range(256):
      key = rw.needle_value(a["type_needle_k"], rng)
      while key in taken:
        key = rw.needle_value(a["type_needle_k"], rng)
      batch.append(NEEDLE.format(type_needle_v=a["type_needle_v"], key=key,
                                 value=rw.needle_value(a["type_needle_v"], rng)) + "\n")
    for ids in tok_lib.encode_batch(tokenizer, batch):
      if used + len(ids) > room:
        return lines
      lines.append(ids)
      used += len(ids)


def _vt_chain(names: list[str], value: str) -> list[str]:
  """RULER's chain: VAR X1 = value, then VAR X(i+1) = VAR Xi (with its trailing space)."""
  return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]


def _vt(spec, tokenizer, budget, rng, *, essay, chat, what, length):
  del essay, length
  hops = spec.args["num_hops"]
  names: list[str] = []
  while len(names) < 2 * (hops + 1):  # the example's chain and the asked one, all distinct
    name = "".join(rng.choices(string.ascii_uppercase, k=5))
    if name not in names:
      names.append(name)
  icl_names, names = names[:hops + 1], names[hops + 1:]
  value, icl_value = (str(v) for v in rng.sample(range(10000, 100000), 2))  # distinct
  line = tokenizer.encode(NOISE + "\n")
  # RULER puts one worked example before the task: the same task at 500 tokens (bare template,
  # answer prefix, the answer); here at most 500 and a quarter of the budget.
  example_budget = min(500, budget // 4)
  icl_head, icl_tail = spec.template.split("{context}")
  icl_tail = (icl_tail + spec.answer_prefix + " " + " ".join(icl_names) + "\n").format(
      query=icl_value, num_v=hops + 1)
  icl_chain = _vt_chain(icl_names, icl_value)
  fixed = len(tokenizer.encode(icl_head + "".join(s + "\n" for s in icl_chain) + icl_tail))
  noise = max(0, (example_budget - fixed) // len(line))
  slots = set(rng.sample(range(noise + hops + 1), hops + 1))
  chain_iter = iter(icl_chain)
  example = icl_head + "".join((next(chain_iter) if i in slots else NOISE) + "\n"
                               for i in range(noise + hops + 1)) + icl_tail
  fill = dict(query=value, num_v=hops + 1)
  template = example + spec.template.replace("{context}", "\0").format(**fill).replace(
      "\0", "{context}")
  fr = rt.frame(tokenizer, template, spec.answer_prefix.format(**fill), budget, chat=chat,
                what=what)
  pieces = [tokenizer.encode(s + "\n") for s in _vt_chain(names, value)]
  room = fr.budget - sum(map(len, pieces))
  if room < 0:
    raise rt.too_short(what, sum(map(len, pieces)), fr.budget)
  context = _place(rng, [line] * (room // len(line)), pieces)
  return fr.prefix + context + fr.suffix, names


class _TokenLengths:
  """Token ids of f(i) for i = 0, 1, ..., encoded in batches as far as asked for."""

  def __init__(self, tokenizer, text_of):
    self.tokenizer, self.text_of, self.ids, self.cum = tokenizer, text_of, [], [0]

  def upto(self, n: int) -> int:
    """Total tokens of items 0..n-1."""
    while len(self.ids) < n:
      start = len(self.ids)
      new = tok_lib.encode_batch(self.tokenizer, [self.text_of(i) for i in
                                                  range(start, max(n, 2 * start, 1024))])
      self.ids += new
      for ids in new:
        self.cum.append(self.cum[-1] + len(ids))
    return self.cum[n]


def _largest(fits, low: int) -> int:
  """The largest n >= low with fits(n) (fits monotone, fits(low) true), by doubling + bisection."""
  high = max(low, 1) * 2
  while fits(high):
    low, high = high, high * 2
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  return low


def _cwe_list(words: list[str], common: int, freq_cw: int, freq_ucw: int, rng) -> list[str]:
  entries = words[:common] * freq_cw + words[common:] * freq_ucw
  rng.shuffle(entries)
  return entries


def _cwe(spec, tokenizer, budget, rng, *, essay, chat, what, length):
  del essay
  a = spec.args
  num_cw = a["num_cw"]
  # RULER: below 4096 tokens the common words appear 6x and the others once, and the worked
  # example has 20 words (3x / 1x); otherwise 30x / 3x and a 40-word example (10x / 3x).
  if length < 4096:
    freq_cw, freq_ucw, example = 6, 1, (20, 3, 1)
  else:
    freq_cw, freq_ucw, example = a["freq_cw"], a["freq_ucw"], (40, 10, 3)
  ex_words = rw.distinct_words(random.Random(rng.random()), example[0])
  ex_list = _cwe_list(ex_words, num_cw, example[1], example[2], rng)
  numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_list))
  answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_words[:num_cw]))
  shot = spec.template.format(context=numbered) + spec.answer_prefix + " " + answer
  fr = rt.frame(tokenizer, shot + "\n" + spec.template, spec.answer_prefix, budget, chat=chat,
                what=what)
  supply_words = _WordSupply(rng.random())
  supply = _TokenLengths(tokenizer, lambda i: " " + supply_words[i])
  numbers = _TokenLengths(tokenizer, lambda i: "1." if i == 0 else f" {i + 1}.")

  def tokens(n: int) -> int:
    entries = num_cw * freq_cw + (n - num_cw) * freq_ucw
    common = supply.upto(num_cw)
    return numbers.upto(entries) + freq_cw * common + freq_ucw * (supply.upto(n) - common)

  if tokens(num_cw + 1) > fr.budget:
    raise rt.too_short(what, tokens(num_cw + 1), fr.budget)
  n = _largest(lambda m: tokens(m) <= fr.budget, num_cw + 1)
  words = [supply_words[i] for i in range(n)]
  index = {w: i for i, w in enumerate(words)}
  entries = _cwe_list(words, num_cw, freq_cw, freq_ucw, rng)
  context = [t for i, w in enumerate(entries) for t in numbers.ids[i] + supply.ids[index[w]]]
  return fr.prefix + context + fr.suffix, words[:num_cw]


class _WordSupply:
  """rw.distinct_words of one seed as an indexable sequence, drawn further as needed (its first n
  words are the same for every n, so the word count can be searched)."""

  def __init__(self, seed: float):
    self.seed, self.words = seed, []

  def __getitem__(self, i: int) -> str:
    if i >= len(self.words):
      self.words = rw.distinct_words(random.Random(self.seed), max(2 * i, 1024))
    return self.words[i]


def _zeta(alpha: float, terms: int = 10_000) -> float:
  """Riemann zeta(alpha), alpha > 1: partial sum + Euler-Maclaurin tail (error < terms^-alpha-2)."""
  head = math.fsum(k ** -alpha for k in range(1, terms))
  return head + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms ** -alpha + (
      alpha * terms ** (-alpha - 1) / 12)


def fwe_counts(num_words: int, vocab_size: int, alpha: float) -> list[int]:
  """RULER's fwe word counts: rank k appears floor(num_words * k^-alpha / zeta(alpha)) times."""
  z = _zeta(alpha)
  return [int(num_words * k ** -alpha / z) for k in range(1, vocab_size + 1)]


def _fwe(spec, tokenizer, budget, rng, *, essay, chat, what, length):
  del essay, length
  alpha = spec.args["alpha"]
  vocab_size = budget // 50  # RULER: (max_seq_length - tokens_to_generate) // 50
  if vocab_size < 5:
    raise rt.too_short(what, 5 * 50, budget)
  vocab = sorted(rw.coded_words(rng, vocab_size))
  rng.shuffle(vocab)
  vocab[0] = "..."  # the most frequent "word" is noise, the answer is ranks 2-4
  fr = rt.frame(tokenizer, spec.template, spec.answer_prefix, budget, chat=chat, what=what,
                strip_head=True)
  word_ids = tok_lib.encode_batch(tokenizer, [" " + w for w in vocab])

  def tokens(n: int) -> int:
    return sum(c * len(ids) for c, ids in zip(fwe_counts(n, vocab_size, alpha), word_ids))

  n = _largest(lambda m: tokens(m) <= fr.budget, 0)
  counts = fwe_counts(n, vocab_size, alpha)
  if counts[3] <= counts[4] or counts[3] < 1:
    raise ValueError(f"{what}: the context holds too few words for the 4th most frequent to "
                     "stand out; use longer lengths.")
  order = [k for k, c in enumerate(counts) for _ in range(c)]
  rng.shuffle(order)
  context = [t for k in order for t in word_ids[k]]
  return fr.prefix + context + fr.suffix, vocab[1:4]
