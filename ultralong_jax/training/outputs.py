"""A run's outputs (final/, hf/, summary.json, loss.png) written aside, then moved into place.

A run that is resumed with more steps, or re-run after a crash mid-export, must never leave a
mix: `final/` of step 4 next to `summary.json` of step 8 would make stage 2 fine-tune stale
weights without a word. So each output is written under a temporary name next to it and renamed
over the old one only once it is complete.

  tmp = start_dir(path); <write into tmp>; commit_dir(path)     # or replace_dir(path, write)
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

_PARTIAL, _OLD = ".partial", ".old"


def partial_path(path: str) -> str:
  """Where `path`'s next version is written before commit_dir moves it into place."""
  return os.path.abspath(path) + _PARTIAL


def start_dir(path: str) -> str:
  """Clears leftovers of an interrupted earlier attempt; returns the (absent) partial path."""
  recover_dir(path)
  tmp = partial_path(path)
  shutil.rmtree(tmp, ignore_errors=True)
  return tmp


def commit_dir(path: str) -> None:
  """Swaps the complete partial directory in for `path`.

  A directory cannot be renamed over a non-empty one, so the swap is two renames (old aside, new
  in); the only moment `path` is missing is between them, and recover_dir repairs that.
  """
  path = os.path.abspath(path)
  old = path + _OLD
  if os.path.exists(path):
    os.rename(path, old)
  os.rename(partial_path(path), path)
  shutil.rmtree(old, ignore_errors=True)


def replace_dir(path: str, write: Callable[[str], Any]) -> Any:
  """write(tmp_dir) on a fresh sibling directory, then commit_dir(path). Returns write's result."""
  result = write(start_dir(path))
  commit_dir(path)
  return result


def recover_dir(path: str) -> None:
  """After a crash between commit_dir's two renames: put the complete old directory back."""
  path = os.path.abspath(path)
  old = path + _OLD
  if os.path.exists(old):
    if os.path.exists(path):
      shutil.rmtree(old)
    else:
      os.rename(old, path)


def replace_file(path: str, write: Callable[[str], Any]) -> Any:
  """write(tmp_path), then an atomic rename over `path`. The temporary name keeps the extension
  (`loss.partial.png`): writers such as matplotlib pick the format from it."""
  root, ext = os.path.splitext(path)
  tmp = root + _PARTIAL + ext
  result = write(tmp)
  os.replace(tmp, path)
  return result


def write_json(path: str, value: Any) -> str:
  """`value` as indented JSON at `path`, atomically."""
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(value, f, indent=2)
  replace_file(path, write)
  return path
