"""Files a workdir holds are checked: fitted maps carry a checksum, JSON and
Orbax files that are damaged or no longer fit the config are one-line
errors, one workdir has one writer, and evaluate.py checks its test set."""

import contextlib
import dataclasses
import gc
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import types

import jax
import numpy as np
from PIL import Image
import pytest

from cavga_jax import checkpointing
from cavga_jax import data
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.deploy import scorer as scorer_lib
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import scoring
from cavga_jax.evaluation import store
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import predict as predict_lib
from cavga_jax.programs import runtime
from cavga_jax.programs import train as train_lib
from cavga_jax.training import train_state
from configs import tiny

# These tests hand Orbax damaged or mismatched files on purpose. When its
# restore fails, Orbax leaves array-reading coroutines un-awaited, and
# Python reports them ("Event loop is closed", "coroutine ... was never
# awaited") when they are garbage-collected, after the one-line error
# these tests check was raised. That is Orbax's cleanup, not ours (13 of
# a CI run's 21 warnings on 2026-12-08, reported under whichever test ran
# when they were collected): each test collects them before it ends, where
# this filter applies.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture(autouse=True)
def _collect_orbax_leftovers():
  yield
  gc.collect()


def _one_line(error: BaseException, *names: str) -> str:
  """``str(error)``, asserted to be one line naming each of ``names``."""
  message = str(error)
  assert '\n' not in message and 'Traceback' not in message, message
  for name in names:
    assert str(name) in message, (name, message)
  return message


def _fitted_maps(seed: int = 0) -> fitting.FittedMaps:
  rng = np.random.default_rng(seed)
  return fitting.FittedMaps(
      maps={
          'residual_calibrated':
              dict(
                  mean=rng.random((8, 8), np.float32),
                  scale=rng.random((8, 8), np.float32)),
          'feature_gaussian':
              dict(
                  mean=rng.random((2, 2, 4), np.float32),
                  precision=rng.random((2, 2, 4, 4), np.float32)),
          # The largest file.
          'feature_knn':
              dict(bank=rng.random((1024, 32), np.float32))
      },
      normalisers={'feature_gaussian': (0.5, 0.25, 0.4, 1.5)},
      thresholds={
          'residual': (1.0, 2.0, 0.5), 'feature_gaussian': (3.0, 4.0, 1.0)
      })


def _state(seed: int = 0) -> types.SimpleNamespace:
  """Stands in for a train state: what fit_key and a fit read of it."""
  rng = np.random.default_rng(seed)
  state = types.SimpleNamespace(
      gen_params={'conv': {'kernel': rng.random((3, 3, 2, 4), np.float32)}},
      gen_batch_stats={
          'bn': {
              'mean': rng.random(4, np.float32),
              'var': rng.random(4, np.float32)
          }
      })
  state.generator_variables = lambda: {
      'params': state.gen_params, 'batch_stats': state.gen_batch_stats
  }
  return state


def _flip_bytes(directory: str) -> None:
  """Inverts bytes across the largest file under ``directory`` (Orbax's
  array data), as a failing disk or a bad copy would."""
  files = [p for p in pathlib.Path(directory).rglob('*') if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  content = bytearray(largest.read_bytes())
  for i in range(len(content) // 3, len(content), 97):
    content[i] ^= 0xFF
  largest.write_bytes(bytes(content))


def _write_nan(directory: str) -> None:
  """Rewrites the saved state with a NaN in one array (a consistent Orbax
  checkpoint: only the checksum in fit.json can tell)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state_path = os.path.join(directory, 'state')
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(state_path)
    tree['maps']['feature_knn']['bank'][3, 1] = np.nan
    shutil.rmtree(state_path)
    checkpointer.save(state_path, tree)
    checkpointer.wait_until_finished()


def _truncate_all(directory: str) -> None:
  for path in pathlib.Path(directory).rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:5])


_DAMAGE = {
    'nan written': _write_nan,
    'bytes flipped': lambda d: _flip_bytes(os.path.join(d, 'state')),
    'state truncated': lambda d: _truncate_all(os.path.join(d, 'state')),
    'state missing': lambda d: shutil.rmtree(os.path.join(d, 'state')),
}
_BAD_JSON = {
    'empty': b'', 'not json': b'{"step": 4,', 'a list': b'[1, 2]',
    'not utf-8': b'\xff\xfe{', 'null': b'null'
}


@pytest.mark.parametrize('damage', list(_DAMAGE))
def test_a_damaged_fit_fails_its_checksum_on_load(tmp_path, damage):
  directory = str(tmp_path / 'fitted' / 'step_4')
  key = store.fit_key(
      typed_config.from_config(tiny.get_config()).eval, 4, _state(), 32, 16)
  store.save(directory, _fitted_maps(), key)
  assert store.load(directory, key).thresholds['residual'] == (1.0, 2.0, 0.5)
  _DAMAGE[damage](directory)
  with pytest.raises(store.FitError) as info:
    store.load(directory, key)
  _one_line(info.value, directory, 'evaluate.py')


@pytest.mark.parametrize('content', list(_BAD_JSON) + ['old format'])
def test_an_unreadable_fit_json_is_a_fit_error(tmp_path, content):
  directory = str(tmp_path / 'fitted' / 'step_4')
  key = store.fit_key(
      typed_config.from_config(tiny.get_config()).eval, 4, _state(), 32, 16)
  store.save(directory, _fitted_maps(), key)
  path = os.path.join(directory, store.KEY_FILE)
  with open(path, 'wb') as f:
    f.write(
        json.dumps(dict(key, params_checksum=1908.291)).encode() if content ==
        'old format' else _BAD_JSON[content])
  for read in (store.saved_key, lambda d: store.load(d, key)):
    with pytest.raises(store.FitError) as info:
      read(directory)
    _one_line(info.value, path)


def test_the_key_covers_params_and_batch_stats_bit_for_bit():
  config = tiny.get_config()
  key = store.fit_key(
      typed_config.from_config(config).eval, 4, _state(), 32, 16)
  assert key == store.fit_key(
      typed_config.from_config(config).eval, 4, _state(), 32, 16)
  for tree in ('gen_params', 'gen_batch_stats'):
    state = _state()
    leaf = jax.tree.leaves(getattr(state, tree))[0]
    leaf.view(np.uint32)[0] ^= 1  # one bit of one float
    assert store.differing_fields(
        key,
        store.fit_key(typed_config.from_config(config).eval, 4, state, 32,
                      16)) == ['variables_sha256'], tree


class _Evaluator:
  """What fitted_maps reads of an evaluator; counts the fits."""
  image_size, num_normal_images = 32, 16
  trained = {}  # no trained detector
  detector_config = None  # the detector's defaults

  def __init__(self):
    self.fits = 0

  def fit(self, params, batch_stats):
    del params, batch_stats
    self.fits += 1
    return _fitted_maps()

  def missing(self, fitted):
    del fitted
    return []  # every map this evaluation asks for


def test_evaluate_refits_a_damaged_fit_saying_why(tmp_path, caplog):
  config, workdir, state = tiny.get_config(), str(tmp_path), _state()
  run = typed_config.from_config(config)
  evaluator = _Evaluator()
  fitted = eval_lib.fitted_maps(config, run.eval, workdir, evaluator, state, 4)
  assert evaluator.fits == 1
  eval_lib.fitted_maps(config, run.eval, workdir, evaluator, state, 4)
  assert evaluator.fits == 1  # reused
  directory = store.fitted_dir(workdir, 4)
  _flip_bytes(os.path.join(directory, 'state'))
  with caplog.at_level(logging.WARNING):
    refitted = eval_lib.fitted_maps(config, run.eval, workdir, evaluator, state,
                                    4)
  assert evaluator.fits == 2
  assert f'refitting the maps: {directory}/state: the fitted maps fail their ' \
      'checksum' in caplog.text
  np.testing.assert_array_equal(refitted.maps['feature_knn']['bank'],
                                fitted.maps['feature_knn']['bank'])
  assert store.load(directory, store.fit_key(run.eval, 4, state, 32,
                                             16)) is not None
  (pathlib.Path(directory) / store.KEY_FILE).write_text('')
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    eval_lib.fitted_maps(config, run.eval, workdir, evaluator, state, 4)
  assert evaluator.fits == 3
  assert 'fit.json: empty file' in caplog.text


@pytest.mark.parametrize('content', list(_BAD_JSON))
def test_a_bad_config_json_is_one_line(tmp_path, content, tiny_config):
  path = tmp_path / 'config.json'
  path.write_bytes(_BAD_JSON[content])
  for read in (lambda: workdirs.check_rerun(tiny_config, str(tmp_path)),
               lambda: scorer_lib.read_config(str(tmp_path))):
    with pytest.raises(CavgaError) as info:
      read()
    _one_line(info.value, path)


def test_predict_py_names_an_empty_config_json_in_one_line(tmp_path):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('')
  (tmp_path / 'in').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'in' / 'a.png')
  # What predict.py's main runs, in this process (a subprocess costs 15 s).
  with pytest.raises(SystemExit) as info:
    runtime.run_program(
        lambda _, workdir: predict_lib.predict(workdir, str(tmp_path / 'in'),
                                               str(tmp_path / 'out')), None,
        str(tmp_path / 'run'), '')
  assert info.value.code == (
      f'error: {tmp_path / "run" / "config.json"}: empty file, expected a '
      'JSON object; it should hold the config the run was trained with '
      '(train.py writes it)')


def _abstract_state(config):
  mesh = sharding.make_mesh()
  _, _, init_fn, _ = train_state.setup(typed_config.from_config(config), mesh)
  return train_state.abstract_state(init_fn, mesh)


def _checkpoint(workdir: str, config) -> None:
  """``workdir`` as train.py leaves it, with checkpoint 1: a state of
  ``config``'s shapes (zeros: compiling the initialiser takes a minute)."""
  manager = checkpointing.make_manager(workdir)
  checkpointing.save(
      manager, 1,
      jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                   _abstract_state(config)))
  manager.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def test_a_checkpoint_that_no_longer_fits_the_config_is_one_line(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny.get_config()
  _checkpoint(workdir, config)
  edited = config.copy_and_resolve_references()
  edited.model.latent_channels = 16
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(edited.to_json_best_effort(indent=2))  # config.json edited
  step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), '1')
  with pytest.raises(CavgaError) as info:
    scorer_lib.load_scorer(workdir)  # predict.py reads config.json
  message = _one_line(
      info.value, step_dir, 'the config differs from the one '
      f'{os.path.abspath(workdir)} was trained with')
  assert 'is (3, 3, 8, 32) in the checkpoint, (3, 3, 16, 32) with this ' \
      'config' in message
  # Damaged files: one line too (a checkpoint's flipped array bytes go
  # unnoticed: only the fitted maps carry a checksum).
  _truncate_all(step_dir)
  with pytest.raises(CavgaError) as info:
    checkpointing.restore_for_eval(workdir, _abstract_state(config))
  _one_line(info.value, step_dir, 'cannot be read')


def test_predict_stops_on_a_damaged_fit_naming_it(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny.get_config()
  _checkpoint(workdir, config)
  state, step = checkpointing.restore_for_eval(workdir, _abstract_state(config))
  directory = store.fitted_dir(workdir, step)
  store.save(
      directory, _fitted_maps(),
      store.fit_key(typed_config.from_config(config).eval, step, state, 32, 16))
  assert scorer_lib.load_scorer(workdir).thresholds == (3.0, 4.0, 1.0)
  _flip_bytes(os.path.join(directory, 'state'))
  # What predict.py's main runs, in this process.
  with pytest.raises(SystemExit) as info:
    runtime.run_program(lambda _, w: scorer_lib.load_scorer(w), None, workdir,
                        '')
  assert info.value.code == (
      f'error: {directory}/state: the fitted maps fail their checksum in '
      f'{directory}/fit.json (damaged or edited since evaluate.py saved '
      'them); run evaluate.py on this workdir to fit the maps again')


def _normal_test_set(num: int = 4) -> data.AnomalyDataset:
  return data.AnomalyDataset(
      images=np.full((num, 32, 32, 3), 128, np.uint8),
      masks=np.zeros((num, 32, 32), bool),
      labels=np.zeros(num, np.int32),
      defect_types=('good',) * num,
      paths=tuple(f'/data/part/test/good/{i}.png' for i in range(num)))


def _made(test_ds: data.AnomalyDataset) -> types.SimpleNamespace:
  """What ``eval_lib.evaluate`` reads of ``run_setup.setup``'s result."""
  return types.SimpleNamespace(
      run=typed_config.from_config(tiny.get_config()),
      test_ds=test_ds,
      state=_state(),
      step=0)


class _ScoringEvaluator(_Evaluator):
  """An evaluator whose network gives random maps; scored for real."""

  def __call__(self, params, batch_stats, fitted):
    del params, batch_stats
    rng, n = np.random.default_rng(0), self.dataset.num_examples
    maps = {
        name: rng.random((n, 32, 32), np.float32)
        for name in ('residual', 'feature_gaussian')
    }
    predictions = dict(
        maps=maps,
        map_scores={k: v.max(axis=(1, 2)) for k, v in maps.items()},
        score=rng.random(n, np.float32),
        reconstruction=self.dataset.images)
    return scoring.compute_metrics(predictions, self.dataset,
                                   'feature_gaussian',
                                   fitted.thresholds), predictions


def test_a_test_set_without_defects_gives_null_metrics_saying_why(
    tmp_path, monkeypatch, caplog):
  test_ds = _normal_test_set()
  evaluator = _ScoringEvaluator()
  evaluator.dataset = test_ds
  monkeypatch.setattr(eval_lib, 'evaluation_setup', lambda *args, **kwargs:
                      (_made(test_ds), evaluator))
  result = eval_lib.evaluate(tiny.get_config(), str(tmp_path), untrained=True)
  with open(tmp_path / eval_lib.UNTRAINED_DIR / 'metrics.json') as f:
    text = f.read()
  assert 'NaN' not in text
  written = json.loads(text)
  assert written == result
  assert written['pixel_auroc'] is None and written['image_auroc'] is None
  assert written['maps']['residual']['aupro'] is None
  # Defined without defects: every image under the held-out threshold 2.
  assert written['maps']['residual']['detection_accuracy_held_out'] == 1.0
  assert written[eval_lib.NO_DEFECTS_FIELD] == (
      '/data/part/test/good: the test set has no defect images (all 4 are '
      'normal); the pixel metrics and the image AUROC need defect images '
      'with masks, so metrics.json gives them as null')
  with caplog.at_level(logging.WARNING):
    eval_lib.check_test_set(test_ds)
  assert written[eval_lib.NO_DEFECTS_FIELD] in caplog.text
  with pytest.raises(
      data.DataError,
      match='/data/part/test/good: the test '
      'set has no defect images .* a learning curve'):
    eval_lib.evaluate_checkpoints(tiny.get_config(), str(tmp_path))


def test_defect_images_without_defect_pixels_are_named(caplog):
  masks = np.zeros((4, 32, 32), bool)
  masks[2, 5:9, 5:9] = True
  test_ds = data.AnomalyDataset(
      images=np.zeros((4, 32, 32, 3), np.uint8),
      masks=masks,
      labels=np.array([0, 1, 1, 1], np.int32),
      defect_types=('good', 'crack', 'crack', 'crack'),
      paths=tuple(f'/data/part/test/{i}.png' for i in range(4)))
  with caplog.at_level(logging.WARNING):
    eval_lib.check_test_set(test_ds)
  assert ('2 of 3 defect test images have no defect pixel at 32 px'
          in caplog.text)
  assert '/data/part/test/1.png, /data/part/test/3.png' in caplog.text
  # No defect image with a defect pixel: a dataset without pixel ground
  # truth (the one-class TFDS sets), not named image by image.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    eval_lib.check_test_set(dataclasses.replace(test_ds, masks=masks & False))
  assert caplog.text == ''


# A lock holder in another process: flock on the lock file, its record in it.
_HOLDER = '''
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps(dict(program='train.py', pid=os.getpid(),
                             host=socket.gethostname(), since='now')).encode())
print('holding', flush=True)
time.sleep(120)
'''


def _unreadable_data(config):
  """``config`` on a dataset root that does not exist: a run that gets past
  the lock fails at once."""
  config.data.name = 'mvtec'
  config.data.root = '/nonexistent/cavga_jax_data'
  return config


@contextlib.contextmanager
def _held(path):
  """Another live process holding the lock file ``path``; yields its pid."""
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLDER, str(path)],
      stdout=subprocess.PIPE,
      text=True)
  try:
    assert holder.stdout.readline().strip() == 'holding'
    yield holder.pid
  finally:
    holder.kill()
    holder.wait()


def test_a_second_writer_stops_naming_the_process_that_holds_the_workdir(
    tmp_path, tiny_config, monkeypatch):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with _held(workdir / workdirs.LOCK_FILE) as pid:
    with pytest.raises(CavgaError) as info:
      train_lib.train(_unreadable_data(tiny_config), str(workdir))
    _one_line(info.value, workdir, f'pid {pid} on host '
              f'{socket.gethostname()}', 'train.py')
    assert sorted(os.listdir(workdir)) == [workdirs.LOCK_FILE]  # untouched
    with pytest.raises(CavgaError, match='is in use'):  # nor --overwrite
      train_lib.train(tiny_config, str(workdir), overwrite=True)
  # The kernel released the dead holder's lock; its record is left behind.
  assert f'"pid": {pid}' in (workdir / workdirs.LOCK_FILE).read_text()

  # An evaluation may run beside training, not beside another evaluation.
  evaluator = _ScoringEvaluator()
  evaluator.dataset = _normal_test_set()
  monkeypatch.setattr(
      eval_lib, 'evaluation_setup', lambda *args, **kwargs:
      (_made(evaluator.dataset), evaluator))
  with _held(workdir / workdirs.EVALUATE_LOCK_FILE) as pid:
    with pytest.raises(CavgaError, match=f'pid {pid} on host'):
      eval_lib.evaluate(tiny_config, str(workdir), untrained=True)
    assert not os.path.exists(store.fitted_dir(str(workdir), 0, True))


def test_a_stale_lock_is_taken_over_and_released_on_error(
    tmp_path, tiny_config, caplog):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  dead = subprocess.Popen([sys.executable, '-c', ''])
  dead.wait()
  (workdir / workdirs.LOCK_FILE).write_text(
      json.dumps(
          dict(
              program='train.py',
              pid=dead.pid,
              host=socket.gethostname(),
              since='then')))
  with caplog.at_level(logging.WARNING), pytest.raises(
      data.DataError, match='/nonexistent/cavga_jax_data'):
    train_lib.train(_unreadable_data(tiny_config), str(workdir))
  assert (f'taking over the lock of train.py (pid {dead.pid} on host '
          f'{socket.gethostname()}') in caplog.text
  assert (workdir / workdirs.LOCK_FILE).read_text() == ''  # released
  with workdirs.lock(str(workdir), 'train.py'):
    record = json.loads((workdir / workdirs.LOCK_FILE).read_text())
    assert record['pid'] == os.getpid()
  # A file of other content is not a lock of ours: never written over.
  (workdir / workdirs.LOCK_FILE).write_text('my notes')
  with pytest.raises(CavgaError, match='not a lock file'):
    with workdirs.lock(str(workdir), 'train.py'):
      pass
  assert (workdir / workdirs.LOCK_FILE).read_text() == 'my notes'


def test_the_key_covers_the_detectors_shape():
  # An untrained detector's fit saved with another aggregation or width
  # would be applied with this run's: the key holds both, so it refits.
  eval_settings = typed_config.from_config(tiny.get_config()).eval
  default = store.fit_key(eval_settings, 4, _state(), 32, 16)
  assert default == store.fit_key(eval_settings, 4, _state(), 32, 16, None,
                                  typed_config.DetectorSettings())
  for changed in (dict(aggregate=1), dict(hidden=256)):
    other = store.fit_key(eval_settings, 4, _state(), 32, 16, None,
                          typed_config.DetectorSettings(**changed))
    assert store.differing_fields(default,
                                  other) == [f'detector.{next(iter(changed))}']
