"""Seconds to score one anomaly map of a whole category, as JSON lines.

  python benchmarks/metrics_speed.py [--images 83] [--size 256] [--repeats 3]

Evaluation scores a dozen maps per category, each with every pixel metric
(`pixel_metrics.localization_metrics`: pixel AUROC, IoU at 0.5, best IoU,
best F1, AU-PRO), so these must not dominate an evaluation. Synthetic test
set of MVTec bottle's shape (83 images at 256 px, 63 with one rectangular
defect); two kinds of map: ``continuous`` (Gaussian noise plus 1 on the
defects: every value distinct, the worst case for the sorts) and ``tied``
(the same, quantised to 256 levels like a uint8 map). Prints one JSON line
per kind with the median and all times of ``--repeats`` calls.
"""

import argparse
import datetime
import json
import platform
import statistics
import time

import numpy as np

from cavga_jax.metrics import pixel_metrics


def synthetic_category(num_images: int, size: int, seed: int = 0):
  """(masks (N, S, S) bool, labels (N,), continuous and tied maps)."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((num_images, size, size), bool)
  labels = np.zeros(num_images, int)
  num_normal = num_images // 4
  labels[num_normal:] = 1
  for index in range(num_normal, num_images):
    y, x = rng.integers(0, size * 3 // 4, 2)
    masks[index, y:y + size // 8, x:x + size // 12] = True
  continuous = (rng.normal(size=masks.shape) + masks).astype(np.float32)
  low, high = continuous.min(), continuous.max()
  tied = np.round((continuous - low) / (high - low) * 255).astype(np.float32)
  return masks, labels, {'continuous': continuous, 'tied': tied}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=83)
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  masks, labels, maps = synthetic_category(args.images, args.size)
  for kind, anomaly_map in maps.items():
    times = []
    for _ in range(args.repeats):
      tic = time.perf_counter()
      result = pixel_metrics.localization_metrics(anomaly_map, masks, labels)
      times.append(time.perf_counter() - tic)
    print(
        json.dumps(
            dict(
                benchmark='localization_metrics',
                map=kind,
                images=args.images,
                size=args.size,
                seconds_median=round(statistics.median(times), 3),
                seconds_all=[round(t, 3) for t in times],
                pixel_auroc=result['pixel_auroc'],
                aupro=result['aupro'],
                machine=platform.processor() or platform.machine(),
                date=datetime.date.today().isoformat())))


if __name__ == '__main__':
  main()
