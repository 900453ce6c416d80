"""ShanghaiTech Campus (STC) -> mSTC in the MVTec AD folder layout.

Input: the STC download, unpacked::

  <source>/training/videos/<scene>_<clip>.avi          # normal only
  <source>/testing/frames/<scene>_<clip>/<frame>.jpg
  <source>/testing/test_frame_mask/<scene>_<clip>.npy  # (frames,) 0/1
  <source>/testing/test_pixel_mask/<scene>_<clip>.npy  # (frames, H, W) 0/1

Output: one category per scene (scenes with both training videos and test
clips; the others are skipped and reported)::

  <output>/<scene>/train/good/<scene>_<clip>_<frame>.jpg
  <output>/<scene>/test/good/<scene>_<clip>_<frame>.jpg
  <output>/<scene>/test/anomaly/<scene>_<clip>_<frame>.jpg
  <output>/<scene>/ground_truth/anomaly/<scene>_<clip>_<frame>_mask.png
  <output>/mstc_conversion.json                        # options and counts

Every `frame_step`-th frame is kept (frames 0, k, 2k, ... of every video and
test clip; default 5, i.e. ~5 fps from STC's 24 fps, which keeps near-copies
of consecutive frames out and the dataset a manageable size). A test frame
is anomalous when its frame label (`test_frame_mask`) is 1; its mask is the
pixel mask (nonzero -> 255). Anomalous frames whose pixel mask is empty are
left out and counted as `anomaly_without_pixels`: a defect image needs a
defect pixel (the loader refuses an all-zero mask of a defect image). Training
frames are decoded with PyAV (`pip install 'cavga_jax[converters]'`) and
saved as JPEG (quality 95) or PNG; test frames are re-encoded only when the
format or size changes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Sequence

import numpy as np

from cavga_jax.data.converters import common
from cavga_jax.data.folder import IMAGE_EXTENSIONS
from cavga_jax.data.folder import MASK_SUFFIX
from cavga_jax.data.folder import NORMAL_DEFECT
from cavga_jax.errors import DataError

VIDEO_EXTENSIONS = ('.avi', '.mp4', '.mkv', '.mov')
DEFAULT_FRAME_STEP = 5
ANOMALY_DEFECT = 'anomaly'

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _TestClip:
  """One test clip: its frame files (in order) and its two mask files."""
  name: str
  frames: tuple[pathlib.Path, ...]
  frame_mask: pathlib.Path
  pixel_mask: pathlib.Path


def _scene_of(path: pathlib.Path) -> str:
  scene, sep, clip = path.stem.partition('_')
  if not sep or not scene or not clip:
    raise DataError(f'{path}: unexpected name, expected <scene>_<clip> '
                    f'(e.g. 01_001)')
  return scene


def _frame_key(path: pathlib.Path) -> tuple[int, str]:
  # STC frames are 000.jpg ... but clips can exceed 999 frames: order
  # numerically so that '1000' does not sort before '101'.
  return (int(path.stem) if path.stem.isdigit() else 1 << 62, path.name)


def _list(folder: pathlib.Path,
          extensions: Sequence[str],
          dirs: bool = False) -> list[pathlib.Path]:
  try:
    entries = list(folder.iterdir())
  except OSError as e:
    raise DataError(
        f'{folder}: cannot list folder ({common.one_line(e)})') from None
  if dirs:
    found = [p for p in entries if p.is_dir() and not p.name.startswith('.')]
  else:
    found = [
        p for p in entries if p.is_file() and not p.name.startswith('.')
        and p.suffix.lower() in extensions
    ]
  return sorted(found, key=lambda p: p.name)


def _find_videos(source: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  folder = common.require_dir(source / 'training' / 'videos', 'training videos')
  videos: dict[str, list[pathlib.Path]] = {}
  for path in _list(folder, VIDEO_EXTENSIONS):
    videos.setdefault(_scene_of(path), []).append(path)
  if not videos:
    raise DataError(f'{folder}: no training videos '
                    f'({", ".join(VIDEO_EXTENSIONS)})')
  return videos


def _find_test_clips(source: pathlib.Path) -> dict[str, list[_TestClip]]:
  testing = common.require_dir(source / 'testing', 'testing')
  frames_dir = common.require_dir(testing / 'frames', 'test frames')
  frame_masks = common.require_dir(testing / 'test_frame_mask',
                                   'test frame labels')
  pixel_masks = common.require_dir(testing / 'test_pixel_mask',
                                   'test pixel masks')
  clips: dict[str, list[_TestClip]] = {}
  for clip_dir in _list(frames_dir, (), dirs=True):
    frames = sorted(_list(clip_dir, IMAGE_EXTENSIONS), key=_frame_key)
    if not frames:
      raise DataError(f'{clip_dir}: test clip folder has no frames')
    frame_mask = frame_masks / f'{clip_dir.name}.npy'
    pixel_mask = pixel_masks / f'{clip_dir.name}.npy'
    for path, what in ((frame_mask, 'frame labels'), (pixel_mask,
                                                      'pixel masks')):
      if not path.is_file():
        raise DataError(f'{path}: {what} are missing for the frames in '
                        f'{clip_dir}')
    clips.setdefault(_scene_of(clip_dir), []).append(
        _TestClip(clip_dir.name, tuple(frames), frame_mask, pixel_mask))
  if not clips:
    raise DataError(f'{frames_dir}: no test clip folders')
  return clips


def _video_frames(path: pathlib.Path, frame_step: int):
  """Yields (index, PIL RGB image) for every `frame_step`-th frame."""
  # Imported here: only this converter needs the video package.
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f'{path}: decoding videos needs PyAV: pip install '
                    f'"cavga_jax[converters]" (or pip install av)') from None
  count = 0
  try:
    with av.open(os.fspath(path)) as container:
      if not container.streams.video:
        raise DataError(f'{path}: file has no video stream')
      for index, frame in enumerate(container.decode(video=0)):
        count += 1
        if index % frame_step == 0:
          yield index, frame.to_image().convert('RGB')
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PyAV raises av.error.* (InvalidDataError etc.) for broken files.
    raise DataError(
        f'{path}: cannot decode video after {count} frames, the '
        f'file is truncated or not a video ({common.one_line(e)})') from None
  if count == 0:
    raise DataError(f'{path}: video has no frames')


def _convert_video(path: pathlib.Path, out_dir: pathlib.Path, frame_step: int,
                   image_format: str, resize: int) -> int:
  written = 0
  for index, image in _video_frames(path, frame_step):
    common.save_image(image,
                      out_dir / f'{path.stem}_{index:04d}.{image_format}',
                      image_format, resize)
    written += 1
  return written


def _load_masks(clip: _TestClip) -> tuple[np.ndarray, np.ndarray]:
  """(frame labels (n,) bool, pixel masks (n, H, W), memory-mapped)."""
  arrays = []
  for path in (clip.frame_mask, clip.pixel_mask):
    try:
      arrays.append(np.load(path, mmap_mode='r', allow_pickle=False))
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f'{path}: cannot read .npy file ({common.one_line(e)})') from None
  labels, pixels = arrays
  n = len(clip.frames)
  if labels.ndim != 1 or labels.shape[0] != n:
    raise DataError(f'{clip.frame_mask}: frame labels have shape '
                    f'{labels.shape}, expected ({n},) for the {n} frames of '
                    f'clip {clip.name}')
  if pixels.ndim != 3 or pixels.shape[0] != n:
    raise DataError(f'{clip.pixel_mask}: pixel masks have shape '
                    f'{pixels.shape}, expected ({n}, H, W) for the {n} '
                    f'frames of clip {clip.name}')
  return np.asarray(labels) != 0, pixels


def _convert_clip(clip: _TestClip, category: pathlib.Path, frame_step: int,
                  image_format: str, resize: int) -> dict[str, int]:
  labels, pixels = _load_masks(clip)
  counts = {NORMAL_DEFECT: 0, ANOMALY_DEFECT: 0, 'anomaly_without_pixels': 0}
  for index in range(0, len(clip.frames), frame_step):
    frame_path = clip.frames[index]
    image = common.open_image(frame_path, 'frame')
    mask = np.asarray(pixels[index]) != 0
    if mask.shape != (image.size[1], image.size[0]):
      raise DataError(
          f'{clip.pixel_mask}: pixel mask {index} is {mask.shape[1]}x'
          f'{mask.shape[0]}, but frame {frame_path} is '
          f'{image.size[0]}x{image.size[1]}')
    defect = ANOMALY_DEFECT if labels[index] else NORMAL_DEFECT
    if defect == ANOMALY_DEFECT and not mask.any():
      counts['anomaly_without_pixels'] += 1
      continue
    stem = f'{clip.name}_{index:04d}'
    out = category / 'test' / defect / f'{stem}.{image_format}'
    source_format = frame_path.suffix.lower().lstrip('.').replace('jpeg', 'jpg')
    if source_format == image_format and not resize:
      shutil.copyfile(frame_path, out)  # No re-encoding loss.
    else:
      common.save_image(image.convert('RGB'), out, image_format, resize)
    counts[defect] += 1
    if defect == ANOMALY_DEFECT:
      common.save_mask(
          mask, category / 'ground_truth' / defect / f'{stem}{MASK_SUFFIX}.png',
          resize)
  return counts


def convert_mstc(source: str | os.PathLike,
                 output: str | os.PathLike,
                 *,
                 frame_step: int = DEFAULT_FRAME_STEP,
                 scenes: Sequence[str] | None = None,
                 image_format: str = 'jpg',
                 resize: int = 0,
                 overwrite: bool = False,
                 num_workers: int = 4) -> dict[str, Any]:
  """Converts an unpacked STC download to mSTC (see the module docstring).

  Everything is checked (folders, masks for every test clip, mask shapes)
  before the first frame is written; the output appears only when the
  whole conversion succeeded.

  Args:
    source: the STC root (holding `training/` and `testing/`).
    output: the folder to create; it becomes a dataset root with one
      category per scene (`config.data.root`, `config.data.category=<scene>`).
    frame_step: keep every `frame_step`-th frame (>= 1).
    scenes: scene ids to convert (e.g. ['01', '04']); None converts every
      scene with both training videos and test clips.
    image_format: 'jpg' or 'png' for the written frames.
    resize: > 0 resizes frames (bilinear) and masks (nearest) to
      resize x resize; 0 keeps the original size.
    overwrite: replace an existing non-empty `output`.
    num_workers: threads decoding videos and clips in parallel.

  Returns:
    The summary also written to `<output>/mstc_conversion.json`: the
    options, `scenes` {scene: {'train', 'test_good', 'test_anomaly',
    'anomaly_without_pixels'} counts} and `skipped_scenes`.

  Raises:
    DataError: a missing folder, a test clip without masks, masks of the
      wrong shape, an unreadable video or frame, bad options, or an
      existing output without `overwrite`.
  """
  common.check_common_args(image_format, resize, num_workers)
  if isinstance(frame_step,
                bool) or int(frame_step) != frame_step or (frame_step < 1):
    raise DataError(f'frame_step must be an integer >= 1, got {frame_step!r}')
  source = pathlib.Path(source)
  common.require_dir(source, 'STC source')
  videos = _find_videos(source)
  clips = _find_test_clips(source)
  both = sorted(set(videos) & set(clips))
  if scenes:
    unknown = sorted(set(scenes) - set(both))
    if unknown:
      raise DataError(
          f'{source}: scene(s) {", ".join(unknown)} have no training videos '
          f'or no test clips (scenes with both: {", ".join(both) or "none"})')
    selected = sorted(set(scenes))
  else:
    selected = both
  if not selected:
    raise DataError(f'{source}: no scene has both training videos and test '
                    f'clips (video scenes: {", ".join(sorted(videos))}; test '
                    f'scenes: {", ".join(sorted(clips))})')
  skipped = sorted((set(videos) | set(clips)) - set(selected))
  # Validate every test clip's masks before writing anything.
  for scene in selected:
    for clip in clips[scene]:
      _load_masks(clip)

  with common.atomic_output(output, overwrite) as tmp:
    for scene in selected:
      category = tmp / scene
      for sub in (('train', NORMAL_DEFECT), ('test', NORMAL_DEFECT),
                  ('test', ANOMALY_DEFECT), ('ground_truth', ANOMALY_DEFECT)):
        (category.joinpath(*sub)).mkdir(parents=True)
    tasks = ([('video', scene, v) for scene in selected for v in videos[scene]]
             + [('clip', scene, c) for scene in selected for c in clips[scene]])

    def run(task):
      kind, scene, item = task
      if kind == 'video':
        return _convert_video(item, tmp / scene / 'train' / NORMAL_DEFECT,
                              frame_step, image_format, resize)
      return _convert_clip(item, tmp / scene, frame_step, image_format, resize)

    results = common.parallel_map(run, tasks, num_workers)
    counts = {
        scene:
            dict(
                train=0, test_good=0, test_anomaly=0, anomaly_without_pixels=0)
        for scene in selected
    }
    for (kind, scene, _), result in zip(tasks, results):
      if kind == 'video':
        counts[scene]['train'] += result
      else:
        counts[scene]['test_good'] += result[NORMAL_DEFECT]
        counts[scene]['test_anomaly'] += result[ANOMALY_DEFECT]
        counts[scene]['anomaly_without_pixels'] += result[
            'anomaly_without_pixels']
    for scene, c in counts.items():
      if c['test_anomaly'] == 0:
        _log.warning(
            'mSTC scene %s: no anomalous test frame kept with '
            'frame_step %d', scene, frame_step)
    summary = dict(
        source=os.fspath(source.absolute()),
        frame_step=frame_step,
        image_format=image_format,
        resize=resize,
        scenes=counts,
        skipped_scenes=skipped)
    with open(tmp / 'mstc_conversion.json', 'w') as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary
