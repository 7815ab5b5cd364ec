"""Length-based document resampling per domain (paper section 3.1, after Fu et al. 2024).

Documents shorter than `short_threshold` tokens appear `short_rate` times in expectation
(< 1 down-samples), longer than `long_threshold` `long_rate` times (> 1 up-samples), the rest
once. A rate r gives floor(r) copies plus one more with probability r - floor(r), drawn once
per document from a generator seeded by (seed, domain name), so a plan is reproducible and
independent of the other domains. The plan is an index array, built from the document lengths
alone; copies are spread by the pipeline's shuffle rather than emitted back to back.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class ResampleRates:
  short_threshold: int
  short_rate: float
  long_threshold: int
  long_rate: float

  def rate(self, lengths: np.ndarray) -> np.ndarray:
    """Expected copies per document, [num_documents] float64."""
    return np.where(lengths < self.short_threshold, self.short_rate,
                    np.where(lengths > self.long_threshold, self.long_rate, 1.0))


@dataclasses.dataclass(frozen=True)
class DomainPlan:
  """One domain after resampling: which documents (with repeats) the epoch holds."""
  name: str
  doc_indices: np.ndarray  # [num_sampled] int64 indices into the domain's documents
  lengths: np.ndarray      # [num_documents] tokens per document
  copies: np.ndarray       # [num_documents] int64 copies of each document

  @property
  def tokens_before(self) -> int:
    return int(self.lengths.sum())

  @property
  def tokens_after(self) -> int:
    return int((self.lengths * self.copies).sum())

  def summary(self, rates: ResampleRates) -> dict[str, int]:
    short = self.lengths < rates.short_threshold
    long = self.lengths > rates.long_threshold
    mid = ~short & ~long
    out = {"documents_before": len(self.lengths), "documents_after": len(self.doc_indices),
           "tokens_before": self.tokens_before, "tokens_after": self.tokens_after}
    for cls, sel in (("short", short), ("mid", mid), ("long", long)):
      out[f"{cls}_documents_before"] = int(sel.sum())
      out[f"{cls}_documents_after"] = int(self.copies[sel].sum())
    return out


def domain_seed(seed: int, name: str) -> list[int]:
  # crc32 of the name, not the domain's position, so adding a domain leaves the others' plans.
  return [seed, zlib.crc32(name.encode())]


def shuffle_seed(seed: int, name: str) -> int:
  """An int seed for Grain's shuffle of one domain, distinct from the plan's stream."""
  return (seed * 1_000_003 + zlib.crc32(name.encode()) + 1) % 2**31


def plan_domain(name: str, lengths: np.ndarray, rates: ResampleRates, seed: int) -> DomainPlan:
  """Draws the copies of each document; empty documents are never sampled."""
  lengths = np.asarray(lengths, np.int64)
  rate = rates.rate(lengths)
  rng = np.random.default_rng(domain_seed(seed, name))
  whole = np.floor(rate)
  copies = (whole + (rng.random(len(lengths)) < rate - whole)).astype(np.int64)
  copies[lengths == 0] = 0
  doc_indices = np.repeat(np.arange(len(lengths), dtype=np.int64), copies)
  return DomainPlan(name, doc_indices, lengths, copies)
