"""Shared fixtures: the tiny config and the repository root."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from configs import tiny  # pylint: disable=wrong-import-position


@pytest.fixture
def tiny_config():
  return tiny.get_config()


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Tests compile the same tiny programs many times: cache them on disk."""
  from cavga_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.enable_compilation_cache(str(tmp_path_factory.mktemp('xla_cache')))
