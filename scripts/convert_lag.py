#!/usr/bin/env python
"""Converts the LAG glaucoma database to the MVTec AD layout.

Usage:
  python scripts/convert_lag.py --source /data/LAG_database_part_1 --output /data/lag
  python train.py --config=configs/mvtec.py --workdir=runs/lag \
      --config.data.root=/data/lag --config.data.category=lag

Non-glaucoma images train (800 held out as normal test images, chosen by
``--seed``); glaucoma images are the anomalous test images, their attention
maps binarised at ``--threshold`` x the map's maximum the ground truth. The
conversion itself is ``cavga_jax.data.converters.convert_lag``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cavga_jax import errors
from cavga_jax.data.converters import lag


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the conversion; returns 0, or 1 with a one-line error on stderr."""
  parser = argparse.ArgumentParser(
      description='Convert LAG (non_glaucoma/image, suspicious_glaucoma/'
      '{image,attention_map}) to the MVTec AD folder layout.')
  parser.add_argument(
      '--source',
      required=True,
      help='LAG root holding non_glaucoma/ and '
      'suspicious_glaucoma/')
  parser.add_argument(
      '--output',
      required=True,
      help='dataset root to create (config.data.root)')
  parser.add_argument('--category', default=lag.DEFAULT_CATEGORY)
  parser.add_argument(
      '--num_test_normal',
      type=int,
      default=lag.DEFAULT_NUM_TEST_NORMAL,
      help='non-glaucoma images held out for the test split '
      '(default %(default)s)')
  parser.add_argument(
      '--seed', type=int, default=0, help='seed of the held-out choice')
  parser.add_argument(
      '--threshold',
      type=float,
      default=lag.DEFAULT_THRESHOLD,
      help='attention-map binarisation threshold, relative '
      'to each map\'s maximum (default %(default)s)')
  parser.add_argument('--num_workers', type=int, default=4)
  parser.add_argument(
      '--overwrite',
      action='store_true',
      help='replace an existing output folder')
  args = parser.parse_args(argv)
  try:
    summary = lag.convert_lag(
        args.source,
        args.output,
        category=args.category,
        num_test_normal=args.num_test_normal,
        seed=args.seed,
        threshold=args.threshold,
        overwrite=args.overwrite,
        num_workers=args.num_workers)
  except errors.CavgaError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{args.output}/{args.category}: train {summary["train"]}, test good '
        f'{summary["test_good"]}, test glaucoma {summary["test_glaucoma"]} '
        f'({summary["empty_masks"]} with an empty mask)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
