"""A workdir holds one run, never two silently mixed.

``train.py`` writes the run's config to ``<workdir>/config.json``. A later
``train.py`` (resume) or ``evaluate.py`` on that workdir compares its config
with the saved one (``check_rerun``): a field that defines the model, the
data or the objective may not differ, and the rerun stops with one line
naming the fields before anything is read, generated or written. Fields that
only change how long to train, logging, checkpointing or evaluation
(``MAY_DIFFER``) may differ; they are logged. ``train.py --overwrite``
(``start_over``) deletes the run's outputs first, and is the only thing that
deletes them.

A field that is absent from an older ``config.json`` compares as its
library default (``settings``), so adding a config field does not lock old
workdirs; a new field defines the run unless it is added to ``MAY_DIFFER``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from cavga_jax import settings
from cavga_jax.errors import CavgaError

CONFIG_FILE = 'config.json'

# Fields (or whole sections) a rerun of a workdir may change: the length of
# the schedule, logging and checkpointing, failure handling, the evaluation,
# the data loading threads and the convolution implementation (the same
# function to float rounding, layers.CONV_IMPLS). With
# optimizer.schedule='cosine' the decay follows train.num_steps, so a longer
# run changes the learning rates of the steps after the resumed one.
MAY_DIFFER = (
    'train.num_steps', 'train.log_every', 'train.checkpoint_every',
    'train.keep_checkpoints', 'train.prefetch', 'train.eval_every',
    'train.nonfinite', 'train.max_consecutive_skips', 'eval',
    'data.num_workers', 'model.conv_impl',
)

# What a run writes into its workdir, deleted by start_over. The generated
# dataset (<workdir>/data) is not: generate_dataset replaces a folder it
# wrote when its parameters change and never touches any other.
RUN_OUTPUTS = (
    'checkpoints', CONFIG_FILE, 'train_metrics.jsonl', 'eval_curve.jsonl',
    'eval_curve.png', 'eval', 'eval_untrained', 'synthetic_examples.png',
    'weak_split.json',
)


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'section.name': value} of a JSON tree (tuples as lists)."""
  if isinstance(tree, dict):
    out = {}
    for name, value in tree.items():
      out.update(_flatten(value, f'{prefix}{name}.'))
    return out
  return {prefix[:-1]: tree}


def _json_tree(config: Any) -> dict[str, Any]:
  """The config as ``config.json`` stores it (the same JSON encoding)."""
  return json.loads(config.to_json_best_effort())


def _may_differ(field: str) -> bool:
  return any(field == f or field.startswith(f + '.') for f in MAY_DIFFER)


def differing_fields(saved: dict[str, Any], config: Any
                     ) -> tuple[dict[str, tuple[Any, Any]],
                                dict[str, tuple[Any, Any]]]:
  """(defining, allowed): {field: (saved value, new value)} that differ.

  Args:
    saved: the JSON tree of ``config.json``.
    config: the new run configuration.
  """
  old, new = _flatten(saved), _flatten(_json_tree(config))
  task = new.get('task', settings.default('task'))
  missing = object()

  def value(values, field):
    if field in values:
      return values[field]
    if settings.has_default(field, task):
      return json.loads(json.dumps(settings.default(field, task)))
    return missing

  defining, allowed = {}, {}
  for field in sorted(set(old) | set(new)):
    before, after = value(old, field), value(new, field)
    if before != after:
      pair = tuple(None if v is missing else v for v in (before, after))
      (allowed if _may_differ(field) else defining)[field] = pair
  return defining, allowed


def check_rerun(config: Any, workdir: str, program: str = 'train.py') -> None:
  """Stops a rerun on ``workdir`` whose config defines another run.

  Nothing to compare (no ``config.json``: a new workdir) passes.

  Args:
    config: the new run configuration.
    workdir: the run folder.
    program: named in the message ('train.py', 'evaluate.py').

  Raises:
    CavgaError: one line naming the fields that define the model, data or
      objective and differ, with both values.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise CavgaError(f'{path}: unreadable ({e}); rerun train.py with '
                     '--overwrite to start over') from None
  defining, allowed = differing_fields(saved, config)
  if allowed:
    logging.info('%s: %s differ from %s (allowed)', program,
                 _describe(allowed), path)
  if defining:
    hint = ('use another --workdir, or --overwrite to start over'
            if program == 'train.py' else
            'evaluate with the config the run was trained with')
    raise CavgaError(f'{path} is another run: {_describe(defining)}; {hint}')


def _describe(fields: dict[str, tuple[Any, Any]]) -> str:
  return ', '.join(f'config.{field} {before!r} -> {after!r}'
                   for field, (before, after) in fields.items())


def start_over(workdir: str) -> list[str]:
  """Deletes the run outputs (``RUN_OUTPUTS``) of ``workdir``.

  Returns:
    The names deleted.
  """
  deleted = []
  for name in RUN_OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
    else:
      continue
    deleted.append(name)
  if deleted:
    logging.info('--overwrite: deleted %s from %s', ', '.join(deleted),
                 workdir)
  return deleted
