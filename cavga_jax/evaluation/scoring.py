"""Scoring as pure functions: maps and masks in, metrics and thresholds out.

``compute_metrics`` gives ``metrics.json``: the headline map's metrics as
flat keys, ``s_a``'s detection metrics under keys suffixed
``_reconstruction``, and ``maps.<name>.<metric>`` for every map (the pixel
metrics of ``cavga_jax.metrics.pixel_metrics`` and the detection metrics of
``cavga_jax.metrics.image_metrics`` on the map's own image score). Every
accuracy
names its threshold: ``_minmax`` (the paper's: score min-max normalised over
the test set, > 0.5), ``_held_out`` (the held-out normal images' quantile,
``held_out_thresholds``), ``_argmax`` (CAVGA_w's classifier).

Maps that are not bounded (``registry``) are min-max normalised over the
test set first, so IoU at the paper's 0.5 means something for them; the
other metrics do not change. Nothing here changes its inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cavga_jax import data
from cavga_jax.evaluation import registry
from cavga_jax.maps import anomaly_maps
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics


def held_out_thresholds(
    held_out: dict[str, Any],
    quantile: float) -> dict[str, tuple[float, float, float]]:
  """Per map (pixel threshold, image threshold, median pixel) on held-out images.

  The thresholds are the ``quantile`` of the map's values over all pixels
  of the held-out normal images, and of their image scores: thresholds a
  user can fix before seeing any defect (``quantile`` 0.999 flags about
  0.1 % of normal pixels), unlike the paper's IoU at 0.5 after min-max over
  the test set. The median is where pictures start the colour scale.
  """
  return {
      name: (float(np.quantile(values, quantile)),
             float(np.quantile(held_out['map_scores'][name],
                               quantile)), float(np.median(values))
            ) for name, values in held_out['maps'].items()
  }


def prior_maps(maps: dict[str, np.ndarray], headline: str,
               labels: np.ndarray) -> dict[str, np.ndarray]:
  """The positional baselines of ``headline``: the same map for every image.

  ``prior``: the mean of ``headline`` over the whole test set. A map that
  localizes well leaks where this test set's defects lie into that mean, so
  ``prior_normal``, its mean over the normal test images only (``labels``
  0; absent without them), is the baseline that cannot know the defects.
  Their image scores are constant (image AUROC 0.5).

  Returns:
    name -> (N, S, S) float32 (a broadcast view).
  """
  values = maps[headline]
  subsets = {
      anomaly_maps.PRIOR: values, anomaly_maps.PRIOR_NORMAL: values[labels == 0]
  }
  return {
      name:
          np.broadcast_to(
              subset.mean(axis=0, dtype=np.float64).astype(np.float32),
              values.shape) for name, subset in subsets.items() if len(subset)
  }


def map_metrics(
    anomaly_map: np.ndarray,
    image_scores: np.ndarray,
    dataset: data.AnomalyDataset,
    unbounded: bool,
    thresholds: tuple[float, ...] | None = None) -> dict[str, float]:
  """Pixel metrics of one map and the detection metrics of its image score.

  ``unbounded`` maps are min-max normalised over the test set first (only
  IoU at 0.5 and the best-IoU threshold change). With ``thresholds``
  (``held_out_thresholds``: pixel, image, ...) also 'iou_held_out' (IoU of
  ``map > pixel threshold``, the map as computed),
  'detection_accuracy_held_out' (image score > image threshold) and both
  thresholds.
  """
  result = {}
  if thresholds is not None:
    pixel_threshold, image_threshold = thresholds[:2]
    result = dict(
        iou_held_out=pixel_metrics.iou_at_threshold(anomaly_map, dataset.masks,
                                                    dataset.labels,
                                                    pixel_threshold),
        detection_accuracy_held_out=image_metrics.accuracy_at_threshold(
            image_scores, dataset.labels, image_threshold),
        threshold_held_out=pixel_threshold,
        image_threshold_held_out=image_threshold)
  if unbounded:
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    anomaly_map = (anomaly_map - low) / max(high - low, 1e-12)
  result.update(
      pixel_metrics.localization_metrics(anomaly_map, dataset.masks,
                                         dataset.labels))
  result.update(image_metrics.detection_metrics(image_scores, dataset.labels))
  return result


# The suffix of the detection metrics of s_a, the mean squared
# reconstruction error (docs/protocol.md).
RECONSTRUCTION_SUFFIX = '_reconstruction'


def compute_metrics(
    predictions: dict[str, Any],
    dataset: data.AnomalyDataset,
    headline: str = 'attention',
    thresholds: dict[str, tuple[float, ...]] | None = None) -> dict[str, Any]:
  """``metrics.json`` of one test set (module docstring).

  ``predictions`` has 'maps' and 'map_scores' (name -> (N, S, S) / (N,)),
  'score' (``s_a``) and, for CAVGA_w, 'p_anomalous'. The priors of
  ``prior_maps`` are scored beside the maps. ``maps[name]`` has every map's
  metrics, with the held-out-threshold metrics of ``map_metrics`` for the
  maps in ``thresholds`` (not the priors, which are test-set means); the
  flat keys are ``maps[headline]``'s (the map a user deploys, its own image
  score included), then 'image_auroc_reconstruction' and
  'detection_accuracy_minmax_reconstruction' of ``s_a``. With CAVGA_w also
  'image_auroc_classifier' and 'classifier_accuracy_argmax' (anomalous iff
  p > 0.5).
  """
  maps = dict(predictions['maps'])
  scores = dict(predictions['map_scores'])
  for name, values in prior_maps(maps, headline, dataset.labels).items():
    maps[name] = values
    scores[name] = np.zeros(len(values), np.float32)
  headline_bounded = registry.spec(headline).bounded
  per_map = {
      name:
          map_metrics(
              maps[name], scores[name], dataset, not registry.spec(name).bounded
              or (registry.spec(name).kind == 'prior' and not headline_bounded),
              (thresholds or {}).get(name)) for name in maps
  }
  result = dict(
      num_test_images=dataset.num_examples,
      num_anomalous_images=int(dataset.labels.sum()),
      map=headline)
  result.update(per_map[headline])
  result.update({
      k + RECONSTRUCTION_SUFFIX: v for k, v in image_metrics.detection_metrics(
          predictions['score'], dataset.labels).items()
  })
  result['maps'] = per_map
  if 'p_anomalous' in predictions:
    p_anomalous = predictions['p_anomalous']
    result['image_auroc_classifier'] = image_metrics.detection_metrics(
        p_anomalous, dataset.labels)['image_auroc']
    result['classifier_accuracy_argmax'] = float(
        np.mean((p_anomalous > 0.5) == (dataset.labels == 1)))
  return result
