"""What both stages hand the trainer: a Grain dataset of batches, its iterator, its counters.

  pipe = build_pretrain_pipeline(resolve_data_config(cfg.data))   # or build_sft_pipeline
  it = pipe.iterator()                            # a grain.DatasetIterator
  batch = next(it)                                # {feature: np.ndarray [B, L]}, see features.py
  mngr.save(step, args=ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointRestore(it)))
  pipe.stats(it)                                  # build-time plan + counters as of `it`

B = global_batch_size // process_count rows per process; each JAX process builds its own
pipeline over a disjoint slice of the data (`process_index::process_count`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain

from ultralong_jax.data import stats as stats_lib


def process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to this JAX process; the data module uses nothing else of JAX."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def check_process_count(data, process_count: int) -> None:
  """Each process feeds global_batch_size / process_count rows of `data` (a data piece)."""
  if data.global_batch_size % process_count:
    raise ValueError(f"data.global_batch_size: got {data.global_batch_size!r}; use a positive "
                     f"multiple of the JAX process count ({process_count}).")


def batch_and_prefetch(ds: grain.IterDataset, batch_size: int, data) -> grain.IterDataset:
  """Batches of `batch_size` rows, prefetched by data.num_workers worker processes."""
  ds = ds.batch(batch_size, drop_remainder=True)
  if data.num_workers > 0:
    # Grain's workers read absl flags; outside an absl app (tests, notebooks, benchmarks)
    # nothing parsed them, so accept their defaults. A parsed command line is left alone.
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
  return ds


@dataclasses.dataclass
class Pipeline:
  """A built pipeline. `dataset` yields numpy dicts of shape [batch_size, seq_len]."""
  dataset: grain.IterDataset
  batch_size: int
  seq_len: int
  build_stats: dict[str, Any]

  def iterator(self) -> grain.DatasetIterator:
    """A fresh iterator; checkpoint it with grain.checkpoint.CheckpointSave/Restore."""
    return iter(self.dataset)

  def stats(self, iterator: grain.DatasetIterator) -> dict[str, Any]:
    """The build-time plan and the runtime counters (summed over workers) as of `iterator`."""
    return {"build": self.build_stats, **stats_lib.collect_stats(iterator.get_state())}
