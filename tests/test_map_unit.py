"""A map is a unit: a fitted map defined here only, registered with one call,
is evaluated, saved with the fit, scored by predict.py and exported."""

import csv
import json

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cavga_jax import anomaly_maps
from cavga_jax import data
from cavga_jax import eval_lib
from cavga_jax import export
from cavga_jax import fitted_map
from cavga_jax import predict_lib
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import store
from configs import tiny

NAME = 'mean_deviation'


class _MeanImage:
  """Sum and count of (B, S, S, C) normal images, float64."""

  def __init__(self):
    self.total, self.count = 0.0, 0

  def add(self, images):
    self.total = self.total + np.asarray(images, np.float64).sum(axis=0)
    self.count += len(images)


def _finalize(accumulator, settings, mesh, progress):
  del settings, mesh, progress
  return {'mean': (accumulator.total / accumulator.count).astype(np.float32)}


def _apply(context, settings, state, images):
  """Per pixel, the mean over channels of |image - the mean normal image|."""
  del context, settings
  return jnp.mean(jnp.abs(images - state['mean']), axis=-1)


MEAN_DEVIATION = fitted_map.FittedMap(
    name=NAME, inputs=lambda context, settings, batch: batch['images'],
    init=lambda settings: _MeanImage(), finalize=_finalize, apply=_apply)


@pytest.fixture
def registered():
  registry.register(MEAN_DEVIATION)
  try:
    yield
  finally:
    registry.unregister(NAME)  # no other test sees it


def _expected(images: np.ndarray, mean: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """(maps, image scores) of uint8 ``images``, in numpy."""
  maps = np.abs(images / 127.5 - 1.0 - mean).mean(axis=-1)
  return maps, np.asarray(anomaly_maps.image_score(jnp.asarray(maps)))


def test_a_registered_map_is_evaluated_saved_predicted_and_exported(
    registered, tmp_path):
  del registered
  config = tiny.get_config()
  config.eval.map = NAME
  config.eval.maps = 'headline'  # only this map: no Grad-CAM, no network
  workdir = str(tmp_path / 'run')
  metrics = eval_lib.evaluate(config, workdir, untrained=True)
  assert set(metrics['maps']) == {NAME, 'prior', 'prior_normal'}
  assert metrics['pixel_auroc'] == metrics['maps'][NAME]['pixel_auroc']
  # An evaluation of every map (eval.maps='all') fits it beside the others.
  assert {NAME, 'feature_gaussian'} <= set(
      evaluator_lib.fitted_settings(config.eval))

  # The saved fit holds its state (checksummed in fit.json like the others):
  # the mean of the normal images it was fitted on.
  fitted = store.load(store.fitted_dir(workdir, 0, untrained=True))
  assert fitted.available() == (NAME,) and NAME in fitted.thresholds
  train, test = data.get_datasets(config, workdir)
  fit_images, _ = fitting.split_held_out(
      evaluator_lib.normal_training_images(train),
      config.eval.threshold_holdout)
  mean = (fit_images / 127.5 - 1.0).mean(axis=0)
  np.testing.assert_allclose(fitted.maps[NAME]['mean'], mean, atol=1e-6)

  # predict.py scores with it, and serializes the same scorer.
  images = test.images[:3]
  folder = tmp_path / 'in'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i}.png')
  out = tmp_path / 'out'
  summary = predict_lib.predict(workdir, str(folder), str(out),
                                export_platforms=('cpu',), untrained=True)
  assert summary.scored == len(images) and not summary.skipped
  assert json.loads((out / predict_lib.SUMMARY_FILE).read_text())['map'] == NAME
  with open(out / predict_lib.SCORES_FILE) as f:
    predicted = np.array([float(r['score']) for r in csv.DictReader(f)])
  maps, scores = _expected(images, mean)
  np.testing.assert_allclose(predicted, scores, rtol=1e-5, atol=1e-6)
  exported, metadata = export.load(str(out / predict_lib.SCORER_DIR))
  assert metadata['headline'] == NAME
  exported_maps, exported_scores, _ = exported.call(images)
  np.testing.assert_allclose(exported_maps, maps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(exported_scores, scores, rtol=1e-5, atol=1e-6)


def test_register_refuses_a_taken_name_and_unregister_undoes_it():
  spec = registry.register(MEAN_DEVIATION)
  try:
    assert spec.kind == 'fitted' and not spec.needs
    assert NAME in registry.headline_names()
    with pytest.raises(ValueError, match='registered already'):
      registry.register(MEAN_DEVIATION)
  finally:
    registry.unregister(NAME)
  assert NAME not in registry.names()
  with pytest.raises(ValueError, match='registered already'):
    registry.register(registry.spec('residual'))
