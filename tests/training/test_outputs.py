"""Run outputs are replaced whole: an interrupted write never leaves a mix of old and new."""

import os

import pytest

from ultralong_jax.training import outputs


def _write(content):
  def write(tmp):
    os.makedirs(tmp)
    with open(os.path.join(tmp, "a"), "w") as f:
      f.write(content)
  return write


def _read(path):
  with open(os.path.join(path, "a")) as f:
    return f.read()


def test_replace_dir_swaps_in_the_new_version_and_drops_stale_files(tmp_path):
  path = str(tmp_path / "final")
  outputs.replace_dir(path, _write("old"))
  open(os.path.join(path, "stale"), "w").close()
  outputs.replace_dir(path, _write("new"))
  assert _read(path) == "new" and sorted(os.listdir(path)) == ["a"]
  assert sorted(os.listdir(tmp_path)) == ["final"]


def test_a_failed_write_leaves_the_old_version(tmp_path):
  path = str(tmp_path / "final")
  outputs.replace_dir(path, _write("old"))

  def crash(tmp):
    _write("half")(tmp)
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    outputs.replace_dir(path, crash)
  assert _read(path) == "old"
  outputs.replace_dir(path, _write("new"))  # the next attempt clears the partial leftovers
  assert _read(path) == "new" and sorted(os.listdir(tmp_path)) == ["final"]


def test_a_crash_between_the_two_renames_is_repaired(tmp_path):
  path = str(tmp_path / "final")
  outputs.replace_dir(path, _write("old"))
  os.rename(path, path + ".old")  # the moment between commit_dir's renames
  outputs.recover_dir(path)
  assert _read(path) == "old" and not os.path.exists(path + ".old")


def test_replace_file_keeps_the_extension_while_writing(tmp_path):
  seen = []
  path = str(tmp_path / "loss.png")
  outputs.replace_file(path, lambda tmp: (seen.append(tmp), open(tmp, "w").write("png")))
  assert seen[0].endswith(".png") and open(path).read() == "png"
  assert sorted(os.listdir(tmp_path)) == ["loss.png"]
