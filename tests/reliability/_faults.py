"""`python -m ultralong_jax.train` in a fresh process with injected faults, for the tests of
failed checkpoint writes, the hang watchdog and the time account.

  python tests/reliability/_faults.py CONFIG.json WORKDIR FAULT[,FAULT...] [TRAIN FLAG...]

FAULT: none, one of _driver.py's (kill_in_step:N, kill_in_save:N), or
  disk_full_at_save:N   just before the checkpoint save of step N (after the write in flight has
                        ended), files stop growing past 64 KiB: RLIMIT_FSIZE, so every later
                        checkpoint write fails in the OS with EFBIG ("File too large"); metrics
                        lines and TensorBoard events stay under the limit
  disk_freed_on_retry   with disk_full_at_save: the limit is lifted while the checkpointer backs
                        off before its first retry (a transient quota error)
  stall_in_step:N[@P]   the N-th step of this invocation never returns (the main thread sleeps),
                        as in a hung collective; with @P only on JAX process P
TRAIN FLAGs go to the CLI (launch/multihost.sh appends --coordinator_address and the others).
The CLI reads CONFIG.json through a generated config file (as test_damaged_checkpoint.py does),
so exit codes and the last line printed are the CLI's own.
"""

import functools
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
import _driver  # noqa: E402  (sets the 8 simulated devices and the matmul precision)

if "device_count" in _XLA_FLAGS:  # launch/multihost.sh --local gave each process its share
  os.environ["XLA_FLAGS"] = _XLA_FLAGS

import jax  # noqa: E402
from absl import app  # noqa: E402

from ultralong_jax.training import checkpointing, loop  # noqa: E402

_FULL_DISK_BYTES = 64 * 1024

_CONFIG_FILE = """import json
import ml_collections


def get_config():
  with open({path!r}) as f:
    return ml_collections.ConfigDict(json.load(f))
"""


def _disk_full_at_save(step: int, freed_on_retry: bool) -> None:
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
  real_save = checkpointing.RunCheckpointer.save

  def save(self, at, *args, **kwargs):
    if at == step:
      self.manager.wait_until_finished()  # the write of an earlier step is not part of the fault
      print(f"faults: disk full from the save of step {step} on", file=sys.stderr, flush=True)
      resource.setrlimit(resource.RLIMIT_FSIZE, (_FULL_DISK_BYTES, resource.RLIM_INFINITY))
    return real_save(self, at, *args, **kwargs)
  checkpointing.RunCheckpointer.save = save
  if freed_on_retry:
    real_backoff = checkpointing.RunCheckpointer._backoff  # pylint: disable=protected-access

    def backoff(self, seconds):
      resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
      print("faults: disk space freed", file=sys.stderr, flush=True)
      real_backoff(self, seconds)
    checkpointing.RunCheckpointer._backoff = backoff  # pylint: disable=protected-access


def _stall_in_step(n: int, process: int | None):
  """A wrap_step for loop.run whose n-th step call never returns (on `process`, or every one)."""
  def wrap_step(real_step):
    calls = {"n": 0}

    def step_fn(state, batch):
      calls["n"] += 1
      if calls["n"] == n and process in (None, jax.process_index()):
        print(f"faults: step call {n} stalls", file=sys.stderr, flush=True)
        while True:
          time.sleep(3600)
      return real_step(state, batch)
    return step_fn
  return wrap_step


def inject(faults: str) -> None:
  wrappers = []
  for fault in faults.split(","):
    kind, _, arg = fault.partition(":")
    if kind == "disk_full_at_save":
      _disk_full_at_save(int(arg), "disk_freed_on_retry" in faults)
    elif kind == "stall_in_step":
      step, _, process = arg.partition("@")
      wrappers.append(_stall_in_step(int(step), int(process) if process else None))
    elif kind not in ("disk_freed_on_retry", "none"):
      wrappers.append(_driver.inject(fault))
  wrappers = [w for w in wrappers if w is not None]
  if wrappers:  # the CLI calls loop.run: hand it the step wrappers through its wrap_step

    def wrap_step(step_fn):
      for wrap in wrappers:
        step_fn = wrap(step_fn)
      return step_fn
    loop.run = functools.partial(loop.run, wrap_step=wrap_step)


def main(config_path: str, workdir: str, faults: str, *flags: str) -> None:
  config_file = os.path.join(os.path.dirname(os.path.abspath(config_path)), "config_loader.py")
  with open(config_file, "w") as f:
    f.write(_CONFIG_FILE.format(path=os.path.abspath(config_path)))
  inject(faults)
  from ultralong_jax import train  # pylint: disable=import-outside-toplevel
  sys.argv = ["train", f"--config={config_file}", f"--workdir={workdir}", *flags]
  app.run(lambda argv: sys.exit(train.main(argv)))


if __name__ == "__main__":
  main(*sys.argv[1:])
