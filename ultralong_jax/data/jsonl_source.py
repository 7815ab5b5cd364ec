"""Random-access JSONL (plain or .gz) for Grain: one record per line, by global line index.

Grain 0.2.18 has no JSONL source. Opening indexes every file's line offsets (one vectorized
scan, 8 bytes per line kept); reads use `os.pread`, which is safe from Grain's reader threads.
A `.gz` file cannot be read at random, so it is decompressed once into `cache_dir` (a temp
directory by default) and indexed there: disk, not RAM, holds it. Records come back raw, as
`(line bytes, "path:line")`, and are parsed where bad input is counted (see sft.py).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile

import numpy as np

_CHUNK = 1 << 24


def _line_starts(path: str) -> np.ndarray:
  """Byte offset of every line start, plus the file size at the end: [num_lines + 1] int64."""
  starts = [np.zeros(1, np.int64)]
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos = 0
    while chunk := f.read(_CHUNK):
      nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")).astype(np.int64)
      starts.append(pos + nl + 1)
      pos += len(chunk)
  starts = np.concatenate(starts)
  if starts[-1] != size:  # last line without a trailing newline
    starts = np.append(starts, size)
  return starts


def _decompressed(path: str, cache_dir: str) -> str:
  stat = os.stat(path)
  key = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  out = os.path.join(cache_dir, f"{key.hexdigest()[:16]}-{os.path.basename(path)[:-3]}")
  if not os.path.exists(out):
    tmp = out + f".tmp{os.getpid()}"
    with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, _CHUNK)
    os.replace(tmp, out)
  return out


class JsonlSource:
  """A `grain.RandomAccessDataSource` over the lines of JSONL files: `(bytes, where)`."""

  def __init__(self, paths: list[str], cache_dir: str | None = None):
    self.paths = list(paths)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "ultralong_jsonl_cache")
    self._read_paths = []
    for p in self.paths:
      if p.endswith(".gz"):
        os.makedirs(cache_dir, exist_ok=True)
        p = _decompressed(p, cache_dir)
      self._read_paths.append(p)
    self._starts = [_line_starts(p) for p in self._read_paths]
    counts = np.asarray([len(s) - 1 for s in self._starts], np.int64)
    self.lines_per_file = counts
    self._first = np.concatenate([[0], np.cumsum(counts)])
    self._fds: dict[int, int] = {}

  def __len__(self) -> int:
    return int(self._first[-1])

  def __getitem__(self, index: int) -> tuple[bytes, str]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    f = int(np.searchsorted(self._first, index, side="right") - 1)
    line = index - int(self._first[f])
    start, stop = int(self._starts[f][line]), int(self._starts[f][line + 1])
    fd = self._fds.get(f)
    if fd is None:
      fd = self._fds[f] = os.open(self._read_paths[f], os.O_RDONLY)
    raw = os.pread(fd, stop - start, start)
    return raw.rstrip(b"\r\n"), f"{self.paths[f]}:{line + 1}"

  def __getstate__(self):
    # File descriptors do not cross into Grain's worker processes; they reopen lazily.
    state = self.__dict__.copy()
    state["_fds"] = {}
    return state

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.paths)} files, {len(self)} lines)"
