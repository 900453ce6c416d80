"""A procedurally generated anomaly dataset in the MVTec AD folder layout.

`generate_dataset` writes the images of `textures` (normal woven textures,
and the same with a scratch, blob or spot defect and its exact mask) as PNGs
in the MVTec AD layout, once: a marker with the parameters says a folder is
complete, and a folder is written aside and renamed into place, so an
interrupted or concurrent run never leaves a partial dataset. The category
'dark_objects' holds `dark_objects`' images instead (an unaligned textured
object on a noisy black background); every other category name is the
textures.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

from cavga_jax.data import dark_objects
from cavga_jax.data import textures
from cavga_jax.errors import DataError

MARKER_NAME = '.generated.json'
# Bump when the rendering of `textures` changes so that existing folders are
# regenerated.
GENERATOR_VERSION = 1
# Categories rendered by another module than `textures` (same interface:
# DEFECT_TYPES, VERSION, normal_image, anomalous_image). Other category names
# are folder names of the textures (e.g. several seeds side by side).
SCENES = {'dark_objects': dark_objects}


def _scene(params: dict[str, object]):
  """The module that renders a generation's images."""
  return SCENES[params['scene']] if 'scene' in params else textures


def _parameters(seed, image_size, category, num_train, num_test_good,
                num_test_per_defect) -> dict[str, object]:
  params = {
      'generator_version': GENERATOR_VERSION,
      'seed': seed,
      'image_size': image_size,
      'category': category,
      'num_train': num_train,
      'num_test_good': num_test_good,
      'num_test_per_defect': num_test_per_defect,
  }
  if category in SCENES:
    # Only these carry the scene: the textures' marker stays as it was, so
    # existing folders are not regenerated.
    params['scene'] = category
    params['scene_version'] = SCENES[category].VERSION
  params['defect_types'] = list(_scene(params).DEFECT_TYPES)
  return params


def _file_name(index: int, count: int) -> str:
  return f'{index:0{max(3, len(str(count - 1)))}d}'


def _expected_files(params: dict[str, object]) -> list[str]:
  """Relative paths of every file a generation writes (marker excluded)."""
  files = []
  n = params['num_train']
  files += [f'train/good/{_file_name(i, n)}.png' for i in range(n)]
  n = params['num_test_good']
  files += [f'test/good/{_file_name(i, n)}.png' for i in range(n)]
  n = params['num_test_per_defect']
  for defect in _scene(params).DEFECT_TYPES:
    for i in range(n):
      name = _file_name(i, n)
      files.append(f'test/{defect}/{name}.png')
      files.append(f'ground_truth/{defect}/{name}_mask.png')
  return files


def _read_marker(folder: pathlib.Path) -> dict[str, object] | None:
  try:
    with open(folder / MARKER_NAME, encoding='utf-8') as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def _is_complete(folder: pathlib.Path, params: dict[str, object]) -> bool:
  if _read_marker(folder) != params:
    return False
  return all((folder / rel).is_file() for rel in _expected_files(params))


def _save_png(array: np.ndarray, path: pathlib.Path) -> None:
  # Fast zlib level: the files are small and regenerable; PNG stays lossless
  # so reloading at the same size gives back the exact arrays.
  Image.fromarray(array).save(path, format='PNG', compress_level=1)


def _write_dataset(folder: pathlib.Path, params: dict[str, object]) -> None:
  seed, size = params['seed'], params['image_size']
  scene = _scene(params)
  for sub in ['train/good', 'test/good'] + [
      f'{kind}/{d}' for d in scene.DEFECT_TYPES
      for kind in ('test', 'ground_truth')
  ]:
    (folder / sub).mkdir(parents=True, exist_ok=True)
  n = params['num_train']
  for i in range(n):
    _save_png(
        scene.normal_image(seed, 'train', i, size),
        folder / 'train' / 'good' / f'{_file_name(i, n)}.png')
  n = params['num_test_good']
  for i in range(n):
    _save_png(
        scene.normal_image(seed, 'good', i, size),
        folder / 'test' / 'good' / f'{_file_name(i, n)}.png')
  n = params['num_test_per_defect']
  for defect in scene.DEFECT_TYPES:
    for i in range(n):
      image, mask = scene.anomalous_image(seed, defect, i, size)
      name = _file_name(i, n)
      _save_png(image, folder / 'test' / defect / f'{name}.png')
      _save_png(
          mask.astype(np.uint8) * 255,
          folder / 'ground_truth' / defect / f'{name}_mask.png')
  # The marker goes last: its presence means every file above was written.
  with open(folder / MARKER_NAME, 'w', encoding='utf-8') as f:
    json.dump(params, f, indent=2, sort_keys=True)


def generate_dataset(root: str,
                     *,
                     seed: int,
                     image_size: int,
                     category: str = 'textures',
                     num_train: int = 200,
                     num_test_good: int = 30,
                     num_test_per_defect: int = 20) -> pathlib.Path:
  """Writes the generated dataset to `<root>/<category>` unless it is there.

  Images are RGB PNGs, masks 0/255 'L' PNGs, in the MVTec AD layout (defect
  folders 'scratch', 'blob', 'spot'; for category 'dark_objects' the
  images of `dark_objects`, folders 'scratch', 'spot', 'missing'). A JSON
  marker with the parameters is written last; a folder whose marker matches
  and whose files are all present is left untouched. Otherwise the dataset
  is written to a temporary sibling folder and renamed into place, so an
  interrupted run never leaves a partial dataset, and concurrent processes
  (e.g. several hosts sharing a disk) agree on the result.

  Args:
    root: parent folder (created if missing).
    seed: non-negative generation seed.
    image_size: height and width in pixels (>= 8).
    category: category folder name; 'dark_objects' selects that scene
      (`SCENES`), any other name the textures.
    num_train: number of normal training images (>= 1).
    num_test_good: number of normal test images.
    num_test_per_defect: number of test images per defect type.

  Returns:
    The category folder `<root>/<category>`.

  Raises:
    DataError: bad parameters, or `<root>/<category>` exists but was not
      written by this function (it is never deleted then).
  """
  root_path = pathlib.Path(root)
  if (not category or category in ('.', '..') or '/' in category
      or os.sep in category):
    raise DataError(f'{root_path}: invalid category name {category!r}')
  target = root_path / category
  for name, value, low in (('seed', seed, 0), ('image_size', image_size, 8),
                           ('num_train', num_train, 1), ('num_test_good',
                                                         num_test_good, 0),
                           ('num_test_per_defect', num_test_per_defect, 0)):
    if isinstance(value, bool) or not isinstance(value,
                                                 (int, np.integer)) or (value
                                                                        < low):
      raise DataError(f'{target}: {name} must be an integer >= {low}, got '
                      f'{value!r}')
  params = _parameters(
      int(seed), int(image_size), category, int(num_train), int(num_test_good),
      int(num_test_per_defect))

  if target.exists():
    if _is_complete(target, params):
      return target
    if _read_marker(target) is None:
      # Only folders this function wrote carry the marker; anything else may
      # be user data, so never delete it.
      raise DataError(f'{target}: folder exists but was not written by '
                      f'generate_dataset (no {MARKER_NAME}); remove it or '
                      'choose another root/category')

  try:
    root_path.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(
        tempfile.mkdtemp(prefix=f'.{category}.tmp-', dir=root_path))
  except OSError as e:
    raise DataError(f'{root_path}: cannot create folder ({e})') from None
  try:
    _write_dataset(tmp, params)
    if target.exists():
      # Stale (other parameters, or files deleted). Move it aside first:
      # rename cannot replace a non-empty folder.
      if _is_complete(target, params):
        return target  # Another process finished first.
      trash = pathlib.Path(
          tempfile.mkdtemp(prefix=f'.{category}.old-', dir=root_path))
      try:
        os.replace(target, trash / category)
      except FileNotFoundError:
        pass  # Another process moved it already.
      shutil.rmtree(trash, ignore_errors=True)
    try:
      os.replace(tmp, target)
    except OSError:
      # Another process renamed its copy into place between our check and
      # our rename; accept it if it is what we wanted.
      if not _is_complete(target, params):
        raise
  except OSError as e:
    raise DataError(f'{target}: cannot write generated dataset ({e})') from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target
