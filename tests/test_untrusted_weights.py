"""Crafted weight files never run code nor read outside their buffers (#37).

``.pth`` files are built here with the standard library (pickle opcodes by
hand, zipfile) in both of torch's formats, or mutated from the torch-written
ones in tests/golden; ``.npz`` files with numpy. torch is not needed. Every
payload's side effect is a marker file, which must not appear.
"""

import io
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest

from cavga_jax import errors
from cavga_jax.weights import pretrained
from cavga_jax.weights import torch_pickle
from conftest import load_script

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
_MAGIC = 0x1950a86a20f9469cfc6c
_SYSTEM = {
    'protocol_version': 1001, 'little_endian': True,
    'type_sizes': {'short': 2, 'int': 4, 'long': 4}
}
_STORAGE_NAMES = {
    np.dtype(np.float32): 'FloatStorage',
    np.dtype(np.float16): 'HalfStorage',
    np.dtype(np.int64): 'LongStorage',
    np.dtype(np.bool_): 'BoolStorage'
}

# A minimal torch.save, opcode by opcode (protocol 2, as torch writes).


def _global(module, name):
  return f'c{module}\n{name}\n'.encode()


def _data(obj):
  """Opcodes of plain data, without PROTO and STOP."""
  return pickle.dumps(obj, protocol=2)[2:-1]


def _tensor(key,
            storage,
            offset,
            size,
            stride,
            legacy,
            numel=None,
            storage_name=None):
  """_rebuild_tensor_v2(storage ``key``, offset, size, stride, ...)."""
  pid = (b'(' + _data('storage')
         + _global('torch', storage_name or _STORAGE_NAMES[storage.dtype])
         + _data(key) + _data('cpu')
         + _data(storage.size if numel is None else numel) +
         (_data(None) if legacy else b'') + b'tQ')
  return (_global('torch._utils', '_rebuild_tensor_v2') + b'(' + pid
          + _data(offset) + _data(size) + _data(stride) + _data(False)
          + _global('collections', 'OrderedDict') + b')RtR')


def _state_dict_record(entries):
  """A pickled {name: opcodes of its value} (a dict, as torch writes)."""
  return (b'\x80\x02}('
          + b''.join(_data(name) + value for name, value in entries.items())
          + b'u.')


def _legacy(storages, views, records=None, counts=None):
  """The legacy format's bytes; ``records``/``counts`` replace parts."""
  entries = {
      name: _tensor(key, storages[key], *view, legacy=True)
      for name, (key, *view) in views.items()
  }
  parts = [
      pickle.dumps(_MAGIC, 2),
      pickle.dumps(1001, 2),
      pickle.dumps(_SYSTEM, 2),
      _state_dict_record(entries),
      pickle.dumps(sorted(storages), 2)
  ]
  for index, record in (records or {}).items():
    parts[index] = record
  for key in sorted(storages):
    count = (counts or {}).get(key, storages[key].size)
    parts.append(struct.pack('<q', count) + storages[key].tobytes())
  return b''.join(parts)


def _zip(members, compression=zipfile.ZIP_STORED):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', compression) as archive:
    for name, data in members.items():
      archive.writestr(f'archive/{name}', data)
  return buffer.getvalue()


def _zip_members(storages, views, data_pkl=None):
  entries = {
      name: _tensor(key, storages[key], *view, legacy=False)
      for name, (key, *view) in views.items()
  }
  members = {
      'data.pkl': data_pkl or _state_dict_record(entries),
      'byteorder': b'little', 'version': b'3\n'
  }
  members.update({f'data/{k}': a.tobytes() for k, a in storages.items()})
  return members


_STORAGES = {
    '0': np.arange(12, dtype=np.float32) * 0.5, '1': np.array([3, -1, 7],
                                                              dtype=np.int64),
    '2': np.array([1, 0, 1, 1], dtype=np.bool_)
}
# name: (storage key, offset, size, stride)
_VIEWS = {
    'w': ('0', 0, (3, 4), (4, 1)),
    't': ('0', 0, (4, 3), (1, 4)),
    'tail': ('0', 8, (2, 2), (2, 1)),
    'n': ('1', 1, (), ()),
    'b': ('2', 0, (4,), (1,)),
    # A length-1 dimension's stride never moves: torch leaves any.
    'row': ('0', 4, (1, 4), (10**30, 1)),
    'empty': ('0', 12, (0, 5), (5, 1))
}


def _expected():
  s = _STORAGES
  return {
      'w': s['0'].reshape(3, 4), 't': s['0'].reshape(3, 4).T,
      'tail': s['0'][8:].reshape(2, 2), 'n': np.array(-1), 'b': s['2'],
      'row': s['0'][4:8].reshape(1, 4), 'empty': np.zeros((0, 5), np.float32)
  }


def _write(tmp_path, data, name='weights.pth'):
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


def _refused(path, match=None):
  """Asserts a one-line DataError naming ``path``; returns its message."""
  with pytest.raises(errors.DataError, match=match) as e:
    torch_pickle.load(path)
  message = str(e.value)
  assert message.startswith(f'{path}: ') and len(message.splitlines()) == 1
  return message


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_the_test_writer_makes_files_the_reader_reads(tmp_path, fmt):
  data = (
      _legacy(_STORAGES, _VIEWS) if fmt == 'legacy' else _zip(
          _zip_members(_STORAGES, _VIEWS)))
  loaded = torch_pickle.load(_write(tmp_path, data))
  expected = _expected()
  assert list(loaded) == list(expected)
  for key, value in expected.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
    np.testing.assert_array_equal(loaded[key], value)


# Payloads: a pickle record that, if run, creates ``marker``.


def _exec_payload(marker):
  # GLOBAL builtins.exec + REDUCE (protocol 2).

  class Exec:

    def __reduce__(self):
      return (exec, (f'open({str(marker)!r}, "w").close()',))

  return pickle.dumps(Exec(), protocol=2)


def _touch_payload(marker):
  # STACK_GLOBAL pathlib Path.touch + REDUCE (protocol 4).

  class Touch:

    def __reduce__(self):
      return (pathlib.Path.touch, (pathlib.Path(marker),))

  return pickle.dumps(Touch(), protocol=4)


def _inst_payload(marker):
  # INST (protocol 0): instantiates builtins.exec with the marked arguments.
  return (b"(S'open(%r, \"w\").close()'\nibuiltins\nexec\n."
          % str(marker).encode())


_PAYLOADS = {
    'exec': _exec_payload, 'touch': _touch_payload, 'inst': _inst_payload
}

_RECORDS = [
    'legacy magic', 'legacy protocol', 'legacy system info',
    'legacy state dict', 'legacy storage keys', 'zip data.pkl'
]


@pytest.mark.parametrize('payload', sorted(_PAYLOADS))
@pytest.mark.parametrize('record', _RECORDS)
def test_code_in_any_pickle_record_never_runs(tmp_path, record, payload):
  marker = tmp_path / 'ran'
  pickled = _PAYLOADS[payload](marker)
  if record == 'zip data.pkl':
    data = _zip(_zip_members(_STORAGES, _VIEWS, data_pkl=pickled))
  else:
    data = _legacy(_STORAGES, _VIEWS, records={_RECORDS.index(record): pickled})
  _refused(_write(tmp_path, data))
  assert not marker.exists()


@pytest.mark.parametrize(
    'member', ['byteorder', 'version', 'data/0', '.data/serialization_id'])
def test_code_in_other_zip_members_is_never_unpickled(tmp_path, member):
  marker = tmp_path / 'ran'
  members = _zip_members(_STORAGES, _VIEWS)
  members[member] = _exec_payload(marker)
  try:
    torch_pickle.load(_write(tmp_path, _zip(members)))
  except errors.DataError:
    pass  # e.g. the storage's size no longer fits its tensors
  assert not marker.exists()


def test_code_in_a_nested_value_never_runs(tmp_path):
  # The payload inside the system info dict of a legacy file.
  marker = tmp_path / 'ran'
  record = (b'\x80\x02}(' + _data('little_endian') + b'\x88' + _data('x')
            + _exec_payload(marker)[2:-1] + b'u.')
  _refused(
      _write(tmp_path, _legacy(_STORAGES, _VIEWS, records={2: record})),
      match='refusing to load')
  assert not marker.exists()


def test_code_in_a_pth_never_runs_in_the_converter_script(tmp_path, capsys):
  marker = tmp_path / 'ran'
  path = _write(tmp_path,
                _legacy(_STORAGES, _VIEWS, records={0: _exec_payload(marker)}),
                'resnet18-f37072fd.pth')
  out = tmp_path / 'out.npz'
  script = load_script('scripts/convert_torchvision_resnet18.py')
  assert script.main(['--input', path, '--output', str(out)]) == 1
  err = capsys.readouterr().err
  assert path in err and len(err.strip().splitlines()) == 1
  assert not marker.exists() and not out.exists()


def _with_view(view, fmt, storages=None):
  storages = storages or {'0': np.arange(6, dtype=np.float32)}
  views = {'x': view}
  if fmt == 'legacy':
    return _legacy(storages, views)
  return _zip(_zip_members(storages, views))


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
@pytest.mark.parametrize(
    'view, match',
    [
        (('0', 0, (10,), (1,)), 'does not fit its storage'),
        (('0', 5, (2,), (1,)), 'reaches element 6'),
        (('0', 7, (0,), (1,)), 'does not fit its storage'),
        (('0', 0, (2, 3), (2**60, 1)), 'reaches element'),
        (('0', 0, (2,), (2**62,)), 'reaches element'),  # strides * 4 overflow
        (('0', 0, (2**62,), (1,)), 'does not fit its storage'),
        (('0', 0, (3, 2**62), (0, 0)), 'does not fit its storage'),
        (('0', -1, (2,), (1,)), 'offset, size or stride'),
        (('0', 0, (2,), (-1,)), 'offset, size or stride'),
        (('0', 0, (-2,), (1,)), 'offset, size or stride'),
        (('0', 0, (2.0,), (1,)), 'offset, size or stride'),
        (('0', 0, [2], [1]), 'offset, size or stride'),
        (('0', 0, (1,) * 40, (1,) * 40), 'offset, size or stride'),
        (('0', 0, (2, 2), (1,)), 'offset, size or stride'),
    ])
def test_a_view_outside_its_storage_is_refused(tmp_path, fmt, view, match):
  _refused(_write(tmp_path, _with_view(view, fmt)), match=match)


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_pickle_build_cannot_move_a_tensor_after_its_checks(tmp_path, fmt):
  storage = {'0': np.arange(6, dtype=np.float32)}
  tensor = _tensor('0', storage['0'], 0, (2,), (1,), legacy=fmt == 'legacy')
  moved = tensor + _data({'offset': 1000}) + b'b'  # BUILD sets attributes
  record = _state_dict_record({'x': moved})
  data = (
      _legacy(storage, {}, records={3: record}) if fmt == 'legacy' else _zip(
          _zip_members(storage, {}, data_pkl=record)))
  _refused(_write(tmp_path, data), match='refusing to set attributes')


def test_legacy_storage_counts_must_match_the_bytes(tmp_path):
  views = {'x': ('0', 0, (6,), (1,))}
  storage = {'0': np.arange(6, dtype=np.float32)}
  _refused(
      _write(tmp_path, _legacy(storage, views, counts={'0': 5})),
      match='holds 5 elements, its tensors say 6')
  # An element count past the end of the file (and its tensors saying so).
  huge = 2**61
  entries = {
      'x': _tensor('0', storage['0'], 0, (6,), (1,), legacy=True, numel=huge)
  }
  data = _legacy(
      storage, {}, records={3: _state_dict_record(entries)}, counts={'0': huge})
  _refused(_write(tmp_path, data), match='truncated')
  _refused(_write(tmp_path, _legacy(storage, views)[:-4]), match='truncated')


@pytest.mark.parametrize('change, match', [
    (lambda m: m.update({'data/0': m['data/0'] + b'\0' * 8}), 'has 32 bytes'),
    (lambda m: m.update({'data/0': m['data/0'][:-4]}), 'has 20 bytes'),
    (lambda m: m.pop('data/0'), 'missing'),
    (lambda m: m.update({'byteorder': b'big'}), 'little-endian'),
])
def test_zip_storages_must_be_their_declared_size(tmp_path, change, match):
  members = _zip_members({'0': np.arange(6, dtype=np.float32)},
                         {'x': ('0', 0, (6,), (1,))})
  change(members)
  _refused(_write(tmp_path, _zip(members)), match=match)


def test_compressed_zip_members_are_refused(tmp_path):
  members = _zip_members(_STORAGES, _VIEWS)
  _refused(
      _write(tmp_path, _zip(members, zipfile.ZIP_DEFLATED)),
      match='is compressed')


def _pid(storage_type, key, numel, view=None):
  """A legacy persistent id: ('storage', type, key, 'cpu', numel, view)."""
  return (b'(' + _data('storage') + _global('torch', storage_type) + _data(key)
          + _data('cpu') + _data(numel) + _data(view) + b'tQ')


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
@pytest.mark.parametrize(
    'storage_id, match',
    [
        (_pid('ComplexFloatStorage', '0', 6), 'refusing to load'),
        (_pid('UntypedStorage', '0', 6), 'refusing to load'),
        # A view of a storage (torch < 0.4): not read, rather than misplaced.
        (_pid('FloatStorage', '0', 6, ('1', 2, 4)), 'storage views'),
        (_pid('FloatStorage', 0, 6), 'without a key'),  # torch writes str keys
        (_pid('FloatStorage', '0', -1), 'element count'),
        (_data('storage') + b'Q', 'not a torch storage'),
    ],
    ids=['complex', 'untyped', 'view', 'int key', 'negative numel', 'str'])
def test_malformed_storage_ids_are_refused(tmp_path, fmt, storage_id, match):
  # 'x': _rebuild_tensor_v2(<storage_id>, 0, (6,), (1,), False, OrderedDict())
  tensor = (
      _global('torch._utils', '_rebuild_tensor_v2') + b'(' + storage_id
      + _data(0) + _data((6,)) + _data((1,)) + _data(False)
      + _global('collections', 'OrderedDict') + b')RtR')
  record = _state_dict_record({'x': tensor})
  storage = {'0': np.arange(6, dtype=np.float32)}
  data = (
      _legacy(storage, {}, records={3: record}) if fmt == 'legacy' else _zip(
          _zip_members(storage, {}, data_pkl=record)))
  _refused(_write(tmp_path, data), match=match)


def test_bool_storages_hold_only_0_and_1(tmp_path):
  storage = {'0': np.array([1, 0, 1, 1], np.bool_)}
  members = _zip_members(storage, {'b': ('0', 0, (4,), (1,))})
  members['data/0'] = b'\x01\x00\x02\x01'
  _refused(_write(tmp_path, _zip(members)), match='other than 0 and 1')


def test_views_repeating_a_storage_cannot_exhaust_memory(tmp_path):
  storage = {'0': np.arange(6, dtype=np.float32)}
  views = {f'x{i}': ('0', 0, (6,), (1,)) for i in range(5)}
  _refused(
      _write(tmp_path, _zip(_zip_members(storage, views))),
      match='more than 4 times')
  # Tied weights (a storage viewed twice) are fine.
  tied = {f'x{i}': ('0', 0, (6,), (1,)) for i in range(2)}
  assert len(
      torch_pickle.load(_write(tmp_path, _zip(_zip_members(storage,
                                                           tied))))) == 2


def test_sparse_pickle_memo_is_refused(tmp_path):
  # The C unpickler would size its memo by the index: 2 ** 32 entries.
  record = b'\x80\x02K\x01r\xff\xff\xff\xff.'
  _refused(
      _write(tmp_path, _legacy(_STORAGES, _VIEWS, records={1: record})),
      match='memo index')


# Fuzzing: mutated files load arrays from their own bytes, or a DataError.


def _substrings(data, size):
  return {data[i:i + size] for i in range(len(data) - size + 1)}


def _check_loaded(loaded, data):
  """Every element of every array is bytes of the file."""
  assert isinstance(loaded, dict)
  pieces = {}
  for key, array in loaded.items():
    assert isinstance(key, str) and isinstance(array, np.ndarray)
    assert array.dtype.kind in 'biuf'
    size = array.dtype.itemsize
    if size not in pieces:
      pieces[size] = _substrings(data, size)
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for i in range(0, flat.size, size):
      assert flat[i:i + size].tobytes() in pieces[size], key


def _mutate(rng, data):
  data = bytearray(data)
  kind = rng.integers(4)
  if kind == 0:  # overwrite 1-4 bytes
    for _ in range(rng.integers(1, 5)):
      data[rng.integers(len(data))] = rng.integers(256)
  elif kind == 1:  # truncate
    del data[rng.integers(len(data)):]
  elif kind == 2:  # insert random bytes
    at = rng.integers(len(data) + 1)
    data[at:at] = rng.integers(0, 256,
                               rng.integers(1, 9)).astype(np.uint8).tobytes()
  else:  # delete a chunk
    at = rng.integers(len(data))
    del data[at:at + rng.integers(1, 9)]
  return bytes(data)


def _fuzz(tmp_path, seeds, load, check, n=150, rng_seed=37):
  rng = np.random.default_rng(rng_seed)
  path = str(tmp_path / 'fuzzed')
  for name, make in seeds.items():
    for i in range(n):
      data = make(rng)
      with open(path, 'wb') as f:
        f.write(data)
      try:
        loaded = load(path)
      except errors.DataError as e:
        assert len(str(e).splitlines()) == 1, (name, i)
        continue
      # pylint: disable=broad-except
      except Exception as e:  # the failure names the case to rerun
        raise AssertionError(
            f'{name} mutation {i}: {type(e).__name__}: {e}') from e
      check(loaded, data)


def _golden(name):
  with open(os.path.join(GOLDEN, name), 'rb') as f:
    return f.read()


def _member_mutation(rng, data, pick_pickle):
  """``data``'s members, one mutated, in a fresh zip (CRCs correct), so that
  the mutation reaches the member's parser."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    members = {i.filename: archive.read(i) for i in archive.infolist()}
  names = sorted(members)
  name = (
      next(n for n in names if n.endswith('data.pkl'))
      if pick_pickle else names[rng.integers(len(names))])
  members[name] = _mutate(rng, members[name])
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    for member, content in members.items():
      archive.writestr(member, content)
  return buffer.getvalue()


def test_fuzzed_pth_files_load_their_own_bytes_or_fail_in_one_line(tmp_path):
  legacy = _golden('tiny_state_dict_legacy.pth')
  golden_zip = _golden('tiny_state_dict_zip.pth')
  ours_legacy = _legacy(_STORAGES, _VIEWS)
  ours_zip = _zip(_zip_members(_STORAGES, _VIEWS))
  _fuzz(
      tmp_path, {
          'golden legacy bytes':
              lambda rng: _mutate(rng, legacy),
          'test writer legacy bytes':
              lambda rng: _mutate(rng, ours_legacy),
          'golden zip bytes':
              lambda rng: _mutate(rng, golden_zip),
          'golden zip data.pkl':
              lambda rng: _member_mutation(rng, golden_zip, True),
          'test writer zip members':
              lambda rng: _member_mutation(rng, ours_zip, False),
      }, torch_pickle.load, _check_loaded)


# .npz weights (config.model.pretrained): pretrained.read_encoder_weights.

_NPZ_ARRAYS = {
    'params/encoder/conv1/kernel':
        np.linspace(-1, 1, 108, dtype=np.float32).reshape(3, 3, 3, 4),
    'batch_stats/encoder/bn1/mean':
        np.arange(4, dtype=np.float32), 'counts':
            np.array([1, 2], np.int64)
}


def _npz(arrays, compressed=False):
  buffer = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
  return buffer.getvalue()


def _npy(descr, shape, data):
  """An .npy member (format 1.0) with this header and data."""
  text = (f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}"
          .encode('latin1'))
  text += b' ' * (-(len(text) + 11) % 64) + b'\n'
  return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(text)) + text + data


def _read_npz_refused(path, match=None):
  with pytest.raises(errors.DataError, match=match) as e:
    pretrained.read_encoder_weights(path)
  assert str(e.value).startswith(f'{path}: ')
  assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize(
    'member, match',
    [
        # numpy would allocate 4 TB before finding 16 bytes.
        (_npy("'<f4'", '(1000000000000,)',
              b'\0' * 16), 'holds 16 bytes, its header says'),
        (_npy("'<f4'", '(4,)', b'\0' * 12), 'holds 12 bytes'),
        (_npy("'<U3'", '(1,)', b'a\0\0\0' * 3), 'not numbers'),
        (_npy("[('a', '<f4')]", '(1,)', b'\0' * 4), 'not numbers'),
        (b'not an array at all', 'cannot read .npz'),
    ],
    ids=['huge shape', 'short data', 'strings', 'structured', 'garbage'])
def test_malformed_npz_members_are_refused(tmp_path, member, match):
  members = {'ok.npy': _npz_member(_NPZ_ARRAYS['counts']), 'bad.npy': member}
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  _read_npz_refused(_write(tmp_path, buffer.getvalue(), 'w.npz'), match)


def _npz_member(array):
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _evil_npz(marker):

  class Exec:

    def __reduce__(self):
      return (exec, (f'open({str(marker)!r}, "w").close()',))

  buffer = io.BytesIO()
  np.savez(buffer, evil=np.array([Exec()], dtype=object))
  return buffer.getvalue()


def _npz_with_text(marker):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('ok.npy', _npz_member(_NPZ_ARRAYS['counts']))
    archive.writestr('notes.txt', b'not weights')
  return buffer.getvalue()


@pytest.mark.parametrize(
    'make, match',
    [
        (_npz_with_text, 'is not a .npy array'),
        (_evil_npz, 'not numbers'),  # pickled objects: never unpickled
        (lambda marker: _npz_member(np.zeros(3)), 'not a zip of .npy arrays'),
    ],
    ids=['text member', 'pickled member', 'npy'])
def test_npz_that_is_not_numeric_arrays_is_refused(tmp_path, make, match):
  marker = tmp_path / 'ran'
  path = _write(tmp_path, make(marker), 'w.npz')
  _read_npz_refused(path, match)
  assert not marker.exists()


def test_non_finite_npz_weights_are_refused(tmp_path):
  # A NaN weight would make every score NaN.
  variables = {
      'params': {
          'encoder': {'conv1': {'kernel': np.zeros((3, 3, 3, 4), np.float32)}}
      }, 'batch_stats': {'encoder': {'bn1': {'mean': np.zeros(4, np.float32)}}}
  }
  arrays = {k: v for k, v in _NPZ_ARRAYS.items() if k != 'counts'}
  loaded = pretrained.load_pretrained_encoder(
      variables, _write(tmp_path, _npz(arrays), 'w.npz'))
  np.testing.assert_array_equal(loaded['batch_stats']['encoder']['bn1']['mean'],
                                arrays['batch_stats/encoder/bn1/mean'])
  arrays['batch_stats/encoder/bn1/mean'] = np.array([0, np.nan, 1, 2],
                                                    np.float32)
  path = _write(tmp_path, _npz(arrays), 'nan.npz')
  with pytest.raises(
      errors.DataError, match='non-finite values in batch_stats/encoder/bn1'):
    pretrained.load_pretrained_encoder(variables, path)


def _check_npz_loaded(loaded, data, raw):
  assert isinstance(loaded, dict)
  for key, array in loaded.items():
    assert isinstance(key, str) and isinstance(array, np.ndarray), key
    assert array.dtype.kind in 'biuf', key
  if raw:  # stored members: the arrays' bytes are the file's
    _check_loaded(loaded, data)


def test_fuzzed_npz_weights_load_their_own_bytes_or_fail_in_one_line(tmp_path):
  stored = _npz(_NPZ_ARRAYS)
  compressed = _npz(_NPZ_ARRAYS, compressed=True)
  for data in (stored, compressed):  # the unmutated files read back
    loaded = pretrained.read_encoder_weights(_write(tmp_path, data, 'w.npz'))
    assert list(loaded) == list(_NPZ_ARRAYS)
    for key, value in _NPZ_ARRAYS.items():
      np.testing.assert_array_equal(loaded[key], value)
  _fuzz(
      tmp_path, {
          'stored bytes': lambda rng: _mutate(rng, stored),
          'stored members': lambda rng: _member_mutation(rng, stored, False),
      }, pretrained.read_encoder_weights,
      lambda loaded, data: _check_npz_loaded(loaded, data, raw=True))
  _fuzz(tmp_path, {
      'compressed bytes': lambda rng: _mutate(rng, compressed),
  }, pretrained.read_encoder_weights,
        lambda loaded, data: _check_npz_loaded(loaded, data, raw=False))
