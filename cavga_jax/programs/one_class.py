"""One-class detection runs: every class of a dataset in turn.

For each class c (docs/protocol.md section 4): train with
`config.data.normal_class = c` in `<workdir>/class_<c>` (resuming if a
checkpoint is there), evaluate, and collect the image AUROC and the
paper's detection accuracy of the image score `s_a`, the reconstruction
error (metrics.json's `*_reconstruction` keys). The table
`<workdir>/one_class.md` and `<workdir>/one_class.json` are rewritten after
every class, so an interrupted sweep keeps the finished rows; rerunning it
resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import logging
import math
import os
from typing import Any

import ml_collections

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.data import tfds_data
from cavga_jax.errors import DataError
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import train as train_lib


def _mean(values: Sequence[float]) -> float:
  finite = [v for v in values if math.isfinite(v)]
  return sum(finite) / len(finite) if finite else float('nan')


def format_table(result: dict[str, Any]) -> str:
  """The Markdown table of a `run_one_class` result."""
  lines = [
      f'# One-class detection: {result["dataset"]}', '',
      '| normal class | name | image AUROC | detection accuracy | '
      'test images |', '|---|---|---|---|---|'
  ]
  for row in result['classes']:
    lines.append(f'| {row["class"]} | {row["name"]} | '
                 f'{row["image_auroc"]:.4f} | '
                 f'{row["detection_accuracy_minmax"]:.4f} | '
                 f'{row["num_test_images"]} |')
  lines.append(f'| mean | | {result["mean_image_auroc"]:.4f} | '
               f'{result["mean_detection_accuracy_minmax"]:.4f} | |')
  return '\n'.join(lines) + '\n'


def _write(workdir: str, result: dict[str, Any]) -> None:
  if not sharding.is_primary_process():
    return
  with open(os.path.join(workdir, 'one_class.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, 'one_class.md'), 'w') as f:
    f.write(format_table(result))


def run_one_class(config: ml_collections.ConfigDict,
                  workdir: str,
                  classes: Sequence[int] | None = None) -> dict[str, Any]:
  """Trains and evaluates one model per normal class; writes the table.

  Args:
    config: a one-class config (`config.data.name` in
      `tfds_data.ONE_CLASS_DATASETS`); `normal_class` is set per run.
    workdir: sweep folder; class c runs in `<workdir>/class_<c>`.
    classes: the normal classes to run, default all 10.

  Returns:
    {'dataset', 'classes': [{'class', 'name', 'image_auroc',
    'detection_accuracy_minmax', 'num_test_images', 'workdir'}, ...],
    'mean_image_auroc', 'mean_detection_accuracy_minmax'} (of ``s_a``);
    the means skip NaN.
  """
  data = typed_config.from_config(config).data
  name = data.name
  if name not in tfds_data.ONE_CLASS_DATASETS:
    raise DataError(f'config.data.name: one-class runs need one of '
                    f'{", ".join(tfds_data.ONE_CLASS_DATASETS)}, got {name!r}')
  classes = list(range(tfds_data.NUM_CLASSES) if classes is None else classes)
  names = tfds_data.class_names(name, data.root or None, bool(data.download))
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for c in classes:
    run_config = config.copy_and_resolve_references()
    run_config.data.normal_class = c
    run_dir = os.path.join(workdir, f'class_{c}')
    logging.info('one-class %s: normal class %d (%s) in %s', name, c, names[c],
                 run_dir)
    train_lib.train(run_config, run_dir)
    metrics = eval_lib.evaluate(run_config, run_dir)
    rows.append({
        'class':
            c, 'name':
                names[c], 'image_auroc':
                    float(metrics['image_auroc_reconstruction']),
        'detection_accuracy_minmax':
            float(metrics['detection_accuracy_minmax_reconstruction']),
        'num_test_images':
            int(metrics['num_test_images']), 'workdir':
                run_dir
    })
    result = {
        'dataset':
            name,
        'classes':
            rows,
        'mean_image_auroc':
            _mean([r['image_auroc'] for r in rows]),
        'mean_detection_accuracy_minmax':
            _mean([r['detection_accuracy_minmax'] for r in rows]),
    }
    _write(workdir, result)
  return result
