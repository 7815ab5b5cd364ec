"""Damaged prepared-data shards (a truncated copy, a flipped bit): the run stops with an error
naming the shard file (and the record, for a flipped bit) instead of training on garbage or
failing deep inside Grain; with data.damaged_records=skip the damaged records are skipped and
counted in the data stats. The corpus is the one `prepare` wrote for the training fixtures,
copied before it is damaged."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ultralong_jax.data import config as data_config
from ultralong_jax.data import pretrain, shards

FAULTS = os.path.join(os.path.dirname(__file__), "_faults.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD = shards.shard_name(0, 2)


def _pretrain_pipeline(cfg, **kwargs):
  """build_pretrain_pipeline of a data ConfigDict, validated and resolved into its piece."""
  return pretrain.build_pretrain_pipeline(data_config.resolve_data_config(cfg), **kwargs)


def _copy(corpus, tmp_path):
  target = str(tmp_path / "prepared")
  shutil.copytree(corpus["prepared"], target)
  return target, os.path.join(target, SHARD)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) * 2 // 3)


def _flip_a_bit(path, among=None):
  """Flips one bit of one record's bytes, searching from a quarter into the file (Riegeli
  pads chunks, and a flip in the padding or the index changes no record); returns the records
  that no longer read back as written (an independent check: the array_record reader against
  the records read before the flip)."""
  before = _records(path)
  size = os.path.getsize(path)
  for offset in range(size // 4 if among is None else 64, size, 97):
    _xor_byte(path, offset)
    changed = [i for i, (a, b) in enumerate(zip(before, _records(path, tolerant=True))) if a != b]
    if changed and (among is None or set(changed) <= among):
      return changed
    _xor_byte(path, offset)  # no record there: undo
  raise AssertionError(f"no flip in {path} changed a record")


def _xor_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x10]))


def _records(path, tolerant=False):
  """Every record of an ArrayRecord file (None for one that fails to read, when tolerant)."""
  from array_record.python import array_record_module as arm  # pylint: disable=import-outside-toplevel
  reader = arm.ArrayRecordReader(path)
  records = []
  for i in range(reader.num_records()):
    try:
      records.append(reader.read([i])[0])
    except Exception:  # pylint: disable=broad-except
      if not tolerant:
        raise
      records.append(None)
  try:
    reader.close()
  except Exception:  # pylint: disable=broad-except
    if not tolerant:
      raise
  return records


def _data_config(tiny_config, prepared, damaged="error"):
  c = tiny_config()
  c.data.domains.synthetic.path = prepared
  c.data.damaged_records = damaged
  return c


def test_prepare_records_sizes_and_checksums(corpus):
  corpus_ = shards.load_prepared(corpus["prepared"])
  for path, info in zip(corpus_.shard_paths, corpus_.manifest["shards"]):
    assert info["bytes"] == os.path.getsize(path)
    assert info["sha256"] == shards.file_sha256(path)
    crcs = np.load(os.path.join(corpus["prepared"], info["crc32"]))
    assert [shards.record_crc32(r) for r in _records(path)] == crcs.tolist()
  assert shards.verify_checksums(corpus_) == []


def test_truncated_shard_fails_at_build_or_is_skipped_and_counted(corpus, tiny_config, tmp_path):
  prepared, shard = _copy(corpus, tmp_path)
  size = os.path.getsize(shard)
  _truncate(shard)
  with pytest.raises(shards.DamagedShardError,
                     match=rf"{shard} has {size * 2 // 3} bytes, but .*manifest.json says "
                           rf"{size}.*damaged_records=skip"):
    _pretrain_pipeline(_data_config(tiny_config, prepared).data)
  # skip: shard 0's documents are dropped and counted; rows come from shard 1 alone.
  pipe = _pretrain_pipeline(_data_config(tiny_config, prepared, "skip").data)
  it = pipe.iterator()
  batches = [next(it) for _ in range(20)]  # counts are as of the packer's checkpointable state
  counts = pipe.stats(it)["mix"]
  assert counts["damaged_record"] > 0 and counts["synthetic/documents"] > 0, counts
  assert all(b["inputs"].shape == (2, 128) for b in batches)


def test_flipped_bit_names_the_shard_and_record(corpus, tiny_config, tmp_path):
  prepared, shard = _copy(corpus, tmp_path)
  changed = _flip_a_bit(shard)
  assert len(changed) == 1, changed  # one bit: one record
  assert shards.verify_checksums(shards.load_prepared(prepared)) == [shard]
  # The whole shard, read through the pipeline's reader: exactly that record fails.
  reader = shards.DocumentReader(shards.load_prepared(prepared))
  records = range(len(_records(shard, tolerant=True)))  # shard 0's are the first in order
  with pytest.raises(shards.DamagedShardError,
                     match=rf"{shard}: record {changed[0]} is damaged .*damaged_records=skip"):
    for record in records:
      reader(record)
  skipping = shards.DocumentReader(shards.load_prepared(prepared, "skip"))
  read = [skipping(r) for r in records]
  assert [i for i, doc in enumerate(read) if doc is None] == changed


def _records_read_first(c, steps):
  """Shard-0 records the pipeline of `c` reads for its first `steps` batches."""
  read, real_call = set(), shards.DocumentReader.__call__

  def spy(self, index):
    read.add(int(index))
    return real_call(self, index)
  shards.DocumentReader.__call__ = spy
  try:
    it = _pretrain_pipeline(c.data).iterator()
    for _ in range(steps):
      next(it)
  finally:
    shards.DocumentReader.__call__ = real_call
  return {i for i in read if i < len(_records(os.path.join(c.data.domains.synthetic.path, SHARD)))}


def test_flipped_bit_stops_the_cli_with_one_line(corpus, session_config, tmp_path):
  prepared, shard = _copy(corpus, tmp_path)
  c = session_config(steps=4)
  c.data.domains.synthetic.path = prepared
  changed = _flip_a_bit(shard, among=_records_read_first(c, 2))  # a record the run reads
  c.export.hf = False
  path = str(tmp_path / "config.json")
  with open(path, "w") as f:
    f.write(c.to_json())
  result = subprocess.run([sys.executable, FAULTS, path, str(tmp_path / "run"), "none"],
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=300)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 2, result.stderr[-3000:]
  assert last.startswith(f"error: {shard}: record {changed[0]} is damaged"), last
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "4")  # it stopped there


def test_a_record_that_reads_but_differs_fails_its_crc(corpus, tmp_path):
  """A shard rewritten by something else (here: one token changed, the file re-encoded, its
  size put in the manifest) passes the container's own hashes; the CRC-32s catch it."""
  from array_record.python import array_record_module as arm  # pylint: disable=import-outside-toplevel
  prepared, shard = _copy(corpus, tmp_path)
  records = _records(shard)
  tokens = shards.decode_doc(records[7]).copy()
  tokens[3] += 1
  records[7] = shards.encode_doc(tokens)
  os.remove(shard)
  writer = arm.ArrayRecordWriter(shard, "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  manifest_path = os.path.join(prepared, shards.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest["shards"][0]["bytes"] = os.path.getsize(shard)
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  reader = shards.DocumentReader(shards.load_prepared(prepared))
  for i in range(7):
    reader(i)
  with pytest.raises(shards.DamagedShardError, match=rf"{shard}: record 7 is damaged \(its CRC-32"):
    reader(7)
