"""LAG glaucoma database -> one category in the MVTec AD folder layout.

Input: the LAG download as its authors distribute it (Li et al., CVPR 2019;
`LAG_database_part_1`), unpacked::

  <source>/non_glaucoma/image/*.jpg
  <source>/suspicious_glaucoma/image/*.jpg
  <source>/suspicious_glaucoma/attention_map/*.jpg   # same file stems

(other folders, e.g. `non_glaucoma/attention_map` or `*/label`, are
ignored). Output::

  <output>/<category>/train/good/              # non-glaucoma, minus held-out
  <output>/<category>/test/good/               # num_test_normal non-glaucoma
  <output>/<category>/test/glaucoma/           # every glaucoma image
  <output>/<category>/ground_truth/glaucoma/<stem>_mask.png
  <output>/lag_conversion.json                 # options, counts, test stems

The held-out normal test images are a seeded random choice
(`np.random.default_rng(seed)` permutation of the sorted non-glaucoma file
names), so the split is the same on every machine. Images are copied
byte-for-byte (after checking that they decode). The ground truth of a
glaucoma image is its ophthalmologists' attention map, converted to 8-bit
grayscale, resized (bilinear) to the image size if it differs, and
binarised: a pixel is anomalous where the map exceeds `threshold` times the
map's maximum (default 0.5, i.e. the upper half of each map). The default
`num_test_normal` of 800 follows our reading of the CAVGA paper (train on the
remaining non-glaucoma images); check it before comparing numbers.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np
from PIL import Image

from cavga_jax.data.converters import common
from cavga_jax.data.folder import IMAGE_EXTENSIONS
from cavga_jax.data.folder import MASK_SUFFIX
from cavga_jax.data.folder import NORMAL_DEFECT
from cavga_jax.errors import DataError

DEFECT = 'glaucoma'
DEFAULT_CATEGORY = 'lag'
DEFAULT_NUM_TEST_NORMAL = 800
DEFAULT_THRESHOLD = 0.5


def _images(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """{stem: path} of the image files in `folder` (DataError if none)."""
  common.require_dir(folder, 'LAG')
  try:
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
  except OSError as e:
    raise DataError(
        f'{folder}: cannot list folder ({common.one_line(e)})') from None
  found: dict[str, pathlib.Path] = {}
  for path in entries:
    if (not path.is_file() or path.name.startswith('.')
        or path.suffix.lower() not in IMAGE_EXTENSIONS):
      continue
    if path.stem in found:
      raise DataError(f'{path}: two images share the stem {path.stem!r} '
                      f'({found[path.stem].name})')
    found[path.stem] = path
  if not found:
    raise DataError(f'{folder}: folder has no images '
                    f'({", ".join(IMAGE_EXTENSIONS)})')
  return found


def attention_mask(attention: Image.Image, size: tuple[int, int],
                   threshold: float) -> np.ndarray:
  """Binarises an attention map at `threshold` x its maximum.

  Args:
    attention: the attention map (any PIL mode; converted to 8-bit gray).
    size: (width, height) of the image it belongs to.
    threshold: in (0, 1).

  Returns:
    (height, width) bool mask. An all-black map gives an all-False mask.
  """
  gray = attention.convert('L')
  if gray.size != size:
    gray = gray.resize(size, Image.BILINEAR)
  values = np.asarray(gray, np.float32)
  return values > threshold * values.max() if values.max() > 0 else (
      np.zeros_like(values, bool))


def _copy_checked(path: pathlib.Path, out: pathlib.Path) -> Image.Image:
  image = common.open_image(path, 'image')
  shutil.copyfile(path, out)
  return image


def convert_lag(source: str | os.PathLike,
                output: str | os.PathLike,
                *,
                category: str = DEFAULT_CATEGORY,
                num_test_normal: int = DEFAULT_NUM_TEST_NORMAL,
                seed: int = 0,
                threshold: float = DEFAULT_THRESHOLD,
                overwrite: bool = False,
                num_workers: int = 4) -> dict[str, Any]:
  """Converts an unpacked LAG download (see the module docstring).

  Args:
    source: the LAG root holding `non_glaucoma/` and `suspicious_glaucoma/`.
    output: dataset root to create; the data goes to `<output>/<category>`.
    category: category folder name.
    num_test_normal: non-glaucoma images held out as normal test images
      (>= 0, fewer than the non-glaucoma images).
    seed: seed of the held-out choice.
    threshold: attention-map binarisation threshold in (0, 1), relative to
      each map's maximum.
    overwrite: replace an existing non-empty `output`.
    num_workers: threads checking and copying images.

  Returns:
    The summary also written to `<output>/lag_conversion.json`: the options,
    counts `train`, `test_good`, `test_glaucoma`, `empty_masks` and the
    sorted `test_good_stems`.

  Raises:
    DataError: a missing folder, a glaucoma image without attention map, an
      unreadable image or map, bad options, or an existing output without
      `overwrite`.
  """
  common.check_common_args('jpg', 0, num_workers)
  if not 0.0 < threshold < 1.0:
    raise DataError(f'threshold must be in (0, 1), got {threshold}')
  if not category or os.sep in category or category.startswith('.'):
    raise DataError(f'category must be a plain folder name, got {category!r}')
  source = pathlib.Path(source)
  common.require_dir(source, 'LAG source')
  normal = _images(source / 'non_glaucoma' / 'image')
  glaucoma = _images(source / 'suspicious_glaucoma' / 'image')
  maps_dir = source / 'suspicious_glaucoma' / 'attention_map'
  maps = _images(maps_dir)
  missing = sorted(set(glaucoma) - set(maps))
  if missing:
    raise DataError(
        f'{maps_dir / (missing[0] + ".jpg")}: attention map is missing for '
        f'glaucoma image {glaucoma[missing[0]]} ({len(missing)} of '
        f'{len(glaucoma)} glaucoma images have no map)')
  if isinstance(num_test_normal, bool) or int(num_test_normal) != (
      num_test_normal) or not 0 <= num_test_normal < len(normal):
    raise DataError(
        f'{source / "non_glaucoma" / "image"}: num_test_normal must be an '
        f'integer in [0, {len(normal)}) for its {len(normal)} non-glaucoma '
        f'images, got {num_test_normal!r}')

  stems = sorted(normal)
  order = np.random.default_rng(seed).permutation(len(stems))
  test_stems = {stems[i] for i in order[:num_test_normal]}

  with common.atomic_output(output, overwrite) as tmp:
    root = tmp / category
    train_dir = root / 'train' / NORMAL_DEFECT
    good_dir = root / 'test' / NORMAL_DEFECT
    defect_dir = root / 'test' / DEFECT
    truth_dir = root / 'ground_truth' / DEFECT
    for folder in (train_dir, good_dir, defect_dir, truth_dir):
      folder.mkdir(parents=True)

    def copy_normal(stem: str) -> None:
      path = normal[stem]
      _copy_checked(path, (good_dir if stem in test_stems else train_dir)
                    / f'{stem}{path.suffix.lower()}')

    def convert_glaucoma(stem: str) -> bool:
      path = glaucoma[stem]
      image = _copy_checked(path, defect_dir / f'{stem}{path.suffix.lower()}')
      mask = attention_mask(
          common.open_image(maps[stem], 'attention map'), image.size, threshold)
      common.save_mask(mask, truth_dir / f'{stem}{MASK_SUFFIX}.png', 0)
      return bool(mask.any())

    common.parallel_map(copy_normal, stems, num_workers)
    nonempty = common.parallel_map(convert_glaucoma, sorted(glaucoma),
                                   num_workers)
    summary = dict(
        source=os.fspath(source.absolute()),
        category=category,
        seed=seed,
        threshold=threshold,
        num_test_normal=num_test_normal,
        train=len(stems) - len(test_stems),
        test_good=len(test_stems),
        test_glaucoma=len(glaucoma),
        empty_masks=len(nonempty) - sum(nonempty),
        test_good_stems=sorted(test_stems))
    with open(tmp / 'lag_conversion.json', 'w') as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary
