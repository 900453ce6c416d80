"""Datasets for cavga_jax: MVTec AD folders, the generated default, batching.

`get_datasets(data_settings, workdir, seed,
              supervision)` is the entry point used by training and
evaluation; it returns the (train, test) splits as in-memory
`AnomalyDataset`s.
"""

from __future__ import annotations

import collections
import logging
import os
import time

import jax
from jax.experimental import multihost_utils

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.data import tfds_data
from cavga_jax.data.folder import AnomalyDataset
from cavga_jax.data.folder import IMAGE_EXTENSIONS
from cavga_jax.data.folder import load_split
from cavga_jax.data.generated import generate_dataset
from cavga_jax.data.pipeline import epoch_permutation_indices
from cavga_jax.data.pipeline import eval_batches
from cavga_jax.data.pipeline import quota_batch_indices
from cavga_jax.data.pipeline import TrainBatches
from cavga_jax.data.textures import anomalous_image
from cavga_jax.data.textures import DEFECT_TYPES
from cavga_jax.data.textures import normal_image
from cavga_jax.data.weak import apply_weak_split
from cavga_jax.errors import DataError

__all__ = [
    'AnomalyDataset',
    'DEFECT_TYPES',
    'IMAGE_EXTENSIONS',
    'KNOWN_DATASETS',
    'TrainBatches',
    'anomalous_image',
    'apply_weak_split',
    'epoch_permutation_indices',
    'eval_batches',
    'generate_dataset',
    'get_datasets',
    'load_split',
    'normal_image',
    'quota_batch_indices',
]

KNOWN_DATASETS = ('generated', 'mvtec') + tfds_data.ONE_CLASS_DATASETS

_log = logging.getLogger(__name__)


def _summary(dataset: AnomalyDataset) -> str:
  counts = collections.Counter(dataset.defect_types)
  return ', '.join(f'{name}={count}' for name, count in sorted(counts.items()))


def get_datasets(
    data: typed_config.DataSettings,
    workdir: str,
    seed: int = 0,
    supervision: str = 'unsupervised') -> tuple[AnomalyDataset, AnomalyDataset]:
  """Loads (or generates, then loads) the train and test splits.

  Fields read (of `data`, `config.data`): `name` ('generated', 'mvtec' or
  a one-class TFDS name, see `tfds_data.one_class_datasets`),
  `root`, `category`, `image_size`, `channels` and `num_workers`;
  for 'generated' also `generated_seed` (None: `seed`),
  `num_train`, `num_test_good`, `num_test_per_defect` (`category`
  'dark_objects' is that scene, any other the textures:
  `generated.SCENES`). With `supervision == 'weak'` (CAVGA_w) a few
  labelled test anomalies move to the train split (`cavga_jax.data.weak`;
  reads `weak_fraction`, `weak_min_per_defect`, `weak_seed` and writes
  `<workdir>/weak_split.json`).

  Args:
    data: the typed data settings (`typed_config.from_config(config).data`).
    workdir: run folder; the generated dataset goes to `<workdir>/data` when
      `data.root` is unset.
    seed: the run's seed (`config.seed`).
    supervision: `config.model.supervision`.

  Returns:
    (train, test): images (N, S, S, C) uint8 with S = data.image_size
    and C = data.channels.

  Raises:
    DataError: unknown dataset name, unset root for 'mvtec', or any problem
      with the files.
  """
  name = data.name
  root = data.root
  image_size = int(data.image_size)
  channels = int(data.channels)
  num_workers = int(data.num_workers)

  if name in tfds_data.ONE_CLASS_DATASETS:
    if supervision == 'weak':
      # One-class benchmarks have no labelled anomalies to move into training.
      raise DataError(f'config.data.name={name!r}: one-class TFDS datasets '
                      "support only config.model.supervision='unsupervised'")
    start = time.perf_counter()
    splits = tfds_data.one_class_datasets(data)
    _log.info(
        'Loaded one-class %s (normal class %s): train %d, test %d (%s) '
        'in %.2f s', name, data.normal_class, splits[0].num_examples,
        splits[1].num_examples, _summary(splits[1]),
        time.perf_counter() - start)
    return splits
  if name == 'generated':
    root = root or os.path.join(workdir, 'data')
    category = data.category or typed_config.default('data.category')
    if data.generated_seed is not None:
      seed = data.generated_seed
    start = time.perf_counter()
    if sharding.is_primary_process():
      generate_dataset(
          root,
          seed=int(seed),
          image_size=image_size,
          category=category,
          num_train=int(data.num_train),
          num_test_good=int(data.num_test_good),
          num_test_per_defect=int(data.num_test_per_defect))
    if jax.process_count() > 1:
      # The other processes read the folder once process 0 has written it.
      multihost_utils.sync_global_devices('cavga_jax generated dataset')
    _log.info('Generated dataset ready at %s (%.2f s)',
              os.path.join(root, category),
              time.perf_counter() - start)
  elif name == 'mvtec':
    if not root:
      raise DataError(
          f'config.data.root is not set: set --config.data.root to the folder '
          f'that holds the MVTec AD category folders (got {root!r})')
    category = data.category
    if not category:
      raise DataError(f'{root}: config.data.category is not set')
  else:
    raise DataError(f'config.data.name: unknown dataset {name!r} (known: '
                    f'{", ".join(KNOWN_DATASETS)})')

  splits = []
  for split in ('train', 'test'):
    start = time.perf_counter()
    dataset = load_split(
        root, category, split, image_size, channels, num_workers=num_workers)
    _log.info('Loaded %s split of %s: %d images (%s) in %.2f s', split,
              os.path.join(root, category), dataset.num_examples,
              _summary(dataset),
              time.perf_counter() - start)
    splits.append(dataset)
  if supervision == 'weak':
    # CAVGA_w: a few labelled test anomalies move to training (audited in
    # <workdir>/weak_split.json).
    return apply_weak_split(data, workdir, splits[0], splits[1])
  return splits[0], splits[1]
