"""Pre-flight: what `validate` accepts really divides (property-based), what it rejects names a
violated key; missing data, a too-large tokenizer and an impossible memory budget are refused
before anything compiles."""

import json
import os

import ml_collections
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from ultralong_jax.data import config as data_config
from ultralong_jax.parallel import mesh as mesh_lib
from ultralong_jax.training import config as config_lib
from ultralong_jax.training import loop, preflight

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_POS = 4096


def _config(mesh, devices_seq_len, batch, micro, heads, chunk):
  del devices_seq_len
  c = config_lib.base_config(1)
  c.model.preset, c.model.ultralong, c.model.max_position_embeddings = "tiny", "", MAX_POS
  c.model.overrides_json = json.dumps({"num_heads": heads[0], "num_kv_heads": heads[1]})
  c.init.mode = "random"
  for axis, size in zip(mesh_lib.MESH_AXES, mesh):
    c.mesh[axis] = size
  c.data.vocab_size, c.data.separator_id, c.data.bos_id = 512, 2, -1
  c.data.domains = ml_collections.ConfigDict({"web": {"path": "/unused", "weight": 1.0}})
  c.data.global_batch_size, c.train.microbatches, c.train.loss_chunk_size = batch, micro, chunk
  return c


def _expected_keys(c, num_devices, heads):
  """An independent oracle: the keys whose constraint this config breaks."""
  sizes = [c.mesh[a] for a in mesh_lib.MESH_AXES]
  fixed = 1
  for s in sizes:
    fixed *= s if s != -1 else 1
  if (sizes.count(-1) > 1 or num_devices % fixed or (-1 not in sizes and fixed != num_devices)):
    return {"mesh"}
  data, fsdp, seq, tensor = [num_devices // fixed if s == -1 else s for s in sizes]
  L, B, m = c.data.seq_len, c.data.global_batch_size, c.train.microbatches
  bad = set()
  if B % (data * fsdp * m):
    bad.add("data.global_batch_size")
  if seq > 1 and L % (2 * seq):
    bad.add("data.seq_len")
  if heads[0] % tensor or heads[1] % tensor:
    bad.add("mesh.tensor")
  chunk = min(c.train.loss_chunk_size, L)
  if L % chunk or chunk % seq:
    bad.add("train.loss_chunk_size")
  if L > MAX_POS:
    bad.add("max_position_embeddings")
  return bad


@st.composite
def _fitting_mesh(draw, num_devices):
  """Axis sizes whose product is num_devices (powers of two), one maybe written as -1."""
  sizes, left = [], num_devices
  for _ in range(3):
    s = draw(st.sampled_from([d for d in (1, 2, 4, 8) if left % d == 0]))
    sizes.append(s)
    left //= s
  sizes.append(left)
  sizes = draw(st.permutations(sizes))
  if draw(st.booleans()):
    sizes[draw(st.integers(0, 3))] = -1
  return tuple(sizes)


_any_mesh = st.tuples(st.sampled_from([1, 2, 4, -1]), st.sampled_from([1, 2, -1]),
                      st.sampled_from([1, 2, 4, 8, 16, -1]), st.sampled_from([1, 2, 4, 8, -1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_devices=st.sampled_from([1, 2, 4, 8, 16, 32]),
       seq_len=st.sampled_from([64, 96, 128, 192, 256, 1000, 1024, 4096, 8192]),
       batch=st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32]), micro=st.sampled_from([1, 1, 2, 3, 4]),
       heads=st.sampled_from([(4, 2), (8, 8), (8, 2), (16, 4), (16, 16), (6, 3), (12, 1)]),
       chunk=st.sampled_from([16, 32, 48, 64, 4096]))
def test_validate_accepts_exactly_the_divisible_configs(data, num_devices, seq_len, batch, micro,
                                                        heads, chunk):
  mesh = data.draw(st.one_of(_fitting_mesh(num_devices), _any_mesh), label="mesh")
  c = _config(mesh, None, batch, micro, heads, chunk)
  c.data.seq_len = seq_len
  expected = _expected_keys(c, num_devices, heads)
  event("rejected" if expected else "accepted")  # --hypothesis-show-statistics: both occur
  try:
    config_lib.validate(c, num_devices)
  except ValueError as e:
    assert expected, f"rejected a valid config: {e}"
    assert any(key in str(e) for key in expected), (str(e), expected)
  else:
    assert not expected, f"accepted a config that breaks {expected}"


def test_missing_or_unreadable_data_names_the_key(tiny_config, tmp_path):
  c = tiny_config()
  c.data.domains.synthetic.path = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="data.domains.synthetic.path: .*nowhere does not exist"):
    loop.run(c, str(tmp_path / "run"), progress=False)  # fails before any compile
  c = tiny_config(stage=2)
  c.data.chat_files = str(tmp_path / "*.jsonl")
  with pytest.raises(ValueError, match=r"data.chat_files: .*matches no file"):
    preflight.check_paths(data_config.data_piece(c.data))
  c = tiny_config(stage=2)
  c.data.tokenizer = str(tmp_path / "tok.json")
  with pytest.raises(ValueError, match="data.tokenizer: .*does not exist"):
    preflight.check_paths(data_config.data_piece(c.data))
  if os.getuid() != 0:  # root reads everything
    os.makedirs(tmp_path / "locked")
    os.chmod(tmp_path / "locked", 0)
    c = tiny_config()
    c.data.domains.synthetic.path = str(tmp_path / "locked")
    with pytest.raises(ValueError, match="not readable"):
      preflight.check_paths(data_config.data_piece(c.data))


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_config):
  c = tiny_config()  # a 512-token tokenizer
  c.model.overrides_json, c.data.vocab_size = '{"vocab_size": 256}', 256
  with pytest.raises(ValueError, match=r"data.tokenizer has 512 tokens .*vocab_size is 256"):
    preflight.check(config_lib.resolve(c, num_devices=8))


def _shipped(spec):
  c = config_lib.load_config_file(os.path.join(REPO, "configs", spec))
  c.init.mode = "random"  # the preset's shape, no checkpoint needed
  return c


def test_memory_estimate_says_what_to_try():
  c = _shipped("llama31_8b_stage1.py:1m")  # TP 8 x CP 4, full remat, on 64 devices
  run = config_lib.resolve(c, num_devices=64)
  model = run.model
  est = preflight.estimate_bytes_per_device(run, platform="gpu")
  # By hand: 8.03e9 params over tensor 8 -> 4.0 GB fp32 params, 8.0 GB moments, 4.0 GB grads;
  # full remat saves each layer's input, split over tensor 8 (sequence parallelism):
  # 1 row x 262,144 tokens x 4096 / 8 x 2 bytes x 32 layers.
  assert est["checkpoints"] == 262_144 * 4096 / 8 * 2 * 32
  assert abs(est["params"] - model.num_params * 4 / 8) < 1e6  # norms are not split over tensor
  with pytest.raises(ValueError, match=r"will not fit: .*try mesh.sequence=8 \(CP\)"):
    preflight.check_memory(run, available=20 * 2**30, platform="gpu")
  preflight.check_memory(run, available=80 * 2**30, platform="gpu")  # fits
  c.model.remat_policy = "dots"
  run = config_lib.resolve(c, num_devices=64)
  with pytest.raises(ValueError, match=r"model.remat_policy=full"):
    preflight.check_memory(run, available=80 * 2**30, platform="gpu")
  preflight.check_memory(run, available=None)  # unknown (CPU): no check
