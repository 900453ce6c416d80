"""Every anomaly map, declared once: what it is made of and how it is read.

A map is one of four kinds:

* ``batch``: a function of one forward pass (the functions of
  ``anomaly_maps``, CAVGA_w's class maps included); its entry carries the
  function, and ``needs`` says which parts of the pass it reads: the
  Grad-CAM attention, Liu et al.'s per-unit maps, the reconstruction
  (decoder), the classifier.
* ``fitted``: fitted on the normal training images, each a
  ``fitted_map.FittedMap`` (``fitted``): the ``<base>_calibrated``
  z-scores of ``calibration``, ``feature_gaussian`` (PaDiM) and
  ``feature_knn`` (PatchCore). Their ``parts`` are the batch maps they
  read; those reading encoder stages need ``ENCODER``.
* ``combined``: ``combined_maps``, their ``parts`` normalised against the
  held-out normal images' maps by their ``rule`` (``combined_maps.RULES``).
* ``prior``: the positional baselines, the same map for every test image
  (only the evaluation on a labelled test set has them).

``bounded``: the map is in [0, 1] by construction. The others are min-max
normalised over the test set before the paper's IoU at 0.5 (``scoring``);
every other metric is invariant to that. ``image_score`` is the top-1 %
mean (``anomaly_maps.image_score``) except for ``feature_knn``, whose image
score is PatchCore's maximum.

``register`` adds a map (a user's ``FittedMap`` needs nothing else; an
evaluation of every map fits and scores it), ``unregister`` removes it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import calibration
from cavga_jax.maps import combined_maps
from cavga_jax.maps import detector
from cavga_jax.maps import feature_gaussian
from cavga_jax.maps import feature_knn
from cavga_jax.maps import fitted_map
from cavga_jax.models import attention as attention_lib

# What a map reads from the forward pass.
ATTENTION = 'attention'  # Grad-CAM (second-order graph, slow)
UNIT_MAPS = 'unit_maps'  # Liu et al.'s per-unit maps (with Grad-CAM)
CLASSIFIER = 'classifier'  # CAVGA_w's class maps (with Grad-CAM)
RECONSTRUCTION = 'reconstruction'  # the decoder
ENCODER = 'encoder'  # encoder stages (the feature maps)


@dataclasses.dataclass(frozen=True)
class MapSpec:
  """One map (module docstring).

  ``function``: a batch map's ``anomaly_maps.MapFn``; ``fitted``: a fitted
  map's unit; ``parts``: the maps it is computed from (fitted, combined);
  ``rule``: how a combined map normalises its parts
  (``combined_maps.RULE_NAMES``).
  """
  name: str
  kind: str  # 'batch' | 'fitted' | 'combined' | 'prior'
  bounded: bool
  needs: frozenset[str] = frozenset()
  parts: tuple[str, ...] = ()
  image_score: Callable[[jax.Array], jax.Array] = anomaly_maps.image_score
  function: anomaly_maps.MapFn | None = None
  fitted: fitted_map.FittedMap | None = None
  rule: str = combined_maps.MEAN_Z


def fitted_spec(unit: fitted_map.FittedMap) -> MapSpec:
  """The ``MapSpec`` of a fitted map."""
  return MapSpec(
      unit.name,
      'fitted',
      unit.bounded,
      frozenset({ENCODER}) if unit.stages else frozenset(),
      unit.parts,
      unit.image_score,
      fitted=unit)


def _builtin() -> list[MapSpec]:
  batch = [
      ('attention', anomaly_maps.attention_map, True, {ATTENTION}),
      ('attention_liu', anomaly_maps.attention_liu_map, True,
       {ATTENTION, UNIT_MAPS}),
      ('residual', anomaly_maps.residual_map, False, {RECONSTRUCTION}),
      ('residual_ssim', anomaly_maps.residual_ssim_map, False, {RECONSTRUCTION
                                                               }),
      ('residual_ssim_smooth', anomaly_maps.residual_ssim_smooth_map, False,
       {RECONSTRUCTION}),
      ('residual_x_ssim', anomaly_maps.residual_x_ssim_map, False,
       {RECONSTRUCTION}),
      ('attention_x_residual', anomaly_maps.attention_x_residual_map, False,
       {ATTENTION, RECONSTRUCTION}),
  ]
  specs = [
      MapSpec(name, 'batch', bounded, frozenset(needs), function=fn)
      for name, fn, bounded, needs in batch
  ]
  # CAVGA_w's class maps, ``weak_<name>``; its 'latent' map is ``attention``.
  specs += [
      MapSpec(
          f'weak_{name}',
          'batch',
          True,
          frozenset({ATTENTION, CLASSIFIER}),
          function=anomaly_maps.weak_map(name))
      for name in attention_lib.WEAK_MAPS
      if name != 'latent'
  ]
  specs += [
      fitted_spec(unit)
      for unit in (*calibration.MAPS, feature_gaussian.MAP,
                   feature_gaussian.SHRUNK_MAP, feature_knn.MAP, detector.MAP)
  ]
  specs += [
      MapSpec(
          name, 'combined', False, parts=parts, rule=combined_maps.RULES[name])
      for name, parts in combined_maps.COMBINATIONS.items()
  ]
  specs += [MapSpec(name, 'prior', True) for name in anomaly_maps.PRIORS]
  return specs


_MAPS: dict[str, MapSpec] = {spec.name: spec for spec in _builtin()}
# config.eval.maps: an evaluation computes every map, or the headline and
# the maps it is made of (``closure``).
SCOPES = ('all', 'headline')


def register(map_spec: MapSpec | fitted_map.FittedMap) -> MapSpec:
  """Adds a map: a ``MapSpec``, or a ``FittedMap`` (``fitted_spec``).

  Its parts must be registered first. Returns its ``MapSpec``.

  Raises:
    ValueError: the name is taken, a part is unknown, or a combined map's
      rule is.
  """
  if isinstance(map_spec, fitted_map.FittedMap):
    map_spec = fitted_spec(map_spec)
  if map_spec.name in _MAPS:
    raise ValueError(f'anomaly map {map_spec.name!r} is registered already')
  unknown = [p for p in map_spec.parts if p not in _MAPS]
  if unknown:
    raise ValueError(f'{map_spec.name!r}: unknown parts {unknown}')
  if map_spec.rule not in combined_maps.RULE_NAMES:
    raise ValueError(f'{map_spec.name!r}: unknown combination rule '
                     f'{map_spec.rule!r}; known: '
                     f'{", ".join(combined_maps.RULE_NAMES)}')
  _MAPS[map_spec.name] = map_spec
  return map_spec


def unregister(name: str) -> None:
  """Removes the map ``name`` (``register``'s inverse)."""
  del _MAPS[spec(name).name]


def names(*kinds: str) -> tuple[str, ...]:
  """The registered maps of ``kinds`` (all kinds when none), in order."""
  return tuple(
      name for name, s in _MAPS.items() if not kinds or s.kind in kinds)


def headline_names() -> tuple[str, ...]:
  """The maps a headline (``config.eval.map``) may be: all but the priors."""
  return names('batch', 'fitted', 'combined')


def spec(name: str) -> MapSpec:
  """The ``MapSpec`` of ``name``; KeyError names the known maps."""
  try:
    return _MAPS[name]
  except KeyError:
    raise KeyError(f'unknown anomaly map {name!r}; known: '
                   f'{", ".join(_MAPS)}') from None


def closure(map_names) -> tuple[str, ...]:
  """``map_names`` and every map they are computed from, parts first."""
  order: list[str] = []

  def visit(name):
    for part in spec(name).parts:
      visit(part)
    if name not in order:
      order.append(name)

  for name in map_names:
    visit(name)
  return tuple(order)


def needs(map_names) -> frozenset[str]:
  """What of the forward pass the maps ``map_names`` (and their parts) read."""
  return frozenset().union(*(spec(n).needs for n in closure(map_names)))


def batch_maps(map_names) -> tuple[str, ...]:
  """The batch maps among ``map_names`` and their parts."""
  return tuple(n for n in closure(map_names) if spec(n).kind == 'batch')


def batch_functions(with_classifier: bool) -> dict[str, anomaly_maps.MapFn]:
  """Every batch map a generator supports: name -> function (CAVGA_w's
  class maps only ``with_classifier``)."""
  return {
      name: s.function
      for name, s in _MAPS.items()
      if s.kind == 'batch' and (with_classifier or CLASSIFIER not in s.needs)
  }


def combinations() -> dict[str, tuple[str, ...]]:
  """Every combined map: name -> its parts."""
  return {name: spec(name).parts for name in names('combined')}


def image_scores(maps: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """name -> (B,) image score of each (B, S, S) map (``MapSpec.image_score``)."""
  return {
      name: spec(name).image_score(jnp.asarray(values))
      for name, values in maps.items()
  }
