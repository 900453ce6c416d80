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
evaluation adds ``<name>_calibrated``.
"""

from __future__ import annotations

import numpy as np

# The maps that get a calibrated version (anomaly_maps names).
BASES = ('residual', 'residual_ssim_smooth', 'residual_x_ssim')
SUFFIX = '_calibrated'
# Floor of the per-pixel standard deviation, as a fraction of its image mean.
STD_FLOOR = 0.1
NAMES = tuple(base + SUFFIX for base in BASES)


class PixelMoments:
  """Per-pixel mean and standard deviation of maps, accumulated in batches.

  ``add({name: (B, S, S)})`` for every batch, then ``statistics()``; sums
  are float64, so the order of batches does not matter to float32 precision.
  """

  def __init__(self, names: tuple[str, ...] = BASES):
    self._names = names
    self._count = 0
    self._sum: dict[str, np.ndarray] = {}
    self._sum_sq: dict[str, np.ndarray] = {}

  def add(self, maps: dict[str, np.ndarray]) -> None:
    for name in self._names:
      values = np.asarray(maps[name], np.float64)
      if name not in self._sum:
        self._sum[name] = np.zeros(values.shape[1:])
        self._sum_sq[name] = np.zeros(values.shape[1:])
      self._sum[name] += values.sum(axis=0)
      self._sum_sq[name] += np.square(values).sum(axis=0)
    self._count += len(np.asarray(maps[self._names[0]]))

  def statistics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (mean (S, S), floored standard deviation (S, S)), float32.

    Raises:
      ValueError: no map was added.
    """
    if not self._count:
      raise ValueError('no normal images were added for the calibration')
    result = {}
    for name in self._names:
      mean = self._sum[name] / self._count
      variance = np.maximum(self._sum_sq[name] / self._count
                            - np.square(mean), 0.0)
      std = np.sqrt(variance)
      scale = np.maximum(std, STD_FLOOR * std.mean()) + 1e-12
      result[name] = (mean.astype(np.float32), scale.astype(np.float32))
    return result


def calibrate(anomaly_maps: np.ndarray, mean: np.ndarray,
              scale: np.ndarray) -> np.ndarray:
  """(N, S, S) maps -> their per-pixel z-scores against (mean, scale).

  Numpy or jax arrays alike (the fitted-map step is jitted).
  """
  return ((anomaly_maps - mean) / scale).astype(np.float32)
