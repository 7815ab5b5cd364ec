"""Bad-input policy: every record that is not used is counted by kind; strict mode fails fast.

Inside Grain pipelines a rejected record becomes a `Dropped` marker that flows to
`stats.CountingIterDataset`, which counts it in its (checkpointed) iterator state. Outside
Grain (`prepare`) a `BadInputLog` counts and logs. In strict mode both raise `BadInputError`
naming the file and line (1-based line for JSONL, row/record index for other formats).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger(__name__)

# The kinds of bad input, as counted in stats and manifests.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
EMPTY_DOCUMENT = "empty_document"
TOKEN_OUT_OF_VOCAB = "token_out_of_vocab"
EMPTY_SOURCE = "empty_source"
DAMAGED_RECORD = "damaged_record"  # a prepared shard's record that fails its checksum
# Not malformed, but dropped by a configured policy; counted the same way.
OVER_LIMIT_DROPPED = "over_limit_dropped"
NO_ASSISTANT_TOKENS = "no_assistant_tokens"

_LOGGED_PER_KIND = 5  # the first few of each kind are logged with their location


class BadInputError(ValueError):
  """Raised in strict mode at the first bad record."""


@dataclasses.dataclass(frozen=True)
class Dropped:
  """Marker for a record that was rejected, with where it came from."""
  kind: str
  where: str  # "path:line"
  detail: str = ""

  def message(self) -> str:
    return f"{self.where}: {self.kind}: {self.detail}"


def reject(kind: str, where: str, detail: str, strict: bool) -> Dropped:
  """Returns a Dropped marker, or raises BadInputError when strict."""
  dropped = Dropped(kind, where, detail)
  if strict:
    raise BadInputError(dropped.message() + " (strict mode; set data.strict=False to skip, "
                        "count and log bad records instead)")
  return dropped


class BadInputLog:
  """Counts bad records by kind, logging the first few of each kind."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts: collections.Counter[str] = collections.Counter()

  def add(self, dropped: Dropped) -> None:
    self.counts[dropped.kind] += 1
    if self.counts[dropped.kind] <= _LOGGED_PER_KIND:
      log.warning("skipping bad input %s", dropped.message())

  def report(self, kind: str, where: str, detail: str = "") -> None:
    self.add(reject(kind, where, detail, self.strict))
