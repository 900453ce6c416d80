#!/usr/bin/env python
"""A whole MVTec-layout benchmark in one command: train, evaluate, tabulate.

  python scripts/benchmark_table.py --config=configs/mvtec.py \
      --root=/data/mvtec_anomaly_detection --workdir=runs/mvtec \
      [--categories=bottle,cable] [--title='MVTec AD'] \
      [--config.model.variant=D ...]

Category c (default: every folder under --root with train/good; mSTC scenes
after scripts/convert_mstc.py are categories too) trains and evaluates in
`<workdir>/<c>` with the one config. `<workdir>/benchmark_table.md` and
`benchmark_table.json` get one row per category and the mean, in the shape
of the paper's Table 3: IoU, pixel AUROC, AU-PRO, the paper's detection
accuracy (min-max over the test set, > 0.5) and image AUROC of the headline
map (config.eval.map) and its image score, the image AUROC of the paper's
image score s_a (the reconstruction error), plus the seconds spent
training and evaluating (config.eval.maps: all maps or the headline's).
The table is rewritten after every category; a rerun skips the categories
whose metrics.json is of step config.train.num_steps and map
config.eval.map and has every column (one written before the columns
changed is evaluated again, from its checkpoint), and resumes the others
from their checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cavga_jax.errors import CavgaError  # pylint: disable=g-import-not-at-top,wrong-import-position
from cavga_jax.errors import DataError  # pylint: disable=g-import-not-at-top,wrong-import-position
from cavga_jax.programs import evaluate as eval_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cavga_jax.programs import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from cavga_jax.programs import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = runtime.define_config_flag(
    'Configuration file (configs/mvtec.py, ...); data.name, root and '
    'category are set per category.')
_ROOT = flags.DEFINE_string(
    'root', None, 'MVTec-layout dataset root '
    '(default: config.data.root).')
_CATEGORIES = flags.DEFINE_list(
    'categories', None, 'Categories to run '
    '(default: every folder under --root with '
    'train/good).')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Benchmark folder; category '
    'c runs in <workdir>/<c>.')
_TITLE = flags.DEFINE_string(
    'title', None, 'Table title (default: the '
    "root folder's name).")
_CACHE = runtime.define_compilation_cache_flag()
flags.mark_flags_as_required(['config', 'workdir'])

# (metrics.json key, column title): the paper's Table 3 metrics.
METRICS = (('iou', 'IoU'), ('pixel_auroc', 'pixel AUROC'), ('aupro', 'AU-PRO'),
           ('detection_accuracy_minmax', 'detection accuracy'),
           ('image_auroc', 'image AUROC'), ('image_auroc_reconstruction',
                                            'image AUROC s_a'))
TIMES = ('train_s', 'eval_s')
TABLE = 'benchmark_table'
_TIMES_FILE = 'benchmark_times.json'


def find_categories(root: str) -> list[str]:
  """The sorted names of the folders under ``root`` with a train/good folder."""
  if not os.path.isdir(root):
    raise DataError(f'{root}: dataset root folder does not exist')
  found = sorted(
      c for c in os.listdir(root)
      if os.path.isdir(os.path.join(root, c, 'train', 'good')))
  if not found:
    raise DataError(f'{root}: no category folder with train/good under it')
  return found


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _mean(values: Sequence[float | None]) -> float:
  """The mean of the finite values, NaN if none."""
  # Skipping NaN keeps one degenerate category from hiding the others' mean.
  finite = [v for v in values if v is not None and math.isfinite(v)]
  return sum(finite) / len(finite) if finite else float('nan')


def _cell(value: float | None, digits: int) -> str:
  return '' if value is None else f'{value:.{digits}f}'


def format_table(result: dict[str, Any]) -> str:
  """The Markdown table of a ``run_benchmark`` result."""
  titles = [title for _, title in METRICS] + ['map', 'train s', 'eval s']
  lines = [
      f'# {result["title"]}: {result["num_steps"]} steps, map '
      f'{result["map"]}', '', '| category | ' + ' | '.join(titles) + ' |',
      '|---|' + '---|' * len(titles)
  ]
  for row in result['rows'] + [result['mean']]:
    cells = ([_cell(row[k], 4) for k, _ in METRICS] + [row['map']]
             + [_cell(row[k], 1) for k in TIMES])
    lines.append(f'| {row["category"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _write(workdir: str, result: dict[str, Any]) -> None:
  with open(os.path.join(workdir, TABLE + '.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, TABLE + '.md'), 'w') as f:
    f.write(format_table(result))


def _run_category(config: ml_collections.ConfigDict, run_dir: str,
                  label: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(metrics.json, {train_s, eval_s}) of one category, run unless finished."""
  metrics = _read_json(os.path.join(run_dir, 'eval', 'metrics.json'))
  times_path = os.path.join(run_dir, _TIMES_FILE)
  if (metrics is not None
      and metrics.get('checkpoint_step') == config.train.num_steps
      and metrics.get('map') == config.eval.map
      and all(k in metrics for k, _ in METRICS)):
    logging.info('%s: finished (step %d), skipping', label,
                 config.train.num_steps)
    return metrics, _read_json(times_path) or dict.fromkeys(TIMES)
  logging.info('%s: training and evaluating in %s', label, run_dir)
  start = time.perf_counter()
  train_lib.train(config, run_dir)
  # A resumed category counts only the steps trained in this call.
  times = {'train_s': time.perf_counter() - start}
  start = time.perf_counter()
  metrics = eval_lib.evaluate(config, run_dir)
  times['eval_s'] = time.perf_counter() - start
  with open(times_path, 'w') as f:
    json.dump(times, f)
  logging.info('%s: trained in %.1f s, evaluated in %.1f s', label,
               times['train_s'], times['eval_s'])
  return metrics, times


def run_benchmark(config: ml_collections.ConfigDict,
                  workdir: str,
                  root: str | None = None,
                  categories: Sequence[str] | None = None,
                  title: str | None = None) -> dict[str, Any]:
  """Trains and evaluates every category in turn; writes the table.

  Args:
    config: a CAVGA config; ``data.name`` becomes 'mvtec' and ``data.root``
      and ``data.category`` are set per category.
    workdir: benchmark folder; category c runs in ``<workdir>/<c>``.
    root: the MVTec-layout root (default ``config.data.root``).
    categories: the categories to run (default ``find_categories(root)``).
    title: the table's title (default the root folder's name).

  Returns:
    {'title', 'root', 'map', 'num_steps', 'rows': [{'category', 'map',
    <METRICS keys>, 'train_s', 'eval_s', 'checkpoint_step',
    'num_test_images', 'workdir'}, ...], 'mean': the row of the means over
    categories (skipping NaN; category 'mean')}.

  Raises:
    DataError: no root, no categories under it, or an unknown category.
    CavgaError: a config of another task than 'cavga', or a failed run.
  """
  if config.get('task', 'cavga') != 'cavga':
    raise CavgaError(f'config.task={config.task!r}: the benchmark table is '
                     "for task 'cavga'")
  root = root or config.data.get('root', '')
  if not root:
    raise DataError('no dataset root: set --root (or config.data.root) to '
                    'the folder that holds the category folders')
  found = find_categories(root)
  categories = list(found if not categories else categories)
  unknown = [c for c in categories if c not in found]
  if unknown:
    raise DataError(f'{root}: unknown categories {", ".join(unknown)} '
                    f'(categories found: {", ".join(found)})')
  os.makedirs(workdir, exist_ok=True)
  result = {
      'title': title or os.path.basename(os.path.abspath(root)),
      'root': os.path.abspath(root), 'map': config.eval.map,
      'num_steps': config.train.num_steps, 'rows': []
  }
  for i, category in enumerate(categories):
    run_config = config.copy_and_resolve_references()
    run_config.data.name = 'mvtec'
    run_config.data.root = root
    run_config.data.category = category
    run_dir = os.path.join(workdir, category)
    metrics, times = _run_category(
        run_config, run_dir, f'category {i + 1}/{len(categories)} {category}')
    row = {'category': category, 'map': metrics['map']}
    row.update({k: float(metrics[k]) for k, _ in METRICS})
    row.update(times)
    row.update(
        checkpoint_step=metrics['checkpoint_step'],
        num_test_images=metrics['num_test_images'],
        workdir=run_dir)
    result['rows'].append(row)
    result['mean'] = {'category': 'mean', 'map': config.eval.map}
    result['mean'].update({
        k: _mean([r[k] for r in result['rows']])
        for k in [k for k, _ in METRICS] + list(TIMES)
    })
    _write(workdir, result)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  result = runtime.run_program(
      lambda config, workdir: run_benchmark(config, workdir, _ROOT.value,
                                            _CATEGORIES.value, _TITLE.value),
      _CONFIG.value, _WORKDIR.value, _CACHE.value)
  print(format_table(result), end='')


if __name__ == '__main__':
  app.run(main)
