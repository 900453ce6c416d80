"""Maps that combine other maps, each normalised against normal images first.

No single source wins on every category (ImageNet features localise objects'
defects, an untrained network's calibrated residual BSData's pitting; docs/
results.md), so the combinations below are maps of their own, measured like
the others. Each part is standardised with the mean and standard deviation
of its values over the held-out normal training images (never the test
set): ``z_k = (map_k - mean_k) / std_k``, so a part counts by how unusual it
is for a normal image, whatever its units; the combination is the mean of
the ``z_k``. Its image score is the top-1 % mean like the other maps'.
"""

from __future__ import annotations

import numpy as np

# Combination name -> the maps it averages (all must exist).
# residual_ssim_smooth_calibrated is the reconstruction map that did best at
# CAVGA-E's ImageNet initialisation on KolektorSDD and BSData (where the
# untrained decoder's near-constant output makes it a local-contrast map).
COMBINATIONS = {
    'combined_features': ('feature_gaussian', 'feature_knn'),
    'combined_knn_ssim': ('feature_knn', 'residual_ssim_smooth_calibrated'),
    'combined_all': ('feature_gaussian', 'feature_knn',
                     'residual_ssim_smooth_calibrated'),
}
NAMES = tuple(COMBINATIONS)


def normalisers(normal_maps: dict[str, np.ndarray]
                ) -> dict[str, tuple[float, float]]:
  """name -> (mean, std) over all pixels of the normal images' maps (N, S, S)."""
  result = {}
  for name, values in normal_maps.items():
    values = np.asarray(values, np.float64)
    result[name] = (float(values.mean()), float(max(values.std(), 1e-12)))
  return result


def combine(maps: dict[str, np.ndarray],
            scales: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
  """The ``COMBINATIONS`` whose parts are all in ``maps`` and ``scales``.

  Args:
    maps: name -> (N, S, S) maps.
    scales: ``normalisers`` of the held-out normal images.

  Returns:
    combination name -> (N, S, S) float32.
  """
  return {name: combine_parts(maps, scales, parts)
          for name, parts in COMBINATIONS.items()
          if all(p in maps and p in scales for p in parts)}


def combine_parts(maps, scales: dict[str, tuple[float, float]],
                  parts) -> np.ndarray:
  """The mean of ``parts``' standardised maps, (N, S, S) float32.

  Works on numpy and jax arrays alike (the fitted-map step is jitted).
  """
  total = sum((maps[p] - scales[p][0]) / scales[p][1] for p in parts)
  return (total / len(parts)).astype(np.float32)
