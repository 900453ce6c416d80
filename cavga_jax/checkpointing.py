"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``.

Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
to ``<step>`` once complete, and only complete ``<step>`` folders count as
checkpoints. A run killed during a save (even by SIGKILL) therefore resumes
from the last complete checkpoint; the training manager
(``make_manager(..., cleanup_tmp=True)``) deletes the temporary folders such
a run left behind. The newest ``max_to_keep`` checkpoints are kept. The train
state carries the step; the data order and PRNG keys are functions of
``(seed, step)``, so resuming reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cavga_jax.errors import CavgaError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, max_to_keep: int = 3,
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
      max_to_keep=max_to_keep, create=True,
      cleanup_tmp_directories=cleanup_tmp)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Writes ``state`` (a pytree) as checkpoint ``step`` and waits for it."""
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint ``step`` restored into ``target``'s structure and shardings.

  ``target`` may hold arrays or ``jax.ShapeDtypeStruct``s.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


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
  """Restores the newest checkpoint of ``workdir`` or raises a clear error."""
  manager = make_manager(workdir)
  state = restore_latest(manager, target)
  if state is None:
    raise CavgaError(f'{checkpoint_dir(workdir)}: no checkpoint found; '
                     'run train.py with this --workdir first')
  return state, int(manager.latest_step())
