"""Prefill with every chunk split over the sequence axis (sharded_cache.ring_cache_attention_fn)
against the single-device cache path (plain attention to an unsharded cache; test_generate.py
holds that path to transformers).

Float32 throughout: the sharded result differs only by the order of the log-sum-exp merges, so
logits agree to 1e-5 relative and the caches' written slots to 1e-5.
"""

import math

import jax
import numpy as np
import pytest

from ultralong_jax.evaluation import generate as gen
from ultralong_jax.evaluation import sharded_cache
from ultralong_jax.modeling import llama
from ultralong_jax.modeling.config import LlamaConfig
from ultralong_jax.parallel import mesh as mesh_lib

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                     max_position_embeddings=2048, initializer_range=0.1)
MESHES = {
    "seq2": {"sequence": 2},
    "seq8": {"sequence": 8},
    "dp2_seq4": {"data": 2, "sequence": 4},
}
P = 48  # prompt slots (left-padded)


def _prompts():
  rng = np.random.RandomState(0)
  return [rng.randint(1, 256, n).tolist() for n in (13, 45)]


def _prefill(runner, batch, chunk):
  cache = runner.new_cache(batch.ids.shape[0], P + 8)
  logits, cache = runner.prefill(batch, cache, chunk)
  return np.asarray(logits), np.asarray(cache.k), np.asarray(cache.v), np.asarray(cache.segment_ids)


@pytest.fixture(scope="module")
def reference():
  model = llama.init_model(CONFIG, seed=0)
  batch = gen.left_pad(_prompts(), P)
  runner = gen.CachedModel(model, kv_block=8)
  return model, batch, {chunk: _prefill(runner, batch, chunk) for chunk in (16, 48)}, runner


# Meshes with what else each checks (all: three chunks of 16, the later ones attending to the
# cache so far): seq8 also one pass over the whole prompt, dp2_seq4 teacher-forced scoring.
# (test_generate.py runs sequence 4 x tensor 2 through the same path against transformers.)
CASES = {"seq2": (16,), "seq8": (16, 48), "dp2_seq4": (16,)}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_every_prefill_chunk_sharded_matches_single_device(mesh_name, reference):
  model, batch, expected, ref_runner = reference
  sizes = MESHES[mesh_name]
  mesh = mesh_lib.make_mesh(sizes, devices=jax.devices()[:math.prod(sizes.values())])
  runner = gen.CachedModel(model, mesh, kv_block=8)
  assert runner._ring_attention is not None  # pylint: disable=protected-access
  for chunk in CASES[mesh_name]:
    logits, k, v, seg = _prefill(runner, batch, chunk)
    ref_logits, ref_k, ref_v, ref_seg = expected[chunk]
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() < 1e-5
    np.testing.assert_allclose(k[:, :, :P], ref_k[:, :, :P], atol=1e-5)
    np.testing.assert_allclose(v[:, :, :P], ref_v[:, :, :P], atol=1e-5)
    np.testing.assert_array_equal(seg[:, :P], ref_seg[:, :P])
  if mesh_name == "dp2_seq4":  # per-token log-probabilities of every chunk through the ring
    rows = [p + [7, 9] for p in _prompts()]
    logp, greedy = runner.score(rows, length=P, chunk=16)
    ref_logp, ref_greedy = ref_runner.score(rows, length=P, chunk=16)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_array_equal(greedy, ref_greedy)


def test_chunk_not_splitting_over_the_sequence_axis_is_refused():
  mesh = mesh_lib.make_mesh({"sequence": 4}, devices=jax.devices()[:4])
  fn = sharded_cache.ring_cache_attention_fn(mesh, kv_block=8)
  q = np.zeros((1, 6, 4, 16), np.float32)
  kv = np.zeros((1, 6, 2, 16), np.float32)
  cache = np.zeros((1, 1, 16, 2, 16), np.float32)  # [L,B,S,K,H]
  with pytest.raises(ValueError, match="does not split over the sequence axis of size 4"):
    fn(q, kv, kv, np.ones((1, 6), np.int32), cache, cache, np.zeros((1, 16), np.int32), 0, 0)
