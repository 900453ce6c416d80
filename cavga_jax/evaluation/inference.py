"""Batched, jitted inference: the forward pass each map needs, over a dataset.

``forward`` runs only what the requested maps read (``registry.needs``):
Grad-CAM (a second-order graph) only for the attention maps, the decoder
only for the reconstruction maps, the encoder stages only for the feature
maps. ``make_eval_step`` is the evaluation's step (the batch maps asked
for, the reconstruction and ``s_a``), ``make_normal_step`` what the
statistics of the normal training images need, and ``predict`` runs any
step over a dataset in equally shaped, sharded batches with a progress bar
(the VAE explanations use it too).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from cavga_jax import data
from cavga_jax import sharding
from cavga_jax.evaluation import registry
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import fitted_map
from cavga_jax.models import attention
from cavga_jax.models import cavga
from cavga_jax.training import train_state

Array = jax.Array

# The key of the fitted maps' inputs in the steps' outputs: {name: inputs}.
INPUTS = 'fitted_inputs'


def map_context(generator: cavga.CAVGAGenerator,
                map_settings: anomaly_maps.MapSettings,
                image_size: int) -> fitted_map.Context:
  """The ``fitted_map.Context`` of ``generator``'s maps at ``image_size``."""
  return fitted_map.Context(image_size, map_settings,
                            tuple(generator.encoder_widths))


def fitted_inputs(
    generator: cavga.CAVGAGenerator, map_settings: anomaly_maps.MapSettings,
    settings: dict[str, Any]
) -> Callable[[Any, Array, dict[str, Array]], dict[str, Array]]:
  """``fn(variables, x, maps) -> {name: inputs}`` of the fitted maps.

  ``settings``: {name: settings} of the fitted maps (``fitted_map``);
  ``x`` (B, S, S, C) in [-1, 1], ``maps`` {name: (B, S, S)} the batch maps
  (their parts). One encoder pass of ``variables`` gives the stages all of
  them read, one plain pass of ``variables`` the 'feature_outputs' of
  those that decode; none when none reads any (``fn`` returns {} without
  maps).
  """
  units = {name: registry.spec(name).fitted for name in settings}
  stages = sorted({
      s for name, unit in units.items() if unit.stages
      for s in unit.stages(settings[name])
  })
  decodes = any(unit.decodes for unit in units.values())

  def fn(variables, x, maps):
    context = map_context(generator, map_settings, x.shape[1])
    batch = dict(images=x, maps=maps, stages={})
    if stages:
      batch['stages'] = dict(
          zip(
              stages,
              generator.apply(
                  variables, x, False, stages, method='encode_stages')))
    if decodes:
      # The same pass as ``forward``'s without Grad-CAM (rng None: mu).
      batch['feature_outputs'] = dict(
          generator.apply(variables, x, None, False), images=x)
    return {
        name: unit.inputs(context, settings[name], batch)
        for name, unit in units.items()
    }

  return fn


def forward(generator: cavga.CAVGAGenerator, params: Any, batch_stats: Any,
            x: Array, needs: frozenset[str]) -> dict[str, Array]:
  """The generator outputs that ``needs`` (``registry``) ask for, and 'images'.

  Grad-CAM with ``registry.ATTENTION`` (``attention.forward_with_attention``,
  which also decodes), else the plain pass with ``registry.RECONSTRUCTION``,
  else nothing but the images (the fitted maps take the encoder stages
  from ``fitted_inputs``). Reconstructions decode ``mu`` (no sampling).
  """
  outputs: dict[str, Array] = {}
  if registry.ATTENTION in needs:
    outputs, _ = attention.forward_with_attention(
        generator,
        params,
        batch_stats,
        x,
        rng=None,
        train=False,
        unit_maps=registry.UNIT_MAPS in needs)
  elif registry.RECONSTRUCTION in needs:
    outputs = generator.apply({'params': params, 'batch_stats': batch_stats}, x,
                              None, False)
  return dict(outputs, images=x)


def to_uint8(images: Array) -> Array:
  """[-1, 1] floats -> uint8 (the inverse of ``images_to_float``)."""
  return jnp.round((images + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8)


def make_eval_step(
    generator: cavga.CAVGAGenerator,
    settings: anomaly_maps.MapSettings = anomaly_maps.MapSettings(),
    fitted: dict[str, Any] | None = None,
    map_names: Sequence[str] | None = None,
    attention: bool = True) -> Callable[..., dict[str, Any]]:
  """Returns ``eval_step(params, batch_stats, images[, feature_variables])``.

  ``map_names`` restricts the batch maps to those (default: every batch map
  the generator supports; ``('attention',)`` is the paper's evaluation, what
  benchmarks compare with the PyTorch peer). The Grad-CAM pass runs with
  ``attention`` (the outputs then include the attention) or when a map
  needs it; without, the step decodes only (``eval.maps='headline'`` of a
  feature map: no Grad-CAM).

  ``images`` is uint8 (B, S, S, C) or float in [-1, 1]. Outputs:
  'reconstruction' uint8 (B, S, S, C), 'attention' (B, h, w; with
  Grad-CAM), 'score' (B,) (``s_a``: mean squared error in [-1, 1] units),
  'maps' {name: (B, S, S) float32} and 'map_scores' {name: (B,)}. With the
  CAVGA_w classifier also 'p_anomalous' (B,) and, with Grad-CAM,
  'class_attention' (B, 2, h, w). With ``fitted`` ({name: settings} of
  fitted maps, their parts among the batch maps) also ``INPUTS``, their
  ``fitted_inputs``, the encoder stages from ``feature_variables``
  ({'params', 'batch_stats'}) when given (e.g. the ImageNet encoder a run
  started from, ``eval.feature_weights='initial'``), else from ``params``
  and ``batch_stats``.
  """
  functions = registry.batch_functions(generator.with_classifier)
  if map_names is not None:
    functions = {name: functions[name] for name in map_names}
  needs = registry.needs(functions) | {registry.RECONSTRUCTION}
  if attention:
    needs |= {registry.ATTENTION}
  inputs_fn = fitted_inputs(generator, settings, fitted or {})

  def eval_step(params, batch_stats, images, feature_variables=None):
    x = train_state.images_to_float(images)
    outputs = forward(generator, params, batch_stats, x, needs)
    maps = anomaly_maps.compute_maps(outputs, functions, settings)
    reconstruction = outputs['reconstruction']
    result = dict(
        reconstruction=to_uint8(reconstruction),
        score=jnp.mean(jnp.square(x - reconstruction), axis=(1, 2, 3)),
        maps=maps,
        map_scores=registry.image_scores(maps))
    result.update({
        k: outputs[k] for k in ('attention', 'class_attention') if k in outputs
    })
    if generator.with_classifier:
      result['p_anomalous'] = jax.nn.softmax(outputs['logits'])[:,
                                                                cavga.ANOMALOUS]
    if fitted:
      result[INPUTS] = inputs_fn(
          feature_variables or {'params': params, 'batch_stats': batch_stats},
          x, maps)
    return result

  return eval_step


def make_normal_step(
    generator: cavga.CAVGAGenerator,
    settings: anomaly_maps.MapSettings = anomaly_maps.MapSettings(),
    fitted: dict[str, Any] | None = None) -> Callable[..., dict[str, Any]]:
  """Returns ``normal_step(params, batch_stats, images[, feature_variables])``.

  What the fitted maps of ``fitted`` ({name: settings}) accumulate over the
  normal training images, and no more (no Grad-CAM): {name: inputs}
  (``fitted_inputs``), from the batch maps they read (the reconstruction of
  ``mu``, the one ``make_eval_step`` decodes; no decoder without them) and
  the encoder stages, as ``make_eval_step``.
  """
  fitted = fitted or {}
  functions = {
      name: registry.spec(name).function for name in registry.batch_maps(fitted)
  }
  needs = registry.needs(functions)
  inputs_fn = fitted_inputs(generator, settings, fitted)

  def normal_step(params, batch_stats, images, feature_variables=None):
    x = train_state.images_to_float(images)
    outputs = forward(generator, params, batch_stats, x, needs)
    maps = anomaly_maps.compute_maps(outputs, functions, settings)
    return inputs_fn(
        feature_variables or {'params': params, 'batch_stats': batch_stats}, x,
        maps)

  return normal_step


def host_batches(step: Callable[[Array], Any],
                 images: data.AnomalyDataset | np.ndarray,
                 batch_size: int,
                 mesh: jax.sharding.Mesh,
                 what: str = 'images') -> Iterator[Any]:
  """Yields ``step(batch)`` of each batch on the host, the padding cut.

  Batches are sharded over ``mesh``; a progress bar named ``what`` counts
  the images (``progress``), and the log line names them and gives the
  rate (including the first call's compilation).
  """
  sharding.check_batch_size(batch_size, mesh, 'config.eval.batch_size')
  tic, done = time.perf_counter(), 0
  total = (
      images.num_examples
      if isinstance(images, data.AnomalyDataset) else len(images))
  with progress(total, what) as bar:
    for batch, num_valid in data.eval_batches(images, batch_size):
      out = sharding.to_host(step(sharding.shard_global_batch(batch, mesh)))
      yield jax.tree.map(lambda v, n=num_valid: v[:n], out)
      done += num_valid
      bar.update(num_valid)
  elapsed = time.perf_counter() - tic
  logging.info('evaluated %d %s in %.1f s (%.1f img/s, incl. compilation)',
               done, what, elapsed, done / max(elapsed, 1e-9))


def progress(total: int, what: str, unit: str = 'img') -> tqdm.tqdm:
  """A progress bar on stderr for ``total`` ``unit``s of ``what``.

  Shown on process 0 when stderr is a terminal (``disable=None``), so logs
  written to a file or a pipe keep their lines: there the log line after
  each pass gives the count and the time.
  """
  return tqdm.tqdm(
      total=total,
      desc=what,
      unit=unit,
      file=sys.stderr,
      leave=False,
      mininterval=1.0,
      disable=None if sharding.is_primary_process() else True)


def predict(step: Callable[[Array], Any],
            images: data.AnomalyDataset | np.ndarray,
            batch_size: int,
            mesh: jax.sharding.Mesh,
            what: str = 'images') -> Any:
  """``host_batches`` concatenated: host arrays with N rows each, in the
  structure of ``step``'s outputs."""
  batches = list(host_batches(step, images, batch_size, mesh, what))
  return jax.tree.map(lambda *values: np.concatenate(values), *batches)
