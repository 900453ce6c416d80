"""Maps fitted on normal images: one state, fitted once, applied to any batch.

``FittedMaps`` holds everything the maps of kind 'fitted' and 'combined'
(``registry``) and the decisions need:

* ``pixel``: per-pixel (mean, scale) of the ``calibration.BASES`` maps,
* ``feature``: (mean, precision) of ``feature_gaussian``,
* ``knn_bank``: ``feature_knn``'s coreset,
* ``normalisers``: (mean, std) of each part of the ``combined_maps`` on the
  held-out normal images,
* ``thresholds``: per map (pixel threshold, image threshold, median pixel
  value) on the held-out normal images (``scoring.held_out_thresholds``).

``fit`` streams the normal training images in batches (moments, the patch
pool of ``feature_knn``; memory is stated in those modules), then the
held-out images for the normalisers and thresholds. ``apply_fitted`` is a
pure jnp function of one batch, so the evaluation, ``predict.py`` and the
exported scorer (``cavga_jax.export``) compute the same maps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import anomaly_maps
from cavga_jax import calibration
from cavga_jax import combined_maps
from cavga_jax import feature_gaussian
from cavga_jax import feature_knn
from cavga_jax.evaluation import inference
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import scoring

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FittedMaps:
  """The fitted state of the maps fitted on normal images (module docstring).

  A pytree (its arrays and floats are the leaves), so jitted functions take
  it as an argument; ``to_tree`` gives the dict Orbax saves (``store``).
  """
  pixel: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
      default_factory=dict)
  feature: tuple[np.ndarray, np.ndarray] | None = None
  knn_bank: np.ndarray | None = None
  normalisers: dict[str, tuple[float, float]] = dataclasses.field(
      default_factory=dict)
  thresholds: dict[str, tuple[float, float, float]] = dataclasses.field(
      default_factory=dict)

  def available(self) -> tuple[str, ...]:
    """The fitted and combined maps this state can compute."""
    names = [base + calibration.SUFFIX for base in self.pixel]
    if self.feature is not None:
      names.append(feature_gaussian.NAME)
    if self.knn_bank is not None:
      names.append(feature_knn.NAME)
    names += [name for name, parts in combined_maps.COMBINATIONS.items()
              if all(p in self.normalisers for p in parts)]
    return tuple(names)

  def to_tree(self) -> dict[str, Any]:
    """A nested dict of arrays (Orbax-savable); ``from_tree`` inverts it."""
    tree: dict[str, Any] = {
        'pixel': {k: {'mean': m, 'scale': s} for k, (m, s) in
                  self.pixel.items()},
        'normalisers': {k: np.asarray(v, np.float64)
                        for k, v in self.normalisers.items()},
        'thresholds': {k: np.asarray(v, np.float64)
                       for k, v in self.thresholds.items()}}
    if self.feature is not None:
      tree['feature'] = {'mean': self.feature[0],
                         'precision': self.feature[1]}
    if self.knn_bank is not None:
      tree['knn_bank'] = self.knn_bank
    return tree

  @classmethod
  def from_tree(cls, tree: dict[str, Any]) -> FittedMaps:
    host = jax.tree.map(np.asarray, tree)
    feature = host.get('feature')
    return cls(
        pixel={k: (v['mean'], v['scale'])
               for k, v in host.get('pixel', {}).items()},
        feature=(feature['mean'], feature['precision']) if feature else None,
        knn_bank=host.get('knn_bank'),
        normalisers={k: tuple(float(x) for x in v)
                     for k, v in host.get('normalisers', {}).items()},
        thresholds={k: tuple(float(x) for x in v)
                    for k, v in host.get('thresholds', {}).items()})


def apply_fitted(fitted: FittedMaps, outputs: dict[str, Array],
                 names: Sequence[str], image_size: int,
                 settings: anomaly_maps.MapSettings,
                 knn_chunk: int = 4096) -> dict[str, Array]:
  """The fitted and combined maps ``names`` of one batch (pure jnp).

  Args:
    fitted: the fitted state.
    outputs: 'maps' {name: (B, S, S)} (the bases of the calibrated maps) and
      the 'features' / 'knn_features' of ``inference.stage_features``.
    names: the maps to compute, each in ``fitted.available()``; parts come
      first (``registry.closure``), a part not in ``outputs['maps']`` is
      computed too.
    image_size: S.
    settings: the blur of the upsampled feature maps
      (``settings.residual_sigma``, like the residual's).
    knn_chunk: ``feature_knn``'s distance chunk.

  Returns:
    name -> (B, S, S) float32 for every name of ``names`` and their parts.
  """
  maps = dict(outputs.get('maps', {}))
  for name in registry.closure(names):
    if name in maps:
      continue
    spec = registry.spec(name)
    if spec.kind == 'combined':
      maps[name] = combined_maps.combine_parts(maps, fitted.normalisers,
                                               spec.parts)
    elif name == feature_gaussian.NAME:
      distances = feature_gaussian.mahalanobis(
          outputs[registry.FEATURES], *map(jnp.asarray, fitted.feature))
      maps[name] = anomaly_maps.upsample_and_blur(distances, image_size,
                                                  settings.residual_sigma)
    elif name == feature_knn.NAME:
      distances = feature_knn.nearest_distances(
          outputs[registry.KNN_FEATURES], fitted.knn_bank, knn_chunk)
      maps[name] = anomaly_maps.upsample_and_blur(distances, image_size,
                                                  settings.residual_sigma)
    elif spec.kind == 'fitted':  # a calibrated map
      maps[name] = calibration.calibrate(maps[spec.parts[0]],
                                         *fitted.pixel[spec.parts[0]])
    else:
      raise ValueError(f'{name!r} is not a fitted map')
  return maps


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


def fit_statistics(batches, knn: feature_knn.KnnSettings | None,
                   mesh: jax.sharding.Mesh | None) -> FittedMaps:
  """The normal statistics from ``make_normal_step`` outputs, batch by batch.

  ``batches`` yields host dicts with 'maps' (the calibration bases, maybe
  none) and optionally 'features' / 'knn_features'; moments are
  accumulated as they come and ``feature_knn``'s patches pooled, then
  reduced to the coreset of ``knn`` (with a progress bar).
  """
  pixel_moments = feature_moments = pool = None
  for out in batches:
    if out['maps']:
      pixel_moments = pixel_moments or calibration.PixelMoments(
          tuple(out['maps']))
      pixel_moments.add(out['maps'])
    if registry.FEATURES in out:
      feature_moments = feature_moments or feature_gaussian.FeatureMoments()
      feature_moments.add(out[registry.FEATURES])
    if registry.KNN_FEATURES in out:
      pool = pool or feature_knn.PatchPool()
      pool.add(out[registry.KNN_FEATURES])
  fitted = FittedMaps(
      pixel=pixel_moments.statistics() if pixel_moments else {},
      feature=feature_moments.statistics() if feature_moments else None)
  if pool is not None:
    tic = time.perf_counter()
    with inference.progress(knn.bank_size, 'feature_knn coreset',
                            'patch') as bar:
      fitted.knn_bank = pool.memory_bank(knn, feature_knn.coreset_key(), mesh,
                                         bar.update)
    logging.info('feature_knn: coreset of %d patches in %.1f s',
                 len(fitted.knn_bank), time.perf_counter() - tic)
  return fitted


def fit_held_out(fitted: FittedMaps, held_out: dict[str, Any],
                 quantile: float, names: Sequence[str] | None = None) -> None:
  """Adds the normalisers and thresholds from the held-out images' maps.

  ``held_out`` has 'maps' {name: (N, S, S)} (every batch and fitted map
  evaluated) and 'map_scores'; the combined maps are added to it first, so
  they get thresholds too. ``names``: the maps evaluated
  (``eval.maps='headline'``: the headline and its parts), None = all; only
  their combinations are fitted.
  """
  combinations = {name: parts for name, parts in
                  combined_maps.COMBINATIONS.items()
                  if names is None or name in names}
  # float32-exact values, so a state restored as float32 equals the fit.
  fitted.normalisers = _float32(combined_maps.normalisers(
      {name: held_out['maps'][name] for name in
       {p for parts in combinations.values() for p in parts}
       if name in held_out['maps']}))
  combined = [name for name in fitted.available()
              if name in combinations]
  # Combined maps read only their parts (image size and blur unused).
  maps = apply_fitted(fitted, held_out, combined, 0,
                      anomaly_maps.MapSettings())
  scores = registry.image_scores({name: maps[name] for name in combined})
  for name in combined:
    held_out['maps'][name] = np.asarray(maps[name])
    held_out['map_scores'][name] = np.asarray(scores[name])
  fitted.thresholds = _float32(scoring.held_out_thresholds(held_out,
                                                            quantile))


def _float32(values: dict[str, tuple[float, ...]]
             ) -> dict[str, tuple[float, ...]]:
  return {k: tuple(float(np.float32(x)) for x in v) for k, v in values.items()}


def add_fitted_maps(out: dict[str, Any], fitted: FittedMaps, image_size: int,
                    settings: anomaly_maps.MapSettings, knn_chunk: int,
                    names: Sequence[str] | None = None) -> dict[str, Any]:
  """A step's outputs with the maps of ``fitted`` added (pure; jit it).

  ``out`` has 'maps', 'map_scores' and the features of
  ``inference.stage_features``; the features are dropped from the result
  (the maps are what is kept). ``names``: the maps wanted (those of them
  ``fitted`` can compute are added); None = every map ``fitted`` can.
  """
  names = tuple(n for n in fitted.available()
                if names is None or n in names)
  out = dict(out)
  features = {k: out.pop(k) for k in (registry.FEATURES,
                                      registry.KNN_FEATURES) if k in out}
  maps = apply_fitted(fitted, dict(features, maps=out['maps']), names,
                      image_size, settings, knn_chunk)
  out['maps'] = maps
  out['map_scores'] = dict(out['map_scores'], **registry.image_scores(
      {n: maps[n] for n in names}))
  return out
