"""Reliability tests reuse the training fixtures (a generated corpus, the tiny-model config)
rather than keep a copy: loaded by path, since tests/ is not a package."""

import importlib.util
import json
import os
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location(
    "_training_fixtures", pathlib.Path(__file__).parents[1] / "training" / "conftest.py")
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)
corpus, tiny_config = _training.corpus, _training.tiny_config


@pytest.fixture(scope="session")
def session_config(corpus):  # noqa: F811
  """The same tiny-config factory, session-scoped, for a reference run shared by several tests."""
  return _training.tiny_config.__wrapped__(corpus)


@pytest.fixture(scope="session")
def reference_rows(session_config, tmp_path_factory):
  """metrics.jsonl rows (step -> row) of an uninterrupted 6-step run: what every interrupted and
  resumed run must reproduce."""
  from ultralong_jax.training import loop  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp("straight"))
  loop.run(_six_steps(session_config), d, progress=False)
  with open(os.path.join(d, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="session")
def six_steps():
  """Function: a tiny-config factory -> the config the crash tests interrupt."""
  return _six_steps


def _six_steps(make):
  """6 steps, a checkpoint every 2 (all kept), no HF export: small and quick to crash."""
  c = make(steps=6)
  c.checkpoint.every_steps, c.checkpoint.keep = 2, 5
  c.export.hf = False
  return c
