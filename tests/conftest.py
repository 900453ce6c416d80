"""Shared fixtures and helpers: the tiny config, the repository root, script
loading and bit-exact tree comparison."""

import importlib.util
import os
import shutil
import sys
from types import ModuleType

import pytest

# Most of the suite's time is XLA:CPU compiling small programs once each, and
# most of a compilation is LLVM optimising the generated code: at level 0
# CAVGA-E's train step compiles in 50 s instead of 90 s and its initialiser in
# 14 s instead of 59 s (tests/configs/tiny_efficientnet, CPU-2, 2026-12-07).
# The level changes LLVM's code generation only, not XLA's HLO (fusions,
# layouts, the convolutions' form tests/test_layers checks), and the tests
# run few steps, so the slower code costs little. Set here, before JAX starts
# its backend; subprocesses inherit it. CAVGA_TEST_XLA_OPT=1 keeps XLA's
# default level.
if os.environ.get('CAVGA_TEST_XLA_OPT') != '1':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_backend_optimization_level=0').strip()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from configs import tiny  # pylint: disable=wrong-import-position


def load_script(relative_path: str) -> ModuleType:
  """Imports a file of the repository that is not in a package (scripts/,
  benchmarks/, tests/*_check.py) as a module."""
  path = os.path.join(REPO_ROOT, relative_path)
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tree_equal(a, b) -> bool:
  """Same structure (every leaf's key path) and bit-identical leaves.

  Static fields (``TrainState``'s optimizers) are not leaves: not compared.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a_leaves = jax.tree_util.tree_flatten_with_path(a)[0]
  b_leaves = jax.tree_util.tree_flatten_with_path(b)[0]
  paths = [jax.tree_util.keystr(path) for path, _ in a_leaves]
  return (paths == [jax.tree_util.keystr(path) for path, _ in b_leaves] and all(
      x.shape == y.shape and x.dtype == y.dtype and bool(jnp.array_equal(x, y))
      for (_, x), (_, y) in zip(a_leaves, b_leaves)))


def train_with_interruption(config, workdir: str, first_steps: int = 3):
  """Trains ``first_steps`` steps, stops, then resumes to
  ``config.train.num_steps`` in the same workdir; returns the final state.

  A ``first_steps`` that is not a multiple of ``config.train.checkpoint_every``
  is a run killed between checkpoints: after step ``first_steps`` and its
  log line, before its checkpoint (the end-of-run save is deleted), so the
  resumed run restarts at the checkpoint before and redoes those steps.
  """
  from cavga_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cavga_jax.programs import train as train_lib  # pylint: disable=g-import-not-at-top
  interrupted = config.copy_and_resolve_references()
  interrupted.train.num_steps = first_steps
  train_lib.train(interrupted, workdir)
  if first_steps % config.train.checkpoint_every:
    shutil.rmtree(
        os.path.join(checkpointing.checkpoint_dir(workdir), str(first_steps)))
  return train_lib.train(config, workdir)


def resume_copy_of_run(config,
                       finished_workdir: str,
                       workdir: str,
                       keep_step: int = 2):
  """Resumes a copy of a finished run as if it had been killed before writing
  its checkpoints after ``keep_step``; returns the final state.

  ``workdir`` becomes a copy of ``finished_workdir`` (``config``'s run to
  ``config.train.num_steps``) without those checkpoints, its logs of the
  later steps kept, as a kill leaves them; the resumed run restarts at
  ``keep_step`` and redoes the steps after it. One ``train`` call instead of
  ``train_with_interruption``'s two: CAVGA-E's train step takes 20-80 s to
  trace and compile for each call on CPU-2.
  """
  from cavga_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cavga_jax.programs import train as train_lib  # pylint: disable=g-import-not-at-top
  shutil.copytree(finished_workdir, workdir)
  checkpoints = checkpointing.checkpoint_dir(workdir)
  steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
  assert keep_step in steps, (keep_step, steps)
  for step in steps:
    if step > keep_step:
      shutil.rmtree(os.path.join(checkpoints, str(step)))
  return train_lib.train(config, workdir)


def dataset_from_masks(masks):
  """A test set of blank images with these (N, S, S) masks; images with a
  defect pixel are labelled anomalous ('crack'), the rest normal."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cavga_jax import data  # pylint: disable=g-import-not-at-top
  labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
  return data.AnomalyDataset(
      images=np.zeros(masks.shape + (3,), np.uint8),
      masks=masks,
      labels=labels,
      defect_types=tuple('crack' if l else 'good' for l in labels),
      paths=tuple(f'/x/{i}.png' for i in range(len(masks))))


@pytest.fixture
def tiny_config():
  return tiny.get_config()


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Tests compile the same tiny programs many times: cache them on disk.

  One cache for the whole run: pytest-xdist's workers (their base
  temporary folders share a parent) and the subprocesses tests start (the
  JAX_* variables) reuse each other's programs.
  """
  from cavga_jax.programs import runtime  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  cache_dir = str(root / 'xla_cache')
  os.environ.update(
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  runtime.enable_compilation_cache(cache_dir)
