"""Reliability tests reuse the training fixtures (a generated corpus, the tiny-model config)
rather than keep a copy: loaded by path, since tests/ is not a package."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "_training_fixtures", pathlib.Path(__file__).parents[1] / "training" / "conftest.py")
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)
corpus, tiny_config = _training.corpus, _training.tiny_config
