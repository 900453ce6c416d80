"""The CAVGA training program: data, models, the jitted step and the loop.

``train(config, workdir)`` is where a run's config enters the library: it
checks the config and writes it to the workdir (``runtime.prepare_run``),
loads the datasets, builds the models and train state, jits the CAVGA step
(``cavga_step.make_train_step``) with a donated state and runs
``training_loop.training_loop``. The step, the loop and the non-finite
policy each live in their own module and take plain arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.evaluation import artifacts
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.models import backbones
from cavga_jax.models import cavga
from cavga_jax.models import layers
from cavga_jax.programs import runtime
from cavga_jax.training import cavga_step
from cavga_jax.training import detector_training
from cavga_jax.training import run_setup
from cavga_jax.training import synthesis
from cavga_jax.training import train_state
from cavga_jax.training import training_loop
from cavga_jax.training import training_pictures

Array = jax.Array


def train(config: ml_collections.ConfigDict,
          workdir: str,
          overwrite: bool = False) -> train_state.TrainState:
  """Trains CAVGA as configured, resuming from ``<workdir>/checkpoints``.

  A workdir of another run (a ``config.json`` that differs in a field of the
  model, data or objective, ``workdirs``) stops the run; ``overwrite``
  deletes its outputs and starts over. The run holds ``<workdir>/.lock``
  (``workdirs.lock``; process 0 for all processes) from before anything is
  deleted or written until it returns or fails: a second training of the
  workdir stops, naming this process.

  Logs step, losses and images/s every ``config.train.log_every`` steps and
  appends them to ``<workdir>/train_metrics.jsonl`` (on resume, lines after
  the restored step are dropped first). Non-finite losses or gradients stop
  the run with ``TrainingError``, keeping the last good checkpoint, or skip
  the update (``config.train.nonfinite``; see ``cavga_jax.nonfinite``).

  ``config.model.pretrained`` (ImageNet weights, ``pretrained``) replaces the
  initial encoder of a fresh run only: a resumed run restores everything from
  its checkpoint and does not read the file.

  Returns:
    The final train state.

  Raises:
    CavgaError: an invalid config (``config_checks.check_config``), a
      workdir of another run or in use by another process (``workdirs``), a
      bad dataset or an unusable pretrained file (``DataError``);
      ``TrainingError`` for non-finite losses.
  """
  # An invalid config stops before the lock creates the workdir.
  run = config_checks.check_config(config)
  with workdirs.lock(workdir, 'train.py'):
    mesh = runtime.prepare_run(config, workdir, overwrite)
    return _train(run, workdir, mesh)


def build_models(
    config: ml_collections.ConfigDict
) -> tuple[cavga.CAVGAGenerator, backbones.Discriminator]:
  """Generator and discriminator of a run config (``cavga_jax.build_models``).

  Reads its model and data sections into typed settings
  (``typed_config.section``) and builds ``cavga.build_models`` of them.
  """
  data_settings = typed_config.section(config, 'data')
  return cavga.build_models(
      typed_config.section(config, 'model'), data_settings.image_size,
      data_settings.channels)


def _train(run: typed_config.RunSettings, workdir: str,
           mesh: jax.sharding.Mesh) -> train_state.TrainState:
  """``train`` with the workdir locked and prepared."""
  supervision = run.model.supervision
  synthetic = run.data.synthetic
  made = run_setup.setup(run, workdir, feature_variables=False, mesh=mesh)
  train_ds, test_ds = made.train_ds, made.test_ds
  generator, init_fn = made.generator, made.init_fn
  state_sharding = made.state_sharding
  _, step_rng = train_state.run_keys(run.seed)
  loop_settings = training_loop.LoopSettings.from_settings(run.seed, run.train)
  batch_size = loop_settings.batch_size
  jitted_step = jax.jit(
      cavga_step.make_train_step(generator, made.discriminator,
                                 dict(run.loss_weights),
                                 loop_settings.nonfinite, synthetic),
      donate_argnums=0,
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      compiler_options=layers.compiler_options(generator.conv_impl))

  def train_step(state, batch, rng):
    images, labels = batch  # CAVGA_u's step ignores the labels.
    return jitted_step(state, images, rng, labels)

  host_slice = sharding.host_batch_slice(batch_size)
  images, labels = train_ds.images, train_ds.labels
  description = (f'CAVGA-{run.model.variant}_{supervision} '
                 f'({run.model.latent} latent) on {train_ds.num_examples} '
                 f'images ({int(labels.sum())} anomalous)')
  quota = run.data.weak_anomalies_per_batch
  index_fn = None
  if quota:
    # CAVGA_w: uniform batches would almost never hold one of the few
    # labelled anomalies, leaving the classifier nothing to learn from.
    index_fn = functools.partial(
        data.quota_batch_indices, labels, batch_size, quota, seed=run.seed)
    description += f', {quota} anomalous per batch'
  if synthetic is not None:
    description += (f', {synthetic.num_synthetic(batch_size)} synthetic '
                    'anomalies per batch')
    if sharding.is_primary_process():
      _write_synthetic_examples(
          os.path.join(workdir, SYNTHETIC_EXAMPLES_FILE), images, synthetic,
          jax.random.fold_in(step_rng, cavga_step.SYNTHESIS_STREAM))
  # A resumed run's checkpoint replaces the whole state in training_loop, so
  # the pretrained file is not read then.
  if checkpointing.has_checkpoint(workdir):
    state = init_fn(train_state.run_keys(run.seed)[0])
  else:
    state = made.initial_state()
    if run.model.pretrained:
      logging.info('encoder initialised from %s', run.model.pretrained)
  state = training_loop.training_loop(
      loop_settings,
      workdir,
      state,
      train_step,
      train_ds.num_examples,
      lambda idx: (sharding.shard_batch(images[idx[host_slice]], mesh),
                   sharding.shard_batch(labels[idx[host_slice]], mesh)),
      step_rng, ('g_loss', 'd_loss'),
      description,
      index_fn=index_fn,
      eval_fn=_curve_fn(run.eval, run.train.eval_every, generator, test_ds,
                        evaluator_lib.normal_training_images(train_ds), mesh))
  # The trained detector (config.detector.num_steps > 0) on the features the
  # evaluation reads: the initial encoder's with eval.feature_weights=
  # 'initial', else the trained one's.
  if run.detector.num_steps > 0:
    source = state
    if run.eval.feature_weights == 'initial':
      source = made.initial_state()
    detector_training.train(
        run,
        workdir,
        generator,
        source.generator_variables(),
        evaluator_lib.normal_training_images(train_ds),
        mesh,
    )
  return state


SYNTHETIC_EXAMPLES_FILE = 'synthetic_examples.png'


def _write_synthetic_examples(path: str,
                              images: np.ndarray,
                              synthetic: typed_config.SynthesisSettings,
                              rng: Array,
                              num: int = 8) -> None:
  """A panel of synthetic training examples: clean | synthetic | mask rows.

  Drawn from the first ``num`` training images with the run's synthesis
  settings (the same generator as the train step, another key).
  """
  clean = train_state.images_to_float(jnp.asarray(images[:num]))
  altered, masks, _ = jax.jit(
      synthesis.synthesize,
      static_argnums=2)(rng, clean,
                        dataclasses.replace(synthetic, fraction=1.0))
  training_pictures.save_synthetic_panel(
      path, np.asarray(images[:num]),
      np.asarray((altered + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8),
      np.asarray(masks) > 0)
  logging.info('wrote synthetic training examples to %s', path)


def _curve_fn(
    eval_settings: typed_config.EvalSettings, eval_every: int,
    generator: cavga.CAVGAGenerator, test_ds: data.AnomalyDataset,
    normal_images: np.ndarray,
    mesh: jax.sharding.Mesh) -> Callable[[Any, int], dict[str, Any]] | None:
  """The learning-curve evaluation of ``config.train.eval_every`` (or None)."""
  if not eval_every:
    return None
  evaluator = evaluator_lib.Evaluator(generator, test_ds, eval_settings, mesh,
                                      normal_images)

  def eval_fn(state, step):
    result, _ = evaluator(state.gen_params, state.gen_batch_stats)
    return artifacts.curve_record(step, result)

  return eval_fn
