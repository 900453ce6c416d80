"""Every anomaly map, declared once: what it is made of and how it is read.

A map is one of four kinds:

* ``batch``: a function of one forward pass (``anomaly_maps.MAPS`` and
  CAVGA_w's class maps); ``needs`` says which parts of the pass: the
  Grad-CAM attention, Liu et al.'s per-unit maps, the reconstruction
  (decoder), the classifier.
* ``fitted``: fitted on the normal training images (``fitting``): the
  ``<base>_calibrated`` z-scores of ``calibration``, ``feature_gaussian``
  (PaDiM) and ``feature_knn`` (PatchCore). Their ``parts`` are the batch map
  or the encoder features they are computed from.
* ``combined``: ``combined_maps``, standardised against the held-out normal
  images' maps of their ``parts``.
* ``prior``: the positional baselines, the same map for every test image
  (only the evaluation on a labelled test set has them).

``bounded``: the map is in [0, 1] by construction. The others are min-max
normalised over the test set before the paper's IoU at 0.5 (``scoring``);
every other metric is invariant to that. ``image_score`` is the top-1 %
mean (``anomaly_maps.image_score``) except for ``feature_knn``, whose image
score is PatchCore's maximum.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from cavga_jax import anomaly_maps
from cavga_jax import calibration
from cavga_jax import combined_maps
from cavga_jax import feature_gaussian
from cavga_jax import feature_knn

# What a batch map reads from the forward pass.
ATTENTION = 'attention'            # Grad-CAM (second-order graph, slow)
UNIT_MAPS = 'unit_maps'            # Liu et al.'s per-unit maps (with Grad-CAM)
CLASSIFIER = 'classifier'          # CAVGA_w's class maps (with Grad-CAM)
RECONSTRUCTION = 'reconstruction'  # the decoder
FEATURES = 'features'              # encoder stages for feature_gaussian
KNN_FEATURES = 'knn_features'      # encoder stages for feature_knn


@dataclasses.dataclass(frozen=True)
class MapSpec:
  """One map. ``parts``: the maps it is computed from (fitted, combined)."""
  name: str
  kind: str  # 'batch' | 'fitted' | 'combined' | 'prior'
  bounded: bool
  needs: frozenset[str] = frozenset()
  parts: tuple[str, ...] = ()
  image_score: Callable[[jax.Array], jax.Array] = anomaly_maps.image_score


def _max_score(maps: jax.Array) -> jax.Array:
  """(B, S, S) -> (B,): PatchCore's image score, the map's maximum."""
  return jnp.max(maps, axis=(1, 2))


def _registry() -> dict[str, MapSpec]:
  batch = {
      'attention': (True, {ATTENTION}),
      'attention_liu': (True, {ATTENTION, UNIT_MAPS}),
      'residual': (False, {RECONSTRUCTION}),
      'residual_ssim': (False, {RECONSTRUCTION}),
      'residual_ssim_smooth': (False, {RECONSTRUCTION}),
      'residual_x_ssim': (False, {RECONSTRUCTION}),
      'attention_x_residual': (False, {ATTENTION, RECONSTRUCTION}),
  }
  assert set(batch) == set(anomaly_maps.MAPS), 'declare every map here'
  specs = [MapSpec(name, 'batch', bounded, frozenset(needs))
           for name, (bounded, needs) in batch.items()]
  specs += [MapSpec(name, 'batch', True, frozenset({ATTENTION, CLASSIFIER}))
            for name in anomaly_maps.WEAK_MAPS]
  specs += [MapSpec(base + calibration.SUFFIX, 'fitted', False,
                    parts=(base,)) for base in calibration.BASES]
  specs.append(MapSpec(feature_gaussian.NAME, 'fitted', False,
                       frozenset({FEATURES})))
  specs.append(MapSpec(feature_knn.NAME, 'fitted', False,
                       frozenset({KNN_FEATURES}), image_score=_max_score))
  specs += [MapSpec(name, 'combined', False, parts=parts)
            for name, parts in combined_maps.COMBINATIONS.items()]
  specs += [MapSpec(name, 'prior', True) for name in anomaly_maps.PRIORS]
  return {spec.name: spec for spec in specs}


MAPS: dict[str, MapSpec] = _registry()
# The maps a headline (``config.eval.map``) may be: all but the priors.
HEADLINE_NAMES = tuple(name for name, spec in MAPS.items()
                       if spec.kind != 'prior')
FITTED_NAMES = tuple(name for name, spec in MAPS.items()
                     if spec.kind in ('fitted', 'combined'))
# config.eval.maps: an evaluation computes every map, or the headline and
# the maps it is made of (``closure``).
SCOPES = ('all', 'headline')


def spec(name: str) -> MapSpec:
  """The ``MapSpec`` of ``name``; KeyError names the known maps."""
  try:
    return MAPS[name]
  except KeyError:
    raise KeyError(f'unknown anomaly map {name!r}; known: '
                   f'{", ".join(MAPS)}') from None


def closure(names) -> tuple[str, ...]:
  """``names`` and every map they are computed from, parts first."""
  order: list[str] = []

  def visit(name):
    for part in spec(name).parts:
      visit(part)
    if name not in order:
      order.append(name)

  for name in names:
    visit(name)
  return tuple(order)


def needs(names) -> frozenset[str]:
  """What of the forward pass the maps ``names`` (and their parts) read."""
  return frozenset().union(*(spec(n).needs for n in closure(names)))


def batch_maps(names) -> tuple[str, ...]:
  """The batch maps among ``names`` and their parts."""
  return tuple(n for n in closure(names) if spec(n).kind == 'batch')


def image_scores(maps: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """name -> (B,) image score of each (B, S, S) map (``MapSpec.image_score``)."""
  return {name: spec(name).image_score(jnp.asarray(values))
          for name, values in maps.items()}
