"""Training's pictures, as PNG files: the synthetic anomalies of a batch
(``synthetic_panel``), the VAE's per-latent-unit attention rows
(``unit_panel``) and the learning curves of every map (``plot_curves``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib
from matplotlib import figure
import numpy as np
from PIL import Image

from cavga_jax.evaluation import visualize


def synthetic_panel(images: np.ndarray,
                    synthetic: np.ndarray,
                    masks: np.ndarray,
                    min_tile: int = 96) -> np.ndarray:
  """Rows of clean image | synthetic anomaly | its mask.

  Args:
    images, synthetic: (N, S, S, C) uint8.
    masks: (N, S, S) bool.
    min_tile: tiles smaller than this are enlarged (nearest).

  Returns:
    (N * S', 3 * S', 3) uint8.
  """
  rows = [
      np.concatenate([
          visualize.rgb(x),
          visualize.rgb(y),
          visualize.rgb(m.astype(np.uint8) * 255)
      ],
                     axis=1) for x, y, m in zip(images, synthetic, masks)
  ]
  return visualize.enlarge(
      np.concatenate(rows, axis=0),
      visualize.scale_to(images.shape[1:], min_tile))


def save_synthetic_panel(path: str, *args, **kwargs) -> None:
  """Writes ``synthetic_panel(*args, **kwargs)`` as a PNG at ``path``."""
  Image.fromarray(synthetic_panel(*args, **kwargs)).save(path)


def unit_panel(image: np.ndarray,
               reconstruction: np.ndarray,
               unit_maps: np.ndarray,
               min_tile: int = 64) -> np.ndarray:
  """Image, reconstruction and one heatmap per latent unit in a row.

  Args:
    image, reconstruction: (S, S, C) uint8.
    unit_maps: (U, h, w) floats in [0, 1] (``explain.UnitAttention.units``);
      each is enlarged (nearest) to S x S.
    min_tile: tiles smaller than this are enlarged (nearest) to be visible.

  Returns:
    (S', (U + 2) * S', 3) uint8.
  """
  size = image.shape[0]
  scale_map = size // unit_maps.shape[1]
  maps = np.repeat(np.repeat(unit_maps, scale_map, axis=1), scale_map, axis=2)
  tiles = ([visualize.rgb(image),
            visualize.rgb(reconstruction)] + [visualize.jet(m) for m in maps])
  return visualize.enlarge(
      np.concatenate(tiles, axis=1), visualize.scale_to((size, size), min_tile))


def save_unit_panel(path: str, *args, **kwargs) -> None:
  """Writes ``unit_panel(*args, **kwargs)`` as a PNG at ``path``."""
  Image.fromarray(unit_panel(*args, **kwargs)).save(path)


CURVE_METRICS = ('pixel_auroc', 'aupro', 'iou', 'image_auroc')


def plot_curves(path: str,
                records: Sequence[Mapping[str, Any]],
                metric_names: Sequence[str] = CURVE_METRICS) -> None:
  """Writes the learning curves of every map as a PNG (one panel per metric).

  Args:
    path: the PNG to write.
    records: ``eval_curve.jsonl`` lines, ``{'step': int, 'maps': {name:
      {metric: value}}}``, in step order.
    metric_names: the metrics to plot, one subplot each.
  """
  steps = [r['step'] for r in records]
  names = list(records[-1]['maps']) if records else []
  # A Figure without pyplot: no global backend state for library users.
  fig = figure.Figure(figsize=(4 * len(metric_names), 3.4))
  axes = fig.subplots(1, len(metric_names), squeeze=False)
  # tab20: a distinct colour for each of up to 20 maps (the default cycle
  # repeats after 10); calibrated maps are dotted, the prior dashed.
  colours = matplotlib.colormaps['tab20'].colors
  for ax, metric in zip(axes[0], metric_names):
    for i, name in enumerate(names):
      values = [
          r['maps'].get(name, {}).get(metric, float('nan')) for r in records
      ]
      style = ('--' if name == 'prior' else
               ':' if name.endswith('_calibrated') else '-')
      ax.plot(
          steps,
          values,
          marker='.',
          label=name,
          linestyle=style,
          color=colours[i % len(colours)])
    ax.set_title(metric)
    ax.set_xlabel('training step')
    ax.grid(alpha=0.3)
  if names:
    axes[0][-1].legend(fontsize=7, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
