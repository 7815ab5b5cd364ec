"""Train either stage of the UltraLong recipe.

  python -m ultralong_jax.train --config=configs/llama31_8b_stage1.py:1m --workdir=runs/stage1 \
      --config.init.path=Llama-3.1-8B-Instruct --config.data.domains.books.path=/data/books

The run resumes from the newest complete checkpoint in --workdir (or --checkpoint_dir, which may be
a gs:// URL); SIGTERM saves and exits. Multi-host: the same command once per host (launch/,
docs/launch.md); `jax.distributed.initialize` runs first.
"""

from __future__ import annotations

import gc
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics, exports go here (a path)")
_CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir", None, "checkpoints go here instead of workdir/checkpoints: a path or a "
    "gs:// / s3:// URL (needs gcsfs / s3fs); resume with the same value")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host without auto-detection)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --coordinator_address")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.INFO)  # before initialize: its lines say who waits for whom
  # Multi-controller runtime before anything touches a JAX backend.
  from ultralong_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  mesh_lib.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from ultralong_jax.training import loop  # pylint: disable=import-outside-toplevel
  try:
    summary = loop.run(_CONFIG.value, _WORKDIR.value, checkpoint_dir=_CHECKPOINT_DIR.value)
  except ValueError as e:  # configuration and input errors: one clear line, no traceback
    # loop.run has closed its checkpointer by now (background saves and reads done): the line
    # comes last, whole, after anything already written to stdout; objects of the failed work
    # (e.g. asyncio tasks) are collected first, so their finalizers cannot print after it.
    gc.collect()
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
