"""Tests for cavga_jax.metrics: pixel_metrics and image_metrics."""

import json
import math
import sys

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as sk_metrics

from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from conftest import load_script

_LOCALIZATION_KEYS = {
    'pixel_auroc', 'iou', 'iou_best', 'iou_best_threshold', 'pixel_f1_max',
    'aupro'
}
_DETECTION_KEYS = {'image_auroc', 'detection_accuracy_minmax'}


def _blob_masks() -> np.ndarray:
  """(4, 12, 12) bool masks with a few blobs; the last image is normal.

  Some blobs touch only diagonally, so they are one region under
  8-connectivity but two under 4-connectivity.
  """
  masks = np.zeros((4, 12, 12), dtype=bool)
  # Image 0: a 3x3 square and a 2x2 square touching it at a corner (one
  # region), plus a separate 1x4 bar.
  masks[0, 1:4, 1:4] = True
  masks[0, 4:6, 4:6] = True
  masks[0, 9, 2:6] = True
  # Image 1: a single pixel, and a diagonal line of three pixels (one region).
  masks[1, 0, 0] = True
  masks[1, 6, 6] = masks[1, 7, 7] = masks[1, 8, 8] = True
  # Image 2: a large blob touching the border.
  masks[2, 5:12, 0:6] = True
  return masks


def _noisy_maps(masks: np.ndarray, seed: int) -> np.ndarray:
  """(N, H, W) maps correlated with masks, quantised so that scores tie."""
  rng = np.random.default_rng(seed)
  noise = rng.integers(0, 20, size=masks.shape) / 20.0
  return (noise + 0.4 * masks).astype(np.float32)


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray,
                       max_fpr: float) -> float:
  """AUPRO straight from its definition, one threshold at a time."""
  regions = []  # (image index, (H, W) bool region mask)
  for index in range(masks.shape[0]):
    labeled, count = ndimage.label(masks[index], structure=np.ones((3, 3)))
    regions.extend((index, labeled == k) for k in range(1, count + 1))
  normal = ~masks
  points = [(0.0, 0.0)]
  for threshold in np.unique(maps)[::-1]:
    pred = maps >= threshold
    fpr = np.sum(pred & normal) / np.sum(normal)
    pro = np.mean([np.sum(pred[i] & r) / np.sum(r) for i, r in regions])
    points.append((fpr, pro))
  # Integrate segment by segment, cutting the segment that crosses max_fpr.
  area = 0.0
  for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:
      y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
      x1 = max_fpr
    area += 0.5 * (y0 + y1) * (x1 - x0)
  return area / max_fpr


# ---------------------------------------------------------------------------
# AUROC.
# ---------------------------------------------------------------------------


def test_pixel_auroc_matches_sklearn():
  rng = np.random.default_rng(0)
  masks = rng.random((3, 8, 9)) < 0.2
  maps = rng.random((3, 8, 9)) + 0.5 * masks
  expected = sk_metrics.roc_auc_score(masks.ravel(), maps.ravel())
  result = pixel_metrics.pixel_auroc(maps, masks.astype(np.uint8))
  assert isinstance(result, float)
  assert result == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_with_ties_matches_sklearn():
  rng = np.random.default_rng(1)
  masks = rng.random((3, 8, 9)) < 0.3
  maps = rng.integers(
      0, 4, size=(3, 8, 9)) + masks * rng.integers(0, 2, (3, 8, 9))
  expected = sk_metrics.roc_auc_score(masks.ravel(), maps.ravel())
  assert pixel_metrics.pixel_auroc(maps, masks) == pytest.approx(
      expected, abs=1e-12)


def test_pixel_auroc_one_class_raises():
  maps = np.random.default_rng(2).random((2, 4, 4))
  with pytest.raises(ValueError, match='only normal'):
    pixel_metrics.pixel_auroc(maps, np.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match='only anomalous'):
    pixel_metrics.pixel_auroc(maps, np.ones((2, 4, 4)))


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match='same shape'):
    pixel_metrics.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match=r'\(N, H, W\)'):
    pixel_metrics.aupro(np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 4, 1)))


def test_accuracy_at_a_fixed_threshold():
  # Scores above 0.5 are called anomalous: 0.9 (1) right, 0.6 (0) wrong,
  # 0.5 (1) wrong (not strictly greater), 0.1 (0) right.
  assert image_metrics.accuracy_at_threshold([0.9, 0.6, 0.5, 0.1], [1, 0, 1, 0],
                                             0.5) == 0.5
  with pytest.raises(ValueError, match='labels must contain only'):
    image_metrics.accuracy_at_threshold([0.1, 0.2], [0, 2], 0.5)


def test_image_auroc_matches_sklearn():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, size=50)
  scores = rng.random(50) + 0.3 * labels
  result = image_metrics.image_auroc(scores, labels)
  assert isinstance(result, float)
  assert result == pytest.approx(
      sk_metrics.roc_auc_score(labels, scores), abs=1e-12)
  tied = np.round(scores * 3)
  assert image_metrics.image_auroc(tied, labels) == pytest.approx(
      sk_metrics.roc_auc_score(labels, tied), abs=1e-12)


def test_image_auroc_one_class_raises():
  with pytest.raises(ValueError, match='only normal'):
    image_metrics.image_auroc([0.1, 0.2, 0.3], [0, 0, 0])


# ---------------------------------------------------------------------------
# IoU.
# ---------------------------------------------------------------------------


def test_iou_at_threshold_hand_computed():
  maps = np.array([
      [[0.9, 0.8, 0.1], [0.2, 0.6, 0.5]],  # 0.5 is not > 0.5, so not predicted.
      [[0.7, 0.3, 0.3], [0.3, 0.3, 0.3]],
      [[0.9, 0.9, 0.9], [0.9, 0.9,
                         0.9]],  # Normal image: would have IoU 0 if counted.
  ])
  masks = np.array([
      [[1, 0, 0], [1, 1, 0]],
      [[1, 1, 1], [0, 0, 0]],
      [[0, 0, 0], [0, 0, 0]],
  ])
  labels = np.array([1, 1, 0])
  # Image 0: P = {(0,0), (0,1), (1,1)}, G = {(0,0), (1,0), (1,1)};
  #   P & G = {(0,0), (1,1)} -> 2, P | G = 4 pixels -> IoU 1/2.
  # Image 1: P = {(0,0)}, G = {(0,0), (0,1), (0,2)}; 1 / 3.
  # Image 2 is normal and ignored. Mean: (1/2 + 1/3) / 2 = 5/12.
  result = pixel_metrics.iou_at_threshold(maps, masks, labels, threshold=0.5)
  assert isinstance(result, float)
  assert result == pytest.approx(5 / 12, abs=1e-12)


def test_iou_empty_union_counts_as_zero():
  maps = np.full((2, 3, 3), 0.1)
  masks = np.zeros((2, 3, 3))
  masks[0, 0, 0] = 1
  maps[0, 0, 0] = 0.9
  # Image 0 has IoU 1; image 1 is labelled anomalous but P and G are empty.
  assert pixel_metrics.iou_at_threshold(maps, masks,
                                        [1, 1]) == pytest.approx(0.5)


def test_iou_without_anomalous_images_is_nan():
  maps = np.zeros((2, 3, 3))
  assert math.isnan(pixel_metrics.iou_at_threshold(maps, maps, [0, 0]))
  assert all(math.isnan(v) for v in pixel_metrics.best_iou(maps, maps, [0, 0]))


def test_bad_labels_raise():
  maps = np.zeros((2, 3, 3))
  with pytest.raises(ValueError, match='only 0'):
    pixel_metrics.iou_at_threshold(maps, maps, [0, 2])
  with pytest.raises(ValueError, match=r'shape \(2,\)'):
    pixel_metrics.iou_at_threshold(maps, maps, [0, 1, 1])


def test_best_iou_is_max_over_grid_and_beats_fixed_threshold():
  rng = np.random.default_rng(4)
  masks = np.zeros((6, 16, 16), dtype=bool)
  for index in range(4):
    y, x = rng.integers(0, 10, size=2)
    masks[index, y:y + 5, x:x + 6] = True
  labels = np.array([1, 1, 1, 1, 0, 0])
  maps = 0.6 * rng.random(masks.shape) + 0.4 * masks
  maps[5, 0, 0], maps[5, 0, 1] = 0.0, 1.0  # Grid range is exactly [0, 1].

  iou, threshold = pixel_metrics.best_iou(
      maps, masks, labels, num_thresholds=200)
  assert isinstance(iou, float) and isinstance(threshold, float)
  fixed = pixel_metrics.iou_at_threshold(maps, masks, labels, 0.5)
  assert iou >= fixed
  # The returned threshold reproduces the returned IoU ...
  assert pixel_metrics.iou_at_threshold(maps, masks, labels,
                                        threshold) == pytest.approx(
                                            iou, abs=1e-12)
  # ... which is the best over the grid plus 0.5.
  grid = np.append(np.linspace(0.0, 1.0, 200), 0.5)
  brute = max(
      pixel_metrics.iou_at_threshold(maps, masks, labels, t) for t in grid)
  assert iou == pytest.approx(brute, abs=1e-12)


def test_best_iou_equals_fixed_threshold_on_binary_maps():
  rng = np.random.default_rng(5)
  masks = rng.random((5, 10, 10)) < 0.3
  flips = rng.random(masks.shape) < 0.1
  maps = (masks ^ flips).astype(np.float64)
  labels = np.array([1, 1, 0, 1, 0])
  iou, _ = pixel_metrics.best_iou(maps, masks, labels)
  assert iou == pytest.approx(
      pixel_metrics.iou_at_threshold(maps, masks, labels, 0.5), abs=1e-12)


# ---------------------------------------------------------------------------
# F1.
# ---------------------------------------------------------------------------


def test_pixel_f1_max_matches_brute_force():
  masks = _blob_masks()
  maps = _noisy_maps(masks, seed=6)
  targets, scores = masks.ravel(), maps.ravel()
  best = 0.0
  for threshold in np.unique(scores):
    pred = scores >= threshold
    tp = np.sum(pred & targets)
    fp = np.sum(pred & ~targets)
    fn = np.sum(~pred & targets)
    best = max(best, 2 * tp / (2 * tp + fp + fn))
  result = pixel_metrics.pixel_f1_max(maps, masks)
  assert isinstance(result, float)
  assert result == pytest.approx(best, abs=1e-12)


def test_pixel_f1_max_without_anomalous_pixels_raises():
  with pytest.raises(ValueError, match='no anomalous pixel'):
    pixel_metrics.pixel_f1_max(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)))


# ---------------------------------------------------------------------------
# AUPRO.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [7, 8])
@pytest.mark.parametrize('max_fpr', [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, max_fpr):
  masks = _blob_masks()
  maps = _noisy_maps(masks, seed)
  result = pixel_metrics.aupro(maps, masks, max_fpr=max_fpr)
  assert isinstance(result, float)
  assert result == pytest.approx(
      _brute_force_aupro(maps.astype(np.float64), masks, max_fpr), abs=1e-6)


def test_aupro_matches_brute_force_without_ties():
  masks = _blob_masks()
  maps = np.random.default_rng(9).random(masks.shape) + 0.3 * masks
  assert pixel_metrics.aupro(maps, masks) == pytest.approx(
      _brute_force_aupro(maps, masks, 0.3), abs=1e-6)


@pytest.mark.parametrize('normal_pixels_allowed', [1, 29, 57, 173, 300])
def test_aupro_at_an_fpr_limit_on_a_pixel_count(normal_pixels_allowed):
  # The curve is cut just past max_fpr; a limit that is a whole number of
  # normal pixels (rounding either way in max_fpr * Q) must still integrate
  # to the last point and interpolate into the next one.
  masks = _blob_masks()
  maps = _noisy_maps(masks, seed=12)
  max_fpr = normal_pixels_allowed / np.count_nonzero(~masks)
  assert pixel_metrics.aupro(
      maps, masks, max_fpr=max_fpr) == pytest.approx(
          _brute_force_aupro(maps.astype(np.float64), masks, max_fpr), abs=1e-9)


def test_pixel_metrics_with_ties_match_sklearn():
  rng = np.random.default_rng(13)
  masks = rng.random((5, 16, 16)) < 0.15
  maps = rng.integers(
      0, 6, size=masks.shape) + 2 * masks * rng.integers(
          0, 2, size=masks.shape)
  precision, recall, _ = sk_metrics.precision_recall_curve(
      masks.ravel(), maps.ravel())
  f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
  result = pixel_metrics.localization_metrics(maps, masks, np.ones(5))
  assert result['pixel_f1_max'] == pytest.approx(np.max(f1), abs=1e-12)
  assert result['pixel_auroc'] == pytest.approx(
      sk_metrics.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_aupro_uses_8_connectivity():
  # The single pixel at (0, 0) touches the 3-pixel blob diagonally.
  masks = np.zeros((1, 4, 4), dtype=bool)
  masks[0, 0, 0] = True
  masks[0, 1, 1] = masks[0, 1, 2] = masks[0, 2, 1] = True
  maps = np.zeros((1, 4, 4))
  maps[0, 0, 0] = 1.0
  # One 4-pixel region: curve (0, 0), (0, 1/4), (1, 1). PRO at FPR 0.3 is
  # 1/4 + 3/4 * 0.3 = 0.475, area 0.3 * (0.25 + 0.475) / 2 = 0.10875, and
  # normalised 0.3625. (Two 4-connected regions would give 0.575.)
  assert pixel_metrics.aupro(maps, masks) == pytest.approx(0.3625, abs=1e-12)


def test_aupro_perfect_map_is_one():
  masks = _blob_masks()
  assert pixel_metrics.aupro(masks.astype(np.float32),
                             masks) == pytest.approx(1.0)


def test_aupro_constant_map_is_diagonal():
  # All pixels tie, so the curve is (0, 0) -> (1, 1): area max_fpr**2 / 2,
  # normalised max_fpr / 2.
  masks = _blob_masks()
  maps = np.full(masks.shape, 0.7)
  assert pixel_metrics.aupro(maps, masks, max_fpr=0.3) == pytest.approx(0.15)
  assert pixel_metrics.aupro(maps, masks, max_fpr=1.0) == pytest.approx(0.5)


def test_aupro_random_map_is_near_diagonal():
  # A map independent of the masks has PRO(t) ~= FPR(t) in expectation.
  rng = np.random.default_rng(10)
  masks = np.zeros((20, 64, 64), dtype=bool)
  for index in range(15):
    for _ in range(3):
      y, x = rng.integers(0, 50, size=2)
      masks[index, y:y + rng.integers(3, 14), x:x + rng.integers(3, 14)] = True
  maps = rng.random(masks.shape)
  assert pixel_metrics.aupro(maps, masks) == pytest.approx(0.15, abs=0.02)


def test_aupro_undefined_cases_raise():
  maps = np.random.default_rng(11).random((2, 4, 4))
  with pytest.raises(ValueError, match='no anomalous region'):
    pixel_metrics.aupro(maps, np.zeros((2, 4, 4)))
  with pytest.raises(ValueError, match='no normal pixel'):
    pixel_metrics.aupro(maps, np.ones((2, 4, 4)))
  with pytest.raises(ValueError, match='max_fpr'):
    pixel_metrics.aupro(maps, np.eye(4)[None].repeat(2, 0), max_fpr=0.0)


# ---------------------------------------------------------------------------
# Detection accuracy.
# ---------------------------------------------------------------------------


def test_detection_accuracy_hand_computed():
  # Normalised scores [0, 0.1, 0.2, 1] -> predictions [0, 0, 0, 1] against
  # labels [0, 0, 1, 1]: 3 of 4 correct.
  result = image_metrics.detection_accuracy([0.0, 1.0, 2.0, 10.0], [0, 0, 1, 1])
  assert isinstance(result, float)
  assert result == pytest.approx(0.75)
  # A lower threshold also flags the score 2 (normalised 0.2 > 0.15).
  assert image_metrics.detection_accuracy([0.0, 1.0, 2.0, 10.0], [0, 0, 1, 1],
                                          threshold=0.15) == pytest.approx(1.0)


def test_detection_accuracy_constant_scores_predict_normal():
  assert image_metrics.detection_accuracy([3.0, 3.0, 3.0, 3.0],
                                          [0, 1, 0, 0]) == pytest.approx(0.75)


# ---------------------------------------------------------------------------
# Gatherers.
# ---------------------------------------------------------------------------


def test_localization_metrics_keys_and_values():
  masks = _blob_masks()
  maps = _noisy_maps(masks, seed=12)
  labels = np.array([1, 1, 1, 0])
  result = pixel_metrics.localization_metrics(maps, masks, labels)
  assert set(result) == _LOCALIZATION_KEYS
  assert all(type(v) is float for v in result.values())
  assert not any(math.isnan(v) for v in result.values())
  assert result['aupro'] == pytest.approx(pixel_metrics.aupro(maps, masks))
  assert result['iou'] == pytest.approx(
      pixel_metrics.iou_at_threshold(maps, masks, labels))
  assert result['iou_best'] >= result['iou']


def test_localization_metrics_normal_only_gives_nan(caplog):
  maps = np.random.default_rng(13).random((3, 5, 5))
  masks = np.zeros((3, 5, 5), dtype=bool)
  result = pixel_metrics.localization_metrics(maps, masks, [0, 0, 0])
  assert set(result) == _LOCALIZATION_KEYS
  assert all(type(v) is float and math.isnan(v) for v in result.values())
  assert 'pixel_auroc' in caplog.text and 'aupro' in caplog.text
  assert 'iou' in caplog.text


def test_localization_metrics_malformed_input_raises():
  with pytest.raises(ValueError, match='same shape'):
    pixel_metrics.localization_metrics(
        np.zeros((2, 4, 4)), np.zeros((2, 4, 3)), [0, 1])


def test_detection_metrics_keys_and_values(caplog):
  result = image_metrics.detection_metrics([0.0, 1.0, 2.0, 10.0], [0, 0, 1, 1])
  assert set(result) == _DETECTION_KEYS
  assert all(type(v) is float for v in result.values())
  assert result['image_auroc'] == pytest.approx(1.0)
  assert result['detection_accuracy_minmax'] == pytest.approx(0.75)

  one_class = image_metrics.detection_metrics([0.1, 0.5, 0.9], [0, 0, 0])
  assert math.isnan(one_class['image_auroc'])
  assert one_class['detection_accuracy_minmax'] == pytest.approx(2 / 3)
  assert 'image_auroc' in caplog.text


def test_metrics_speed_benchmark_runs_and_scores_like_sklearn(
    monkeypatch, capsys):
  script = load_script('benchmarks/metrics_speed.py')
  monkeypatch.setattr(
      sys, 'argv',
      ['metrics_speed.py', '--images', '8', '--size', '32', '--repeats', '1'])
  script.main()
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line['map'] for line in lines] == ['continuous', 'tied']
  masks, _, maps = script.synthetic_category(8, 32)
  for line in lines:
    assert line['pixel_auroc'] == pytest.approx(
        sk_metrics.roc_auc_score(masks.ravel(), maps[line['map']].ravel()),
        abs=1e-12)
