"""RULER's two QA tasks from local files: qa_1 (SQuAD) and qa_2 (HotpotQA).

As RULER's scripts/data/synthetic/qa.py (github.com/NVIDIA/RULER): the question's own paragraph(s)
(SQuAD: plus the other paragraphs of the same article; HotpotQA: the question's 10 context
paragraphs, gold and distractors) and then random other paragraphs of the file fill the context,
as many as fit, shuffled, each as "Document i:\\n<text>" with blank lines between. Sample k asks
question k of the file (RULER takes the first questions in file order). Scored by
string_match_part: any one of the reference answers found counts.

Files: SQuAD in its official JSON layout (v2.0 `dev-v2.0.json`, whose unanswerable questions are
left out, or v1.1), HotpotQA's `hotpot_dev_distractor_v1.json`; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

from ultralong_jax.evaluation import ruler_tasks as rt
from ultralong_jax.evaluation.prompt_style import PromptStyle

FLAGS = {"qa_1": "--squad", "qa_2": "--hotpotqa"}


@dataclasses.dataclass
class QAData:
  """Questions [{"query", "outputs", "context": [doc index], "more": [doc index]}] and the
  distinct paragraphs they index."""
  questions: list[dict]
  docs: list[str]


def load(task: str, path: str) -> QAData:
  """Reads the SQuAD (qa_1) or HotpotQA (qa_2) file; errors name the flag and the file."""
  flag = FLAGS[task]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag}: {path} is not a file.")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{flag}: {path} is not a JSON file ({e}).") from None
  try:
    out = _squad(data) if task == "qa_1" else _hotpotqa(data)
  except (KeyError, TypeError, IndexError) as e:
    layout = ("SQuAD's {'data': [{'paragraphs': [{'context', 'qas': [{'question', 'answers': "
              "[{'text'}]}]}]}]}" if task == "qa_1" else
              "HotpotQA's [{'question', 'answer', 'context': [[title, [sentences]]]}]")
    raise ValueError(f"{flag}: {path} does not have {layout} layout (missing or wrong "
                     f"{e!r}).") from None
  if not out.questions:
    raise ValueError(f"{flag}: {path} has no answerable questions.")
  return out


def _squad(data) -> QAData:
  paragraphs = [p for d in data["data"] for p in d["paragraphs"]]
  docs = sorted({p["context"] for p in paragraphs})
  index = {c: i for i, c in enumerate(docs)}
  questions = []
  for article in data["data"]:
    same = [index[p["context"]] for p in article["paragraphs"]]
    for p in article["paragraphs"]:
      own = index[p["context"]]
      for qa in p["qas"]:
        if qa.get("is_impossible", False):
          continue
        questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                          "context": [own], "more": [i for i in same if i != own]})
  return QAData(questions, docs)


def _hotpotqa(data) -> QAData:
  def text(title, sentences):
    return f"{title}\n{''.join(sentences)}"

  docs = sorted({text(t, s) for d in data for t, s in d["context"]})
  index = {c: i for i, c in enumerate(docs)}
  questions = [{"query": d["question"], "outputs": [d["answer"]],
                "context": [index[text(t, s)] for t, s in d["context"]], "more": []}
               for d in data]
  return QAData(questions, docs)


def make(task: str, data: QAData, tokenizer, length: int, seed: int, *,
         chat: bool | PromptStyle = True, new_tokens: int | None = None) -> dict:
  """Sample for question `seed` (mod the file's count) at `length` tokens, as `make` of
  ruler_synthetic: a prompt of at most length - new_tokens tokens."""
  spec = rt.TASKS[task]
  new_tokens = spec.new_tokens if new_tokens is None else new_tokens
  what = f"{task} at length {length} ({new_tokens} new tokens)"
  rng = random.Random(f"{task}/{length}/{seed}")
  question = data.questions[seed % len(data.questions)]
  template = spec.template.replace("{context}", "\0").format(query=question["query"]).replace(
      "\0", "{context}")
  fr = rt.frame(tokenizer, template, spec.answer_prefix, length - new_tokens, chat=chat,
                what=what)
  gold, more = question["context"], list(question["more"])
  taken = set(gold) | set(more)
  others = [i for i in range(len(data.docs)) if i not in taken]
  rng.shuffle(more)
  rng.shuffle(others)
  candidates = gold + more + others  # taken in this order, cycling when the file runs out
  bodies: dict[int, list[int]] = {}
  headers = [[]]  # headers[i]: the ids of document i's header
  chosen, used = [], 0
  while True:
    i = len(chosen)
    doc = candidates[i % len(candidates)]
    if doc not in bodies:
      bodies[doc] = tokenizer.encode(data.docs[doc])
    headers.append(_header(tokenizer, i + 1))
    cost = len(headers[i + 1]) + len(bodies[doc])
    if used + cost > fr.budget:
      break
    chosen.append(doc)
    used += cost
  if len(chosen) < len(gold):
    raise rt.too_short(what, used + cost, fr.budget)
  rng.shuffle(chosen)
  context = [t for i, doc in enumerate(chosen) for t in headers[i + 1] + bodies[doc]]
  return rt.sample(task, length, fr.prefix + context + fr.suffix, question["outputs"], new_tokens)


def _header(tokenizer, i: int) -> list[int]:
  """ "Document i:\\n", after a blank line from the document before."""
  return tokenizer.encode(("\n\n" if i > 1 else "") + f"Document {i}:\n")
