#!/usr/bin/env python
"""Converts ResNet-18 ImageNet weights to the .npz that cavga_jax loads.

Usage:
  python scripts/convert_torchvision_resnet18.py \
      --input resnet18-f37072fd.pth --output resnet18_imagenet.npz
  python scripts/convert_torchvision_resnet18.py \
      --input model.safetensors --output resnet18_imagenet.npz

``.pth`` input (torchvision ``ResNet18_Weights.IMAGENET1K_V1``) and
``.safetensors`` input (e.g. ``timm/resnet18.a1_in1k``) need neither torch nor
a network (``cavga_jax.weights.torch_pickle`` reads the .pth). Train with
``--config.model.pretrained=resnet18_imagenet.npz``.
The conversion itself is ``cavga_jax.weights.torch_weights.convert_file``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cavga_jax import errors
from cavga_jax.weights import torch_weights


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the conversion.

  Args:
    argv: command-line arguments without the program name; None reads
      sys.argv.

  Returns:
    Exit status: 0 on success, 1 when the input cannot be converted (the
    reason is printed as one line on stderr).
  """
  parser = argparse.ArgumentParser(
      description='Convert torchvision/timm resnet18 ImageNet weights (.pth '
      'or .safetensors) to a cavga_jax encoder .npz.')
  parser.add_argument(
      '--input',
      required=True,
      help='resnet18-f37072fd.pth or '
      'model.safetensors')
  parser.add_argument(
      '--output',
      required=True,
      help='.npz to write, for --config.model.pretrained')
  args = parser.parse_args(argv)
  try:
    arrays = torch_weights.convert_file(args.input, args.output)
  except errors.CavgaError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  n_params = sum(a.size for k, a in arrays.items() if k.startswith('params/'))
  n_stats = sum(
      a.size for k, a in arrays.items() if k.startswith('batch_stats/'))
  print(f'wrote {args.output}: {len(arrays)} tensors, {n_params:,} '
        f'parameters, {n_stats:,} batch-norm statistics (float32)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
