"""The training loop shared by CAVGA and the VAEs: resume, log, checkpoint.

``training_loop`` takes a jitted ``(state, batch, rng) -> (state, metrics)``
step and plain settings (``LoopSettings``); it restores the newest
checkpoint, draws each step's batch as a pure function of ``(seed, step)``,
logs losses and images/s, writes the metrics log, checkpoints, applies the
non-finite policy (``cavga_jax.nonfinite``) and records an optional
learning curve. Only process 0 writes the shared files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from cavga_jax import checkpointing
from cavga_jax import data
from cavga_jax import nonfinite
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.errors import TrainingError
from cavga_jax.evaluation import artifacts

Array = jax.Array

METRICS_FILE = 'train_metrics.jsonl'


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long to train and how often to log, checkpoint and evaluate.

  ``seed`` picks the batch order; ``nonfinite`` is a ``nonfinite.MODES``
  policy; ``eval_every`` 0 records no learning curve. ``keep_checkpoints``
  to ``eval_every`` default to ``typed_config.TrainSettings``'s.
  """
  num_steps: int
  batch_size: int
  seed: int = 0
  log_every: int = 100
  checkpoint_every: int = 1000
  keep_checkpoints: int = typed_config.default('train.keep_checkpoints')
  prefetch: int = typed_config.default('train.prefetch')
  nonfinite: str = typed_config.default('train.nonfinite')
  max_consecutive_skips: int = typed_config.default(
      'train.max_consecutive_skips')
  eval_every: int = typed_config.default('train.eval_every')

  @classmethod
  def from_settings(cls, seed: int,
                    train: typed_config.TrainSettings) -> LoopSettings:
    """``config.seed`` and the typed ``config.train`` fields."""
    return cls(
        seed=seed,
        **{
            field.name: getattr(train, field.name)
            for field in dataclasses.fields(train)
        })


def _log_line(step: int, num_steps: int, metrics: dict[str, float],
              images_per_s: float, batch_size: int) -> str:
  """The periodic progress line: step, losses, speed and the time left at
  that speed (log lines rather than a bar, so a log file stays readable)."""
  terms = ' '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())
  line = f'step {step}/{num_steps} | {terms} | {images_per_s:.1f} img/s'
  if images_per_s > 0 and step < num_steps:
    left = round((num_steps - step) * batch_size / images_per_s)
    line += f' | ETA {datetime.timedelta(seconds=left)}'
  return line


def truncate_metrics_log(path: str, last_step: int) -> None:
  """Keeps the JSONL lines of steps <= ``last_step`` (the resumed step).

  A run killed after logging a step but before checkpointing it logs that
  step again when resumed; a line torn by the kill is dropped as well.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)['step'] <= last_step:
          kept.append(line if line.endswith('\n') else line + '\n')
      except (ValueError, KeyError, TypeError):
        continue
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def training_loop(
    settings: LoopSettings,
    workdir: str,
    state: Any,
    train_step: Callable[[Any, Any, Array], Any],
    num_examples: int,
    put_fn: Callable[[np.ndarray], Any],
    step_rng: Array,
    loss_keys: tuple[str, ...],
    description: str,
    index_fn: Callable[[int], np.ndarray] | None = None,
    eval_fn: Callable[[Any, int], dict[str, Any]] | None = None) -> Any:
  """Resumes, runs, logs and checkpoints a training run (CAVGA and the VAEs).

  Args:
    settings: steps, batch size, batch-order seed, log / checkpoint / eval
      intervals and the non-finite policy.
    workdir: checkpoints go to ``<workdir>/checkpoints``, metrics to
      ``<workdir>/train_metrics.jsonl``.
    state: the freshly initialised state (a flax struct with ``step``); the
      newest checkpoint, if any, replaces it. With ``num_steps`` 0 and no
      checkpoint it is saved as checkpoint 0 (``configs/mvtec.py`` trains
      no VAE-GAN; evaluate.py reads the initial networks from it).
    train_step: the jitted ``(state, batch, rng) -> (state, metrics)``;
      metrics hold float scalars incl. ``nonfinite`` and ``loss_keys``.
    num_examples: size of the training set; batches are
      ``put_fn(global_batch_indices)``, a function of ``(seed, step)``.
    put_fn: (batch_size,) example indices -> the step's (sharded) batch.
    step_rng: the run's key (the step folds in ``state.step``).
    loss_keys: metrics named in a non-finite error message.
    description: what is trained, for the log.
    index_fn: step -> the step's (batch_size,) global batch indices, a pure
      function of the step (CAVGA_w's ``data.quota_batch_indices``); None:
      ``data.epoch_permutation_indices`` of ``settings.seed``.
    eval_fn: ``(state, step) -> record`` (a JSON-able dict with 'step' and
      'maps'), called every ``settings.eval_every`` steps and at the last
      step; the records go to ``<workdir>/eval_curve.jsonl`` (truncated to
      the resumed step like the metrics log) and are plotted to
      ``eval_curve.png``. It only observes: no checkpoint is selected.

  Returns:
    The final state.

  Raises:
    TrainingError: non-finite losses or gradients (``settings.nonfinite``;
      see ``cavga_jax.nonfinite``) or parameters; the last good checkpoint is
      kept.
  """
  # Only training removes the temporary folders of saves that a killed run
  # left behind (evaluate.py may run beside a training run).
  manager = checkpointing.make_manager(
      workdir, settings.keep_checkpoints, cleanup_tmp=True)
  restored = checkpointing.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('resumed from %s at step %d',
                 checkpointing.checkpoint_dir(workdir), int(state.step))
  start_step, num_steps = int(state.step), settings.num_steps
  metrics_path = os.path.join(workdir, METRICS_FILE)
  curve_path = os.path.join(workdir, artifacts.CURVE_FILE)
  primary = sharding.is_primary_process()
  if primary:
    truncate_metrics_log(metrics_path, start_step)
    truncate_metrics_log(curve_path, start_step)
  eval_every = settings.eval_every if eval_fn else 0
  if start_step >= num_steps:
    logging.info('already trained for %d steps (config.train.num_steps=%d)',
                 start_step, num_steps)
    if manager.latest_step() is None:
      # num_steps 0: the initial state is the checkpoint evaluate.py reads.
      checkpointing.save(manager, start_step, state)
    return state

  batch_size = settings.batch_size
  batches = data.TrainBatches(
      np.arange(num_examples),
      batch_size,
      seed=settings.seed,
      start_step=start_step,
      prefetch=settings.prefetch,
      put_fn=put_fn,
      index_fn=index_fn)
  guard = nonfinite.NonFiniteGuard(
      settings.nonfinite, settings.max_consecutive_skips, lambda:
      (f'the last good checkpoint (step {manager.latest_step()}) in '
       f'{checkpointing.checkpoint_dir(workdir)} is kept'), loss_keys)
  logging.info('training %s for %d steps, batch %d on %d device(s)',
               description, num_steps, batch_size, jax.device_count())
  with batches, (open(metrics_path, 'a')
                 if primary else contextlib.nullcontext()) as metrics_file:
    tic, tic_step = time.perf_counter(), start_step
    for step in range(start_step, num_steps):
      state, metrics = train_step(state, next(batches), step_rng)
      done = step + 1
      guard.add(done, metrics)
      if done == start_step + 1:
        jax.block_until_ready(metrics)
        logging.info('first step (including compilation) took %.1f s',
                     time.perf_counter() - tic)
        tic, tic_step = time.perf_counter(), done
      if done % settings.log_every == 0 or done == num_steps:
        guard.drain()
        metrics = {
            k: float(v)
            for k, v in jax.device_get(metrics).items()
            if k != 'nonfinite'
        }
        if settings.nonfinite == 'skip':
          metrics['skipped'] = guard.take_skipped()
        elapsed = time.perf_counter() - tic
        speed = (done - tic_step) * batch_size / elapsed if elapsed else 0.0
        tic, tic_step = time.perf_counter(), done
        logging.info(_log_line(done, num_steps, metrics, speed, batch_size))
        if primary:
          metrics_file.write(
              json.dumps(dict(step=done, images_per_s=speed, **metrics)) + '\n')
          metrics_file.flush()
      if done % settings.checkpoint_every == 0 or done == num_steps:
        guard.drain()
        if not bool(nonfinite.tree_all_finite(state)):
          raise TrainingError(
              f'non-finite parameters at step {done}; not saved, the last '
              f'good checkpoint (step {manager.latest_step()}) in '
              f'{checkpointing.checkpoint_dir(workdir)} is kept')
        checkpointing.save(manager, done, state)
        logging.info('saved checkpoint %d', done)
      if eval_every and (done % eval_every == 0 or done == num_steps):
        record = eval_fn(state, done)  # Every process computes its part.
        if primary:
          artifacts.append_curve_point(curve_path, record)
  if guard.skipped_total:
    logging.warning(
        '%d of %d steps were skipped for non-finite losses or '
        'gradients', guard.skipped_total, num_steps - start_step)
  return state
