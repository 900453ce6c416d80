#!/usr/bin/env python
"""Converts the ShanghaiTech Campus download to mSTC in the MVTec AD layout.

Usage:
  python scripts/convert_mstc.py --source /data/shanghaitech --output /data/mstc
  python train.py --config=configs/mvtec.py --workdir=runs/mstc_01 \
      --config.data.root=/data/mstc --config.data.category=01

One category per scene; every 5th frame by default (``--frame_step``).
Needs PyAV: ``pip install 'cavga_jax[converters]'``. The conversion itself
is ``cavga_jax.data.converters.convert_mstc``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from cavga_jax import errors
from cavga_jax.data.converters import mstc


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the conversion; returns 0, or 1 with a one-line error on stderr."""
  parser = argparse.ArgumentParser(
      description='Convert ShanghaiTech Campus (training/videos, testing/'
      'frames, testing/test_*_mask) to mSTC in the MVTec AD '
      'folder layout, one category per scene.')
  parser.add_argument(
      '--source', required=True, help='STC root holding training/ and testing/')
  parser.add_argument(
      '--output',
      required=True,
      help='dataset root to create (config.data.root)')
  parser.add_argument(
      '--frame_step',
      type=int,
      default=mstc.DEFAULT_FRAME_STEP,
      help='keep every k-th frame (default %(default)s)')
  parser.add_argument(
      '--scenes',
      default='',
      help='comma-separated scene ids, e.g. 01,04 (default: '
      'every scene with training videos and test clips)')
  parser.add_argument('--image_format', default='jpg', choices=['jpg', 'png'])
  parser.add_argument(
      '--resize',
      type=int,
      default=0,
      help='resize frames and masks to N x N (0: keep size)')
  parser.add_argument('--num_workers', type=int, default=4)
  parser.add_argument(
      '--overwrite',
      action='store_true',
      help='replace an existing output folder')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(message)s')
  scenes = [s.strip() for s in args.scenes.split(',') if s.strip()]
  try:
    summary = mstc.convert_mstc(
        args.source,
        args.output,
        frame_step=args.frame_step,
        scenes=scenes or None,
        image_format=args.image_format,
        resize=args.resize,
        overwrite=args.overwrite,
        num_workers=args.num_workers)
  except errors.CavgaError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for scene, counts in summary['scenes'].items():
    print(f'{args.output}/{scene}: train {counts["train"]}, test good '
          f'{counts["test_good"]}, test anomaly {counts["test_anomaly"]} '
          f'({counts["anomaly_without_pixels"]} left out: anomalous frames '
          'without annotated pixels)')
  if summary['skipped_scenes']:
    print(f'skipped scenes without both training videos and test clips: '
          f'{", ".join(summary["skipped_scenes"])}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
