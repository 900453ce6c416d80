"""PNG panels: image | reconstruction | heatmap overlay | ground-truth mask,
and the per-latent-unit attention rows of the VAE explanations."""

from __future__ import annotations

import numpy as np
from PIL import Image


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
          anomaly_map: np.ndarray, mask: np.ndarray,
          min_tile: int = 128, alpha: float = 0.5) -> np.ndarray:
  """One row of four tiles, (S', 4*S', 3) uint8.

  Args:
    image, reconstruction: (S, S, C) uint8.
    anomaly_map: (S, S) float in [0, 1] (the localization map 1 - A).
    mask: (S, S) bool ground truth.
    min_tile: tiles smaller than this are enlarged (nearest) to be visible.
    alpha: heatmap opacity over the image.
  """
  image = _rgb(image)
  overlay = ((1 - alpha) * image + alpha * jet(anomaly_map)).round()
  tiles = [image, _rgb(reconstruction), overlay.astype(np.uint8),
           _rgb(mask.astype(np.uint8) * 255)]
  row = np.concatenate(tiles, axis=1)
  scale = max(1, -(-min_tile // image.shape[0]))
  return np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)


def save_panel(path: str, *args, **kwargs) -> None:
  """Writes ``panel(*args, **kwargs)`` as a PNG at ``path``."""
  Image.fromarray(panel(*args, **kwargs)).save(path)


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
