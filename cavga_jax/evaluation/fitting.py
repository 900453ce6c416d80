"""Maps fitted on normal images: one state, fitted once, applied to any batch.

``FittedMaps`` holds everything the maps of kind 'fitted' and 'combined'
(``registry``) and the decisions need:

* ``maps``: each fitted map's state by name (``fitted_map.FittedMap``:
  e.g. the per-pixel (mean, scale) of a ``<base>_calibrated`` map,
  ``feature_gaussian``'s (mean, precision), ``feature_knn``'s coreset);
* ``normalisers``: (mean, std, median, tail) of each part of the combined
  maps on the held-out normal images (``combined_maps.normalisers``: what
  every rule needs),
* ``thresholds``: per map (pixel threshold, image threshold, median pixel
  value) on the held-out normal images (``scoring.held_out_thresholds``).

The last two are shared post-processing, fitted after the maps.
``fit_statistics`` streams the normal training images in batches into each
map's accumulator (memory is stated in the maps' modules), then
``fit_held_out`` the held-out images for the normalisers and thresholds.
``fitted_batch_maps`` is a pure jnp
function of one batch, so the evaluation, ``predict.py`` and the exported
scorer (``cavga_jax.deploy.export``) compute the same maps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from cavga_jax.evaluation import inference
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import scoring
from cavga_jax.maps import combined_maps
from cavga_jax.maps import fitted_map

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FittedMaps:
  """The fitted state of the maps fitted on normal images (module docstring).

  A pytree (its arrays and floats are the leaves), so jitted functions take
  it as an argument; ``to_tree`` gives the dict Orbax saves (``store``).
  """
  maps: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  normalisers: dict[str, tuple[float,
                               ...]] = dataclasses.field(default_factory=dict)
  thresholds: dict[str, tuple[float, float,
                              float]] = dataclasses.field(default_factory=dict)

  def available(self) -> tuple[str, ...]:
    """The registered fitted and combined maps this state can compute."""
    return tuple(
        name for name in registry.names('fitted', 'combined')
        if name in self.maps or (registry.spec(name).kind == 'combined' and all(
            p in self.normalisers for p in registry.spec(name).parts)))

  def to_tree(self) -> dict[str, Any]:
    """A nested dict of arrays (Orbax-savable); ``from_tree`` inverts it."""
    return {
        'maps': self.maps, 'normalisers': {
            k: np.asarray(v, np.float64) for k, v in self.normalisers.items()
        }, 'thresholds': {
            k: np.asarray(v, np.float64) for k, v in self.thresholds.items()
        }
    }

  @classmethod
  def from_tree(cls, tree: dict[str, Any]) -> FittedMaps:
    """Inverts ``to_tree``.

    Raises:
      ValueError: a tree of another layout, e.g. one saved before the maps
        were units ('pixel', 'feature', 'knn_bank' at the top) or before
        the combination rules (normalisers of (mean, std) only):
        ``store.load`` raises it as a ``FitError``, ``evaluate.py`` refits.
    """
    other = set(tree) - {'maps', 'normalisers', 'thresholds'}
    if other:
      raise ValueError(f'saved in an older layout, top-level '
                       f'{", ".join(sorted(other))}')
    host = jax.tree.map(np.asarray, tree)
    statistics = len(combined_maps.STATISTICS)
    short = sorted(k for k, v in host.get('normalisers', {}).items()
                   if np.shape(v) != (statistics,))
    if short:
      raise ValueError(f'saved in an older layout, normalisers of '
                       f'{", ".join(short)} without the '
                       f'{"/".join(combined_maps.STATISTICS)} of each rule')
    return cls(
        maps=host.get('maps', {}),
        normalisers={
            k: tuple(float(x) for x in v)
            for k, v in host.get('normalisers', {}).items()
        },
        thresholds={
            k: tuple(float(x) for x in v)
            for k, v in host.get('thresholds', {}).items()
        })


def fitted_batch_maps(fitted: FittedMaps, maps: dict[str, Array],
                      inputs: dict[str, Array], names: Sequence[str],
                      context: fitted_map.Context,
                      per_map: dict[str, Any]) -> dict[str, Array]:
  """The fitted and combined maps ``names`` of one batch (pure jnp).

  Args:
    fitted: the fitted state.
    maps: {name: (B, S, S)} the batch maps (the parts of the fitted maps);
      the result adds to a copy.
    inputs: {name: array} each fitted map's ``inputs`` of the batch
      (``inference.fitted_inputs``).
    names: the maps to compute, each in ``fitted.available()``; parts come
      first (``registry.closure``), a part not in ``maps`` is computed too.
    context: what the fitted maps read besides their inputs.
    per_map: {name: settings} of the fitted maps (``fitted_map``).

  Returns:
    name -> (B, S, S) float32 for every name of ``names`` and their parts.
  """
  maps = dict(maps)
  for name in registry.closure(names):
    if name in maps:
      continue
    spec = registry.spec(name)
    if spec.kind == 'combined':
      maps[name] = combined_maps.combine_parts(maps, fitted.normalisers,
                                               spec.parts, spec.rule)
    elif spec.kind == 'fitted':
      maps[name] = spec.fitted.apply(context, per_map.get(name),
                                     fitted.maps[name], inputs[name])
    else:
      raise ValueError(f'{name!r} is not a fitted map')
  return maps


def split_held_out(normal_images: np.ndarray,
                   fraction: float) -> tuple[np.ndarray, np.ndarray | None]:
  """(images for the statistics, held-out images or None).

  ``ceil(fraction * N)`` images, chosen by a fixed permutation (seed 0, so
  every evaluation of a run holds out the same ones), are held out; at least
  one image stays for the statistics. None when nothing is held out.
  """
  count = min(math.ceil(fraction * len(normal_images)), len(normal_images) - 1)
  if count <= 0:
    return normal_images, None
  order = np.random.default_rng(0).permutation(len(normal_images))
  keep = np.sort(order[count:])
  return normal_images[keep], normal_images[np.sort(order[:count])]


def fit_statistics(batches,
                   settings: dict[str, Any],
                   mesh: jax.sharding.Mesh | None,
                   trained: dict[str, Any] | None = None) -> FittedMaps:
  """The fitted maps' states from ``make_normal_step`` outputs, batch by batch.

  ``batches`` yields host dicts {name: inputs} for every map of
  ``settings`` ({name: settings}); each map's accumulator takes them as
  they come and is finalized (with a progress bar where long) at the end.
  ``trained``: {name: state} of maps trained elsewhere (``train.py``'s
  detector), taken as they are.
  """
  trained = {
      name: state for name, state in (trained or {}).items() if name in settings
  }
  units = {
      name: registry.spec(name).fitted
      for name in settings
      if name not in trained
  }
  # One accumulator per distinct (init, shares key); it is filled from the
  # inputs of the first map that owns it (``FittedMap.shares``).
  owners: dict[Any, tuple[str, Any]] = {}
  accumulators = {}
  for name, unit in units.items():
    key = ((unit.init, unit.shares(settings[name])) if unit.shares else
           ('own', name))
    if key not in owners:
      owners[key] = (name, unit.init(settings[name]))
    accumulators[name] = owners[key][1]
  for out in batches:
    for name, accumulator in owners.values():
      accumulator.add(out[name])
  return FittedMaps(
      maps={
          **{
              name:
                  unit.finalize(accumulators[name], settings[name], mesh,
                                inference.progress)
              for name, unit in units.items()
          }, **{
              name: jax.tree.map(np.asarray, state)
              for name, state in trained.items()
          }
      })


def fit_held_out(fitted: FittedMaps,
                 held_out: dict[str, Any],
                 quantile: float,
                 names: Sequence[str] | None = None) -> None:
  """Adds the normalisers and thresholds from the held-out images' maps.

  ``held_out`` has 'maps' {name: (N, S, S)} (every batch and fitted map
  evaluated) and 'map_scores'; the combined maps are added to it first, so
  they get thresholds too. ``names``: the maps evaluated
  (``eval.maps='headline'``: the headline and its parts), None = all; only
  their combinations are fitted.
  """
  combinations = {
      name: parts
      for name, parts in registry.combinations().items()
      if names is None or name in names
  }
  # float32-exact values, so a state restored as float32 equals the fit.
  fitted.normalisers = _float32(
      combined_maps.normalisers({
          name: held_out['maps'][name]
          for name in {p for parts in combinations.values() for p in parts}
          if name in held_out['maps']
      }))
  combined = [name for name in fitted.available() if name in combinations]
  # Combined maps read only their parts.
  maps = fitted_batch_maps(fitted, held_out['maps'], {}, combined,
                           fitted_map.Context(0), {})
  scores = registry.image_scores({name: maps[name] for name in combined})
  for name in combined:
    held_out['maps'][name] = np.asarray(maps[name])
    held_out['map_scores'][name] = np.asarray(scores[name])
  fitted.thresholds = _float32(scoring.held_out_thresholds(held_out, quantile))


def _float32(
    values: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
  return {k: tuple(float(np.float32(x)) for x in v) for k, v in values.items()}


def outputs_with_fitted_maps(
    out: dict[str, Any],
    fitted: FittedMaps,
    context: fitted_map.Context,
    settings: dict[str, Any],
    names: Sequence[str] | None = None) -> dict[str, Any]:
  """A step's outputs with the maps of ``fitted`` added (pure; jit it).

  ``out`` has 'maps', 'map_scores' and the fitted maps' 'inputs'
  (``inference.make_eval_step``), which are dropped from the result (the
  maps are what is kept). ``settings``: {name: settings} of the fitted
  maps. ``names``: the maps wanted (those of them ``fitted`` can compute
  are added); None = every map ``fitted`` can.
  """
  names = tuple(n for n in fitted.available() if names is None or n in names)
  out = dict(out)
  inputs = out.pop(inference.INPUTS, {})
  maps = fitted_batch_maps(fitted, out['maps'], inputs, names, context,
                           settings)
  out['maps'] = maps
  out['map_scores'] = dict(out['map_scores'],
                           **registry.image_scores({n: maps[n] for n in names}))
  return out
