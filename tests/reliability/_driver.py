"""Runs `loop.run` in a fresh process with one injected fault, for the crash tests.

  python tests/reliability/_driver.py CONFIG.json WORKDIR FAULT

FAULT: none | kill_in_step:N (SIGKILL while step N's computation is in flight) |
kill_in_save:N (SIGKILL while the async write of step N's checkpoint is in flight; its final
rename is held back so the kill always lands mid-write). The same 8 simulated devices and matmul
precision as the in-process tests, so losses compare exactly with an in-process run.
"""

import json
import os
import signal
import sys

from ultralong_jax.parallel import host_devices  # noqa: E402  (imports no JAX)

host_devices.simulate(8)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import ml_collections  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402  (test instrumentation only)

from ultralong_jax.training import loop  # noqa: E402


def _die(what: str) -> None:
  print(f"driver: SIGKILL {what}", file=sys.stderr, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: str):
  """Installs `fault`; returns the step wrapper for loop.run's wrap_step (None: the step as is)."""
  kind, _, arg = fault.partition(":")
  if kind == "kill_in_step":
    def wrap_step(real_step):
      calls = {"n": 0}

      def step_fn(state, batch):
        out = real_step(state, batch)  # dispatched asynchronously: still computing on return
        calls["n"] += 1
        if calls["n"] == int(arg):
          _die(f"during step {arg}")
        return out
      return step_fn
    return wrap_step
  if kind == "kill_in_save":
    # The background thread's last act is renaming `<step>.orbax-checkpoint-tmp-*` to `<step>`;
    # dying just before it is the worst moment: every byte written, nothing committed.
    tmp_path_cls = atomicity.AtomicRenameTemporaryPath
    real_finalize = tmp_path_cls.finalize

    async def finalize(self, *args, **kwargs):
      if os.path.basename(str(self._final_path)) == arg:  # pylint: disable=protected-access
        _die(f"during the async save of step {arg}")
      return await real_finalize(self, *args, **kwargs)
    tmp_path_cls.finalize = finalize
  elif kind != "none":
    raise ValueError(f"unknown fault {fault!r}")
  return None


def main(config_path: str, workdir: str, fault: str) -> int:
  with open(config_path) as f:
    c = ml_collections.ConfigDict(json.load(f))
  summary = loop.run(c, workdir, progress=False, wrap_step=inject(fault))
  print(json.dumps({k: summary[k] for k in ("start_step", "end_step", "complete", "preempted")}))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
