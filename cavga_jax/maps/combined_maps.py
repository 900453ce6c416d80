"""Maps that combine other maps, each normalised against normal images first.

No single source wins on every category (ImageNet features localise objects'
defects, an untrained network's calibrated residual BSData's pitting; docs/
results.md), so the combinations below are maps of their own, measured like
the others. Each part is normalised with statistics of its values over the
held-out normal training images (never the test set), so a part counts by
how unusual it is for a normal image, whatever its units; the combination is
the mean of the normalised parts. Its rule (``RULES``) says how:

* ``mean_z``: ``(map_k - mean_k) / std_k``;
* ``mean_tail``: ``(map_k - median_k) / (q99.9_k - median_k)``: a part whose
  normal images already reach high values (a heavy tail: the SSIM residual
  on an object's edges) counts less, where ``mean_z`` would let its tail
  dominate (issue 36's experiment, docs/results.md).

Every part's normaliser holds the statistics of both rules, (mean, std,
median, tail) with tail = q99.9 - median (``normalisers``). The image score
is the top-1 % mean like the other maps'.
"""

from __future__ import annotations

import numpy as np

MEAN_Z = 'mean_z'
MEAN_TAIL = 'mean_tail'
RULE_NAMES = (MEAN_Z, MEAN_TAIL)
# mean_tail's upper quantile of the normal maps.
TAIL_QUANTILE = 0.999
# A part's normaliser: these statistics of its held-out normal maps.
STATISTICS = ('mean', 'std', 'median', 'tail')
# A zero std or tail (a constant part) divides by this instead.
_FLOOR = 1e-12

# Combination name -> the maps it averages (all must exist).
# residual_ssim_smooth_calibrated is the reconstruction map that did best at
# CAVGA-E's ImageNet initialisation on KolektorSDD and BSData (where the
# untrained decoder's random-texture output makes it a local-structure map);
# initial_ssim_calibrated is that map from the initial decoder, which
# training does not change.
COMBINATIONS = {
    'combined_features': ('feature_gaussian', 'feature_knn'),
    'combined_knn_ssim': ('feature_knn', 'residual_ssim_smooth_calibrated'),
    'combined_all':
        ('feature_gaussian', 'feature_knn', 'residual_ssim_smooth_calibrated'),
    'combined_robust':
        ('feature_gaussian_shrunk', 'feature_knn', 'initial_ssim_calibrated'),
    # combined_robust and the trained detector (detector.py, issue 36
    # item 4), measured beside it.
    'combined_detector': ('feature_gaussian_shrunk', 'feature_knn',
                          'initial_ssim_calibrated', 'feature_detector'),
    # combined_robust with the *trained* decoder's SSIM residual (issue 36:
    # does CAVGA's training earn a place through its decoder?).
    'combined_robust_trained': ('feature_gaussian_shrunk', 'feature_knn',
                                'residual_ssim_smooth_calibrated'),
}
# Combination name -> its rule (module docstring).
RULES = {
    'combined_features': MEAN_Z,
    'combined_knn_ssim': MEAN_Z,
    'combined_all': MEAN_Z,
    'combined_robust': MEAN_TAIL,
    'combined_detector': MEAN_TAIL,
    'combined_robust_trained': MEAN_TAIL,
}
NAMES = tuple(COMBINATIONS)


def normalisers(
    normal_maps: dict[str, np.ndarray]
) -> dict[str, tuple[float, float, float, float]]:
  """name -> (mean, std, median, tail) over all pixels of the normal images'
  maps (N, S, S); tail = the ``TAIL_QUANTILE`` quantile - median. The std
  and tail are floored above 0."""
  result = {}
  for name, values in normal_maps.items():
    values = np.asarray(values, np.float64).ravel()
    median, high = np.quantile(values, [0.5, TAIL_QUANTILE])
    result[name] = (float(values.mean()), float(max(values.std(), _FLOOR)),
                    float(median), float(max(high - median, _FLOOR)))
  return result


def offset_scale(normaliser, rule: str) -> tuple[float, float]:
  """(offset, scale) of one part's ``normalisers`` entry under ``rule``."""
  if rule == MEAN_Z:
    return normaliser[0], normaliser[1]
  if rule == MEAN_TAIL:
    return normaliser[2], normaliser[3]
  raise ValueError(f'unknown combination rule {rule!r}; known: '
                   f'{", ".join(RULE_NAMES)}')


def combine(maps: dict[str, np.ndarray],
            scales: dict[str, tuple[float, ...]]) -> dict[str, np.ndarray]:
  """The ``COMBINATIONS`` whose parts are all in ``maps`` and ``scales``.

  Args:
    maps: name -> (N, S, S) maps.
    scales: ``normalisers`` of the held-out normal images.

  Returns:
    combination name -> (N, S, S) float32.
  """
  return {
      name: combine_parts(maps, scales, parts, RULES[name])
      for name, parts in COMBINATIONS.items()
      if all(p in maps and p in scales for p in parts)
  }


def combine_parts(maps,
                  scales: dict[str, tuple[float, ...]],
                  parts,
                  rule: str = MEAN_Z) -> np.ndarray:
  """The mean of ``parts``' maps normalised by ``rule``, (N, S, S) float32.

  Works on numpy and jax arrays alike (the fitted-map step is jitted).
  """
  total = 0.0
  for part in parts:
    offset, scale = offset_scale(scales[part], rule)
    total = total + (maps[part] - offset) / scale
  return (total / len(parts)).astype(np.float32)
