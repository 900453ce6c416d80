"""Evaluation protocol (SPEC section 4), written once for every model.

For every test image: the reconstruction from ``mu`` (no sampling), the
attention ``A`` and every anomaly map of ``cavga_jax.anomaly_maps`` (the
paper's ``1 - A``, Liu et al.'s mean of the per-unit maps, the smoothed
residual, ``1 - SSIM``, their product, CAVGA_w's class maps) from one
forward pass in one jitted step, plus ``prior``, the test-set mean of the
headline map (the same map for every image). The image score ``s_a`` is the
mean squared reconstruction error. Metrics come from ``cavga_jax.metrics``
(model-agnostic numpy code). With ``config.eval.calibrate`` (default) the
evaluator also passes over the normal training images (reconstruction and
encoder only) and adds the ``<map>_calibrated`` z-scores of
``cavga_jax.calibration``, the ``feature_gaussian`` map (PaDiM), the
``feature_knn`` map (PatchCore) and, with held-out normal images, the
``combined_maps``. Their features come from the evaluated networks or,
with ``eval.feature_weights='initial'``, from the state the run started
from (its ImageNet encoder).

Over 400 lines: it still holds seven jobs (inference, fitting, maps added
after the pass, metrics, outputs, the evaluator and the programs' entry
points); issue 31 splits it into an evaluation package.

``metrics.json`` keeps SPEC section 4's flat keys for the headline map
``config.eval.map`` (``configs/default.py``: ``'feature_gaussian'``,
the best of our measurements; ``'attention'`` is the paper's ``M = 1 - A``) and
``s_a``, and adds ``maps.<name>.<metric>`` for every map: the pixel metrics,
and ``image_auroc`` / ``detection_accuracy`` of the map's own image score
(the mean of its top 1 % pixels, ``anomaly_maps.image_score``). Maps not
in [0, 1] by construction (``anomaly_maps.UNBOUNDED``) are min-max
normalised over the test set first, so IoU at the paper's threshold 0.5
means something for them; the other metrics do not change.

CAVGA_w (a generator with the classifier) plugs into the same protocol: its
class maps are ``weak_<name>`` (``weak_anomalous`` = ``A^ca``, the Grad-CAM
of the anomalous logit, which the paper uses to localize anomalies and which
``L_cga`` pushes towards 0 on normal images; configs/mvtec_weak.py makes it
the headline map), and the classifier's probability of 'anomalous' gives the
extra detection metrics ``image_auroc_classifier`` and
``classifier_accuracy`` (argmax of the logits), computed from ``z = mu``.
The test set is the one left after ``cavga_jax.data.weak`` moved the
labelled anomalies to training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cavga_jax import anomaly_maps
from cavga_jax import attention
from cavga_jax import calibration
from cavga_jax import checkpointing
from cavga_jax import combined_maps
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import feature_gaussian
from cavga_jax import feature_knn
from cavga_jax import layers
from cavga_jax import metrics
from cavga_jax import models
from cavga_jax import settings as config_settings
from cavga_jax import sharding
from cavga_jax import train_state
from cavga_jax import visualize
from cavga_jax import workdirs
from cavga_jax.errors import CavgaError

Array = jax.Array


def map_settings(eval_config: ml_collections.ConfigDict, image_size: int
                 ) -> anomaly_maps.MapSettings:
  """``anomaly_maps.MapSettings`` from ``config.eval`` for one image size.

  ``eval.residual_sigma`` None (``configs/default.py``) is
  ``anomaly_maps.RELATIVE_SIGMA * image_size`` pixels.
  """
  sigma = eval_config.get('residual_sigma')
  if sigma is None:
    sigma = anomaly_maps.RELATIVE_SIGMA * image_size
  return anomaly_maps.MapSettings(
      residual_sigma=float(sigma),
      ssim_window=int(eval_config.get(
          'ssim_window', anomaly_maps.MapSettings().ssim_window)))


def _eval_field(eval_config: ml_collections.ConfigDict, name: str):
  """``eval.<name>``, or the library's default (``settings``)."""
  return eval_config.get(name, config_settings.default(f'eval.{name}'))


def feature_settings(eval_config: ml_collections.ConfigDict
                     ) -> feature_gaussian.FeatureSettings | None:
  """The feature map's settings, or None without ``eval.calibrate``.

  The feature map needs the pass over the normal training images that
  ``eval.calibrate`` turns on.
  """
  if not _eval_field(eval_config, 'calibrate'):
    return None
  return feature_gaussian.FeatureSettings(
      stages=tuple(int(s) for s in _eval_field(eval_config, 'feature_stages')),
      dims=int(_eval_field(eval_config, 'feature_dims')),
      grid_divisor=int(_eval_field(eval_config, 'feature_grid_divisor')))


def knn_settings(eval_config: ml_collections.ConfigDict
                 ) -> feature_knn.KnnSettings | None:
  """The feature-kNN map's settings, or None (no ``eval.calibrate``, or
  ``eval.knn_bank_size`` 0)."""
  bank_size = int(_eval_field(eval_config, 'knn_bank_size'))
  if not _eval_field(eval_config, 'calibrate') or bank_size <= 0:
    return None
  return feature_knn.KnnSettings(
      stages=tuple(int(s) for s in _eval_field(eval_config, 'knn_stages')),
      grid_divisor=int(_eval_field(eval_config, 'knn_grid_divisor')),
      bank_size=bank_size,
      chunk=int(_eval_field(eval_config, 'knn_chunk')))


def make_eval_step(generator: models.CAVGAGenerator,
                   settings: anomaly_maps.MapSettings = anomaly_maps.MapSettings(),
                   features: feature_gaussian.FeatureSettings | None = None,
                   map_names: Sequence[str] | None = None,
                   knn: feature_knn.KnnSettings | None = None
                   ) -> Callable[..., dict[str, Any]]:
  """Returns ``eval_step(params, batch_stats, images[, feature_variables])``.

  ``map_names`` restricts the maps to those (default: every map the
  generator supports; ``('attention',)`` is the paper's evaluation, what
  benchmarks compare with the PyTorch peer).

  ``images`` is uint8 (B, S, S, C) or float in [-1, 1]. Outputs:
  'reconstruction' uint8 (B, S, S, C), 'attention' (B, h, w), 'score' (B,) (mean squared error in
  [-1, 1] units), 'maps' {name: (B, S, S) float32} for every map of
  ``anomaly_maps.map_functions`` and 'map_scores' {name: (B,)} (their image
  scores). With the CAVGA_w classifier also 'class_attention'
  (B, 2, h, w) and 'p_anomalous' (B,). With ``features`` also 'features'
  (B, g, g, dims): the encoder features of ``feature_gaussian``; with
  ``knn`` also 'knn_features' (B, g', g', D) of ``feature_knn``. Both come
  from ``feature_variables`` ({'params', 'batch_stats'}) when given (e.g.
  the ImageNet encoder a run started from, ``eval.feature_weights
  ='initial'``), else from ``params`` and ``batch_stats``.
  """
  functions = anomaly_maps.map_functions(generator.with_classifier)
  if map_names is not None:
    functions = {name: functions[name] for name in map_names}
  stage_features = _stage_features(generator, features, knn)

  def eval_step(params, batch_stats, images, feature_variables=None):
    x = train_state.images_to_float(images)
    outputs, _ = attention.forward_with_attention(
        generator, params, batch_stats, x, rng=None, train=False,
        unit_maps=not anomaly_maps.UNIT_MAPS.isdisjoint(functions))
    reconstruction = outputs['reconstruction']
    maps = anomaly_maps.compute_maps(dict(outputs, images=x), functions,
                                     settings)
    result = dict(
        reconstruction=jnp.round((reconstruction + 1.0) * 127.5).clip(
            0, 255).astype(jnp.uint8),
        attention=outputs['attention'],
        score=jnp.mean(jnp.square(x - reconstruction), axis=(1, 2, 3)),
        maps=maps,
        map_scores={name: anomaly_maps.image_score(m)
                    for name, m in maps.items()})
    if generator.with_classifier:
      result.update(
          class_attention=outputs['class_attention'],
          p_anomalous=jax.nn.softmax(outputs['logits'])[:, models.ANOMALOUS])
    if stage_features is not None:
      result.update(stage_features(
          feature_variables or {'params': params, 'batch_stats': batch_stats},
          x))
    return result

  return eval_step


def _stage_features(generator: models.CAVGAGenerator,
                    features: feature_gaussian.FeatureSettings | None,
                    knn: feature_knn.KnnSettings | None = None
                    ) -> Callable[[Any, Array], dict[str, Array]] | None:
  """``fn(variables, x) -> {'features', 'knn_features'}`` (those configured).

  One encoder pass serves both maps. None when neither is configured.
  """
  if features is None and knn is None:
    return None
  stages = sorted(set(features.stages if features else ())
                  | set(knn.stages if knn else ()))
  channels = features and feature_gaussian.select_channels(
      [generator.encoder_widths[s - 1] for s in features.stages],
      features.dims)

  def stage_features(variables, x):
    outputs = dict(zip(stages, generator.apply(
        variables, x, False, stages, method='encode_stages')))
    result = {}
    if features is not None:
      result['features'] = feature_gaussian.stack_features(
          [outputs[s] for s in features.stages], channels,
          feature_gaussian.grid_size(x.shape[1], features.grid_divisor))
    if knn is not None:
      result['knn_features'] = feature_knn.patch_features(
          [outputs[s] for s in knn.stages],
          feature_gaussian.grid_size(x.shape[1], knn.grid_divisor),
          knn.neighbourhood)
    return result

  return stage_features


def make_normal_step(generator: models.CAVGAGenerator,
                     settings: anomaly_maps.MapSettings = anomaly_maps.MapSettings(),
                     features: feature_gaussian.FeatureSettings | None = None,
                     knn: feature_knn.KnnSettings | None = None
                     ) -> Callable[..., dict[str, Any]]:
  """Returns ``normal_step(params, batch_stats, images[, feature_variables])``.

  What the statistics of the normal training images need, and no more (no
  Grad-CAM): 'maps' {name: (B, S, S)} of ``calibration.BASES`` from the
  reconstruction of ``mu`` (the one ``make_eval_step`` decodes) and, with
  ``features``, 'features' (B, g, g, dims), with ``knn`` 'knn_features', from
  ``feature_variables`` as ``make_eval_step``.
  """
  functions = {name: anomaly_maps.MAPS[name] for name in calibration.BASES}
  stage_features = _stage_features(generator, features, knn)

  def normal_step(params, batch_stats, images, feature_variables=None):
    x = train_state.images_to_float(images)
    reconstruction = generator.apply(
        {'params': params, 'batch_stats': batch_stats}, x, None,
        False)['reconstruction']
    result = dict(maps=anomaly_maps.compute_maps(
        dict(images=x, reconstruction=reconstruction), functions, settings))
    if stage_features is not None:
      result.update(stage_features(
          feature_variables or {'params': params, 'batch_stats': batch_stats},
          x))
    return result

  return normal_step


def _host_outputs(eval_step: Callable, params: Any, batch_stats: Any,
                  images: data.AnomalyDataset | np.ndarray, batch_size: int,
                  mesh: jax.sharding.Mesh, what: str,
                  feature_variables: Any = None):
  """Yields ``eval_step``'s outputs of each batch on the host, padding cut."""
  sharding.check_batch_size(batch_size, mesh, 'config.eval.batch_size')
  tic, done = time.perf_counter(), 0
  for batch, num_valid in data.eval_batches(images, batch_size):
    out = sharding.to_host(eval_step(
        params, batch_stats, sharding.shard_global_batch(batch, mesh),
        feature_variables))
    yield jax.tree.map(lambda v, n=num_valid: v[:n], out)
    done += num_valid
  elapsed = time.perf_counter() - tic
  logging.info('evaluated %d %s in %.1f s (%.1f img/s, incl. compilation)',
               done, what, elapsed, done / max(elapsed, 1e-9))


def predict(eval_step: Callable, params: Any, batch_stats: Any,
            dataset: data.AnomalyDataset | np.ndarray, batch_size: int,
            mesh: jax.sharding.Mesh, what: str = 'images',
            feature_variables: Any = None) -> dict[str, Any]:
  """Runs ``eval_step`` over a dataset (or (N, S, S, C) uint8 images).

  Returns host arrays with N rows each, in the structure of ``eval_step``'s
  outputs (nested dicts); ``what`` names the images in the log;
  ``feature_variables`` goes to ``eval_step`` (``make_eval_step``).
  """
  batches = list(_host_outputs(eval_step, params, batch_stats, dataset,
                               batch_size, mesh, what, feature_variables))
  return jax.tree.map(lambda *values: np.concatenate(values), *batches)


@dataclasses.dataclass
class NormalStatistics:
  """What the maps fitted on the normal training images need.

  Attributes:
    pixel: name -> (mean, scale), each (S, S), of the ``calibration.BASES``
      maps.
    feature: (mean (g, g, d), precision (g, g, d, d)) of
      ``feature_gaussian.FeatureMoments``, or None.
    knn_bank: (M, D) memory bank of ``feature_knn``, or None.
  """
  pixel: dict[str, tuple[np.ndarray, np.ndarray]]
  feature: tuple[np.ndarray, np.ndarray] | None = None
  knn_bank: np.ndarray | None = None


def normal_statistics(normal_step: Callable, params: Any, batch_stats: Any,
                      normal_images: np.ndarray, batch_size: int,
                      mesh: jax.sharding.Mesh,
                      knn: feature_knn.KnnSettings | None = None,
                      feature_variables: Any = None) -> NormalStatistics:
  """Statistics of the normal images for the calibrated and feature maps.

  ``normal_step`` is a jitted ``make_normal_step``; ``normal_images`` (N,
  S, S, C) uint8. Moments are accumulated batch by batch; ``feature_knn``'s
  patches are pooled (its memory is stated there) and reduced to the
  coreset of ``knn`` when the step gives 'knn_features'.
  """
  pixel_moments = calibration.PixelMoments()
  feature_moments = None
  pool = None
  for out in _host_outputs(normal_step, params, batch_stats, normal_images,
                           batch_size, mesh, 'normal training images',
                           feature_variables):
    pixel_moments.add(out['maps'])
    if 'features' in out:
      feature_moments = feature_moments or feature_gaussian.FeatureMoments()
      feature_moments.add(out['features'])
    if 'knn_features' in out:
      pool = pool or feature_knn.PatchPool()
      pool.add(out['knn_features'])
  result = NormalStatistics(
      pixel_moments.statistics(),
      feature_moments.statistics() if feature_moments else None)
  if pool is not None:
    tic = time.perf_counter()
    result.knn_bank = pool.memory_bank(knn, feature_knn.coreset_key(), mesh)
    logging.info('feature_knn: coreset of %d patches in %.1f s',
                 len(result.knn_bank), time.perf_counter() - tic)
  return result


def split_held_out(normal_images: np.ndarray, fraction: float
                   ) -> tuple[np.ndarray, np.ndarray | None]:
  """(images for the statistics, held-out images or None).

  ``ceil(fraction * N)`` images, chosen by a fixed permutation (seed 0, so
  every evaluation of a run holds out the same ones), are held out; at least
  one image stays for the statistics. None when nothing is held out.
  """
  count = min(math.ceil(fraction * len(normal_images)),
              len(normal_images) - 1)
  if count <= 0:
    return normal_images, None
  order = np.random.default_rng(0).permutation(len(normal_images))
  keep = np.sort(order[count:])
  return normal_images[keep], normal_images[np.sort(order[:count])]


def held_out_thresholds(held_out: dict[str, Any], quantile: float
                        ) -> dict[str, tuple[float, float]]:
  """Per map (pixel threshold, image threshold) from held-out normal images.

  Each is the ``quantile`` of the map's values over all pixels of the
  held-out images, and of their image scores: thresholds a user can fix
  before seeing any defect (``quantile`` 0.999 flags about 0.1 % of normal
  pixels), unlike the paper's IoU at 0.5 after min-max over the test set.
  """
  return {name: (float(np.quantile(values, quantile)),
                 float(np.quantile(held_out['map_scores'][name], quantile)))
          for name, values in held_out['maps'].items()}


def add_calibrated(predictions: dict[str, Any],
                   statistics: dict[str, tuple[np.ndarray, np.ndarray]]
                   ) -> None:
  """Adds ``<base>_calibrated`` maps and their image scores (``calibration``)."""
  for base, (mean, scale) in statistics.items():
    calibrated = calibration.calibrate(predictions['maps'][base], mean, scale)
    name = base + calibration.SUFFIX
    predictions['maps'][name] = calibrated
    predictions['map_scores'][name] = np.asarray(
        anomaly_maps.image_score(jnp.asarray(calibrated)))


def add_feature_map(predictions: dict[str, Any],
                    statistics: tuple[np.ndarray, np.ndarray],
                    settings: anomaly_maps.MapSettings) -> None:
  """Replaces ``predictions['features']`` by the ``feature_gaussian`` map.

  The per-cell Mahalanobis distances are bilinear to image size and
  smoothed with ``settings.residual_sigma``, like the residual.
  """
  features = predictions.pop('features')
  distances = feature_gaussian.mahalanobis(jnp.asarray(features),
                                           *map(jnp.asarray, statistics))
  feature_map = anomaly_maps.upsample_and_blur(
      distances, predictions['reconstruction'].shape[1],
      settings.residual_sigma)
  predictions['maps'][feature_gaussian.NAME] = np.asarray(feature_map)
  predictions['map_scores'][feature_gaussian.NAME] = np.asarray(
      anomaly_maps.image_score(feature_map))


def add_knn_map(predictions: dict[str, Any], bank: np.ndarray,
                knn: feature_knn.KnnSettings,
                settings: anomaly_maps.MapSettings,
                mesh: jax.sharding.Mesh | None = None) -> None:
  """Replaces ``predictions['knn_features']`` by the ``feature_knn`` map.

  Distances to the nearest bank entry per cell, bilinear to image size and
  smoothed like the residual; the image score is the map's maximum
  (PatchCore's).
  """
  features = predictions.pop('knn_features')
  distances = feature_knn.nearest_distances(features, bank, knn.chunk, mesh)
  knn_map = anomaly_maps.upsample_and_blur(
      jnp.asarray(distances), predictions['reconstruction'].shape[1],
      settings.residual_sigma)
  predictions['maps'][feature_knn.NAME] = np.asarray(knn_map)
  predictions['map_scores'][feature_knn.NAME] = np.asarray(
      jnp.max(knn_map, axis=(1, 2)))


def add_combined_maps(outputs: Sequence[dict[str, Any]],
                      held_out: dict[str, Any]) -> None:
  """Adds ``combined_maps`` to every prediction dict of ``outputs``.

  Each part is standardised by its values on the ``held_out`` normal
  images' predictions (one of ``outputs``).
  """
  scales = combined_maps.normalisers(held_out['maps'])
  for out in outputs:
    for name, values in combined_maps.combine(out['maps'], scales).items():
      out['maps'][name] = values
      out['map_scores'][name] = np.asarray(
          anomaly_maps.image_score(jnp.asarray(values)))


def _unbounded(name: str) -> bool:
  """Maps that ``map_metrics`` min-max normalises over the test set."""
  return (name in anomaly_maps.UNBOUNDED or name in calibration.NAMES
          or name in (feature_gaussian.NAME, feature_knn.NAME)
          or name in combined_maps.NAMES)


def add_prior(predictions: dict[str, Any], headline: str,
              labels: np.ndarray) -> None:
  """Adds the positional baselines of ``headline``: the same map for every image.

  ``prior``: the mean of ``headline`` over the whole test set. A map that
  localizes well leaks where this test set's defects lie into that mean, so
  ``prior_normal``, its mean over the normal test images only (``labels``
  0; absent without them), is the baseline that cannot know the defects.
  Their image scores are constant (image AUROC 0.5).
  """
  maps = predictions['maps'][headline]
  subsets = {anomaly_maps.PRIOR: maps,
             anomaly_maps.PRIOR_NORMAL: maps[labels == 0]}
  for name, subset in subsets.items():
    if not len(subset):
      continue
    predictions['maps'][name] = np.broadcast_to(
        subset.mean(axis=0, dtype=np.float64).astype(np.float32), maps.shape)
    predictions['map_scores'][name] = np.zeros(len(maps), np.float32)


def map_metrics(anomaly_map: np.ndarray, image_scores: np.ndarray,
                dataset: data.AnomalyDataset, unbounded: bool,
                thresholds: tuple[float, float] | None = None
                ) -> dict[str, float]:
  """Pixel metrics of one map and the detection metrics of its image score.

  ``unbounded`` maps are min-max normalised over the test set first (only
  IoU at 0.5 and the best-IoU threshold change). With ``thresholds``
  (``held_out_thresholds``: pixel, image) also 'iou_held_out' (IoU of
  ``map > pixel threshold``, the map as computed), 'detection_accuracy_held_out'
  (image score > image threshold) and both thresholds.
  """
  result = {}
  if thresholds is not None:
    pixel_threshold, image_threshold = thresholds
    result = dict(
        iou_held_out=metrics.iou_at_threshold(
            anomaly_map, dataset.masks, dataset.labels, pixel_threshold),
        detection_accuracy_held_out=metrics.accuracy_at_threshold(
            image_scores, dataset.labels, image_threshold),
        threshold_held_out=pixel_threshold,
        image_threshold_held_out=image_threshold)
  if unbounded:
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    anomaly_map = (anomaly_map - low) / max(high - low, 1e-12)
  result.update(metrics.localization_metrics(anomaly_map, dataset.masks,
                                             dataset.labels))
  result.update(metrics.detection_metrics(image_scores, dataset.labels))
  return result


def compute_metrics(predictions: dict[str, Any],
                    dataset: data.AnomalyDataset,
                    headline: str = 'attention',
                    thresholds: dict[str, tuple[float, float]] | None = None
                    ) -> dict[str, Any]:
  """The metrics dict of SPEC section 4 plus ``maps`` for one test set.

  Adds the ``prior`` map to ``predictions`` (``add_prior``) and the headline
  map as ``predictions['anomaly_map']``. The flat SPEC keys are those of the
  ``headline`` map and of ``s_a``; ``maps[name]`` has every map's metrics,
  with the held-out-threshold metrics of ``map_metrics`` for the maps in
  ``thresholds`` (not the priors, which are test-set means).
  With CAVGA_w predictions ('p_anomalous') also 'image_auroc_classifier'
  (ROC AUC of the classifier's probability of 'anomalous') and
  'classifier_accuracy' (anomalous iff that probability > 0.5).
  """
  add_prior(predictions, headline, dataset.labels)
  per_map = {
      name: map_metrics(predictions['maps'][name],
                        predictions['map_scores'][name], dataset,
                        _unbounded(name)
                        or (name in anomaly_maps.PRIORS
                            and _unbounded(headline)),
                        (thresholds or {}).get(name))
      for name in predictions['maps']}
  predictions['anomaly_map'] = predictions['maps'][headline]
  result = dict(
      num_test_images=dataset.num_examples,
      num_anomalous_images=int(dataset.labels.sum()),
      map=headline)
  result.update({k: v for k, v in per_map[headline].items()
                 if k not in ('image_auroc', 'detection_accuracy',
                              'detection_accuracy_held_out',
                              'image_threshold_held_out')})
  result.update(metrics.detection_metrics(predictions['score'],
                                          dataset.labels))
  # The decision a user gets: the headline map's own image score (the flat
  # image_auroc above is SPEC's s_a, the reconstruction error, which the
  # feature and combined maps beat on every category we measured).
  result['headline_detection'] = {
      k: per_map[headline][k] for k in (
          'image_auroc', 'detection_accuracy', 'detection_accuracy_held_out',
          'image_threshold_held_out') if k in per_map[headline]}
  result['maps'] = per_map
  if 'p_anomalous' in predictions:
    # CAVGA_w: detection by the classifier instead of the reconstruction.
    p_anomalous = predictions['p_anomalous']
    result['image_auroc_classifier'] = metrics.detection_metrics(
        p_anomalous, dataset.labels)['image_auroc']
    result['classifier_accuracy'] = float(np.mean(
        (p_anomalous > 0.5) == (dataset.labels == 1)))
  return result


def panel_indices(num_examples: int, num_panels: int) -> np.ndarray:
  """Evenly spaced test indices, so panels show normal and every defect type."""
  num_panels = min(num_panels, num_examples)
  return np.unique(np.linspace(0, num_examples - 1, num_panels).round()
                   .astype(int)) if num_panels else np.zeros(0, int)


def display_maps(predictions: dict[str, Any]) -> dict[str, np.ndarray]:
  """The maps to draw, each in [0, 1].

  Unbounded maps are scaled from their test-set minimum to their 99.9th
  percentile (clipped above), so a few extreme pixels do not darken every
  panel. VAE predictions without 'maps' show their 'anomaly_map' alone.
  """
  if 'maps' not in predictions:
    return {'anomaly_map': predictions['anomaly_map']}
  shown = {}
  for name, values in predictions['maps'].items():
    if _unbounded(name):
      low, high = float(values.min()), float(np.percentile(values, 99.9))
      values = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    shown[name] = values
  return shown


def write_outputs(out_dir: str, result: dict[str, Any],
                  predictions: dict[str, Any],
                  dataset: data.AnomalyDataset, num_panels: int) -> None:
  """metrics.json, per-image scores.csv and the PNG panels under ``out_dir``.

  scores.csv has ``s_a`` ('score'), each map's image score
  ('score_<map>') and, for CAVGA_w, 'p_anomalous'; a panel row shows the
  image, the reconstruction, every map over the image and the mask. Only
  process 0 writes (every process holds the same gathered predictions).
  """
  if not sharding.is_primary_process():
    return
  panel_dir = os.path.join(out_dir, 'panels')
  os.makedirs(panel_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  columns = {'score': predictions['score']}
  columns.update({f'score_{name}': values for name, values in
                  predictions.get('map_scores', {}).items()})
  if 'p_anomalous' in predictions:
    columns['p_anomalous'] = predictions['p_anomalous']
  with open(os.path.join(out_dir, 'scores.csv'), 'w') as f:
    f.write(','.join(['path', 'label', 'defect_type', *columns]) + '\n')
    for i, (path, label, defect) in enumerate(zip(
        dataset.paths, dataset.labels, dataset.defect_types)):
      values = ','.join(f'{v[i]:.6g}' for v in columns.values())
      f.write(f'{path},{label},{defect},{values}\n')
  shown = display_maps(predictions)
  for i in panel_indices(dataset.num_examples, num_panels):
    stem = os.path.splitext(os.path.basename(dataset.paths[i]))[0]
    visualize.save_panel(
        os.path.join(panel_dir, f'{i:04d}_{dataset.defect_types[i]}_{stem}.png'),
        dataset.images[i], predictions['reconstruction'][i],
        {name: values[i] for name, values in shown.items()},
        dataset.masks[i])


def make_evaluator(generator: models.CAVGAGenerator,
                   dataset: data.AnomalyDataset,
                   eval_config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh,
                   normal_images: np.ndarray | None = None,
                   feature_variables: Any = None
                   ) -> Callable[[Any, Any], tuple[dict[str, Any],
                                                   dict[str, Any]]]:
  """``evaluator(params, batch_stats) -> (metrics, predictions)`` on ``dataset``.

  One jitted step (compiled once, reused by every call: the final
  evaluation and the learning-curve points during training).

  Args:
    generator: the generator module.
    dataset: the test set.
    eval_config: ``config.eval`` (batch_size, map, residual_sigma (None:
      relative to the test images' size, ``map_settings``),
      ssim_window, calibrate, feature_stages, feature_dims).
    mesh: the device mesh the batches are sharded over.
    normal_images: (N, S, S, C) uint8 normal training images. A share
      ``eval_config.threshold_holdout`` (default 0.1) is held out
      (``split_held_out``) to set each map's thresholds
      (``held_out_thresholds``, quantile ``eval_config.threshold_quantile``,
      default 0.999); with ``eval_config.calibrate`` (default True) each
      call also measures the ``calibration.BASES`` maps and the encoder
      features on the others and adds the calibrated maps,
      ``feature_gaussian`` and ``feature_knn`` (``knn_settings``), and with
      held-out images the ``combined_maps``.
    feature_variables: the generator variables ({'params', 'batch_stats'})
      the feature maps take their features from, whatever the evaluated
      parameters (``eval.feature_weights='initial'``: the encoder a run
      started from); None = the evaluated ones.
  """
  settings = map_settings(eval_config, dataset.images.shape[1])
  features = feature_settings(eval_config)
  knn = knn_settings(eval_config)
  options = layers.compiler_options(generator.conv_impl)
  eval_step = jax.jit(make_eval_step(generator, settings, features, knn=knn),
                      compiler_options=options)
  normal_step = jax.jit(make_normal_step(generator, settings, features, knn),
                        compiler_options=options)
  headline = eval_config.get('map', config_settings.default('eval.map'))
  fit_images = held_out = None
  if normal_images is not None:
    fit_images, held_out = split_held_out(
        normal_images, eval_config.get(
            'threshold_holdout',
            config_settings.default('eval.threshold_holdout')))
  if not eval_config.get('calibrate',
                         config_settings.default('eval.calibrate')):
    fit_images = None
  quantile = eval_config.get(
      'threshold_quantile', config_settings.default('eval.threshold_quantile'))

  def evaluator(params, batch_stats):
    predictions = predict(eval_step, params, batch_stats, dataset,
                          eval_config.batch_size, mesh,
                          feature_variables=feature_variables)
    outputs = [predictions]
    if held_out is not None:
      outputs.append(predict(eval_step, params, batch_stats, held_out,
                             eval_config.batch_size, mesh,
                             'held-out normal training images',
                             feature_variables))
    if fit_images is not None:
      statistics = normal_statistics(
          normal_step, params, batch_stats, fit_images,
          eval_config.batch_size, mesh, knn, feature_variables)
      tic = time.perf_counter()
      for out in outputs:
        add_calibrated(out, statistics.pixel)
        if statistics.feature is not None:
          add_feature_map(out, statistics.feature, settings)
        if statistics.knn_bank is not None:
          add_knn_map(out, statistics.knn_bank, knn, settings, mesh)
      if held_out is not None:
        add_combined_maps(outputs, outputs[1])
      logging.info('calibrated, feature and combined maps in %.1f s',
                   time.perf_counter() - tic)
    thresholds = (held_out_thresholds(outputs[1], quantile)
                  if held_out is not None else None)
    tic = time.perf_counter()
    result = compute_metrics(predictions, dataset, headline, thresholds)
    logging.info('metrics of %d maps in %.1f s', len(result['maps']),
                 time.perf_counter() - tic)
    return result, predictions

  return evaluator


def curve_record(step: int, result: dict[str, Any]) -> dict[str, Any]:
  """One line of ``eval_curve.jsonl``: the step and every map's metrics."""
  return dict(step=step, image_auroc_mse=result['image_auroc'],
              maps=result['maps'])


CURVE_FILE = 'eval_curve.jsonl'


def _evaluation_setup(config: ml_collections.ConfigDict, workdir: str,
                      untrained: bool = False):
  """(test set, evaluator, initial state fn, mesh) of a run's config.

  The initial state fn gives ``train_state.initial_state``, the state the
  run started from; with ``eval.feature_weights='initial'`` the evaluator
  takes the feature maps' features from it.

  Raises:
    CavgaError: an invalid config or, unless ``untrained``, one that differs
      from the workdir's ``config.json`` in a field of the model, data or
      objective (``workdirs.check_rerun``).

  """
  config_checks.check_config(config)
  if not untrained:
    workdirs.check_rerun(config, workdir, 'evaluate.py')
  mesh = sharding.make_mesh()
  train_ds, test_ds = data.get_datasets(config, workdir)
  generator, _, init_fn, state_sharding = train_state.setup(config, mesh)
  initial = lambda: train_state.initial_state(config, init_fn, state_sharding)
  feature_variables = None
  if _eval_field(config.eval, 'feature_weights') == 'initial':
    state = initial()
    feature_variables = {'params': state.gen_params,
                         'batch_stats': state.gen_batch_stats}
  return (test_ds, make_evaluator(generator, test_ds, config.eval, mesh,
                                  normal_training_images(train_ds),
                                  feature_variables),
          init_fn, initial, mesh)


def normal_training_images(train_ds: data.AnomalyDataset) -> np.ndarray:
  """The training images that are normal (CAVGA_w's anomalies left out)."""
  return train_ds.images[train_ds.labels == 0]


def append_curve_point(path: str, record: dict[str, Any]) -> None:
  """Appends a ``curve_record`` to ``path`` and replots ``<path stem>.png``."""
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')
  with open(path) as f:
    records = [json.loads(line) for line in f]
  visualize.plot_curves(os.path.splitext(path)[0] + '.png', records)
  summary = ', '.join(f'{name} {values["pixel_auroc"]:.3f}/{values["aupro"]:.3f}'
                      for name, values in record['maps'].items())
  logging.info('eval at step %d (pixel AUROC / AU-PRO): %s', record['step'],
               summary)


def evaluate_checkpoints(config: ml_collections.ConfigDict, workdir: str
                         ) -> list[dict[str, Any]]:
  """The learning curve after the fact: every retained checkpoint, all maps.

  For runs trained without ``config.train.eval_every`` (keep checkpoints
  with ``config.train.keep_checkpoints``). Replaces
  ``<workdir>/eval_curve.jsonl`` and ``eval_curve.png``.

  Returns:
    The curve records, in step order.
  """
  test_ds, evaluator, init_fn, _, mesh = _evaluation_setup(config, workdir)
  target = train_state.abstract_state(init_fn, mesh)
  manager = checkpointing.make_manager(workdir)
  steps = sorted(manager.all_steps())
  if not steps:
    raise CavgaError(f'{checkpointing.checkpoint_dir(workdir)}: no checkpoint '
                     'found; run train.py with this --workdir first')
  path = os.path.join(workdir, CURVE_FILE)
  if os.path.exists(path):
    os.remove(path)
  records = []
  for step in steps:
    state = checkpointing.restore(manager, step, target)
    result, _ = evaluator(state.gen_params, state.gen_batch_stats)
    records.append(curve_record(step, result))
    append_curve_point(path, records[-1])
  return records


UNTRAINED_DIR = 'eval_untrained'


def evaluated_state(workdir: str, init_fn: Callable,
                    initial: Callable[[], Any], mesh: jax.sharding.Mesh,
                    untrained: bool = False) -> tuple[Any, int]:
  """(train state, step): the newest checkpoint of ``workdir``, or with
  ``untrained`` the state training starts from (``initial()``: the run's
  initialisation key and ``model.pretrained``; step 0).
  """
  if untrained:
    return initial(), 0
  return checkpointing.restore_for_eval(
      workdir, train_state.abstract_state(init_fn, mesh))


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             untrained: bool = False) -> dict[str, Any]:
  """Restores the latest checkpoint of ``workdir`` and evaluates it.

  Writes ``<workdir>/eval/metrics.json``, ``scores.csv`` and ``panels/``
  (process 0 only; every process computes).
  Always the final checkpoint: the learning curve of ``config.train.eval_every``
  never selects one.

  Args:
    config: the run's configuration.
    workdir: the training workdir.
    untrained: evaluate the freshly initialised networks of ``config.seed``
      instead (no checkpoint needed; written to ``<workdir>/eval_untrained``,
      ``checkpoint_step`` 0): the control that says what training added to
      each map.

  Returns:
    The metrics dict (also logged).
  """
  test_ds, evaluator, init_fn, initial, mesh = _evaluation_setup(
      config, workdir, untrained)
  state, step = evaluated_state(workdir, init_fn, initial, mesh, untrained)
  if untrained:
    logging.info('evaluating the untrained networks (seed %d) on %d test '
                 'images', config.seed, test_ds.num_examples)
  else:
    logging.info('evaluating checkpoint %d on %d test images', step,
                 test_ds.num_examples)
  result, predictions = evaluator(state.gen_params, state.gen_batch_stats)
  result['checkpoint_step'] = step
  write_outputs(os.path.join(workdir, UNTRAINED_DIR if untrained else 'eval'),
                result, predictions, test_ds, config.eval.num_panels)
  logging.info('metrics: %s', json.dumps(result, sort_keys=True))
  return result
