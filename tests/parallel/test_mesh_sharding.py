"""Mesh construction and the logical -> mesh sharding table (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
import numpy as np
import optax
import pytest
from flax import nnx

from ultralong_jax.modeling import llama, presets
from ultralong_jax.parallel import mesh as mesh_lib
from ultralong_jax.parallel import sharding


def test_resolve_axis_sizes():
  assert mesh_lib.resolve_axis_sizes({"sequence": 4, "tensor": -1}, 8) == {
      "data": 1, "fsdp": 1, "sequence": 4, "tensor": 2}
  assert mesh_lib.resolve_axis_sizes({}, 1) == {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}
  with pytest.raises(ValueError, match="at most one -1"):
    mesh_lib.resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.resolve_axis_sizes({"sequence": 3, "data": -1}, 8)
  with pytest.raises(ValueError, match="multiply to 4"):
    mesh_lib.resolve_axis_sizes({"sequence": 4}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    mesh_lib.resolve_axis_sizes({"pipeline": 2}, 8)


def test_make_mesh_axes_and_order():
  mesh = mesh_lib.make_mesh({"data": 2, "sequence": 2, "tensor": -1})
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  # tensor is innermost: its groups are neighbouring device ids (one host's fast links).
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert ids[0, 0, 0].tolist() == [0, 1]
  default = mesh_lib.make_mesh()
  assert default.shape["fsdp"] == jax.device_count()


def test_split_dcn_puts_data_across_hosts():
  ici, dcn = mesh_lib.split_dcn({"data": 4, "fsdp": 2, "sequence": 4, "tensor": 8}, 8)
  assert dcn == {"data": 4, "fsdp": 2, "sequence": 1, "tensor": 1}
  assert ici == {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 8}
  with pytest.raises(ValueError, match="hosts"):
    mesh_lib.split_dcn({"data": 1, "fsdp": 1, "sequence": 1, "tensor": 3}, 2)


def test_make_mesh_resolves_the_rest():
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "sequence": 4, "tensor": 1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}


def test_single_process_skips_distributed_init(monkeypatch):
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.initialize_distributed() is False


def test_logical_to_spec_rules():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "sequence": 2})
  assert sharding.logical_to_spec(("batch", "length", "embed"), mesh) == P(
      ("data", "fsdp"), "sequence")  # fsdp already taken by batch: embed stays whole
  assert sharding.logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(
      None, "fsdp", "tensor")
  # Indivisible parameter dims are replicated rather than rejected.
  assert sharding.logical_to_spec(("embed",), mesh, shape=(3,)) == P()
  with pytest.raises(KeyError, match="sharding table"):
    sharding.logical_to_spec(("channels",))


def test_no_other_module_hard_codes_mesh_axes():
  import pathlib
  import re
  root = pathlib.Path(sharding.__file__).parents[1]
  pattern = re.compile(r"""PartitionSpec\(\s*['"]|P\(\s*['"](data|fsdp|sequence|tensor)['"]""")
  offenders = [str(p) for p in root.rglob("*.py")
               if p.name not in ("sharding.py", "mesh.py") and pattern.search(p.read_text())]
  assert not offenders, offenders


def test_state_and_optimizer_shardings():
  mesh = mesh_lib.make_mesh({"fsdp": 2, "sequence": 2, "tensor": 2})
  model = llama.init_model(presets.tiny())
  shardings = sharding.state_shardings(mesh, nnx.state(model))
  assert shardings["layers"]["wq"].get_value().spec == P(None, "fsdp", "tensor")
  assert shardings["embed"].get_value().spec == P("tensor", "fsdp")
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  opt_shardings = sharding.state_shardings(mesh, nnx.state(optimizer))
  specs = [s.spec for s in jax.tree.leaves(opt_shardings)]
  assert P(None, "tensor", "fsdp") in specs  # w_down moments follow their parameter
  assert P() in specs  # the step counter is replicated
  placed = jax.device_put(nnx.state(model), shardings)
  assert placed["layers"]["w_gate"].get_value().sharding.spec == P(None, "fsdp", "tensor")


def test_batch_shardings():
  mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
  batch = {"tokens": jnp.zeros((4, 16), jnp.int32), "weights": jnp.zeros((4,))}
  specs = jax.tree.map(lambda s: s.spec, sharding.batch_shardings(mesh, batch))
  assert specs == {"tokens": P(("data", "fsdp"), "sequence"), "weights": P(("data", "fsdp"))}
  with pytest.raises(ValueError, match="not divisible"):
    sharding.batch_shardings(mesh, {"tokens": jnp.zeros((4, 10), jnp.int32)})


def test_constrain_is_noop_without_mesh_and_shards_with_one():
  x = jnp.ones((4, 8, 16))
  assert sharding.constrain(x, ("batch", "length", "embed")) is x
  mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length", "embed")))(x)
  assert y.sharding.shard_shape(x.shape) == (2, 2, 16)
