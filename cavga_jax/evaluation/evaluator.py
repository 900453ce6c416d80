"""The evaluator of one test set: fit on normal images, predict, score.

``Evaluator.fit`` passes over the normal training images (``inference.
make_normal_step``: the calibration bases and the encoder features, no
Grad-CAM) for ``fitting.fit_statistics``, then over the held-out normal
images for the combined maps' normalisers and every map's thresholds.
``Evaluator.__call__`` runs the jitted evaluation step and the jitted
fitted maps over the test set and scores them (``scoring``); given a
``FittedMaps`` (e.g. loaded by ``store``) it does not fit. Both steps are
compiled once and reused by every call (the final evaluation and the
learning-curve points during training).

``eval.maps`` says which maps: 'all' (every map the generator supports,
every registered fitted map included, for the tables of docs/results.md),
or 'headline': ``eval.map`` and the maps it is made of
(``registry.closure``), and only what they read (``registry.needs``): e.g.
``combined_features`` fits the feature Gaussians and the kNN coreset and
runs no Grad-CAM, no SSIM and no calibration. The flat metrics, the saved
fit and ``predict.py`` need only the headline.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import numpy as np

from cavga_jax import data
from cavga_jax import typed_config
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import inference
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import scoring
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import detector
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import feature_knn
from cavga_jax.models import cavga
from cavga_jax.models import layers


def map_settings(eval_settings: typed_config.EvalSettings,
                 image_size: int) -> anomaly_maps.MapSettings:
  """``anomaly_maps.MapSettings`` from ``config.eval`` for one image size.

  ``eval.residual_sigma`` None (``configs/default.py``) is
  ``anomaly_maps.RELATIVE_SIGMA * image_size`` pixels.
  """
  sigma = eval_settings.residual_sigma
  if sigma is None:
    sigma = anomaly_maps.RELATIVE_SIGMA * image_size
  return anomaly_maps.MapSettings(
      residual_sigma=float(sigma),
      ssim_window=int(eval_settings.ssim_window),
      ssim_scale=float(eval_settings.ssim_scale))


def feature_settings(
    eval_settings: typed_config.EvalSettings
) -> feature_gaussian.FeatureSettings | None:
  """The feature map's settings, or None without ``eval.calibrate`` (the
  feature map needs the pass over the normal training images)."""
  if not eval_settings.calibrate:
    return None
  return feature_gaussian.FeatureSettings(
      stages=tuple(int(s) for s in eval_settings.feature_stages),
      dims=int(eval_settings.feature_dims),
      grid_divisor=int(eval_settings.feature_grid_divisor))


def knn_settings(
    eval_settings: typed_config.EvalSettings) -> feature_knn.KnnSettings | None:
  """The feature-kNN map's settings, or None (no ``eval.calibrate``, or
  ``eval.knn_bank_size`` 0)."""
  bank_size = int(eval_settings.knn_bank_size)
  if not eval_settings.calibrate or bank_size <= 0:
    return None
  return feature_knn.KnnSettings(
      stages=tuple(int(s) for s in eval_settings.knn_stages),
      grid_divisor=int(eval_settings.knn_grid_divisor),
      bank_size=bank_size,
      chunk=int(eval_settings.knn_chunk))


def detector_settings(
    eval_settings: typed_config.EvalSettings,
    detector_config: typed_config.DetectorSettings | None = None
) -> detector.DetectorSettings:
  """The trained detector's map settings: the features of
  ``feature_gaussian`` (``eval.feature_stages``, ``eval.feature_grid_divisor``),
  all channels, aggregated and read as ``detector_config`` (the run's
  ``config.detector``: ``aggregate``, ``hidden``; None: their defaults) says.
  The evaluation must aggregate as the training did."""
  detector_config = detector_config or typed_config.DetectorSettings()
  return detector.DetectorSettings(
      stages=tuple(int(s) for s in eval_settings.feature_stages),
      grid_divisor=int(eval_settings.feature_grid_divisor),
      aggregate=int(detector_config.aggregate),
      hidden=int(detector_config.hidden))


def fitted_settings(
    eval_settings: typed_config.EvalSettings,
    detector_config: typed_config.DetectorSettings | None = None
) -> dict[str, Any]:
  """{name: settings} of the fitted maps an evaluation fits (``fitted_map``).

  Empty without ``eval.calibrate`` (the pass over the normal training
  images); else every registered fitted map with its default settings, the
  feature maps' from ``config.eval`` (``feature_gaussian_shrunk``: the
  features of ``feature_gaussian`` and ``eval.feature_shrinkage``;
  ``feature_knn`` only with a bank).
  """
  if not eval_settings.calibrate:
    return {}
  fitted = {
      name: registry.spec(name).fitted.settings
      for name in registry.names('fitted')
  }
  fitted[feature_gaussian.NAME] = feature_settings(eval_settings)
  fitted[feature_gaussian.SHRUNK_NAME] = dataclasses.replace(
      fitted[feature_gaussian.NAME],
      shrinkage=float(eval_settings.feature_shrinkage))
  fitted[feature_knn.NAME] = knn_settings(eval_settings)
  fitted[detector.NAME] = detector_settings(eval_settings, detector_config)
  return {
      name: value
      for name, value in fitted.items()
      if name != feature_knn.NAME or value is not None
  }


def normal_training_images(train_ds: data.AnomalyDataset) -> np.ndarray:
  """The training images that are normal (CAVGA_w's anomalies left out)."""
  return train_ds.images[train_ds.labels == 0]


class Evaluator:
  """``evaluator(params, batch_stats[, fitted]) -> (metrics, predictions)``.

  Its jitted steps are attributes: ``eval_step`` and ``normal_step``
  (``inference``) and ``outputs_with_fitted_maps(outputs, fitted)``
  (``fitting``);
  ``fitted_settings`` is {name: settings} of the fitted maps it fits.

  Args:
    generator: the generator module.
    dataset: the test set.
    eval_settings: the typed ``config.eval`` (batch_size, map, maps, the
      map settings, calibrate, the feature and kNN fields, threshold_holdout,
      threshold_quantile).
    mesh: the device mesh the batches are sharded over.
    normal_images: (N, S, S, C) uint8 normal training images. A share
      ``eval.threshold_holdout`` is held out (``fitting.split_held_out``)
      for the thresholds and the combined maps; with ``eval.calibrate`` the
      others fit the calibrated and feature maps. None: no fitted maps.
    feature_variables: the generator variables ({'params', 'batch_stats'})
      the feature maps take their features from, whatever the evaluated
      parameters (``eval.feature_weights='initial'``); None = the evaluated
      ones.
    trained: {name: state} of fitted maps trained by ``train.py`` (the
      ``feature_detector`` of ``detector_training.trained_state``): the fit
      takes these states instead of fitting them.
    detector_config: the run's ``config.detector`` (its ``aggregate`` and
      ``hidden`` shape the detector's map; None: the defaults).
  """

  def __init__(self,
               generator: cavga.CAVGAGenerator,
               dataset: data.AnomalyDataset,
               eval_settings: typed_config.EvalSettings,
               mesh: jax.sharding.Mesh,
               normal_images: np.ndarray | None = None,
               feature_variables: Any = None,
               trained: dict[str, Any] | None = None,
               detector_config: typed_config.DetectorSettings | None = None):
    self.generator, self.dataset, self.mesh = generator, dataset, mesh
    self.trained = dict(trained or {})
    self.detector_config = detector_config
    self.batch_size = int(eval_settings.batch_size)
    self.headline = eval_settings.map
    self.quantile = float(eval_settings.threshold_quantile)
    self.image_size = dataset.images.shape[1]
    self.settings = map_settings(eval_settings, self.image_size)
    self.feature_variables = feature_variables
    # The maps evaluated (None: all) and what they read.
    self.names = None
    self.batch_names = tuple(
        registry.batch_functions(generator.with_classifier))
    # {name: settings} of the fitted maps (``fitted_settings``).
    fitted = fitted_settings(eval_settings, detector_config)
    attention = True
    if eval_settings.maps == 'headline':
      self.names = registry.closure([self.headline])
      self.batch_names = registry.batch_maps(self.names)
      attention = registry.ATTENTION in registry.needs(self.names)
      fitted = {
          name: value for name, value in fitted.items() if name in self.names
      }
    # An untrained map of a program (``FittedMap.trained``) is only a
    # control: scored when the headline is or contains it.
    headline_closure = registry.closure([self.headline])
    fitted = {
        name: value
        for name, value in fitted.items()
        if not registry.spec(name).fitted.trained or name in self.trained
        or name in headline_closure
    }
    self.fitted_settings = fitted
    self.outputs_with_fitted_maps = jax.jit(
        functools.partial(
            fitting.outputs_with_fitted_maps,
            settings=fitted,
            names=self.names,
            context=inference.map_context(generator, self.settings,
                                          self.image_size)))
    options = layers.compiler_options(generator.conv_impl)
    self.eval_step = jax.jit(
        inference.make_eval_step(generator, self.settings, fitted,
                                 self.batch_names, attention),
        compiler_options=options)
    self.normal_step = jax.jit(
        inference.make_normal_step(generator, self.settings, fitted),
        compiler_options=options)
    self.fit_images = self.held_out = None
    if normal_images is not None:
      self.fit_images, self.held_out = fitting.split_held_out(
          normal_images, eval_settings.threshold_holdout)
      if not fitted:
        self.fit_images = None
    # What a fit of these settings holds: the maps fitted on fit_images
    # and, with held-out images, a threshold for every map evaluated.
    self.fitted_names = () if self.fit_images is None else tuple(fitted)
    self.num_normal_images = 0 if normal_images is None else len(normal_images)

  def _predict(self, params, batch_stats, fitted, images, what):

    def step(batch):
      out = self.eval_step(params, batch_stats, batch, self.feature_variables)
      return (out if fitted is None else self.outputs_with_fitted_maps(
          out, fitted))

    return inference.predict(step, images, self.batch_size, self.mesh, what)

  def missing(self, fitted: fitting.FittedMaps) -> list[str]:
    """The maps of this evaluation that ``fitted`` (e.g. saved by an
    evaluation with other ``eval.maps``) lacks: fitted maps, or thresholds.
    """
    lacking = [n for n in self.fitted_names if n not in fitted.available()]
    if self.held_out is not None:
      lacking += [
          n for n in dict.fromkeys((self.headline, *self.batch_names,
                                    *self.fitted_names))
          if n not in fitted.thresholds
      ]
    return list(dict.fromkeys(lacking))

  def fit(self, params: Any, batch_stats: Any) -> fitting.FittedMaps:
    """The maps fitted on the normal training images (module docstring)."""
    tic = time.perf_counter()
    fitted = fitting.FittedMaps()
    if self.fit_images is not None:
      fitted = fitting.fit_statistics(
          inference.host_batches(
              lambda batch: self.normal_step(params, batch_stats, batch, self.
                                             feature_variables),
              self.fit_images, self.batch_size, self.mesh,
              'normal training images'), self.fitted_settings, self.mesh,
          self.trained)
    if self.held_out is not None:
      held_out = self._predict(params, batch_stats, fitted, self.held_out,
                               'held-out normal training images')
      fitting.fit_held_out(fitted, held_out, self.quantile, self.names)
    logging.info('fitted %d maps and %d thresholds in %.1f s',
                 len(fitted.available()), len(fitted.thresholds),
                 time.perf_counter() - tic)
    return fitted

  def predict(self, params: Any, batch_stats: Any,
              fitted: fitting.FittedMaps | None) -> dict[str, Any]:
    """``inference.make_eval_step``'s outputs on the test set, with every
    map of ``fitted`` (and their image scores) in 'maps' / 'map_scores'."""
    predictions = self._predict(params, batch_stats, fitted, self.dataset,
                                'test images')
    predictions.pop(inference.INPUTS, None)  # without fitted maps to read them
    return predictions

  def __call__(
      self,
      params: Any,
      batch_stats: Any,
      fitted: fitting.FittedMaps | None = None
  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, predictions); fits first unless ``fitted`` is given."""
    if fitted is None:
      fitted = self.fit(params, batch_stats)
    predictions = self.predict(params, batch_stats, fitted)
    tic = time.perf_counter()
    result = scoring.compute_metrics(predictions, self.dataset, self.headline,
                                     fitted.thresholds or None)
    logging.info('metrics of %d maps in %.1f s', len(result['maps']),
                 time.perf_counter() - tic)
    return result, predictions
