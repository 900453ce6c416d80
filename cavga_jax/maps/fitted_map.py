"""A map fitted on normal images, as one unit: what it reads, fits and computes.

A fitted map is one ``FittedMap`` value, declared in the module of the
map (``calibration``, ``feature_gaussian``, ``feature_knn``) and registered
with ``evaluation.registry.register``; everything else (the jitted steps of
``evaluation.inference``, the fit of ``evaluation.fitting``, the saved fit
of ``evaluation.store``, the ``scorer`` and its ``jax.export``) goes
through it by name. Its four parts:

* what it reads of one batch: ``parts`` (batch maps), ``stages`` (encoder
  stages, one encoder pass for all maps), ``decodes`` (the reconstruction
  of the feature networks) and ``inputs``, a pure jnp function of them run
  inside the jitted steps (e.g. the stacked stage features);
* ``init(settings)``: an accumulator over the normal training images with
  ``add(inputs)`` (host arrays, one batch at a time), reduced by
  ``finalize`` to the map's state: a dict of arrays (a pytree Orbax saves
  and restores as it is; tuples would come back as lists);
* ``apply(context, settings, state, inputs) -> (B, S, S)``: the map, pure
  jnp and jittable, the same function in the evaluation, ``predict.py`` and
  the exported scorer;
* ``image_score``: (B, S, S) -> (B,).

``settings``: a hashable value (a frozen dataclass), static under
``jax.jit``; the map's own default unless the evaluation's config gives one
(``evaluation.evaluator.fitted_settings``).

A user-defined map needs no library change: build a ``FittedMap`` and
``registry.register`` it (tests/test_map_unit.py fits the mean normal image
that way).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ContextManager, Protocol

import jax
import numpy as np

from cavga_jax.maps import anomaly_maps

Array = jax.Array
# progress(total, what, unit): a progress bar (``inference.progress``) whose
# ``update(n)`` a long ``finalize`` calls.
Progress = Callable[[int, str, str], ContextManager[Any]]


@dataclasses.dataclass(frozen=True)
class Context:
  """What every fitted map's functions may read, static under ``jax.jit``.

  Attributes:
    image_size: S, the side of the images and the maps.
    map_settings: the maps' blur and SSIM window
      (``anomaly_maps.MapSettings``; feature maps blur like the residual).
    encoder_widths: the generator's encoder stage widths (channel counts).
  """
  image_size: int
  map_settings: anomaly_maps.MapSettings = anomaly_maps.MapSettings()
  encoder_widths: tuple[int, ...] = ()


class Accumulator(Protocol):
  """Gathers the normal images' inputs of one map, a batch at a time."""

  def add(self, inputs: np.ndarray) -> None:
    """``inputs``: the map's ``inputs`` of one batch, on the host."""


@dataclasses.dataclass(frozen=True)
class FittedMap:
  """One map fitted on normal images (module docstring).

  Attributes:
    name: the map's name in the metrics, the fit and ``config.eval.map``.
    inputs: ``(context, settings, batch) -> array``, pure jnp. ``batch``
      has 'images' (B, S, S, C) in [-1, 1], 'maps' {part: (B, S, S)},
      'stages' {stage: (B, h, w, k)} (those of ``stages``) and, with
      ``decodes``, 'feature_outputs': the plain forward pass of the
      networks the feature maps read (``eval.feature_weights``; 'images'
      and 'reconstruction' (B, S, S, C), the decoding of ``mu``).
    init: ``settings -> Accumulator``.
    finalize: ``(accumulator, settings, mesh, progress) -> state`` (a dict
      of arrays; ``mesh`` may shard a long reduction; ``progress``:
      ``Progress``).
    apply: ``(context, settings, state, inputs) -> (B, S, S)`` float32.
    parts: the batch maps ``inputs`` reads (their forward pass runs).
    stages: ``settings -> `` the encoder stages ``inputs`` reads (1..4);
      None: no encoder pass.
    decodes: ``inputs`` reads 'feature_outputs' (one more forward pass,
      shared by all such maps).
    settings: the default settings.
    bounded: the map is in [0, 1] by construction (``registry``).
    image_score: (B, S, S) -> (B,); the top-1 % mean by default.
    shares: ``settings -> `` a hashable key of what the accumulator
      gathers, or None. Maps with the same ``init`` and equal keys share
      one accumulator, filled once (``feature_gaussian`` and
      ``feature_gaussian_shrunk`` gather the same moments and differ only
      in ``finalize``); ``finalize`` must then leave it unchanged.
    trained: its state is trained by a program (``train.py``) and handed to
      the evaluation (``Evaluator(trained=...)``); without one, ``finalize``
      gives the untrained control, which an evaluation computes only when
      its headline is or contains the map.
  """
  name: str
  inputs: Callable[[Context, Any, dict[str, Any]], Array]
  init: Callable[[Any], Accumulator]
  finalize: Callable[[Any, Any, jax.sharding.Mesh | None, Progress], dict[str,
                                                                          Any]]
  apply: Callable[[Context, Any, dict[str, Any], Array], Array]
  parts: tuple[str, ...] = ()
  stages: Callable[[Any], tuple[int, ...]] | None = None
  decodes: bool = False
  settings: Any = None
  bounded: bool = False
  image_score: Callable[[Array], Array] = anomaly_maps.image_score
  shares: Callable[[Any], Any] | None = None
  trained: bool = False
