"""CAVGA_w's data split: a few labelled anomalies move from test to train.

Weak supervision (docs/protocol.md section 3) trains on all normal training
images plus a small labelled set of anomalous images. Those images are taken out of the
test split, so the evaluation never sees an image the model trained on.

Which images move is a pure function of the test split and
``(seed, fraction, min_per_defect)``:

* per defect type ``d`` with ``n_d`` test images, ``k_d = max(min_per_defect,
  round(fraction * n_d))`` images move (``fraction`` is a fraction of the test
  anomalies, applied per defect type so every type is represented in
  proportion), but never all of them: at least one image of every defect type
  stays in the test set, so every type is still evaluated;
* the ``k_d`` images are drawn without replacement from the type's images in
  name order with ``default_rng([seed, crc32(d)])``, so a type's choice does
  not depend on the other types.

The split is written to ``<workdir>/weak_split.json`` (the images moved, the
settings and the counts) so a run can be audited; a later call with the same
workdir (``evaluate.py``, a resumed ``train.py``) recomputes the split and
stops with a one-line error if it differs from the file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import zlib

import numpy as np

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.data.folder import AnomalyDataset
from cavga_jax.errors import DataError

SPLIT_FILE = 'weak_split.json'
SPLIT_VERSION = 1
# config.data.weak_*'s defaults (typed_config.DataSettings).
DEFAULT_FRACTION = typed_config.default('data.weak_fraction')
DEFAULT_MIN_PER_DEFECT = typed_config.default('data.weak_min_per_defect')
DEFAULT_SEED = typed_config.default('data.weak_seed')

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WeakSplit:
  """The weakly supervised train/test split and its audit record.

  Attributes:
    train: all normal training images, then the moved anomalies (labels 1).
    test: the test split without the moved anomalies (original order).
    moved: (M,) int indices into the original test split of the moved images.
    record: the JSON-serialisable audit record written to ``SPLIT_FILE``.
  """
  train: AnomalyDataset
  test: AnomalyDataset
  moved: np.ndarray
  record: dict


def image_key(path: str, defect_type: str) -> str:
  """``'<defect>/<file name>'``: names a test image independently of the root.

  Unique within a test split (each defect folder holds unique names), and
  unchanged when the dataset folder moves, so the audit file stays valid.
  """
  return f'{defect_type}/{os.path.basename(path)}'


def num_to_move(num_images: int, fraction: float, min_per_defect: int) -> int:
  """``k_d``: how many of a defect type's ``num_images`` test images move."""
  k = max(int(min_per_defect), int(np.floor(fraction * num_images + 0.5)))
  # Leave one image of the type in the test set.
  return max(0, min(k, num_images - 1))


def select_anomalies(test: AnomalyDataset,
                     fraction: float = DEFAULT_FRACTION,
                     min_per_defect: int = DEFAULT_MIN_PER_DEFECT,
                     seed: int = DEFAULT_SEED) -> np.ndarray:
  """Indices of the test images that move to training (see module docstring).

  Args:
    test: the full test split.
    fraction: fraction of each defect type's test images to move, in [0, 1].
    min_per_defect: at least this many per defect type (>= 0).
    seed: non-negative selection seed.

  Returns:
    (M,) int64 sorted indices into ``test``; all are anomalous images.

  Raises:
    DataError: bad settings, or a test split without anomalous images.
  """
  if not 0.0 <= fraction <= 1.0:
    raise DataError(f'config.data.weak_fraction must be in [0, 1], got '
                    f'{fraction!r}')
  if int(min_per_defect) != min_per_defect or min_per_defect < 0:
    raise DataError(f'config.data.weak_min_per_defect must be an integer >= '
                    f'0, got {min_per_defect!r}')
  if int(seed) != seed or seed < 0:
    raise DataError(f'config.data.weak_seed must be an integer >= 0, got '
                    f'{seed!r}')
  by_defect: dict[str, list[int]] = collections.defaultdict(list)
  for i, (label, defect) in enumerate(zip(test.labels, test.defect_types)):
    if label:
      by_defect[defect].append(i)
  if not by_defect:
    raise DataError(
        f'{_where(test)}: weak supervision needs anomalous test images to '
        'label, but the test split has none')
  moved = []
  for defect in sorted(by_defect):
    indices = sorted(
        by_defect[defect], key=lambda i: image_key(test.paths[i], defect))
    k = num_to_move(len(indices), fraction, min_per_defect)
    if k < min_per_defect:
      _log.warning(
          'weak split: defect type %r has only %d test image(s); '
          'moving %d so that one stays in the test set', defect, len(indices),
          k)
    rng = np.random.default_rng([int(seed), zlib.crc32(defect.encode())])
    chosen = rng.choice(len(indices), size=k, replace=False)
    moved.extend(indices[j] for j in chosen)
  return np.array(sorted(moved), np.int64)


def _where(dataset: AnomalyDataset) -> str:
  """The folder the split came from, for error messages."""
  if not dataset.paths:
    return '<empty test split>'
  return os.path.dirname(os.path.dirname(dataset.paths[0]))


def _subset(dataset: AnomalyDataset, indices: np.ndarray) -> AnomalyDataset:
  return AnomalyDataset(
      images=dataset.images[indices],
      masks=dataset.masks[indices],
      labels=dataset.labels[indices],
      defect_types=tuple(dataset.defect_types[i] for i in indices),
      paths=tuple(dataset.paths[i] for i in indices))


def _concat(a: AnomalyDataset, b: AnomalyDataset) -> AnomalyDataset:
  return AnomalyDataset(
      images=np.concatenate([a.images, b.images]),
      masks=np.concatenate([a.masks, b.masks]),
      labels=np.concatenate([a.labels, b.labels]).astype(np.int32),
      defect_types=a.defect_types + b.defect_types,
      paths=a.paths + b.paths)


def split(train: AnomalyDataset,
          test: AnomalyDataset,
          fraction: float = DEFAULT_FRACTION,
          min_per_defect: int = DEFAULT_MIN_PER_DEFECT,
          seed: int = DEFAULT_SEED) -> WeakSplit:
  """Moves the selected anomalies from ``test`` to the end of ``train``.

  Args:
    train: the normal training split (labels all 0).
    test: the full test split.
    fraction, min_per_defect, seed: see ``select_anomalies``.

  Returns:
    The ``WeakSplit``; ``train.labels`` marks the moved anomalies with 1.
  """
  moved = select_anomalies(test, fraction, min_per_defect, seed)
  kept = np.setdiff1d(np.arange(test.num_examples), moved)
  new_train = _concat(train, _subset(test, moved))
  new_test = _subset(test, kept)
  per_defect = {}
  anomalous_types = {
      d for d, label in zip(test.defect_types, test.labels) if label
  }
  for defect in sorted(anomalous_types):
    available = sum(d == defect for d in test.defect_types)
    per_defect[defect] = dict(
        test_images=available,
        moved=sum(test.defect_types[i] == defect for i in moved))
  record = dict(
      version=SPLIT_VERSION,
      seed=int(seed),
      fraction=float(fraction),
      min_per_defect=int(min_per_defect),
      num_train_normal=train.num_examples,
      num_train_anomalous=int(moved.size),
      num_test_before=test.num_examples,
      num_test_after=new_test.num_examples,
      per_defect=per_defect,
      moved=[
          dict(
              key=image_key(test.paths[i], test.defect_types[i]),
              defect_type=test.defect_types[i],
              path=test.paths[i]) for i in moved
      ])
  return WeakSplit(train=new_train, test=new_test, moved=moved, record=record)


def apply_weak_split(
    data: typed_config.DataSettings, workdir: str, train: AnomalyDataset,
    test: AnomalyDataset) -> tuple[AnomalyDataset, AnomalyDataset]:
  """``split`` with the data settings, audited in the workdir.

  Fields of ``data`` (``config.data``): ``weak_fraction`` (default 0.01),
  ``weak_min_per_defect`` (1), ``weak_seed`` (0; independent of
  ``config.seed`` so runs with several training seeds share one test set).

  Writes the audit file when it is absent (process 0 only); when present (a
  resumed run, ``evaluate.py``) checks that the recomputed split moves the
  same images.

  Returns:
    (train, test) of the weak split.

  Raises:
    DataError: the recomputed split differs from the workdir's file, or the
      file is unreadable.
  """
  result = split(
      train,
      test,
      fraction=float(data.weak_fraction),
      min_per_defect=data.weak_min_per_defect,
      seed=data.weak_seed)
  path = os.path.join(workdir, SPLIT_FILE)
  if os.path.exists(path):
    check_split_file(path, result.record)
  elif sharding.is_primary_process():
    # The other processes compute the same split from the same config.
    write_split_file(path, result.record)
  _log.info(
      'weak split (%s): %d labelled anomalies moved from test to train '
      '(%s); %d test images remain', path, result.moved.size,
      ', '.join(f'{d}={c["moved"]}/{c["test_images"]}'
                for d, c in result.record['per_defect'].items()),
      result.test.num_examples)
  return result.train, result.test


def write_split_file(path: str, record: dict) -> None:
  """Writes the audit record atomically: a killed run leaves no partial file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)


def check_split_file(path: str, record: dict) -> None:
  """Raises DataError unless ``path`` moves the same images as ``record``."""
  try:
    with open(path) as f:
      saved = json.load(f)
    saved_keys = [m['key'] for m in saved['moved']]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f'{path}: cannot read the weak split file '
                    f'({type(e).__name__}: {e})') from None
  keys = [m['key'] for m in record['moved']]
  if saved_keys != keys:
    settings = ('seed', 'fraction', 'min_per_defect')
    raise DataError(
        f'{path}: the weak split recomputed from the config '
        f'({", ".join(f"{k}={record[k]}" for k in settings)}: '
        f'{len(keys)} images) differs from the one this workdir was trained '
        f'with ({", ".join(f"{k}={saved.get(k)}" for k in settings)}: '
        f'{len(saved_keys)} images); use the same config.data.weak_* '
        'settings and dataset, or a new --workdir')
