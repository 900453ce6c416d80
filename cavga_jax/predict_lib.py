"""predict.py's program: score unlabelled images with a trained run.

Every readable image (PNG, JPEG, BMP, TIFF; 8 or 16 bit; gray, RGB or
RGBA; any size) is converted like the training images, resized to the
model's size, scored by the run's ``Scorer`` (the headline map only), and
its map resized back to the image's own size. The output folder gets

* ``scores.csv``: per file its image score, the decision at the held-out
  image threshold (``anomalous`` 1/0) and the maximum of its map;
* ``overlays/<file>.png``: the map over the image with a colour bar and
  the contour of the held-out pixel threshold (``visualize.overlay``);
* ``masks/<file>.png``: the map above the pixel threshold (255) or not (0);
* ``predict.json``: the thresholds, the checkpoint, the counts and every
  skipped file with its reason;
* with ``export_platforms``, ``scorer/``: the scorer serialized by
  ``cavga_jax.export``.

A file that cannot be read is named in the log and skipped; the rest are
scored. The input folder is never written to, and an earlier output is
replaced only with ``overwrite``.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import os
import pathlib
import shutil
import sys
from typing import Sequence

import numpy as np
from PIL import Image
import tqdm

from cavga_jax import visualize
from cavga_jax.data import folder
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import outputs
from cavga_jax import export as export_lib
from cavga_jax import scorer as scorer_lib

SCORES_FILE = 'scores.csv'
SUMMARY_FILE = 'predict.json'


@dataclasses.dataclass
class PredictSummary:
  """What ``predict`` did: the output folder, the scored and skipped files."""
  output: str
  scored: int
  skipped: list[tuple[str, str]]


def list_inputs(pattern: str) -> tuple[list[pathlib.Path], pathlib.Path]:
  """(image files, the folder they are named relative to) of a folder or glob.

  A folder contributes its image files (``folder.IMAGE_EXTENSIONS``) and
  those of its subfolders; a glob pattern every file it matches (whatever
  the extension: a file that is not an image is reported, not ignored).
  """
  path = pathlib.Path(pattern)
  if path.is_dir():
    files = sorted(p for p in path.rglob('*') if p.is_file()
                   and not p.name.startswith('.')
                   and p.suffix.lower() in folder.IMAGE_EXTENSIONS)
    root = path
  else:
    files = sorted(pathlib.Path(p) for p in glob.glob(pattern, recursive=True)
                   if os.path.isfile(p))
    root = pathlib.Path(os.path.commonpath([str(p.parent.resolve())
                                            for p in files])) if files else path
  if not files:
    raise CavgaError(f'{pattern}: no image files found (a folder, or a glob '
                     f'such as "dir/*.png"; extensions '
                     f'{", ".join(folder.IMAGE_EXTENSIONS)})')
  return files, root


def prepare_output(output: str, inputs: Sequence[pathlib.Path],
                   input_root: pathlib.Path, overwrite: bool) -> None:
  """Checks that ``output`` is not in the input and creates it.

  Raises:
    CavgaError: ``output`` is the input folder or inside it, or holds an
      earlier output (or anything else) and ``overwrite`` is off.
  """
  out = pathlib.Path(output).resolve()
  roots = {input_root.resolve()} | {p.parent.resolve() for p in inputs}
  for root in roots:
    if out == root or root in out.parents:
      raise CavgaError(f'--output={output} is inside the input folder '
                       f'{root}; predict.py never writes there')
  if out.exists() and any(out.iterdir()):
    if not overwrite:
      raise CavgaError(f'--output={output} is not empty; pass --overwrite to '
                       'replace an earlier output')
    if not (out / SCORES_FILE).exists() and not (out / SUMMARY_FILE).exists():
      raise CavgaError(f'--output={output} holds files predict.py did not '
                       'write; choose another folder')
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)


def _output_name(path: pathlib.Path, root: pathlib.Path) -> str:
  """The file's path under the input root, '/' kept (outputs mirror it)."""
  try:
    return path.resolve().relative_to(root.resolve()).as_posix()
  except ValueError:
    return path.name


def score_files(scorer: scorer_lib.Scorer, files: Sequence[pathlib.Path],
                root: pathlib.Path, output: str, batch_size: int = 8
                ) -> tuple[list[dict], list[tuple[str, str]]]:
  """Scores ``files`` into ``output``'s overlays/ and masks/.

  Returns:
    (rows of scores.csv, (path, reason) of each file that was skipped).
  """
  pixel_threshold, image_threshold, _ = scorer.thresholds
  low, high = outputs.display_range(np.zeros(1), scorer.thresholds)
  size = (scorer.image_size, scorer.image_size)
  rows, skipped, batch = [], [], []
  progress = tqdm.tqdm(total=len(files), unit='img', file=sys.stderr,
                       desc='predict')

  def flush():
    images = np.stack([resized for _, _, resized in batch])
    # Full batches only, so the scorer compiles once.
    padded = np.concatenate([images] + [images[-1:]] * (batch_size
                                                        - len(images)))
    maps, scores = scorer.score(padded)
    for (path, image, _), values, score in zip(batch, maps, scores):
      name = _output_name(path, root)
      # The map back at the file's own size (PIL sizes are (W, H)).
      full = visualize.resize(values, image.size[::-1])
      visualize.save_png(os.path.join(output, 'overlays', name + '.png'),
                         visualize.overlay(np.asarray(image), full, low, high,
                                           pixel_threshold))
      visualize.save_png(os.path.join(output, 'masks', name + '.png'),
                         ((full > pixel_threshold) * 255).astype(np.uint8))
      rows.append(dict(path=str(path), score=float(score),
                       anomalous=int(score > image_threshold),
                       map_max=float(values.max()),
                       overlay=os.path.join('overlays', name + '.png'),
                       mask=os.path.join('masks', name + '.png')))
      progress.update()
    batch.clear()

  for path in files:
    try:
      image = folder.read_image(path, scorer.channels)
    except CavgaError as e:
      skipped.append((str(path), str(e)))
      logging.error('skipped: %s', e)
      progress.update()
      continue
    resized = image if image.size == size else image.resize(size,
                                                            Image.BILINEAR)
    batch.append((path, image, np.asarray(resized, np.uint8).reshape(
        *size, scorer.channels)))
    if len(batch) == batch_size:
      flush()
  if batch:
    flush()
  progress.close()
  return rows, skipped


def predict(workdir: str, input_pattern: str, output: str | None = None,
            overwrite: bool = False, batch_size: int = 8,
            export_platforms: Sequence[str] = (),
            untrained: bool = False) -> PredictSummary:
  """Scores the images of ``input_pattern`` with ``workdir``'s run.

  Args:
    workdir: a trained workdir whose maps ``evaluate.py`` fitted.
    input_pattern: a folder (searched recursively) or a glob pattern.
    output: the output folder (default ``<workdir>/predict``).
    overwrite: replace an earlier output in ``output``.
    batch_size: images per scorer call.
    export_platforms: also serialize the scorer for these platforms
      (e.g. ``('cpu',)``) to ``<output>/scorer``.
    untrained: score with the networks training starts from and the maps
      ``evaluate.py --untrained`` fitted (``scorer.load_scorer``).

  Returns:
    The summary; ``skipped`` non-empty means some files were not scored.
  """
  files, root = list_inputs(input_pattern)
  output = output or os.path.join(workdir, 'predict')
  prepare_output(output, files, root, overwrite)
  scorer = scorer_lib.load_scorer(workdir, untrained=untrained)
  logging.info('scoring %d files with %s (checkpoint %d, map %s) into %s',
               len(files), workdir, scorer.step, scorer.headline, output)
  rows, skipped = score_files(scorer, files, root, output, batch_size)
  _write(output, rows, skipped, scorer, input_pattern)
  if export_platforms:
    path = export_lib.save(os.path.join(output, 'scorer'), scorer,
                           export_platforms)
    logging.info('serialized the scorer to %s', path)
  logging.info('scored %d images, skipped %d; wrote %s', len(rows),
               len(skipped), output)
  return PredictSummary(output, len(rows), skipped)


def _write(output: str, rows: list[dict], skipped: list[tuple[str, str]],
           scorer: scorer_lib.Scorer, input_pattern: str) -> None:
  with open(os.path.join(output, SCORES_FILE), 'w', newline='') as f:
    writer = csv.DictWriter(f, ['path', 'score', 'anomalous', 'map_max',
                                'overlay', 'mask'])
    writer.writeheader()
    writer.writerows(rows)
  pixel, image, _ = scorer.thresholds
  with open(os.path.join(output, SUMMARY_FILE), 'w') as f:
    json.dump(dict(input=input_pattern, map=scorer.headline,
                   checkpoint_step=scorer.step, pixel_threshold=pixel,
                   image_threshold=image, scored=len(rows),
                   anomalous=sum(r['anomalous'] for r in rows),
                   skipped=[dict(path=p, reason=r) for p, r in skipped]),
              f, indent=2)
