"""predict.py's program: score unlabelled images with a trained run.

Every readable image (PNG, JPEG, BMP, TIFF; 8 or 16 bit; gray, RGB or
RGBA; any size) is decoded upright (EXIF orientation) and converted like
the training images (``data.images``), resized to the model's size
(``data.images.model_input``), scored by the run's ``Scorer`` (the headline
map only), and its map resized back to the image's own size. An image of
more than ``MAX_OUTPUT_PIXELS`` is reduced at decode by an integer factor
to at most that many pixels (``data.images.open_image``), and its overlay
and mask have that reduced size: memory stays bounded whatever the file.
The output folder gets

* ``scores.csv``: per scored file its image score, the decision at the
  held-out image threshold (``anomalous`` 1/0) and the maximum of its map;
* ``overlays/<file>.png``: the map over the image with a colour bar and
  the contour of the held-out pixel threshold (``visualize.overlay``);
* ``masks/<file>.png``: the map above the pixel threshold (255) or not (0);
* ``predict.json``: the thresholds, the checkpoint, the counts and every
  skipped file with its reason;
* with ``export_platforms``, ``scorer/``: the scorer serialized by
  ``cavga_jax.deploy.export``;
* ``predict_manifest.json``: every file above, written before them
  (``predict_output``): ``overwrite`` deletes only what it lists.

``<file>`` is the file's path relative to the input folder as given
(symlinks not followed), so every input gets its own overlay and mask.

A file that cannot be read, or whose map or score is not finite (a
corrupted checkpoint or fit: never reported as normal), is named in the
log and skipped: it has no row in scores.csv, and ``predict.json`` lists
it with the reason. The rest are scored. Everything that can stop the run
(the export platforms, the inputs, the output folder, the scorer) is
checked before anything is written; the input folder is never written to.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import os
import pathlib
import sys
from typing import Sequence

import numpy as np
import tqdm

from cavga_jax.data import folder
from cavga_jax.data import images as images_lib
from cavga_jax.deploy import export as export_lib
from cavga_jax.deploy import predict_output
from cavga_jax.deploy import scorer as scorer_lib
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import artifacts
from cavga_jax.evaluation import visualize

SCORES_FILE = 'scores.csv'
SUMMARY_FILE = 'predict.json'
SCORER_DIR = 'scorer'
# Larger images are reduced at decode to at most this many pixels (their
# overlay and mask too): about 25 bytes a pixel for the overlay and mask
# (docs/memory.md).
MAX_OUTPUT_PIXELS = 4096 * 4096
# A batch is scored early once its images hold this many pixels, so a
# batch of large images does not stay in memory at once.
_BATCH_PIXELS = 2 * MAX_OUTPUT_PIXELS


@dataclasses.dataclass
class PredictSummary:
  """What ``predict`` did: the output folder, the scored and skipped files."""
  output: str
  scored: int
  skipped: list[tuple[str, str]]


def list_inputs(pattern: str) -> tuple[list[pathlib.Path], pathlib.Path]:
  """(image files, the folder they are named relative to) of ``pattern``.

  An existing file is that file, whatever its name (``[`` included); a
  folder contributes its image files (``folder.IMAGE_EXTENSIONS``) and
  those of its subfolders; anything else is a glob pattern, of every file
  it matches (whatever the extension: a file that is not an image is
  reported, not ignored).
  """
  path = pathlib.Path(pattern)
  if path.is_dir():
    files = sorted(
        p for p in path.rglob('*') if p.is_file() and not p.name.startswith('.')
        and p.suffix.lower() in folder.IMAGE_EXTENSIONS)
    root = path
  elif path.is_file():
    files, root = [path], path.parent
  else:
    files = sorted(
        pathlib.Path(p)
        for p in glob.glob(pattern, recursive=True)
        if os.path.isfile(p))
    root = pathlib.Path(
        os.path.commonpath([os.path.abspath(p.parent) for p in files
                           ])) if files else path
  if not files:
    raise CavgaError(f'{pattern}: no image files found (a file, a folder, or '
                     'a glob such as "dir/*.png"; extensions '
                     f'{", ".join(folder.IMAGE_EXTENSIONS)})')
  return files, root


def output_names(files: Sequence[pathlib.Path],
                 root: pathlib.Path) -> list[str]:
  """Per file the name of its overlay and mask (``+ '.png'``), all distinct.

  The file's path relative to ``root`` as given ('/'-separated; symlinks
  are not resolved, so two links to one file, or to files of one name,
  get two names); a name taken already (compared case-insensitively, for
  case-insensitive disks) gets '~2', '~3', ... appended.
  """
  base = os.path.abspath(root)
  names, taken = [], set()
  for path in files:
    name = os.path.relpath(os.path.abspath(path), base)
    if name == '..' or name.startswith('..' + os.sep):
      name = path.name
    name = pathlib.Path(name).as_posix()
    unique, k = name, 1
    while unique.casefold() in taken:
      k += 1
      unique = f'{name}~{k}'
    taken.add(unique.casefold())
    names.append(unique)
  return names


def planned_files(names: Sequence[str], export: bool) -> list[str]:
  """Every file predict.py may write for ``names``, relative to the output."""
  files = [SCORES_FILE, SUMMARY_FILE]
  files += [
      f'{folder_name}/{name}.png' for name in names
      for folder_name in ('overlays', 'masks')
  ]
  if export:
    files += [
        f'{SCORER_DIR}/{export_lib.PROGRAM_FILE}',
        f'{SCORER_DIR}/{export_lib.METADATA_FILE}'
    ]
  return files


def prepare_output(output: str,
                   inputs: Sequence[pathlib.Path],
                   input_root: pathlib.Path,
                   overwrite: bool,
                   workdir: str | None = None,
                   planned: Sequence[str] | None = None) -> None:
  """Checks ``output`` and makes it ready (``predict_output``).

  ``planned``: the files the run will write (default: those of ``inputs``
  without an export).

  Raises:
    CavgaError: ``output`` may not be written (``check_location``) or holds
      files that ``overwrite`` may not delete (``check_earlier``); nothing
      was deleted then.
  """
  if planned is None:
    planned = planned_files(output_names(inputs, input_root), False)
  predict_output.check_location(output, inputs, input_root, workdir)
  predict_output.prepare(output, planned, overwrite)


def score_files(
    scorer: scorer_lib.Scorer,
    files: Sequence[pathlib.Path],
    root: pathlib.Path,
    output: str,
    batch_size: int = 8,
    names: Sequence[str] | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
  """Scores ``files`` into ``output``'s overlays/ and masks/.

  ``names``: ``output_names(files, root)`` unless given.

  Returns:
    (rows of scores.csv, (path, reason) of each file that was skipped:
    unreadable, or a non-finite map or score).
  """
  names = names if names is not None else output_names(files, root)
  pixel_threshold, _, _ = scorer.thresholds
  low, high = artifacts.threshold_display_range(scorer.thresholds)
  rows, skipped, batch = [], [], []
  progress = tqdm.tqdm(
      total=len(files), unit='img', file=sys.stderr, desc='predict')

  def skip(path, reason):
    skipped.append((str(path), reason))
    logging.error('skipped: %s', reason)
    progress.update()

  def flush():
    images = np.stack([resized for _, _, _, resized in batch])
    # Full batches only, so the scorer compiles once.
    padded = np.concatenate([images]
                            + [images[-1:]] * (batch_size - len(images)))
    maps, scores = scorer.score(padded)
    anomalous, finite = scorer.decide(maps, scores)
    for i, (path, name, image, _) in enumerate(batch):
      if not finite[i]:
        skip(
            path, f'{path}: the map or score is not finite (score '
            f'{float(scores[i])}): the checkpoint or the fitted maps '
            'are corrupted; not scored')
        continue
      # The map back at the (decoded) file's size (PIL sizes are (W, H)).
      full = visualize.resize(maps[i], image.size[::-1])
      visualize.save_png(
          os.path.join(output, 'overlays', name + '.png'),
          visualize.overlay(
              np.asarray(image), full, low, high, pixel_threshold))
      visualize.save_png(
          os.path.join(output, 'masks', name + '.png'),
          (full > pixel_threshold).astype(np.uint8) * 255)
      rows.append(
          dict(
              path=str(path),
              score=float(scores[i]),
              anomalous=int(anomalous[i]),
              map_max=float(maps[i].max()),
              overlay=f'overlays/{name}.png',
              mask=f'masks/{name}.png'))
      progress.update()
    batch.clear()

  held = 0  # pixels of the batch's decoded images
  for path, name in zip(files, names):
    try:
      image = images_lib.read_image(path, scorer.channels, MAX_OUTPUT_PIXELS)
    except CavgaError as e:
      skip(path, str(e))
      continue
    batch.append((path, name, image,
                  images_lib.model_input(image, scorer.image_size,
                                         scorer.channels)))
    held += image.width * image.height
    if len(batch) == batch_size or held >= _BATCH_PIXELS:
      flush()
      held = 0
  if batch:
    flush()
  progress.close()
  return rows, skipped


def predict(workdir: str,
            input_pattern: str,
            output: str | None = None,
            overwrite: bool = False,
            batch_size: int = 8,
            export_platforms: Sequence[str] = (),
            untrained: bool = False) -> PredictSummary:
  """Scores the images of ``input_pattern`` with ``workdir``'s run.

  Args:
    workdir: a trained workdir whose maps ``evaluate.py`` fitted.
    input_pattern: a file, a folder (searched recursively) or a glob.
    output: the output folder (default ``<workdir>/predict``).
    overwrite: replace an earlier output in ``output`` (only the files its
      manifest lists are deleted; ``predict_output``).
    batch_size: images per scorer call.
    export_platforms: also serialize the scorer for these platforms
      (``export.PLATFORMS``, e.g. ``('cpu',)``) to ``<output>/scorer``.
    untrained: score with the networks training starts from and the maps
      ``evaluate.py --untrained`` fitted (``scorer.load_scorer``).

  Returns:
    The summary; ``skipped`` non-empty means some files were not scored.

  Raises:
    CavgaError: before anything is written, for unknown platforms, no
      inputs, an output predict.py may not write, or a run that cannot be
      loaded.
  """
  platforms = (
      export_lib.check_platforms(export_platforms) if export_platforms else ())
  if batch_size < 1:
    raise CavgaError(f'--batch_size={batch_size} must be at least 1')
  files, root = list_inputs(input_pattern)
  output = output or os.path.join(workdir, 'predict')
  names = output_names(files, root)
  planned = planned_files(names, bool(platforms))
  predict_output.check_location(output, files, root, workdir)
  predict_output.check_earlier(output, planned, overwrite)
  scorer = scorer_lib.load_scorer(workdir, untrained=untrained)
  prepare_output(output, files, root, overwrite, workdir, planned)
  logging.info('scoring %d files with %s (checkpoint %d, map %s) into %s',
               len(files), workdir, scorer.step, scorer.headline, output)
  rows, skipped = score_files(scorer, files, root, output, batch_size, names)
  _write(output, rows, skipped, scorer, input_pattern)
  if platforms:
    path = export_lib.save(os.path.join(output, SCORER_DIR), scorer, platforms)
    logging.info('serialized the scorer to %s', path)
  predict_output.finish(output)
  logging.info('scored %d images, skipped %d; wrote %s', len(rows),
               len(skipped), output)
  return PredictSummary(output, len(rows), skipped)


def _write(output: str, rows: list[dict], skipped: list[tuple[str, str]],
           scorer: scorer_lib.Scorer, input_pattern: str) -> None:
  with open(os.path.join(output, SCORES_FILE), 'w', newline='') as f:
    writer = csv.DictWriter(
        f, ['path', 'score', 'anomalous', 'map_max', 'overlay', 'mask'])
    writer.writeheader()
    writer.writerows(rows)
  pixel, image, _ = scorer.thresholds
  with open(os.path.join(output, SUMMARY_FILE), 'w') as f:
    json.dump(
        dict(
            input=input_pattern,
            map=scorer.headline,
            checkpoint_step=scorer.step,
            pixel_threshold=pixel,
            image_threshold=image,
            scored=len(rows),
            anomalous=sum(r['anomalous'] for r in rows),
            max_output_pixels=MAX_OUTPUT_PIXELS,
            skipped=[dict(path=p, reason=r) for p, r in skipped]),
        f,
        indent=2)
