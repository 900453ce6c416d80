"""Trains the ``feature_detector`` map (``detector``): ``train.py``'s second part.

``train(run, workdir, generator, variables, mesh)`` runs after CAVGA's
training when ``config.detector.num_steps > 0``:

1. the frozen features of every normal training image are computed once
   (the map's own ``inputs``, through ``inference.make_normal_step``, from
   the encoder the evaluation reads: the initial ImageNet one with
   ``eval.feature_weights='initial'``) and kept as one host array of cells;
2. the images the evaluation holds out for its thresholds
   (``fitting.split_held_out``, ``eval.threshold_holdout``) are not trained
   on: with a synthetic anomaly pasted on each (``synthesis.synthesize``,
   fixed key) they are the validation set, scored every
   ``detector.validate_every`` steps (pixel AUROC, AU-PRO on the synthetic
   masks, image AUROC against the clean held-out images) into
   ``<workdir>/detector/eval_curve.jsonl``: model selection without test
   data;
3. ``training_loop.training_loop`` runs the jitted step (``detector.
   make_train_step``; the cells of each step are a pure function of
   ``(seed, step)``, sharded over the mesh's 'data' axis, the state
   replicated) with Orbax checkpoints in ``<workdir>/detector/checkpoints``
   and exact resume.

``trained_state(workdir)`` gives ``evaluate.py`` the map state of
the kept checkpoint with the best synthetic-validation pixel AUROC
(``selected_step``; test data never selects), which replaces the untrained
detector of the fit. ``settings_from_run`` turns the run's typed settings
into the detector's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import checkpointing
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.evaluation import artifacts
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.maps import detector
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.training import synthesis
from cavga_jax.training import train_state
from cavga_jax.training import training_loop

DETECTOR_DIR = 'detector'
# The validation's synthetic anomalies: one per held-out image, drawn with
# this key, of the library's default kinds and sizes.
VALIDATION_SEED = 1234
# The validation record's name and the metric that selects the checkpoint
# evaluate.py uses (``selected_step``).
VALIDATION = 'synthetic_validation'
SELECTION_METRIC = 'pixel_auroc'
# The detector's noise keys: this stream of the run's step key.
_STEP_STREAM = 0xDE7


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the detector's training reads from the config."""
  map: detector.DetectorSettings
  train: detector.TrainSettings
  seed: int
  eval_batch_size: int
  threshold_holdout: float


def settings_from_run(run: typed_config.RunSettings) -> Settings:
  """``Settings`` from the run's typed ``detector`` and ``eval`` sections."""
  fields = {f.name for f in dataclasses.fields(detector.TrainSettings)}
  train = detector.TrainSettings(
      **{name: getattr(run.detector, name) for name in fields})
  return Settings(
      map=evaluator_lib.detector_settings(run.eval, run.detector),
      train=train,
      seed=int(run.seed),
      eval_batch_size=int(run.eval.batch_size),
      threshold_holdout=float(run.eval.threshold_holdout))


def detector_dir(workdir: str) -> str:
  return os.path.join(workdir, DETECTOR_DIR)


def compute_features(generator, variables: dict[str, Any], images: np.ndarray,
                     settings: detector.DetectorSettings, map_settings_: Any,
                     batch_size: int, mesh, what: str) -> np.ndarray:
  """(N, g, g, D) float32 features of uint8 or [-1, 1] images (the map's
  ``inputs``), in sharded batches."""
  step = jax.jit(
      inference.make_normal_step(generator, map_settings_,
                                 {detector.NAME: settings}))
  out = inference.predict(
      lambda batch: step(variables['params'], variables['batch_stats'], batch),
      images, batch_size, mesh, what)
  return out[detector.NAME]


def synthetic_validation_images(
    images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images with one synthetic anomaly each, (N, S, S) masks)."""
  x = train_state.images_to_float(jnp.asarray(images))
  altered, masks, _ = jax.jit(
      synthesis.synthesize,
      static_argnums=2)(jax.random.key(VALIDATION_SEED), x,
                        typed_config.SynthesisSettings(fraction=1.0))
  altered = np.asarray(inference.to_uint8(altered))
  return altered, np.asarray(masks) > 0


def validation_fn(clean: np.ndarray, synthetic: np.ndarray, masks: np.ndarray,
                  context):
  """``(state) -> {'pixel_auroc', 'aupro', 'image_auroc'}`` of the detector
  map on the synthetic validation images (clean ones as the normals)."""
  apply = jax.jit(lambda state, f: detector.MAP.apply(context, None, state, f))

  def fn(state: detector.DetectorState) -> dict[str, float]:
    map_state = state.map_state()
    clean_maps = np.asarray(apply(map_state, clean))
    maps = np.asarray(apply(map_state, synthetic))
    score = detector.MAP.image_score
    scores = np.concatenate(
        [np.asarray(score(clean_maps)),
         np.asarray(score(maps))])
    labels = np.r_[np.zeros(len(clean)), np.ones(len(synthetic))]
    return dict(
        pixel_auroc=pixel_metrics.pixel_auroc(maps, masks),
        aupro=pixel_metrics.aupro(maps, masks),
        image_auroc=image_metrics.image_auroc(scores, labels))

  return fn


def train(run: typed_config.RunSettings, workdir: str, generator,
          variables: dict[str, Any], normal_images: np.ndarray,
          mesh: jax.sharding.Mesh) -> detector.DetectorState | None:
  """Trains the detector on ``normal_images`` (module docstring).

  ``variables``: the generator's {'params', 'batch_stats'} the features
  are read from. Returns the final state, or None when
  ``config.detector.num_steps`` is 0.
  """
  settings = settings_from_run(run)
  if settings.train.num_steps <= 0:
    return None
  image_size = normal_images.shape[1]
  maps = evaluator_lib.map_settings(run.eval, image_size)
  fit_images, held_out = fitting.split_held_out(normal_images,
                                                settings.threshold_holdout)
  features = compute_features(generator, variables, fit_images, settings.map,
                              maps, settings.eval_batch_size, mesh,
                              'detector training images')
  dims = features.shape[-1]
  cells = features.reshape(-1, dims)
  moments = detector.ChannelMoments()
  moments.add(cells)
  mean, std = moments.statistics()
  del features
  logging.info('detector: %d training cells of %d channels (%.0f MB)',
               len(cells), dims, cells.nbytes / 2**20)

  eval_fn = None
  if held_out is not None:
    synthetic, masks = synthetic_validation_images(held_out)
    clean_f = compute_features(generator, variables, held_out, settings.map,
                               maps, settings.eval_batch_size, mesh,
                               'held-out images')
    synthetic_f = compute_features(generator, variables, synthetic,
                                   settings.map, maps, settings.eval_batch_size,
                                   mesh, 'synthetic validation images')
    validate = validation_fn(clean_f, synthetic_f, masks,
                             inference.map_context(generator, maps, image_size))

    def eval_fn(state, step):
      return dict(step=step, maps={VALIDATION: validate(state)})

  return train_on_cells(settings, workdir, cells, mean, std, mesh, eval_fn,
                        f'on {len(fit_images)} images')


def train_on_cells(settings: Settings,
                   workdir: str,
                   cells: np.ndarray,
                   mean: np.ndarray,
                   std: np.ndarray,
                   mesh: jax.sharding.Mesh,
                   eval_fn=None,
                   what: str = '') -> detector.DetectorState:
  """The training loop on (M, D) feature cells (``train``'s step 3).

  Each step's ``detector.batch_size`` cells are drawn with replacement as a
  pure function of ``(seed, step)``, so a resumed run equals an
  uninterrupted one; checkpoints in ``<workdir>/detector/checkpoints``.
  """
  train_settings = settings.train
  sharding.check_batch_size(train_settings.batch_size, mesh,
                            'config.detector.batch_size')
  replicated = sharding.replicated(mesh)
  state = jax.device_put(
      detector.create_state(settings.map, train_settings, mean, std),
      replicated)
  jitted = jax.jit(
      detector.make_train_step(train_settings),
      donate_argnums=0,
      out_shardings=(replicated, replicated))
  loop = training_loop.LoopSettings(
      num_steps=train_settings.num_steps,
      batch_size=train_settings.batch_size,
      seed=settings.seed,
      log_every=train_settings.log_every,
      checkpoint_every=train_settings.checkpoint_every,
      eval_every=train_settings.validate_every or train_settings.num_steps)
  host_slice = sharding.host_batch_slice(train_settings.batch_size)

  def index_fn(step: int) -> np.ndarray:
    rng = np.random.default_rng([settings.seed, step])
    return rng.integers(0, len(cells), train_settings.batch_size)

  step_rng = jax.random.fold_in(
      train_state.run_keys(settings.seed)[1], _STEP_STREAM)
  return training_loop.training_loop(
      loop,
      detector_dir(workdir),
      state,
      lambda s, batch, rng: jitted(s, batch, rng),
      len(cells),
      lambda idx: sharding.shard_batch(cells[idx[host_slice]], mesh),
      step_rng, ('loss',), f'the detector ({cells.shape[-1]} channels, hidden '
      f'{settings.map.hidden}, noise {train_settings.noise_std}) {what}',
      index_fn=index_fn,
      eval_fn=eval_fn)


def trained_state(workdir: str,
                  step: int | None = None) -> tuple[dict[str, Any], int] | None:
  """(a detector checkpoint's map state, its step), or None when the run
  trained no detector. ``step`` None: ``selected_step``'s. The checkpoint
  holds everything the map needs."""
  directory = detector_dir(workdir)
  if not checkpointing.has_checkpoint(directory):
    return None
  step = selected_step(workdir) if step is None else step
  manager = checkpointing.make_manager(directory)
  try:
    restored = manager.restore(step)
  finally:
    manager.close()
  tree = restored if isinstance(restored, dict) else restored.__dict__
  state = {
      k: jax.tree.map(np.asarray, tree[k])
      for k in ('params', 'batch_stats', 'mean', 'std')
  }
  return state, int(step)


def trained_maps(workdir: str) -> dict[str, dict[str, Any]]:
  """{``feature_detector``: the selected checkpoint's map state}, or {}
  when the run trained no detector: what the evaluation's fit and the
  scorer's fit key take as trained maps."""
  trained = trained_state(workdir)
  return {} if trained is None else {detector.NAME: trained[0]}


def validation_scores(workdir: str) -> dict[int, dict[str, float]]:
  """step -> the synthetic validation logged at it (``train``)."""
  path = os.path.join(detector_dir(workdir), artifacts.CURVE_FILE)
  scores = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        scores[int(record['step'])] = record['maps'][VALIDATION]
  return scores


def selected_step(workdir: str) -> int:
  """The kept checkpoint with the best synthetic-validation pixel AUROC
  (``SELECTION_METRIC``; the later one on a tie), the newest when none was
  validated: model selection without test data."""
  steps = checkpoint_steps(workdir)
  scores = validation_scores(workdir)
  scored = [s for s in steps if s in scores]
  if not scored:
    return steps[-1]
  return max(scored, key=lambda s: (scores[s][SELECTION_METRIC], s))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the detector checkpoints kept in ``workdir``."""
  manager = checkpointing.make_manager(detector_dir(workdir))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()
