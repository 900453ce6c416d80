"""The trained detector (SimpleNet): its step, resume, registry entry, and
its path through train.py, evaluate.py, predict.py and the export."""

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavga_jax import config_checks
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.deploy import export
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import store
from cavga_jax.maps import detector
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import predict as predict_lib
from cavga_jax.programs import train as train_lib
from cavga_jax.training import detector_training
from configs import tiny

_TRAIN = detector.TrainSettings(
    num_steps=6, batch_size=64, log_every=2, checkpoint_every=3, noise_std=0.5)
_SETTINGS = detector_training.Settings(
    map=detector.DetectorSettings(hidden=16),
    train=_TRAIN,
    seed=0,
    eval_batch_size=8,
    threshold_holdout=0.1)


def _cells(num=512, dims=6, seed=0):
  return np.random.default_rng(seed).normal(2.0, 3.0,
                                            (num, dims)).astype(np.float32)


def _train(workdir, num_steps, cells):
  settings = dataclasses.replace(
      _SETTINGS, train=dataclasses.replace(_TRAIN, num_steps=num_steps))
  mean, std = cells.mean(0), cells.std(0)
  return detector_training.train_on_cells(settings, str(workdir), cells, mean,
                                          std, sharding.make_mesh())


def test_step_separates_noisy_from_normal_features():
  cells = _cells()
  moments = detector.ChannelMoments()
  moments.add(cells)
  mean, std = moments.statistics()
  np.testing.assert_allclose(mean, cells.mean(0), rtol=1e-5)
  train = dataclasses.replace(_TRAIN, learning_rate=3e-3, noise_std=1.0)
  state = detector.create_state(
      detector.DetectorSettings(hidden=16), train, mean, std)
  # The adaptor starts as the identity.
  np.testing.assert_array_equal(state.params['adaptor']['kernel'],
                                np.eye(cells.shape[1]))
  step = jax.jit(detector.make_train_step(train))
  rng = jax.random.key(0)
  losses = []
  for i in range(60):
    batch = cells[np.random.default_rng(i).integers(0, len(cells), 128)]
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics['loss']))
    assert float(metrics['nonfinite']) == 0.0
  assert int(state.step) == 60
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  # Far from the normal features scores higher (the map is -D).
  map_state = state.map_state()
  normal = detector.cell_scores(map_state, jnp.asarray(cells[None, :16, None]))
  far = detector.cell_scores(map_state,
                             jnp.asarray(cells[None, :16, None] + 3.0 * std))
  assert float(jnp.mean(far)) > float(jnp.mean(normal))


def test_resume_equals_an_uninterrupted_run(tmp_path):
  cells = _cells()
  full = _train(tmp_path / 'full', 6, cells)
  _train(tmp_path / 'resumed', 3, cells)  # stops at checkpoint 3
  resumed = _train(tmp_path / 'resumed', 6, cells)
  assert int(resumed.step) == 6
  jax.tree.map(np.testing.assert_array_equal, resumed.map_state(),
               full.map_state())
  state, step = detector_training.trained_state(str(tmp_path / 'full'))
  assert step == 6  # no validation logged: the newest
  jax.tree.map(np.testing.assert_array_equal, state, full.map_state())
  # The synthetic validation selects among the kept checkpoints (3, 6).
  curve = (
      tmp_path / 'full' / detector_training.DETECTOR_DIR / 'eval_curve.jsonl')
  curve.write_text(''.join(
      json.dumps(
          dict(
              step=s, maps={detector_training.VALIDATION: dict(pixel_auroc=p)}))
      + '\n' for s, p in ((3, 0.9), (6, 0.8))))
  assert detector_training.selected_step(str(tmp_path / 'full')) == 3
  assert detector_training.trained_state(str(tmp_path / 'full'))[1] == 3


def test_aggregate_one_is_the_identity_and_three_a_local_mean():
  features = jnp.asarray(
      np.random.default_rng(0).normal(size=(2, 5, 5, 4)).astype(np.float32))
  np.testing.assert_array_equal(detector.aggregate(features, 1), features)
  mean = detector.aggregate(features, 3)
  np.testing.assert_allclose(
      mean[:, 2, 2],
      features[:, 1:4, 1:4].mean(axis=(1, 2)),
      rtol=1e-5,
      atol=1e-6)
  # A corner averages its 2 x 2 cells (the padding is not counted).
  np.testing.assert_allclose(
      mean[:, 0, 0],
      features[:, :2, :2].mean(axis=(1, 2)),
      rtol=1e-5,
      atol=1e-6)


def test_aggregate_flows_from_the_config_to_training_and_evaluation():
  config = tiny.get_config()
  run = typed_config.from_config(config)
  assert detector_training.settings_from_run(run).map.aggregate == 3
  assert detector.DetectorSettings().aggregate == run.detector.aggregate == 3
  config.detector.aggregate = 1
  config.detector.hidden = 256
  run = config_checks.check_config(config)
  trained = detector_training.settings_from_run(run).map
  assert (trained.aggregate, trained.hidden) == (1, 256)
  # The evaluation (and the scorer) reads the features as the training did.
  evaluated = evaluator_lib.fitted_settings(run.eval, run.detector)
  assert evaluated[detector.NAME] == trained


@pytest.mark.parametrize('value', [0, 2, 4, -1, True])
def test_a_bad_aggregate_is_refused(value):
  config = tiny.get_config()
  config.detector.aggregate = value
  with pytest.raises(CavgaError, match='config.detector.aggregate'):
    config_checks.check_config(config)


def test_registered_with_the_feature_maps_features():
  spec = registry.spec(detector.NAME)
  assert spec.kind == 'fitted' and registry.ENCODER in spec.needs
  config = tiny.get_config()
  config.eval.feature_stages = (1, 2, 3)
  eval_settings = typed_config.from_config(config).eval
  settings = evaluator_lib.fitted_settings(eval_settings)[detector.NAME]
  assert settings.stages == (1, 2, 3)
  # A trained state replaces the fit; the fit key then names it.
  trained = {'mean': np.ones(3, np.float32)}
  fitted = fitting.fit_statistics(
      iter([]), {detector.NAME: settings}, None, {detector.NAME: trained})
  assert fitted.maps[detector.NAME] == trained
  eval_state = type('S', (), dict(generator_variables=lambda self: {}))()
  plain = store.fit_key(eval_settings, 0, eval_state, 32, 4)
  keyed = store.fit_key(eval_settings, 0, eval_state, 32, 4,
                        {detector.NAME: trained})
  assert store.differing_fields(plain, keyed) == ['trained_sha256']


def test_trained_by_train_py_then_evaluated_predicted_and_exported(tmp_path):
  config = tiny.get_config()
  config.train.num_steps = 0  # no VAE-GAN: its initial state is step 0
  config.detector.num_steps = 4
  config.detector.batch_size = 64
  config.detector.hidden = 16
  config.detector.checkpoint_every = 2
  config.eval.map = detector.NAME
  config.eval.maps = 'headline'
  workdir = str(tmp_path / 'run')
  train_lib.train(config, workdir)
  trained, step = detector_training.trained_state(workdir)
  assert step == 4
  metrics = eval_lib.evaluate(config, workdir)
  assert metrics['map'] == detector.NAME and 'prior_normal' in metrics['maps']
  # The fit holds the trained detector, not an untrained one.
  fitted = store.load(store.fitted_dir(workdir, 0))
  jax.tree.map(np.testing.assert_array_equal, fitted.maps[detector.NAME],
               trained)
  curve = (tmp_path / 'run' / detector_training.DETECTOR_DIR
           / 'eval_curve.jsonl').read_text()
  assert 'synthetic_validation' in curve

  folder = tmp_path / 'in'
  folder.mkdir()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).integers(
      0, 256, (2, 32, 32, 3), dtype=np.uint8)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i}.png')
  out = tmp_path / 'out'
  summary = predict_lib.predict(
      workdir, str(folder), str(out), export_platforms=('cpu',))
  assert summary.scored == 2
  with open(out / predict_lib.SCORES_FILE) as f:
    predicted = np.array([float(r['score']) for r in csv.DictReader(f)])
  exported, metadata = export.load(str(out / predict_lib.SCORER_DIR))
  assert metadata['headline'] == detector.NAME
  _, exported_scores, _ = exported.call(images)
  np.testing.assert_allclose(exported_scores, predicted, rtol=1e-5, atol=1e-6)
