"""One static HTML page of an evaluation: the metrics of every map, the
learning curve, and the test images sorted by score with a defect filter.

The page is self-contained (inline CSS, a few lines of vanilla JS, relative
image paths): it opens from file:// with no server and fetches nothing.
"""

from __future__ import annotations

import html
import math
import numbers
import os
from typing import Any, Mapping, Sequence
from urllib import parse

METRIC_COLUMNS = ('pixel_auroc', 'aupro', 'image_auroc', 'iou_held_out')
BASELINE = 'prior_normal'  # positional baseline the maps are compared with
# The summary's detection numbers: the headline map's image score, then
# s_a's (metrics.json's flat keys, ``scoring.compute_metrics``).
SUMMARY_KEYS = ('image_auroc', 'detection_accuracy_held_out',
                'image_threshold_held_out', 'detection_accuracy_minmax',
                'image_auroc_reconstruction')
_DASH = '\u2013'  # a missing value

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.headline { background: #fff3c4; font-weight: bold; }
td.better { color: #176c2c; } td.worse { color: #a31515; }
dl.summary { display: grid; grid-template-columns: max-content auto;
             gap: 0.1em 1em; } dl.summary dd { margin: 0; }
.gallery { display: flex; flex-direction: column; gap: 1em; }
figure { margin: 0; padding: 0.4em; border: 2px solid #ddd; }
figure.wrong { border-color: #d33; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.9em; margin-top: 0.3em; word-break: break-all; }
"""

# Shows only the figures of the chosen defect type ('' shows all).
_JS = """
var filter = document.getElementById('defect-filter');
filter.addEventListener('change', function () {
  var chosen = filter.value;
  document.querySelectorAll('figure.item').forEach(function (f) {
    f.style.display = (!chosen || f.dataset.defect === chosen) ? '' : 'none';
  });
});
"""


def _real(value: Any) -> float | None:
  """``value`` as a float (numpy scalars too); None for a non-number or NaN."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return None
  return None if math.isnan(value) else float(value)


def _number(value: Any, signed: bool = False) -> str:
  """A metric as text: 4 decimals, '–' for None, NaN or a non-number."""
  value = _real(value)
  if value is None:
    return _DASH
  return f'{value:+.4f}' if signed else f'{value:.4f}'


def _src(path: str) -> str:
  """A relative path as an <img src>: percent-quoted ('#', '%' and spaces in
  file names would break a file:// URL), then HTML-escaped."""
  return html.escape(parse.quote(path.replace(os.sep, '/'), safe='/'))


def map_rows(metrics: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """``(name, metrics)`` per map, the headline first, then as in ``'maps'``.

  A headline missing from ``metrics['maps']`` takes the flat keys of
  ``metrics`` (a metrics.json without per-map tables).
  """
  maps = dict(metrics.get('maps') or {})
  headline = metrics.get('map')
  if headline is not None and headline not in maps:
    maps[headline] = {
        k: v
        for k, v in metrics.items()
        if _real(v) is not None and k not in ('checkpoint_step',
                                              'num_test_images')
    }
  names = ([headline] if headline in maps else
           []) + [name for name in maps if name != headline]
  return [(name, dict(maps[name])) for name in names]


def _metrics_table(metrics: Mapping[str, Any]) -> str:
  rows = map_rows(metrics)
  columns = [c for c in METRIC_COLUMNS if any(c in m for _, m in rows)]
  baseline = _real(dict(rows).get(BASELINE, {}).get('pixel_auroc'))
  compare = baseline is not None
  head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
  if compare:
    head += f'<th>pixel_auroc vs {BASELINE}</th>'
  lines = [
      f'<table id="metrics"><thead><tr><th>map</th>{head}</tr></thead>',
      '<tbody>'
  ]
  for name, values in rows:
    cells = ''.join(f'<td>{_number(values.get(c))}</td>' for c in columns)
    if compare:
      auroc = _real(values.get('pixel_auroc'))
      diff = None if auroc is None else auroc - baseline
      kind = ('' if not diff else
              ' class="better"' if diff > 0 else ' class="worse"')
      cells += f'<td{kind}>{_number(diff, signed=True)}</td>'
    headline = ' class="headline"' if name == metrics.get('map') else ''
    lines.append(f'<tr{headline}><td>{html.escape(name)}</td>{cells}</tr>')
  lines.append('</tbody></table>')
  return '\n'.join(lines)


def _summary(metrics: Mapping[str, Any]) -> str:
  """The headline map, the checkpoint, the test set and image detection."""
  items = [('headline map', metrics.get('map')),
           ('checkpoint step', metrics.get('checkpoint_step')),
           ('test images', metrics.get('num_test_images'))]
  items += [(k.replace('_', ' '), metrics.get(k)) for k in SUMMARY_KEYS]
  lines = []
  for key, value in items:
    if value is None:
      continue
    text = (
        _number(value) if isinstance(value, numbers.Real)
        and not isinstance(value, numbers.Integral) else str(value))
    lines.append(f'<dt>{html.escape(key)}</dt><dd>{html.escape(text)}</dd>')
  return '<dl class="summary">' + ''.join(lines) + '</dl>' if lines else ''


def _sort_key(row: Mapping[str, Any]) -> float:
  """Highest score first; a missing or NaN score last."""
  score = _real(row.get('score'))
  return math.inf if score is None else -score


def _label_text(label: Any) -> str:
  if label is None:
    return 'unlabelled'
  return 'anomalous' if int(label) else 'normal'


def _figure(rank: int, row: Mapping[str, Any]) -> str:
  """One test image: its picture and a caption (rank, score, truth, file)."""
  defect = str(row.get('defect_type', ''))
  parts = [
      f'#{rank}', f'score {_number(row.get("score"))}',
      f'defect type: {defect}', f'label: {_label_text(row.get("label"))}'
  ]
  decision = row.get('decision')
  if decision is not None:
    parts.append('decision: ' + ('anomalous' if decision else 'normal'))
  parts.append(str(row.get('path', '')))
  # A decision that disagrees with the label gets a red frame.
  wrong = (
      decision is not None and row.get('label') is not None
      and bool(decision) != bool(int(row['label'])))
  alt = html.escape(f'{row.get("path", "")} ({defect})')
  image = (f'<img src="{_src(row["image"])}" alt="{alt}" loading="lazy">'
           if row.get('image') else '')
  caption = ' &middot; '.join(html.escape(p) for p in parts)
  return (f'<figure class="item{" wrong" if wrong else ""}" '
          f'data-defect="{html.escape(defect)}">{image}'
          f'<figcaption>{caption}</figcaption></figure>')


def _gallery(rows: Sequence[Mapping[str, Any]]) -> str:
  ordered = sorted(rows, key=_sort_key)  # stable: ties keep their order
  defects = sorted({str(r.get('defect_type', '')) for r in rows})
  counts = {
      d: sum(str(r.get('defect_type', '')) == d for r in rows) for d in defects
  }
  options = [f'<option value="">all ({len(rows)})</option>'] + [
      f'<option value="{html.escape(d)}">{html.escape(d)} ({counts[d]})'
      '</option>' for d in defects
  ]
  return '\n'.join([
      '<label for="defect-filter">defect type</label> '
      '<select id="defect-filter">', *options, '</select>',
      '<div class="gallery">',
      *(_figure(i + 1, r) for i, r in enumerate(ordered)), '</div>'
  ])


def write_report(path: str,
                 metrics: dict,
                 rows: Sequence[Mapping[str, Any]],
                 curve_image: str | None = None,
                 title: str = 'cavga_jax evaluation') -> None:
  """Writes the evaluation as one static HTML page at ``path``.

  Args:
    path: the HTML file to write (its folder is made).
    metrics: a metrics.json dict: ``'map'`` (the headline map), its flat
      metrics, ``'maps'`` ({map: {metric: value}}, including the positional
      baselines ``'prior'`` and ``'prior_normal'``), optionally the
      ``SUMMARY_KEYS``, ``'checkpoint_step'``, ``'num_test_images'``.
    rows: one per test image: ``'image'`` (its panel PNG, relative to the
      HTML file), ``'path'`` (the original file), ``'defect_type'``,
      ``'label'`` (0, 1 or None when unlabelled), ``'score'`` and optionally
      ``'decision'`` (bool); shown highest score first.
    curve_image: the learning-curve PNG relative to the HTML file, or None.
    title: the page's title and heading.
  """
  parts = [
      '<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
      f'<title>{html.escape(title)}</title><style>{_CSS}</style></head>',
      f'<body><h1>{html.escape(title)}</h1>',
      _summary(metrics), '<h2>Metrics per map</h2>',
      _metrics_table(metrics)
  ]
  if curve_image:
    parts += [
        '<h2>Learning curves</h2>',
        f'<img id="curve" src="{_src(curve_image)}" '
        'alt="learning curves" style="max-width: 100%">'
    ]
  parts += [
      f'<h2>Test images by score ({len(rows)})</h2>',
      _gallery(rows), f'<script>{_JS}</script>', '</body></html>'
  ]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(parts) + '\n')
