"""Sharded loading and saving: every process reads only its devices' slices of the safetensors
files and writes only its own shards, and the result equals a single-process whole-tensor load
bit for bit (the reference: hf.load_hf_params, itself checked against transformers)."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from ultralong_jax.bench import convert as bench_convert
from ultralong_jax.bench import convert_multihost
from ultralong_jax.convert import __main__ as cli
from ultralong_jax.convert import api, hf, sharded
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize("hf_kwargs,bf16", [
    (dict(attention_bias=True, mlp_bias=True), False),
    (dict(tie_word_embeddings=True, num_key_value_heads=4), False),
    (dict(), True),
], ids=["biases", "tied", "bf16_file"])
def test_sharded_load_equals_whole_tensor_load_on_every_mesh(make_hf_llama, hf_kwargs, bf16,
                                                             tmp_path):
  hf_model, hf_dir = make_hf_llama(**hf_kwargs)
  if bf16:  # stored bf16, loaded as the config's float32 parameters
    import torch  # pylint: disable=import-outside-toplevel
    hf_dir = str(tmp_path / "bf16")
    hf_model.to(torch.bfloat16).save_pretrained(hf_dir)
  config = api.load_config(hf_dir)
  reader = hf.SafetensorsReader(hf_dir)
  reference = hf.load_hf_params(reader, config, dtype=np.dtype(config.param_dtype))
  for sizes in ({"fsdp": 8}, {"fsdp": 2, "tensor": 4}, {"fsdp": 4, "tensor": 2},
                {"data": 2, "tensor": 4}):
    shardings = convert_multihost.param_shardings(config, mesh_lib.make_mesh(sizes))
    params = api.load_params(hf_dir, config, shardings)
    for (path, want), got, sharding in zip(jax.tree_util.tree_leaves_with_path(reference),
                                           jax.tree.leaves(params), jax.tree.leaves(shardings)):
      assert got.sharding == sharding, (sizes, path)
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{sizes} {path}")


def test_hf_region_reads_the_box_a_slice_covers(tmp_path):
  # wq's mapping: torch [N*H, D] -> ours [D, N, H]; heads 1..3 of columns 4..8 are rows 2H..6H.
  D, N, H = 8, 4, 2
  hf_array = np.arange(N * H * D, dtype=np.float32).reshape(N * H, D)
  to_project = lambda w: w.T.reshape(D, N, H)
  index = (slice(4, 8), slice(1, 3), slice(0, 2))
  box, steps = sharded.hf_region(to_project, hf_array.shape, index)
  assert box == (slice(2, 6), slice(4, 8))
  got = sharded.from_region(hf_array[box], steps, (4, 2, 2))
  np.testing.assert_array_equal(got, to_project(hf_array)[index])
  # The reader's row blocks (here 3 rows of 32 bytes at a time) give the same box.
  reader_box = (slice(1, 7), slice(2, 5))
  save_file({"w": hf_array}, str(tmp_path / hf.SINGLE_FILE))
  reader = hf.SafetensorsReader(str(tmp_path))
  np.testing.assert_array_equal(reader.get_slice("w", reader_box, block_bytes=96),
                                hf_array[reader_box])
  with pytest.raises(ValueError, match="copies instead of viewing"):
    sharded.hf_region(lambda w: w.T.copy(), hf_array.shape, (slice(0, 2), slice(0, 2)))


@pytest.mark.slow
def test_two_processes_load_and_save_their_share_bit_exact(tmp_path):
  """2 processes x 4 CPU devices, parameters fsdp-sharded over all 8: each process's RSS rises by
  <= 0.6 x the weights while it loads the HF directory and while it writes the final checkpoint
  (CPU device buffers are host memory, so the load includes its half of the weights); the
  checkpoint equals a 1-process load and the HF export equals the input, bit for bit."""
  config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=12,
                       num_heads=8, num_kv_heads=4)
  hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "out")
  weights = bench_convert.write_random_hf(hf_dir, config, shard_bytes=60 * 10**6)
  results = convert_multihost.run_processes(hf_dir, out, 2, "sharded", str(tmp_path / "logs"))
  assert sorted(r["process"] for r in results) == [0, 1]
  for r in results:
    for phase in ("load", "save"):
      assert r["rise"][phase] <= 0.6 * weights, (phase, r, weights)
  convert_multihost.check_bit_exact(hf_dir, os.path.join(out, "final"))
  # `jax-to-hf` streams the 2-process checkpoint one parameter at a time in this 1 process.
  assert cli.main(["jax-to-hf", "--ckpt", os.path.join(out, "final"), "--out",
                   os.path.join(out, "back")]) == 0
  original = hf.SafetensorsReader(hf_dir)
  for exported_dir in ("hf", "back"):  # the run's export (gathered per tensor) and the CLI's
    exported = hf.SafetensorsReader(os.path.join(out, exported_dir))
    assert sorted(original.keys()) == sorted(exported.keys())
    for name in original.keys():
      np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)
    with open(os.path.join(out, exported_dir, "config.json")) as f:
      assert json.load(f)["num_hidden_layers"] == 12
