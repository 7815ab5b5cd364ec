"""Counters that live in Grain iterator state, so they survive workers and checkpoints.

Pipelines drop, truncate and mix records inside `mp_prefetch` worker processes, where a plain
Python counter would be invisible to the trainer. `CountingIterDataset` keeps its counts in
`get_state()`; Grain ships every worker's state to the main process with each element (that is
how it checkpoints), so `collect_stats(iterator.get_state())` sums them over workers, and a
restored iterator resumes its counts with its position.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import grain

STATS_KEY = "ultralong_data_stats"

# count_fn(element) -> (element to emit or None to drop it, {counter name: increment}).
CountFn = Callable[[Any], tuple[Any, Mapping[str, int]]]


class CountingIterDataset(grain.IterDataset):
  """Passes elements through `count_fn`, accumulating its counters in iterator state."""

  def __init__(self, parent: grain.IterDataset, count_fn: CountFn, name: str):
    super().__init__(parent)
    self._count_fn = count_fn
    self._name = name

  def __iter__(self) -> grain.DatasetIterator:
    return _CountingIterator(self._parent.__iter__(), self._count_fn, self._name)

  def __str__(self) -> str:
    return f"CountingIterDataset({self._name})"


class _CountingIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, count_fn: CountFn, name: str):
    super().__init__(parent)
    self._count_fn = count_fn
    self._name = name
    self._counts: collections.Counter[str] = collections.Counter()

  def __next__(self):
    while True:
      element, increments = self._count_fn(next(self._parent))
      for key, value in increments.items():
        self._counts[key] += int(value)
      if element is not None:
        return element

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(),
            STATS_KEY: {self._name: dict(sorted(self._counts.items()))}}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = collections.Counter(state[STATS_KEY][self._name])


def collect_stats(state: Any) -> dict[str, dict[str, int]]:
  """Sums the counters found anywhere in an iterator state, by counting step name.

  Counts are as of the state: a packer restores its parent to before any document it still
  buffers, so documents inside a half-built row are counted once that row is emitted.
  """
  totals: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

  def walk(node: Any) -> None:
    if isinstance(node, Mapping):
      for key, value in node.items():
        if key == STATS_KEY:
          for name, counts in value.items():
            totals[name].update(counts)
        else:
          walk(value)
    elif isinstance(node, (list, tuple)):
      for value in node:
        walk(value)

  walk(state)
  return {name: dict(sorted(c.items())) for name, c in sorted(totals.items())}
