"""RULER's task table and prompt framing (Hsieh et al. 2024, arXiv 2404.06654).

Every number, template and answer prefix here is RULER's (github.com/NVIDIA/RULER:
scripts/synthetic.yaml for the 13 tasks' arguments, scripts/data/synthetic/constants.py for the
templates, answer prefixes and generation budgets, scripts/eval/synthetic/constants.py for the
metrics). A sample is assembled from token ids:

  prompt = frame prefix | context | frame suffix      (the answer prefix ends the suffix)

The frame is the task's template split at {context}, inside the model's chat template
(`prompt_style.PromptStyle`; for Llama 3.1 RULER's `meta-llama3` model template, ours adding the
system block with the date preamble, as the official template does) or, with chat=False, BOS +
the bare template (RULER's `base`). RULER appends the answer prefix after the model template, so
the model continues from it. A sample of length L
holds at most L - new_tokens prompt tokens (RULER's `max_seq_length` counts the generated tokens
too), and the context fills that budget to the token: the context is built from separately
tokenized pieces whose token counts add up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ultralong_jax.evaluation import prompt_style
from ultralong_jax.evaluation.prompt_style import PromptStyle

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
    "the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = (
    " The special magic {type_needle_v} for {query} mentioned in the provided text are")
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above.")
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: ")
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?")
FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:")
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output "
    "any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question "
    "based on the given documents. Only give me the answer and do not output any other words."
    "\n\nQuestion: {query}")
QA_ANSWER_PREFIX = " Answer:"

# Per RULER task family: template, answer prefix, tokens to generate, metric.
FAMILIES = {
    "niah": (NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, 128, "string_match_all"),
    "vt": (VT_TEMPLATE, VT_ANSWER_PREFIX, 30, "string_match_all"),
    "cwe": (CWE_TEMPLATE, CWE_ANSWER_PREFIX, 120, "string_match_all"),
    "fwe": (FWE_TEMPLATE, FWE_ANSWER_PREFIX, 50, "string_match_all"),
    "qa": (QA_TEMPLATE, QA_ANSWER_PREFIX, 32, "string_match_part"),
}


@dataclasses.dataclass(frozen=True)
class Task:
  """One RULER task: its family and that family's arguments (scripts/synthetic.yaml)."""
  name: str
  family: str
  args: dict[str, Any]

  @property
  def template(self) -> str:
    return FAMILIES[self.family][0]

  @property
  def answer_prefix(self) -> str:
    return FAMILIES[self.family][1]

  @property
  def new_tokens(self) -> int:
    """RULER's `tokens_to_generate`."""
    return FAMILIES[self.family][2]

  @property
  def metric(self) -> str:
    return FAMILIES[self.family][3]


def _niah(name, haystack, key, value, k=1, v=1, q=1) -> Task:
  return Task(name, "niah", dict(type_haystack=haystack, type_needle_k=key, type_needle_v=value,
                                 num_needle_k=k, num_needle_v=v, num_needle_q=q))


TASKS: dict[str, Task] = {t.name: t for t in (
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", q=4),
    Task("vt", "vt", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    Task("cwe", "cwe", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    Task("fwe", "fwe", dict(alpha=2.0)),
    Task("qa_1", "qa", dict(dataset="squad")),
    Task("qa_2", "qa", dict(dataset="hotpotqa")),
)}
SYNTHETIC = tuple(n for n, t in TASKS.items() if t.family != "qa")
QA = ("qa_1", "qa_2")


@dataclasses.dataclass
class Frame:
  """Token ids before and after a sample's context; `budget`: how many context tokens fit."""
  prefix: list[int]
  suffix: list[int]
  budget: int


def frame(tokenizer, template: str, answer_prefix: str, prompt_budget: int, *,
          chat: bool | PromptStyle, what: str, strip_head: bool = False) -> Frame:
  """The template (with every field but {context} filled) split at {context}, wrapped as the
  module docstring says; raises ValueError when it leaves no room for a context.

  strip_head: drop the space that ends the head (the context's pieces then start with one).
  """
  head, tail = template.split("{context}")
  if strip_head:
    head = head.rstrip(" ")
  prefix, suffix = prompt_style.as_style(chat).wrap(tokenizer, head, tail, answer_prefix)
  budget = prompt_budget - len(prefix) - len(suffix)
  if budget < 1:
    raise ValueError(f"{what}: the template takes {len(prefix) + len(suffix)} tokens, more than "
                     f"the {prompt_budget} the prompt may have; use longer lengths.")
  return Frame(prefix, suffix, budget)


def too_short(what: str, need: int, budget: int) -> ValueError:
  return ValueError(f"{what}: needs at least {need} context tokens but the length leaves "
                    f"{budget}; use longer lengths.")


def sample(task: str, length: int, ids: Sequence[int], answers: Sequence[str], new_tokens: int,
           **extra) -> dict:
  """A sample record: prompt ids, gold answers, the metric and the generation budget."""
  return {"task": task, "length": length, "ids": list(ids), "answers": list(answers),
          "metric": TASKS[task].metric, "new_tokens": new_tokens, **extra}
