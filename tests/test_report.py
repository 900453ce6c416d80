"""The pictures a person reads (visualize.overlay, headline_panel, map_grid)
and the static HTML report (evaluation.report)."""

import html.parser
import os
import re
import shutil
import subprocess
from urllib import parse

import numpy as np
from PIL import Image
from PIL import ImageDraw
import pytest

from cavga_jax.evaluation import report
from cavga_jax.evaluation import visualize

LONG_NAMES = ('residual_ssim_calibrated', 'combined_knn_ssim', 'attention',
              'prior_normal', 'feature_knn_calibrated')


def _blob(size: int, seed: int = 0) -> np.ndarray:
  """(size, size) float map: two bumps and noise, range about [-1, 3]."""
  yy, xx = np.mgrid[:size, :size] / size
  rng = np.random.default_rng(seed)
  bumps = (3 * np.exp(-((yy - 0.4)**2 + (xx - 0.3)**2) / 0.02)
           + 2 * np.exp(-((yy - 0.9)**2 + (xx - 1.0)**2) / 0.01))
  return (bumps + 0.3 * rng.standard_normal(
      (size, size)) - 0.5).astype(np.float32)


def _brute_force_boundary(mask: np.ndarray) -> np.ndarray:
  """Pixels of ``mask`` with a 4-neighbour inside the picture and off it."""
  height, width = mask.shape
  out = np.zeros_like(mask)
  for i in range(height):
    for j in range(width):
      if mask[i, j]:
        out[i, j] = any(
            0 <= i + di < height and 0 <= j + dj < width and not mask[i + di,
                                                                      j + dj]
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)))
  return out


# --- visualize --------------------------------------------------------------


@pytest.mark.parametrize('shape', [(32, 32, 1), (128, 128, 3), (70, 100, 3),
                                   (300, 200, 3)])
def test_overlay_shape_and_dtype(shape):
  image = np.full(shape, 90, np.uint8)
  out = visualize.overlay(
      image, _blob(1)[0, 0] + np.zeros(shape[:2]), -1.0, 3.0, threshold=1.0)
  scale = max(1, -(-128 // min(shape[:2])))
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
  assert out.shape[0] == shape[0] * scale
  assert out.shape[1] > shape[1] * scale  # the colour bar


@pytest.mark.parametrize('size,threshold', [(128, 1.0), (128, 0.0), (32, 0.5)])
def test_overlay_contour_is_exactly_the_boundary(size, threshold):
  # alpha 0 on a black image: the only white pixels are the contour.
  values = _blob(size)
  image = np.zeros((size, size, 3), np.uint8)
  out = visualize.overlay(
      image, values, -1.0, 3.0, threshold=threshold, alpha=0.0)
  scale = max(1, 128 // size)
  picture = out[:, :size * scale]
  mask = np.kron(values > threshold, np.ones((scale, scale), bool))
  expected = _brute_force_boundary(mask)
  assert expected.any() and not expected.all()
  np.testing.assert_array_equal(np.all(picture == 255, axis=-1), expected)
  np.testing.assert_array_equal(visualize.contour(mask), expected)


def test_overlay_contour_is_two_pixels_on_big_pictures():
  yy, xx = np.mgrid[:512, :600]
  values = -np.hypot(yy - 200, xx - 300)
  image = np.zeros((512, 600, 3), np.uint8)
  out = visualize.overlay(
      image, values, -400.0, 0.0, threshold=-100.0, alpha=0.0)
  mask = values > -100.0
  ring = visualize.contour(mask) | visualize.contour(~mask)
  np.testing.assert_array_equal(np.all(out[:, :600] == 255, axis=-1), ring)


def test_overlay_without_threshold_draws_no_contour_and_blends_jet():
  values = np.linspace(0, 1, 128 * 128).reshape(128, 128)
  image = np.zeros((128, 128, 3), np.uint8)
  out = visualize.overlay(image, values, 0.0, 1.0, alpha=1.0)
  np.testing.assert_allclose(out[:, :128], visualize.jet(values), atol=1)


def test_overlay_has_a_colour_bar():
  image = np.full((128, 128, 3), 128, np.uint8)
  out = visualize.overlay(image, _blob(128), -1.0, 3.0, threshold=1.0)
  bar = out[:, 128:]
  assert not np.all(bar == bar[0, 0])  # the right columns are not the image
  colours = {tuple(p) for p in bar.reshape(-1, 3)}
  # The ramp runs from jet(1) (dark red, top) to jet(0) (dark blue, bottom).
  assert tuple(visualize.jet(np.float32(1.0))) in colours
  assert tuple(visualize.jet(np.float32(0.0))) in colours
  # Labels: dark text pixels right of the ramp.
  assert (bar[:, 30:].max(axis=-1) < 80).sum() > 20


def test_fit_label_fits_or_cuts_the_middle():
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  for width in (40, 60, 124, 300):
    for name in LONG_NAMES:
      text, font = visualize.fit_label(name, width, 12)
      assert draw.textbbox((0, 0), text, font=font)[2] <= width, (name, width)
      assert text == name or '..' in text
  text, _ = visualize.fit_label('residual_ssim_calibrated', 60, 10)
  assert text.startswith('res') and text.endswith('ed') and '..' in text


def _assert_titles_inside_tiles(out, tile_widths, label_height):
  """Every gap between tiles is white top to bottom (no title crosses it),
  and each tile has a title (dark pixels above it)."""
  x = 0
  for width in tile_widths:
    strip = out[:label_height, x:x + width]
    assert (strip.max(axis=-1) < 100).any(), x  # a title is drawn
    gap = out[:, x + width:x + width + visualize._GAP]
    assert np.all(gap == 255), x
    x += width + visualize._GAP


def test_headline_panel_layout_and_titles():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  values = _blob(32)
  truth = values > 1.5
  out = visualize.headline_panel(
      image,
      image,
      values,
      -1.0,
      3.0,
      1.0,
      truth,
      title='test/crack/000.png  score 0.93')
  no_truth = visualize.headline_panel(image, image, values, -1.0, 3.0, 1.0)
  tile = 128  # 32 px enlarged 4x
  map_width = visualize.overlay(image, values, -1.0, 3.0, 1.0).shape[1]
  assert out.dtype == np.uint8 and out.shape[2] == 3
  assert out.shape[1] == 4 * tile + map_width + 4 * visualize._GAP
  assert no_truth.shape[1] == out.shape[1] - tile - visualize._GAP
  # The prediction tile is values > threshold, white on black.
  x = 2 * (tile + visualize._GAP) + map_width + visualize._GAP
  prediction = out[-tile:, x:x + tile, 0]
  np.testing.assert_array_equal(prediction,
                                np.kron(values > 1.0, np.ones((4, 4))) * 255)
  np.testing.assert_array_equal(out[-tile:, x + tile + visualize._GAP:, 0],
                                np.kron(truth, np.ones((4, 4))) * 255)
  # Column titles sit in the strip between the title line and the tiles.
  strip = out[:-tile]
  widths = [tile, tile, map_width, tile, tile]
  label = visualize._line_height(visualize._font(10))  # 10 px at 128 px
  head = strip.shape[0] - label  # the row title's line
  assert head > 0 and (strip[:head].max(axis=-1) < 100).any()
  assert no_truth.shape[0] == tile + label  # no title, no title line
  _assert_titles_inside_tiles(strip[head:], widths, label)


def test_headline_titles_fit_their_tiles_by_textbbox():
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  for name in ('image', 'reconstruction', 'prediction', 'ground truth',
               *LONG_NAMES):
    text, font = visualize.fit_label(name, 128 - 4, 10)
    left, _, right, _ = draw.textbbox((2, 0), text, font=font)
    assert 0 <= left and right <= 128, name


def test_map_grid_wraps_and_titles_do_not_overlap():
  image = np.full((16, 16, 3), 60, np.uint8)
  maps = {
      name: np.clip(_blob(16, i) / 3, 0, 1) for i, name in enumerate(LONG_NAMES)
  }
  out = visualize.map_grid(image, maps, columns=3, min_tile=64)
  bar = visualize.colour_bar(64, 0.0, 1.0).shape[1]
  assert out.dtype == np.uint8
  assert out.shape[1] == 3 * 64 + 2 * visualize._GAP + bar
  label = (out.shape[0] - 2 * 64 - visualize._GAP) // 2
  assert out.shape[0] == 2 * (label + 64) + visualize._GAP  # two rows
  _assert_titles_inside_tiles(out, [64, 64], label)
  second = out[label + 64 + visualize._GAP:]
  _assert_titles_inside_tiles(second, [64, 64], label)
  # The tiles are the blends of image and jet.
  first = out[label:label + 64, :64]
  expected = visualize._blend(
      np.full((64, 64, 3), 60, np.uint8),
      np.kron(maps[LONG_NAMES[0]], np.ones((4, 4))), 0.5)
  np.testing.assert_array_equal(first, expected)


def test_save_png_round_trips(tmp_path):
  array = np.random.default_rng(0).integers(0, 256, (9, 7, 3), np.uint8)
  path = str(tmp_path / 'sub' / 'x.png')
  visualize.save_png(path, array)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), array)


# --- report -----------------------------------------------------------------

METRICS = {
    'map': 'combined',
    'pixel_auroc': 0.95,
    'aupro': 0.8,
    'image_auroc': 0.9,
    'iou': 0.4,
    'checkpoint_step': 1200,
    'num_test_images': 6,
    'detection_accuracy_minmax': 0.83,
    'detection_accuracy_held_out': 0.8,
    'image_threshold_held_out': 0.51,
    'image_auroc_reconstruction': 0.75,
    'maps': {
        'attention': {
            'pixel_auroc': 0.85, 'aupro': 0.6, 'image_auroc': 0.7,
            'iou_held_out': 0.2
        },
        'prior': {'pixel_auroc': 0.6},
        'combined': {
            'pixel_auroc': 0.95, 'aupro': 0.8, 'image_auroc': 0.9,
            'iou_held_out': 0.4
        },
        'prior_normal': {'pixel_auroc': 0.7, 'aupro': 0.3},
        'residual_ssim_calibrated': {
            'pixel_auroc': 0.65, 'aupro': float('nan')
        },
    },
}


class _Page(html.parser.HTMLParser):
  """Collects the table rows, images, options and figure captions."""

  def __init__(self):
    super().__init__()
    self.rows, self.imgs, self.options, self.figures = [], [], [], []
    self._cell = self._row = self._caption = None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == 'tr':
      self._row = {'class': attrs.get('class'), 'cells': []}
    elif tag in ('td', 'th'):
      self._cell = ''
    elif tag == 'img':
      self.imgs.append(attrs['src'])
    elif tag == 'option':
      self.options.append(attrs['value'])
    elif tag == 'figure':
      self.figures.append({'defect': attrs['data-defect'], 'caption': ''})
    elif tag == 'figcaption':
      self._caption = ''

  def handle_endtag(self, tag):
    if tag in ('td', 'th'):
      self._row['cells'].append(self._cell)
      self._cell = None
    elif tag == 'tr':
      self.rows.append(self._row)
    elif tag == 'figcaption':
      self.figures[-1]['caption'] = self._caption
      self._caption = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell += data
    if self._caption is not None:
      self._caption += data


def _rows(folder):
  """Six scored test images with panels on disk (odd file names included)."""
  specs = [('good', 0, 0.1), ('crack', 1, 0.9), ('crack', 1, 0.4),
           ('hole <b>', 1, 0.7), ('good', 0, float('nan')), ('new', None, 0.95)]
  rows = []
  for i, (defect, label, score) in enumerate(specs):
    name = f'panels/{i:02d} a#b&c.png'
    visualize.save_png(
        os.path.join(folder, name), np.full((4, 4, 3), 40 * i, np.uint8))
    rows.append({
        'image': name, 'path': f'/data/{defect}/{i:03d}&x.png',
        'defect_type': defect, 'label': label, 'score': score,
        'decision': score > 0.5
    })
  return rows


@pytest.fixture(name='page')
def _page_fixture(tmp_path):
  rows = _rows(str(tmp_path))
  visualize.save_png(str(tmp_path / 'curve.png'), np.zeros((4, 4, 3), np.uint8))
  path = str(tmp_path / 'report.html')
  report.write_report(
      path, METRICS, rows, curve_image='curve.png', title='bottle <test>')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  parser = _Page()
  parser.feed(text)
  return path, text, parser, rows


def test_report_metrics_table(page):
  _, _, parser, _ = page
  header, *body = parser.rows
  assert header['cells'] == [
      'map', 'pixel_auroc', 'aupro', 'image_auroc', 'iou_held_out',
      'pixel_auroc vs prior_normal'
  ]
  names = [r['cells'][0] for r in body]
  assert names[0] == 'combined' and body[0]['class'] == 'headline'
  assert sorted(names) == sorted(METRICS['maps'])
  assert all(r['class'] is None for r in body[1:])
  by_name = {r['cells'][0]: r['cells'] for r in body}
  for name, values in METRICS['maps'].items():
    assert by_name[name][-1] == f'{values["pixel_auroc"] - 0.7:+.4f}', name
  assert by_name['prior'][2:5] == ['\u2013'] * 3  # missing metrics
  assert by_name['residual_ssim_calibrated'][2] == '\u2013'  # NaN


def test_report_summary_names_the_headline_and_each_threshold(page):
  _, text, _, _ = page
  summary = text.split('<dl class="summary">')[1].split('</dl>')[0]
  terms = dict(re.findall(r'<dt>([^<]*)</dt><dd>([^<]*)</dd>', summary))
  assert terms['headline map'] == 'combined'
  assert terms['image auroc'] == '0.9000'  # the headline's own image score
  assert terms['detection accuracy held out'] == '0.8000'
  assert terms['detection accuracy minmax'] == '0.8300'
  assert terms['image auroc reconstruction'] == '0.7500'  # s_a's


def test_report_images_sorted_and_present(page):
  path, text, parser, rows = page
  scores = [
      f['caption'].split('score ')[1].split(' ')[0] for f in parser.figures
  ]
  assert scores == ['0.9500', '0.9000', '0.7000', '0.4000', '0.1000', '\u2013']
  assert len(parser.figures) == len(rows)
  folder = os.path.dirname(path)
  assert parser.imgs[0] == 'curve.png'
  assert len(parser.imgs) == len(rows) + 1
  for src in parser.imgs:
    assert os.path.isfile(os.path.join(folder, parse.unquote(src))), src
  assert 'unlabelled' in parser.figures[0]['caption']
  assert parser.figures[2]['defect'] == 'hole <b>'
  # Text is escaped: no tag from a defect type, a path or the title.
  assert '<b>' not in text and '<test>' not in text and '&x.png' not in text
  assert 'http' not in text and '//' not in text.replace('file://', '')


def test_report_filter_lists_each_defect_once(page):
  _, text, parser, rows = page
  defects = [o for o in parser.options if o]
  assert parser.options[0] == ''  # 'all'
  assert sorted(defects) == sorted({r['defect_type'] for r in rows})
  assert len(defects) == len(set(defects))
  assert "getElementById('defect-filter')" in text


def test_report_without_curve_or_baseline(tmp_path):
  metrics = {'map': 'a', 'pixel_auroc': 0.9, 'maps': {}}
  path = str(tmp_path / 'out' / 'r.html')
  report.write_report(path, metrics, [])
  parser = _Page()
  with open(path, encoding='utf-8') as f:
    parser.feed(f.read())
  assert parser.rows[0]['cells'] == ['map', 'pixel_auroc']
  assert parser.rows[1]['cells'] == ['a', '0.9000']
  assert parser.imgs == [] and parser.options == ['']


def test_report_renders_in_headless_chromium(page, tmp_path):
  browser = (
      shutil.which('chromium') or shutil.which('chromium-browser')
      or shutil.which('google-chrome'))
  if browser is None:
    pytest.skip('headless Chromium not installed (Debian: apt install '
                'chromium); the HTML parser test above checks the page '
                'structure')
  path, _, _, rows = page
  url = 'file://' + os.path.abspath(path)
  flags = [
      browser, '--headless', '--no-sandbox', '--disable-gpu',
      f'--user-data-dir={tmp_path / "profile"}'
  ]
  dom = subprocess.run(
      flags + ['--dump-dom', url],
      capture_output=True,
      text=True,
      timeout=60,
      check=True).stdout
  parser = _Page()
  parser.feed(dom)
  assert len(parser.rows) == 1 + len(METRICS['maps'])
  assert len(parser.figures) == len(rows)
  assert len(parser.imgs) == len(rows) + 1
  shot = tmp_path / 'shot.png'
  subprocess.run(
      flags + [f'--screenshot={shot}', '--window-size=1000,800', url],
      capture_output=True,
      timeout=60,
      check=True)
  pixels = np.asarray(Image.open(shot).convert('RGB'))
  assert pixels.std() > 1.0  # not blank
