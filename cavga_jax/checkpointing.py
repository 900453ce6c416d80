"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``.

Saves are atomic (orbax writes to a temporary folder and renames), so a run
killed during a save resumes from the last complete checkpoint. The train
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


def make_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A manager keeping the ``max_to_keep`` newest checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Writes ``state`` (a pytree) as checkpoint ``step`` and waits for it."""
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """The newest checkpoint restored into ``target``'s structure and shardings.

  Returns None when there is no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_for_eval(workdir: str, target: Any) -> tuple[Any, int]:
  """Restores the newest checkpoint of ``workdir`` or raises a clear error."""
  manager = make_manager(workdir)
  state = restore_latest(manager, target)
  if state is None:
    raise CavgaError(f'{checkpoint_dir(workdir)}: no checkpoint found; '
                     'run train.py with this --workdir first')
  return state, int(manager.latest_step())
