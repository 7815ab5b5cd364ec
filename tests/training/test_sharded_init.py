"""A run's initial parameters from a HF directory or project checkpoint arrive placed by the train
step's shardings, read slice by slice, equal to the weights that were written."""

import jax
import numpy as np
import pytest
from flax import nnx

from ultralong_jax.convert import api as convert_api
from ultralong_jax.convert import checkpoint
from ultralong_jax.modeling import llama
from ultralong_jax.training import config as config_lib, loop, train_step


@pytest.mark.parametrize("mode", ["hf", "checkpoint"])
def test_initial_params_are_sharded_and_equal_the_written_weights(mode, tiny_config, tmp_path):
  c = tiny_config(batch=4, mesh=dict(data=1, fsdp=4, sequence=1, tensor=2))
  model_cfg = config_lib.model_config(c)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(
      nnx.state(llama.init_model(model_cfg, seed=5), nnx.Param)))
  path = str(tmp_path / mode)
  if mode == "hf":
    convert_api.export_hf(path, model_cfg, convert_api.params_getter(params))
  else:
    checkpoint.save_params(path, model_cfg, params)
  c.init.mode, c.init.path = mode, path
  run = config_lib.resolve(c, jax.device_count())
  built = train_step.from_config(run)
  got = loop.initial_params(run, built)
  for (key, want), array, sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                          jax.tree.leaves(got),
                                          jax.tree.leaves(built.shardings["params"])):
    assert array.sharding == sharding, key
    np.testing.assert_array_equal(np.asarray(array), want, err_msg=jax.tree_util.keystr(key))
