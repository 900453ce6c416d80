"""What an evaluation shows a person, as PNG pictures: one map over its
image with a colour bar (``overlay``), the labelled headline row
(``headline_panel``), every map (``map_grid``). Training's pictures (the
synthetic examples, the VAE's unit rows, the learning curves) are in
``training_pictures``."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont


def jet(values: np.ndarray) -> np.ndarray:
  """Jet colour map: (...) floats in [0, 1] -> (..., 3) uint8, 0 blue, 1 red."""
  v = np.clip(values, 0.0, 1.0)[..., None]
  rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
  return (rgb * 255).round().astype(np.uint8)


def rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, C) or (H, W) uint8 -> (H, W, 3) uint8."""
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def enlarge(array: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour enlargement of the two leading axes by ``scale``."""
  if scale == 1:
    return array  # no copy: a large overlay holds few full-size arrays
  return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def scale_to(shape: Sequence[int], min_size: int) -> int:
  """The integer factor taking the shorter of ``shape[:2]`` to ``min_size``."""
  return max(1, -(-min_size // max(1, min(shape[:2]))))


# Pictures a person reads: titles sized to their tiles, a colour bar per map.

_GAP = 4  # white pixels between tiles: a title never runs into its neighbour
_MEASURE = ImageDraw.Draw(Image.new('RGB', (1, 1)))


def _font(size: int) -> Any:
  """PIL's default font at ``size`` px (fixed bitmap font without FreeType)."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
    return ImageFont.load_default()


def _font_size(height: int) -> int:
  """Label size for a tile ``height`` px tall: 10 px up to ~250, 28 at 700+."""
  return int(np.clip(round(height / 24), 10, 28))


def _right(text: str, font: Any) -> int:  # where text drawn at x = 0 ends
  return _MEASURE.textbbox((0, 0), text, font=font)[2]


def _line_height(font: Any) -> int:  # a text line with 3 px of air
  return _MEASURE.textbbox((0, 0), 'Ag|', font=font)[3] + 3


def fit_label(text: str, width: int, size: int) -> tuple[str, Any]:
  """``(text', font)`` whose rendering at x = 0 ends at or before ``width``.

  Shrinks the font from ``size`` down to 8 px, then cuts the middle of the
  text ('residual..calibrated'): names of maps differ at both ends.
  """
  for s in range(size, 7, -1):  # below 8 px the font is no longer legible
    font = _font(s)
    if _right(text, font) <= width:
      return text, font
  for n in range(len(text) - 1, 0, -1):
    cut = text[:(n + 1) // 2] + '..' + text[len(text) - n // 2:]
    if _right(cut, font) <= width:
      return cut, font
  return '', font


def contour(mask: np.ndarray) -> np.ndarray:
  """(H, W) bool -> (H, W) bool: pixels of ``mask`` with a 4-neighbour off it
  (the picture's edge is no boundary: a region there stays open)."""
  p = np.pad(mask, 1, mode='edge')
  inside = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~inside


def resize(array: np.ndarray,
           shape: Sequence[int],
           resample: int = Image.BILINEAR) -> np.ndarray:
  """(h, w[, 3]) uint8, float or bool -> (H, W[, 3]); bool masks nearest."""
  if array.shape[:2] == tuple(shape[:2]):
    return array
  if array.dtype == bool:
    return resize(array.astype(np.uint8) * 255, shape, Image.NEAREST) > 127
  array = array if array.dtype == np.uint8 else array.astype(np.float32)
  return np.asarray(Image.fromarray(array).resize(shape[1::-1], resample))


def _blend(image: np.ndarray,
           unit: np.ndarray,
           alpha: float,
           rows: int = 256) -> np.ndarray:
  """(H, W, 3) uint8 and (H, W) values in [0, 1] -> (H, W, 3) uint8.

  ``rows`` at a time: the float64 temporaries of a whole large image
  would take about 100 bytes a pixel.
  """
  out = np.empty(image.shape[:2] + (3,), np.uint8)
  for top in range(0, image.shape[0], rows):
    part = slice(top, top + rows)
    mixed = ((1 - alpha) * image[part]
             + alpha * jet(np.nan_to_num(unit[part], nan=0.0)))
    out[part] = mixed.round().astype(np.uint8)
  return out


def colour_bar(height: int,
               low: float,
               high: float,
               threshold: float | None = None,
               size: int | None = None) -> np.ndarray:
  """(height, W, 3) uint8: jet from ``low`` (bottom) to ``high`` (top), the
  threshold a white line across it (the contour's colour in ``overlay``)."""
  size = size or _font_size(height)
  font, bar, x0 = _font(size), max(16, int(1.5 * size)), 6  # x0: white gap
  line = _line_height(font)
  top, bottom = line // 2 + 1, height - line // 2 - 2  # room for end labels
  span = high - low if high > low else 1.0
  marks = [(high, f'{high:.3g}'), (low, f'{low:.3g}')]
  if threshold is not None:
    marks.append((threshold, f'thr {threshold:.3g}'))
  ys = [
      int(round(top + np.clip((high - v) / span, 0, 1) * (bottom - top)))
      for v, _ in marks
  ]
  width = x0 + bar + 9 + max(_right(text, font) for _, text in marks)
  canvas = Image.new('RGB', (width, height), 'white')
  ramp = jet(np.linspace(1.0, 0.0, bottom - top + 1))[:, None, :]
  canvas.paste(Image.fromarray(np.repeat(ramp, bar, axis=1)), (x0, top))
  draw = ImageDraw.Draw(canvas)
  draw.rectangle((x0 - 1, top - 1, x0 + bar, bottom + 1), outline='black')
  for i, ((_, text), y) in enumerate(zip(marks, ys)):
    if i == 2:  # the threshold: across the bar, its label clear of the ends
      draw.line((x0, y, x0 + bar - 1, y), fill='white', width=2)
    draw.line((x0 + bar, y, x0 + bar + 3, y), fill='black')
    text_y = y if i < 2 else int(np.clip(y, top + line, bottom - line))
    draw.text((x0 + bar + 5, text_y - line // 2), text, fill='black', font=font)
  return np.asarray(canvas)


def overlay(image: np.ndarray,
            values: np.ndarray,
            low: float,
            high: float,
            threshold: float | None = None,
            alpha: float = 0.5,
            min_size: int = 128) -> np.ndarray:
  """One map over its image, its threshold contour and a colour bar.

  Args:
    image: (H, W, C) uint8, C in {1, 3}.
    values: (H, W) float map, any range (resized bilinearly if (h, w)).
    low, high: the values coloured blue and red (``jet``); clipped outside.
    threshold: if given, the boundary of ``values > threshold`` is drawn in
      white (1 px; 2 px from 512 px on) and labelled on the colour bar.
    alpha, min_size: heatmap opacity; shorter sides below ``min_size`` are
      enlarged (nearest, integer s).

  Returns:
    (s * H, s * W + B, 3) uint8: the picture, then the colour bar B px wide.
  """
  image = rgb(np.asarray(image))
  values = resize(np.asarray(values, np.float32), image.shape)
  scale = scale_to(image.shape, min_size)
  image, values = enlarge(image, scale), enlarge(values, scale)
  span = high - low if high > low else 1.0
  out = _blend(image, (values - low) / span, alpha)
  if threshold is not None:
    mask = values > threshold
    thick = min(out.shape[:2]) >= 512  # the outer ring too: 2 px when big
    out[contour(mask) | (thick & contour(~mask))] = 255
  return np.concatenate(
      [out, colour_bar(out.shape[0], low, high, threshold)], axis=1)


def _grid(tiles: Sequence[tuple[str, np.ndarray]],
          columns: int,
          title: str,
          bar: np.ndarray | None = None) -> np.ndarray:
  """(name, (h, w, 3) uint8) tiles, names fitted above them -> (H, W, 3)."""
  columns = max(1, min(columns, len(tiles)))
  rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
  size = _font_size(max(t.shape[0] for _, t in tiles))
  label = _line_height(_font(size))
  widths = [
      max(t.shape[1] for _, t in tiles[c::columns]) for c in range(columns)
  ]
  heights = [label + max(t.shape[0] for _, t in row) for row in rows]
  head = _line_height(_font(size + 2)) if title else 0
  lefts = np.cumsum([0] + [w + _GAP for w in widths])
  width = int(lefts[-1]) - _GAP + (bar.shape[1] if bar is not None else 0)
  canvas = Image.new('RGB', (width, head + sum(heights) + _GAP *
                             (len(rows) - 1)), 'white')
  draw = ImageDraw.Draw(canvas)
  if title:
    text, font = fit_label(title, width - 4, size + 2)
    draw.text((2, 1), text, fill='black', font=font)
  y = head
  for row, height in zip(rows, heights):
    for (name, tile), x in zip(row, lefts):
      text, font = fit_label(name, tile.shape[1] - 4, size)
      draw.text((int(x) + 2, y + 1), text, fill='black', font=font)
      canvas.paste(Image.fromarray(tile), (int(x), y + label))
    y += height + _GAP
  if bar is not None:
    canvas.paste(Image.fromarray(bar), (int(lefts[-1]) - _GAP, head + label))
  return np.asarray(canvas)


def headline_panel(image: np.ndarray,
                   reconstruction: np.ndarray,
                   values: np.ndarray,
                   low: float,
                   high: float,
                   threshold: float,
                   ground_truth: np.ndarray | None = None,
                   title: str = '',
                   map_name: str = 'anomaly map',
                   min_tile: int = 128) -> np.ndarray:
  """One labelled row: image | reconstruction | map | prediction | truth.

  Args:
    image: (H, W, C) uint8, C in {1, 3}.
    reconstruction, values, ground_truth: (h, w, C) uint8, (h, w) float map
      in any range, (h, w) bool mask or None (no tile); resized to H x W.
    low, high: the map values coloured blue and red.
    threshold: pixels with ``values > threshold`` are predicted anomalous:
      outlined on the map tile, white on the prediction tile.
    title, map_name: a line above the row (the file, its score); the map
      tile's title.
    min_tile: shorter sides below this are enlarged (nearest, integer s).

  Returns:
    (T + L + s * H, (4 or 5) * (s * W + 4) - 4 + B, 3) uint8: the title line
    T (if any), column titles L, tiles 4 px apart; B: the map's colour bar.
  """
  image = rgb(np.asarray(image))
  shape = image.shape[:2]  # the original size every input is resized to
  reconstruction = resize(rgb(np.asarray(reconstruction)), shape)
  values = resize(np.asarray(values, np.float32), shape)
  scale = scale_to(shape, min_tile)
  image, values = enlarge(image, scale), enlarge(values, scale)
  tiles = [('image', image), ('reconstruction', enlarge(reconstruction, scale)),
           (map_name, overlay(image, values, low, high, threshold, min_size=1)),
           ('prediction', rgb((values > threshold).astype(np.uint8) * 255))]
  if ground_truth is not None:
    truth = enlarge(resize(np.asarray(ground_truth, bool), shape), scale)
    tiles.append(('ground truth', rgb(truth.astype(np.uint8) * 255)))
  return _grid(tiles, len(tiles), title)


def map_grid(image: np.ndarray,
             maps: Mapping[str, np.ndarray],
             columns: int = 4,
             title: str = '',
             alpha: float = 0.5,
             min_tile: int = 128) -> np.ndarray:
  """Every map over the image, its name above it, ``columns`` per row.

  Args:
    image: (H, W, C) uint8, C in {1, 3}.
    maps: name -> (h, w) float map in [0, 1] (resized to H x W), in order.
    columns, title, alpha: tiles per row, a line above, heatmap opacity.
    min_tile: as in ``headline_panel``.

  Returns:
    (T + R * (L + s * H + 4) - 4, min(columns, M) * (s * W + 4) - 4 + B, 3)
    uint8 for M maps in R rows; one 0-to-1 colour bar right of the first row.
  """
  image = rgb(np.asarray(image))
  scale = scale_to(image.shape, min_tile)
  big = enlarge(image, scale)
  tiles = [
      (name,
       _blend(big,
              enlarge(resize(np.asarray(m, np.float32), image.shape),
                      scale), alpha)) for name, m in maps.items()
  ]
  if not tiles:
    return big
  return _grid(tiles, columns, title, colour_bar(big.shape[0], 0.0, 1.0))


def save_png(path: str, array: np.ndarray) -> None:
  """Writes an (H, W, 3) or (H, W) uint8 array as a PNG, making its folder."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)
