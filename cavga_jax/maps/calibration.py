"""Normal-calibrated anomaly maps: each pixel measured against normal images.

A reconstruction residual is large wherever the model reconstructs badly,
and some places are hard on *every* image (a bottle's rim, a surface's
edges, fine texture): a raw residual map partly marks those places, not the
defect. Calibration scores each pixel by how unusual its value is for that
pixel on normal images: with the per-pixel mean ``mu`` and standard
deviation ``sigma`` of a map over the normal training images,

  calibrated = (map - mu) / max(sigma, STD_FLOOR * mean(sigma))

(a z-score; the floor keeps pixels that never vary, e.g. a flat background,
from turning noise into huge scores). It is the per-pixel Gaussian of
PaDiM-style methods applied to the residual maps. The statistics come from
the training images, which are normal (CAVGA_w's labelled anomalies are
left out), never from the test set. For each map of ``BASES`` the
evaluation adds ``<name>_calibrated``: the fitted maps ``MAPS``
(``fitted_map``), one per base.

``initial_ssim_calibrated`` (``INITIAL_SSIM``, also in ``MAPS``) is
``residual_ssim_smooth_calibrated`` of the networks the feature maps read
(``eval.feature_weights``): with 'initial' (configs/mvtec.py) the decoder
the run started from, so a local-structure map that training cannot change
(at CAVGA-E's ImageNet initialisation the random decoder does not
reconstruct: its output is a random texture of the encoder's features,
per-image pixel std 0.43-0.56 on [-1, 1] on bottle, KolektorSDD and BSData,
and the SSIM residual against it, calibrated per pixel, marks local
structure unusual for normal images; issue 36). With
'evaluated', or for the untrained networks, it equals
``residual_ssim_smooth_calibrated``.
"""

from __future__ import annotations

import numpy as np

from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import fitted_map

# The maps that get a calibrated version (anomaly_maps names).
BASES = ('residual', 'residual_ssim_smooth', 'residual_x_ssim')
SUFFIX = '_calibrated'
# Floor of the per-pixel standard deviation, as a fraction of its image mean.
STD_FLOOR = 0.1


class PixelMoments:
  """Per-pixel mean and standard deviation of one map, accumulated in batches.

  ``add((B, S, S))`` for every batch, then ``statistics()``; sums are
  float64, so the order of batches does not matter to float32 precision.
  """

  def __init__(self):
    self._count = 0
    self._sum: np.ndarray | None = None
    self._sum_sq: np.ndarray | None = None

  def add(self, maps: np.ndarray) -> None:
    values = np.asarray(maps, np.float64)
    if self._sum is None:
      self._sum = np.zeros(values.shape[1:])
      self._sum_sq = np.zeros(values.shape[1:])
    self._sum += values.sum(axis=0)
    self._sum_sq += np.square(values).sum(axis=0)
    self._count += len(values)

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean (S, S), floored standard deviation (S, S)), float32.

    Raises:
      ValueError: no map was added.
    """
    if not self._count:
      raise ValueError('no normal images were added for the calibration')
    mean = self._sum / self._count
    variance = np.maximum(self._sum_sq / self._count - np.square(mean), 0.0)
    std = np.sqrt(variance)
    scale = np.maximum(std, STD_FLOOR * std.mean()) + 1e-12
    return mean.astype(np.float32), scale.astype(np.float32)


def calibrate(anomaly_maps: np.ndarray, mean: np.ndarray,
              scale: np.ndarray) -> np.ndarray:
  """(N, S, S) maps -> their per-pixel z-scores against (mean, scale).

  Numpy or jax arrays alike (the fitted-map step is jitted).
  """
  return ((anomaly_maps - mean) / scale).astype(np.float32)


def _finalize(moments: PixelMoments, settings, mesh,
              progress) -> dict[str, np.ndarray]:
  del settings, mesh, progress
  mean, scale = moments.statistics()
  return {'mean': mean, 'scale': scale}


def _apply(context, settings, state, maps):
  del context, settings
  return calibrate(maps, state['mean'], state['scale'])


def _calibrated(base: str) -> fitted_map.FittedMap:
  """``<base>_calibrated``: state {'mean', 'scale'} (S, S) of ``base``."""
  return fitted_map.FittedMap(
      name=base + SUFFIX,
      inputs=lambda context, settings, batch: batch['maps'][base],
      init=lambda settings: PixelMoments(),
      finalize=_finalize,
      apply=_apply,
      parts=(base,))


def _initial_ssim(context: fitted_map.Context, settings, batch):
  """(B, S, S): the SSIM residual of the feature networks' reconstruction."""
  del settings
  return anomaly_maps.residual_ssim_smooth_map(
      batch['feature_outputs'], context.map_settings).astype(np.float32)


INITIAL_SSIM = fitted_map.FittedMap(
    name='initial_ssim_calibrated',
    inputs=_initial_ssim,
    init=lambda settings: PixelMoments(),
    finalize=_finalize,
    apply=_apply,
    decodes=True)
MAPS = tuple(_calibrated(base) for base in BASES) + (INITIAL_SSIM,)
