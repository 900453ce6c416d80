"""PNG panels: image | reconstruction | heatmap overlays | ground-truth mask,
the per-latent-unit attention rows of the VAE explanations, and the plot of
the learning curves."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib
from matplotlib import figure
import numpy as np
from PIL import Image
from PIL import ImageDraw

_LABEL_HEIGHT = 12


def jet(values: np.ndarray) -> np.ndarray:
  """Jet colour map: (...) floats in [0, 1] -> (..., 3) uint8 (blue=0, red=1)."""
  v = np.clip(values, 0.0, 1.0)[..., None]
  rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
  return (rgb * 255).round().astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, C) or (H, W) uint8 -> (H, W, 3) uint8."""
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def panel(image: np.ndarray, reconstruction: np.ndarray,
          anomaly_maps: Mapping[str, np.ndarray], mask: np.ndarray,
          min_tile: int = 128, alpha: float = 0.5) -> np.ndarray:
  """One labelled row: image | reconstruction | each map over the image | mask.

  Args:
    image, reconstruction: (S, S, C) uint8.
    anomaly_maps: name -> (S, S) float map in [0, 1] (e.g. ``1 - A``); one
      overlay tile each, in this order.
    mask: (S, S) bool ground truth.
    min_tile: tiles smaller than this are enlarged (nearest) to be visible.
    alpha: heatmap opacity over the image.

  Returns:
    (12 + S', (3 + len(anomaly_maps)) * S', 3) uint8: a strip with the tile
    names above the tiles.
  """
  image = _rgb(image)
  overlays = [((1 - alpha) * image + alpha * jet(m)).round().astype(np.uint8)
              for m in anomaly_maps.values()]
  tiles = ([image, _rgb(reconstruction)] + overlays
           + [_rgb(mask.astype(np.uint8) * 255)])
  names = ['image', 'reconstruction', *anomaly_maps, 'mask']
  row = np.concatenate(tiles, axis=1)
  scale = max(1, -(-min_tile // image.shape[0]))
  row = np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)
  tile = image.shape[1] * scale
  strip = Image.new('RGB', (row.shape[1], _LABEL_HEIGHT), 'white')
  draw = ImageDraw.Draw(strip)
  for i, name in enumerate(names):
    draw.text((i * tile + 2, 0), name, fill='black')
  return np.concatenate([np.asarray(strip), row], axis=0)


def save_panel(path: str, *args, **kwargs) -> None:
  """Writes ``panel(*args, **kwargs)`` as a PNG at ``path``."""
  Image.fromarray(panel(*args, **kwargs)).save(path)


def synthetic_panel(images: np.ndarray, synthetic: np.ndarray,
                    masks: np.ndarray, min_tile: int = 96) -> np.ndarray:
  """Rows of clean image | synthetic anomaly | its mask.

  Args:
    images, synthetic: (N, S, S, C) uint8.
    masks: (N, S, S) bool.
    min_tile: tiles smaller than this are enlarged (nearest).

  Returns:
    (N * S', 3 * S', 3) uint8.
  """
  rows = [np.concatenate([_rgb(x), _rgb(y), _rgb(m.astype(np.uint8) * 255)],
                         axis=1) for x, y, m in zip(images, synthetic, masks)]
  grid = np.concatenate(rows, axis=0)
  scale = max(1, -(-min_tile // images.shape[1]))
  return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def save_synthetic_panel(path: str, *args, **kwargs) -> None:
  """Writes ``synthetic_panel(*args, **kwargs)`` as a PNG at ``path``."""
  Image.fromarray(synthetic_panel(*args, **kwargs)).save(path)


def unit_panel(image: np.ndarray, reconstruction: np.ndarray,
               unit_maps: np.ndarray, min_tile: int = 64) -> np.ndarray:
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
  tiles = [_rgb(image), _rgb(reconstruction)] + [jet(m) for m in maps]
  row = np.concatenate(tiles, axis=1)
  scale = max(1, -(-min_tile // size))
  return np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)


def save_unit_panel(path: str, *args, **kwargs) -> None:
  """Writes ``unit_panel(*args, **kwargs)`` as a PNG at ``path``."""
  Image.fromarray(unit_panel(*args, **kwargs)).save(path)


CURVE_METRICS = ('pixel_auroc', 'aupro', 'iou', 'image_auroc')


def plot_curves(path: str, records: Sequence[Mapping[str, Any]],
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
      values = [r['maps'].get(name, {}).get(metric, float('nan'))
                for r in records]
      style = ('--' if name == 'prior'
               else ':' if name.endswith('_calibrated') else '-')
      ax.plot(steps, values, marker='.', label=name, linestyle=style,
              color=colours[i % len(colours)])
    ax.set_title(metric)
    ax.set_xlabel('training step')
    ax.grid(alpha=0.3)
  if names:
    axes[0][-1].legend(fontsize=7, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
