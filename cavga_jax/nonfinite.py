"""The non-finite loss policy shared by every training loop.

Every train step reports a ``nonfinite`` flag (1.0 when a loss or a
gradient is NaN or infinite). ``'stop'`` (default) ends the run with
``TrainingError`` at the first flagged step, before any later checkpoint is
written, so the last good checkpoint is kept. ``'skip'`` makes the jitted
step itself keep the previous parameters, batch statistics and optimizer
states (``keep_state_unless_finite``; only the step counter advances, so the
next step draws the next batch); ``max_consecutive_skips`` skipped steps in
a row end the run. The host reads the flags without waiting for the device
(``NonFiniteGuard`` polls finished steps and drains the rest at log and
checkpoint steps), so there is no per-step synchronisation.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cavga_jax.errors import TrainingError

Array = jax.Array

MODES = ('stop', 'skip')


def check_mode(mode: str) -> None:
  """Raises ValueError unless ``mode`` is one of ``MODES``."""
  if mode not in MODES:
    raise ValueError(f"nonfinite must be 'stop' or 'skip', got {mode!r}")


def tree_all_finite(tree: Any) -> Array:
  """A scalar bool: every element of every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def keep_state_unless_finite(finite: Array, new_state: Any, state: Any) -> Any:
  """``new_state`` if ``finite``, else ``state`` with only ``step`` advanced.

  The selection happens inside the jitted step (``nonfinite='skip'``), so a
  skipped step costs no host synchronisation; advancing ``step`` makes the
  next step draw the next batch and noise.
  """
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                      state)
  return kept.replace(step=state.step + 1)


class NonFiniteGuard:
  """Acts on the steps' ``nonfinite`` flags without a per-step host sync.

  ``add`` queues a step's flag and losses (device scalars) and processes the
  queued steps that have already finished; ``drain`` waits for and processes
  all of them. Processing is in step order, so the step a run stops at does
  not depend on timing.
  """

  def __init__(self, mode: str, max_consecutive_skips: int,
               describe_checkpoint: Callable[[], str], loss_keys: tuple[str,
                                                                        ...]):
    check_mode(mode)
    self._mode = mode
    self._loss_keys = loss_keys
    self._max_skips = max_consecutive_skips
    self._describe_checkpoint = describe_checkpoint
    self._pending: collections.deque = collections.deque()
    self.consecutive = 0
    self.skipped = 0  # Since the last ``take_skipped``.
    self.skipped_total = 0

  def add(self, step: int, metrics: dict[str, Array]) -> None:
    self._pending.append(
        (step, {k: metrics[k] for k in ('nonfinite',) + self._loss_keys}))
    while self._pending and self._pending[0][1]['nonfinite'].is_ready():
      self._process(*self._pending.popleft())

  def drain(self) -> None:
    while self._pending:
      self._process(*self._pending.popleft())

  def take_skipped(self) -> int:
    skipped, self.skipped = self.skipped, 0
    return skipped

  def _process(self, step: int, flags: dict[str, Array]) -> None:
    if not float(flags['nonfinite']):
      self.consecutive = 0
      return
    losses_text = ', '.join(
        f'{k} {float(flags[k]):.4g}' for k in self._loss_keys)
    if self._mode == 'stop':
      raise TrainingError(
          f'non-finite loss or gradients at step {step} ({losses_text}); '
          f'training stopped, {self._describe_checkpoint()}; lower '
          'optimizer.learning_rate, set optimizer.grad_clip_norm, or set '
          "train.nonfinite='skip' to skip such steps")
    self.consecutive += 1
    self.skipped += 1
    self.skipped_total += 1
    logging.warning(
        'step %d: non-finite loss or gradients (%s), update '
        'skipped (%d in a row)', step, losses_text, self.consecutive)
    if self.consecutive >= self._max_skips:
      raise TrainingError(
          f'{self.consecutive} consecutive steps up to step {step} had '
          'non-finite losses or gradients and were skipped '
          f'(train.max_consecutive_skips={self._max_skips}); training '
          f'stopped, {self._describe_checkpoint()}')
