"""Scores of a model's answer against a reference, each in [0, 1]."""

from __future__ import annotations

import re
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"\d+")


def words(text: str) -> list[str]:
  """Lower-case alphanumeric words (punctuation and case ignored)."""
  return _WORD.findall(text.lower())


def passkey_exact(answer: str, passkey: str) -> float:
  """1.0 when some number written in the answer is exactly the passkey (so "1234567." and
  "The number is 1234567" count; "12345678" or "123 4567" do not), else 0.0."""
  return float(passkey in _NUMBER.findall(answer))


def word_recall(answer: str, reference: str) -> float:
  """Fraction of the reference's distinct words that appear in the answer (needle recall)."""
  ref = set(words(reference))
  if not ref:
    raise ValueError("word_recall: the reference has no words.")
  return len(ref & set(words(answer))) / len(ref)


def all_present(answer: str, references: Sequence[str]) -> float:
  """RULER's string_match_all: fraction of the references found in the answer (case-insensitive)."""
  answer = answer.lower()
  return sum(r.lower() in answer for r in references) / len(references)


_CONTROL = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(prediction: str) -> str:
  """RULER's postprocess_pred (scripts/eval/evaluate.py): strip, control characters -> newline."""
  return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """RULER's string_match_all (scripts/eval/synthetic/constants.py): per prediction, the fraction
  of its references found in it (case-insensitive), averaged, x100, rounded to 2 decimals."""
  return round(100 * sum(all_present(p, r) for p, r in zip(predictions, references))
               / len(predictions), 2)


def any_present(answer: str, references: Sequence[str]) -> float:
  """1.0 when any reference is found in the answer (case-insensitive), else 0.0."""
  answer = answer.lower()
  return float(any(r.lower() in answer for r in references))


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """RULER's string_match_part: per prediction 1 when any of its references is found in it
  (case-insensitive), averaged, x100, rounded to 2 decimals."""
  return round(100 * sum(any_present(p, r) for p, r in zip(predictions, references))
               / len(predictions), 2)


RULER_METRICS = {"string_match_all": all_present, "string_match_part": any_present}


def score(kind: str, answer: str, reference) -> float:
  """Dispatch by needle kind: passkey -> exact number, sentence -> word recall, all -> RULER."""
  if kind == "passkey":
    return passkey_exact(answer, reference)
  if kind == "sentence":
    return word_recall(answer, reference)
  if kind == "all":
    return all_present(answer, reference)
  raise ValueError(f"unknown scoring kind {kind!r}; use passkey, sentence or all.")
