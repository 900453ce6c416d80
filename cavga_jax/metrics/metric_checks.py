"""The inputs and the undefined-metric policy shared by all metrics.

Everything in `pixel_metrics` and `image_metrics` runs on the host with
numpy, scipy and scikit-learn and knows nothing about the model: callers pass
numpy arrays (or anything `np.asarray` accepts, e.g. JAX arrays, which are
copied to the host).

Conventions shared by all metrics:

* ``anomaly_maps`` has shape ``(N, H, W)``; higher means more anomalous.
* ``masks`` has shape ``(N, H, W)``; a nonzero pixel is anomalous (ground
  truth), so bool, 0/1 and 0/255 masks all work.
* ``labels`` has shape ``(N,)`` with values in {0, 1}; 1 is anomalous.
* ``scores`` has shape ``(N,)``; higher means more anomalous.

Metrics that are undefined for the data given (e.g. an AUROC when only one
class is present) raise `UndefinedMetricError`, a `ValueError`. The gatherers
`pixel_metrics.localization_metrics` and `image_metrics.detection_metrics`
turn those into ``nan`` and log why (`or_nan`), so that one normal-only
category does not abort a whole evaluation run.
"""

from collections.abc import Callable
import logging
from typing import Any

import numpy as np


class UndefinedMetricError(ValueError):
  """A metric is undefined for the data given (e.g. only one class present)."""


def maps_and_masks(anomaly_maps: Any,
                   masks: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts maps and masks.

  Args:
    anomaly_maps: (N, H, W) real-valued anomaly maps.
    masks: (N, H, W) ground-truth masks; nonzero means anomalous.

  Returns:
    maps: (N, H, W) float64.
    gt: (N, H, W) bool.

  Raises:
    ValueError: on a shape mismatch or non-finite map values.
  """
  maps = np.asarray(anomaly_maps, dtype=np.float64)
  gt = np.asarray(masks)
  if maps.ndim != 3:
    raise ValueError(
        f'anomaly_maps must have shape (N, H, W), got shape {maps.shape}.')
  if gt.shape != maps.shape:
    raise ValueError(
        f'masks must have the same shape as anomaly_maps {maps.shape}, got '
        f'shape {gt.shape}.')
  if maps.size == 0:
    raise ValueError('anomaly_maps is empty.')
  if not np.all(np.isfinite(maps)):
    raise ValueError('anomaly_maps contain NaN or infinite values.')
  return maps, gt > 0


def binary_labels(labels: Any,
                  num_items: int,
                  name: str = 'labels') -> np.ndarray:
  """Validates (N,) labels in {0, 1} and returns them as an (N,) bool array."""
  labels = np.asarray(labels)
  if labels.shape != (num_items,):
    raise ValueError(
        f'{name} must have shape ({num_items},), got shape {labels.shape}.')
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError(
        f'{name} must contain only 0 (normal) and 1 (anomalous), got values '
        f'{np.unique(labels)[:10]}.')
  return labels == 1


def scores_and_labels(scores: Any,
                      labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates image scores and labels.

  Args:
    scores: (N,) real-valued image anomaly scores.
    labels: (N,) labels in {0, 1}.

  Returns:
    scores: (N,) float64.
    labels: (N,) bool.

  Raises:
    ValueError: on bad shapes, values or an empty input.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 1:
    raise ValueError(f'scores must have shape (N,), got shape {scores.shape}.')
  if scores.size == 0:
    raise ValueError('scores is empty.')
  if not np.all(np.isfinite(scores)):
    raise ValueError('scores contain NaN or infinite values.')
  return scores, binary_labels(labels, scores.shape[0])


def require_both_classes(targets: np.ndarray, what: str) -> None:
  """Raises UndefinedMetricError unless bool `targets` holds both classes."""
  require_both_counts(int(np.count_nonzero(targets)), targets.size, what)


def require_both_counts(num_positive: int, total: int, what: str) -> None:
  """Raises UndefinedMetricError unless 0 < num_positive < total."""
  if num_positive == 0 or num_positive == total:
    only = 'anomalous' if num_positive else 'normal'
    raise UndefinedMetricError(
        f'{what} contain only {only} entries ({total} in total); the '
        'metric needs both normal and anomalous ones.')


def or_nan(name: str, metric_fn: Callable[..., Any], *args: Any) -> Any:
  """Calls metric_fn(*args); on UndefinedMetricError logs and returns nan."""
  try:
    return metric_fn(*args)
  except UndefinedMetricError as e:
    logging.warning('Metric %s is undefined, reporting nan: %s', name, e)
    return float('nan')
