"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``.

Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
to ``<step>`` once complete, and only complete ``<step>`` folders count as
checkpoints. A run killed during a save (even by SIGKILL) therefore resumes
from the last complete checkpoint; the training manager
(``make_manager(..., cleanup_tmp=True)``) deletes the temporary folders such
a run left behind. The newest ``max_to_keep`` checkpoints are kept. The train
state carries the step; the data order and PRNG keys are functions of
``(seed, step)``, so resuming reproduces an uninterrupted run exactly.

A checkpoint that does not restore (a config whose shapes differ from the
one the run was trained with, e.g. an edited ``config.json``, or damaged
files) raises ``CavgaError``, one line naming the checkpoint and, for a
shape, the first array that differs, instead of Orbax's traceback.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cavga_jax import workdirs
from cavga_jax.errors import CavgaError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str,
                 max_to_keep: int = 3,
                 cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """A manager keeping the ``max_to_keep`` newest checkpoints.

  Args:
    workdir: the run folder; checkpoints go to ``<workdir>/checkpoints``.
    max_to_keep: retention: older checkpoints are deleted after a save.
    cleanup_tmp: delete unfinished saves (``*.orbax-checkpoint-tmp``) of a
      killed run now. Only the process that writes checkpoints may do this,
      not a reader such as ``evaluate.py`` running beside training.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=cleanup_tmp)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Writes ``state`` (a pytree) as checkpoint ``step`` and waits for it."""
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint ``step`` restored into ``target``'s structure and shardings.

  ``target`` may hold arrays or ``jax.ShapeDtypeStruct``s.

  Raises:
    CavgaError: the checkpoint does not fit ``target`` (the config differs
      from the one the run was trained with) or cannot be read.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except
    # Orbax and TensorStore raise many types, with tracebacks of hundreds of
    # lines, for a target that does not fit and for damaged files alike.
    raise _restore_error(
        os.path.join(os.fspath(manager.directory), str(step)), abstract,
        e) from None


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'gen_params.encoder.conv0.kernel': shape} of a pytree's leaves (the
  names Orbax gives them: dict keys, attribute names, sequence indices)."""

  def name(path):
    return '.'.join(
        str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
        for k in path)

  return {
      name(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _restore_error(path: str, abstract: Any, error: Exception) -> CavgaError:
  """Why checkpoint ``path`` did not restore into ``abstract``, one line."""
  try:  # A manager saves its one item as '<step>/default'.
    with ocp.StandardCheckpointer() as checkpointer:
      saved = _leaf_shapes(
          checkpointer.metadata(os.path.join(path, 'default')).item_metadata)
  except Exception:  # pylint: disable=broad-except
    saved = None  # The metadata is damaged too.
  if saved:
    wanted = _leaf_shapes(abstract)
    differing = [
        f'{n} is {saved[n]} in the checkpoint, {wanted[n]} with '
        'this config' for n in wanted if n in saved and saved[n] != wanted[n]
    ]
    differing += [
        f'{n} is not in the checkpoint' for n in wanted if n not in saved
    ]
    differing += [
        f'{n} is in the checkpoint, not with this config' for n in saved
        if n not in wanted
    ]
    if differing:
      workdir = os.path.dirname(os.path.dirname(path))
      return CavgaError(
          f'{path}: the config differs from the one {workdir} was trained '
          f'with ({differing[0]}'
          f'{f", and {len(differing) - 1} more" if len(differing) > 1 else ""}'
          f'); use that config (was {workdir}/{workdirs.CONFIG_FILE} '
          'edited?)')
  return CavgaError(f'{path}: the checkpoint cannot be read, damaged? '
                    f'({workdirs.one_line(error)})')


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """The newest checkpoint restored into ``target``'s structure and shardings.

  Returns None when there is no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  return restore(manager, step, target)


def has_checkpoint(workdir: str) -> bool:
  """Whether ``<workdir>/checkpoints`` holds a complete checkpoint."""
  manager = make_manager(workdir)
  try:
    return manager.latest_step() is not None
  finally:
    manager.close()


def restore_for_eval(workdir: str, target: Any) -> tuple[Any, int]:
  """Restores the newest checkpoint of ``workdir`` or raises a clear error
  (none there, or ``restore``'s)."""
  manager = make_manager(workdir)
  state = restore_latest(manager, target)
  if state is None:
    raise CavgaError(f'{checkpoint_dir(workdir)}: no checkpoint found; '
                     'run train.py with this --workdir first')
  return state, int(manager.latest_step())
