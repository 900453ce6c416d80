"""Image-level (detection) metrics: AUROC and the paper's accuracies.

Conventions and errors are `metric_checks`'s: ``(N,)`` scores, higher means
more anomalous, and ``(N,)`` labels in {0, 1}. `detection_metrics` gathers
the metrics an evaluation reports.
"""

from typing import Any

import numpy as np
from sklearn import metrics as sk_metrics

from cavga_jax.metrics import metric_checks


def image_auroc(scores: Any, labels: Any) -> float:
  """Area under the ROC curve of image anomaly scores.

  Args:
    scores: (N,) image anomaly scores.
    labels: (N,) image labels in {0, 1}.

  Returns:
    The image-level AUROC in [0, 1].

  Raises:
    metric_checks.UndefinedMetricError: if the labels contain only one class.
    ValueError: on malformed inputs.
  """
  scores, labels = metric_checks.scores_and_labels(scores, labels)
  metric_checks.require_both_classes(labels, 'labels')
  return float(sk_metrics.roc_auc_score(labels, scores))


def detection_accuracy(scores: Any,
                       labels: Any,
                       threshold: float = 0.5) -> float:
  """The CAVGA paper's detection accuracy.

  Scores are min-max normalised over the given (test) set, and an image is
  predicted anomalous if its normalised score is strictly greater than
  `threshold`. If all scores are equal, all normalised scores are 0.

  Args:
    scores: (N,) image anomaly scores.
    labels: (N,) image labels in {0, 1}.
    threshold: decision threshold on the normalised scores.

  Returns:
    The fraction of images classified correctly, in [0, 1].

  Raises:
    ValueError: on malformed inputs.
  """
  scores, labels = metric_checks.scores_and_labels(scores, labels)
  low, high = scores.min(), scores.max()
  if high > low:
    normalised = (scores - low) / (high - low)
  else:
    normalised = np.zeros_like(scores)
  predictions = normalised > threshold
  return float(np.mean(predictions == labels))


def accuracy_at_threshold(scores: Any, labels: Any, threshold: float) -> float:
  """Fraction of images classified correctly by ``score > threshold``.

  The threshold is fixed in the scores' own units (e.g. set on normal
  training images), unlike `detection_accuracy`'s min-max over the test set.

  Args:
    scores: (N,) image anomaly scores.
    labels: (N,) image labels in {0, 1}.
    threshold: an image is predicted anomalous if its score is strictly
      greater.

  Raises:
    ValueError: on malformed inputs.
  """
  scores, labels = metric_checks.scores_and_labels(scores, labels)
  return float(np.mean((scores > threshold) == labels))


def detection_metrics(scores: Any, labels: Any) -> dict[str, float]:
  """All image-level detection metrics in one flat dict.

  Metrics undefined for the data (e.g. only one class) are reported as nan,
  with the reason logged as a warning.

  Args:
    scores: (N,) image anomaly scores.
    labels: (N,) image labels in {0, 1}.

  Returns:
    A dict with float values under the keys 'image_auroc' and
    'detection_accuracy_minmax' (`detection_accuracy`: the threshold is 0.5
    of the scores min-max normalised over the given set).

  Raises:
    ValueError: on malformed inputs.
  """
  scores, labels = metric_checks.scores_and_labels(scores, labels)
  return {
      'image_auroc':
          metric_checks.or_nan('image_auroc', image_auroc, scores, labels),
      'detection_accuracy_minmax':
          detection_accuracy(scores, labels),
  }
