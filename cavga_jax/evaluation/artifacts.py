"""What an evaluation writes: metrics.json, scores.csv, panels, report, curve.

Panels lead with the headline map (``visualize.headline_panel``: image |
reconstruction | headline map over the image with its colour bar and the
held-out pixel threshold's contour | the prediction at that threshold |
ground truth); every other map goes to a separate grid per image
(``visualize.map_grid``). ``report.html`` is one static page over them.
Only process 0 writes (every process holds the same gathered predictions).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from cavga_jax import data
from cavga_jax import sharding
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import report
from cavga_jax.evaluation import visualize
from cavga_jax.training import training_pictures

CURVE_FILE = 'eval_curve.jsonl'


def threshold_display_range(thresholds: Sequence[float]) -> tuple[float, float]:
  """(low, high) of a map's colour scale from its held-out thresholds.

  ``thresholds``: (pixel threshold t, image threshold, median m of normal
  pixels); the scale is (m, 2 t - m), so the threshold sits mid-scale
  whatever the map's units.
  """
  threshold, median = thresholds[0], thresholds[2]
  return median, max(2.0 * threshold - median, median + 1e-6)


def value_display_range(values: np.ndarray) -> tuple[float, float]:
  """(low, high) of a map's colour scale from its values (any shape): the
  minimum and the 99.9th percentile, so a few extreme pixels do not darken
  every picture."""
  low, high = float(values.min()), float(np.percentile(values, 99.9))
  return low, max(high, low + 1e-6)


def display_maps(maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every map in [0, 1] for the grids: unbounded maps scaled by
  ``value_display_range`` over all images, clipped."""
  shown = {}
  for name, values in maps.items():
    if not registry.spec(name).bounded:
      low, high = value_display_range(values)
      values = np.clip((values - low) / (high - low), 0.0, 1.0)
    shown[name] = values
  return shown


def panel_indices(num_examples: int, num_panels: int) -> np.ndarray:
  """Evenly spaced test indices, so panels show normal and every defect type."""
  num_panels = min(num_panels, num_examples)
  return np.unique(
      np.linspace(0, num_examples - 1,
                  num_panels).round().astype(int)) if num_panels else np.zeros(
                      0, int)


def write_scores_csv(path: str, dataset: data.AnomalyDataset,
                     columns: dict[str, np.ndarray]) -> None:
  """One row per test image: path, label, defect type and ``columns``."""
  with open(path, 'w') as f:
    f.write(','.join(['path', 'label', 'defect_type', *columns]) + '\n')
    for i, (path_i, label, defect) in enumerate(
        zip(dataset.paths, dataset.labels, dataset.defect_types)):
      values = ','.join(f'{v[i]:.6g}' for v in columns.values())
      f.write(f'{path_i},{label},{defect},{values}\n')


def write_outputs(out_dir: str,
                  result: dict[str, Any],
                  predictions: dict[str, Any],
                  dataset: data.AnomalyDataset,
                  num_panels: int,
                  thresholds: dict[str, tuple[float, ...]] | None = None,
                  curve_image: str | None = None) -> None:
  """metrics.json, scores.csv, panels/, overlays/, report.html in ``out_dir``.

  scores.csv has ``s_a`` ('score'), each map's image score ('score_<map>')
  and, for CAVGA_w, 'p_anomalous'. Panels are drawn for ``num_panels``
  evenly spaced test images (``panel_indices``), the headline map over the
  image (overlays/) for the others; the report lists them all, sorted by
  the headline map's image score. VAE predictions without 'maps' show
  their 'anomaly_map' alone. ``curve_image``: the learning
  curve's PNG, linked from the report when it exists.
  """
  if not sharding.is_primary_process():
    return
  panel_dir = os.path.join(out_dir, 'panels')
  os.makedirs(panel_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  columns = {'score': predictions['score']}
  columns.update({
      f'score_{name}': values
      for name, values in predictions.get('map_scores', {}).items()
  })
  if 'p_anomalous' in predictions:
    columns['p_anomalous'] = predictions['p_anomalous']
  write_scores_csv(os.path.join(out_dir, 'scores.csv'), dataset, columns)

  headline = result.get('map')
  maps = predictions.get('maps') or {'anomaly_map': predictions['anomaly_map']}
  if headline not in maps:
    headline = next(iter(maps))
  values = maps[headline]
  threshold = (thresholds or {}).get(headline)
  low, high = (
      threshold_display_range(threshold)
      if threshold else value_display_range(values))
  image_scores = predictions.get('map_scores', {}).get(headline,
                                                       predictions['score'])
  others = display_maps({k: v for k, v in maps.items() if k != headline})
  pixel_threshold = threshold[0] if threshold else (low + high) / 2
  panels = set(panel_indices(dataset.num_examples, num_panels).tolist())
  rows = []
  for i in range(dataset.num_examples):
    stem = (f'{i:04d}_{dataset.defect_types[i]}_'
            f'{os.path.splitext(os.path.basename(dataset.paths[i]))[0]}')
    if i in panels:
      name = os.path.join('panels', stem + '.png')
      visualize.save_png(
          os.path.join(out_dir, name),
          visualize.headline_panel(
              dataset.images[i],
              predictions['reconstruction'][i],
              values[i],
              low,
              high,
              pixel_threshold,
              dataset.masks[i],
              title=f'{dataset.paths[i]} ({dataset.defect_types[i]})',
              map_name=headline))
      if others:
        visualize.save_png(
            os.path.join(panel_dir, stem + '_maps.png'),
            visualize.map_grid(dataset.images[i],
                               {k: v[i] for k, v in others.items()}))
    else:
      # The report shows every test image: the others as the headline map
      # over the image.
      name = os.path.join('overlays', stem + '.png')
      visualize.save_png(
          os.path.join(out_dir, name),
          visualize.overlay(dataset.images[i], values[i], low, high,
                            pixel_threshold))
    rows.append(
        dict(
            image=name,
            path=dataset.paths[i],
            defect_type=dataset.defect_types[i],
            label=int(dataset.labels[i]),
            score=float(image_scores[i])))
  report.write_report(
      os.path.join(out_dir, 'report.html'), result, rows, curve_image)
  logging.info(
      'wrote %s (metrics.json, scores.csv, %d panels, report.html '
      'of %d images)', out_dir, len(panels), len(rows))


def curve_record(step: int, result: dict[str, Any]) -> dict[str, Any]:
  """One line of ``eval_curve.jsonl``: the step and every map's metrics."""
  return dict(
      step=step,
      image_auroc_reconstruction=result['image_auroc_reconstruction'],
      maps=result['maps'])


def append_curve_point(path: str, record: dict[str, Any]) -> None:
  """Appends a ``curve_record`` to ``path`` and replots ``<path stem>.png``."""
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')
  with open(path) as f:
    records = [json.loads(line) for line in f]
  training_pictures.plot_curves(os.path.splitext(path)[0] + '.png', records)
  summary = ', '.join(
      f'{name} {values["pixel_auroc"]:.3f}/{values["aupro"]:.3f}'
      for name, values in record['maps'].items())
  logging.info('eval at step %d (pixel AUROC / AU-PRO): %s', record['step'],
               summary)
