"""A map is a unit: a fitted map defined here only, registered with one call,
is evaluated, saved with the fit, scored by predict.py and exported."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax.deploy import export
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import fitting
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import store
from cavga_jax.maps import anomaly_maps
from cavga_jax.maps import combined_maps
from cavga_jax.maps import fitted_map
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import predict as predict_lib
from cavga_jax.programs import train as train_lib
from cavga_jax.training import run_setup
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
    name=NAME,
    inputs=lambda context, settings, batch: batch['images'],
    init=lambda settings: _MeanImage(),
    finalize=_finalize,
    apply=_apply)


@pytest.fixture
def registered():
  registry.register(MEAN_DEVIATION)
  try:
    yield
  finally:
    registry.unregister(NAME)  # no other test sees it


def _expected(images: np.ndarray,
              mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(maps, image scores) of uint8 ``images``, in numpy."""
  maps = np.abs(images / 127.5 - 1.0 - mean).mean(axis=-1)
  return maps, np.asarray(anomaly_maps.image_score(jnp.asarray(maps)))


def _predict(workdir: str, images: np.ndarray, folder,
             out) -> predict_lib.PredictSummary:
  """predict.py's run (untrained fit, a CPU export) on ``images`` saved as
  PNG files in ``folder``, writing to ``out``."""
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i}.png')
  return predict_lib.predict(
      workdir, str(folder), str(out), export_platforms=('cpu',), untrained=True)


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
      evaluator_lib.fitted_settings(typed_config.from_config(config).eval))

  # The saved fit holds its state (checksummed in fit.json like the others):
  # the mean of the normal images it was fitted on.
  fitted = store.load(store.fitted_dir(workdir, 0, untrained=True))
  assert fitted.available() == (NAME,) and NAME in fitted.thresholds
  train, test = run_setup.load_datasets(
      typed_config.from_config(config), workdir)
  fit_images, _ = fitting.split_held_out(
      evaluator_lib.normal_training_images(train),
      config.eval.threshold_holdout)
  mean = (fit_images / 127.5 - 1.0).mean(axis=0)
  np.testing.assert_allclose(fitted.maps[NAME]['mean'], mean, atol=1e-6)

  # predict.py scores with it, and serializes the same scorer.
  images = test.images[:3]
  out = tmp_path / 'out'
  summary = _predict(workdir, images, tmp_path / 'in', out)
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


def test_mean_tail_and_mean_z_match_numpy_and_a_constant_part_stays_finite():
  rng = np.random.default_rng(3)
  normal = {
      'feature_gaussian_shrunk': rng.gamma(2.0, 1.5, (5, 16, 16)),
      'feature_knn': rng.normal(-1.0, 0.5, (5, 16, 16)),
      'initial_ssim_calibrated': np.full((5, 16, 16), 2.0)
  }
  scales = combined_maps.normalisers(normal)
  test = {name: rng.normal(3.0, 2.0, (2, 16, 16)) for name in normal}
  parts = tuple(normal)
  tail = combined_maps.combine_parts(test, scales, parts,
                                     combined_maps.MEAN_TAIL)
  z = combined_maps.combine_parts(test, scales, parts, combined_maps.MEAN_Z)
  expected_tail, expected_z = 0.0, 0.0
  for name in parts:
    values = normal[name].ravel()
    median, high = np.quantile(values, [0.5, 0.999])
    expected_tail += (test[name] - median) / max(high - median, 1e-12)
    expected_z += (test[name] - values.mean()) / max(values.std(), 1e-12)
  np.testing.assert_allclose(tail, expected_tail / 3, rtol=1e-5)
  np.testing.assert_allclose(z, expected_z / 3, rtol=1e-5)
  assert np.isfinite(tail).all()
  # combined_robust is the three parts under mean_tail.
  assert registry.spec('combined_robust').parts == parts
  assert registry.spec('combined_robust').rule == combined_maps.MEAN_TAIL
  assert registry.spec('combined_features').rule == combined_maps.MEAN_Z
  # combined_robust_trained: the same with the evaluated decoder's SSIM.
  assert registry.spec('combined_robust_trained').parts == (
      parts[:2] + ('residual_ssim_smooth_calibrated',))
  assert registry.spec('combined_robust_trained').rule == (
      combined_maps.MEAN_TAIL)
  robust = combined_maps.combine(test, scales)['combined_robust']
  np.testing.assert_array_equal(robust, tail)
  with pytest.raises(ValueError, match='unknown combination rule'):
    registry.register(
        registry.MapSpec('bad', 'combined', False, parts=parts, rule='max'))


def test_a_fit_whose_normalisers_lack_a_rules_statistics_is_refused():
  tree = fitting.FittedMaps(
      normalisers={'feature_knn': (0.0, 1.0, 0.1, 2.0)},
      thresholds={'feature_knn': (1.0, 2.0, 0.5)}).to_tree()
  assert fitting.FittedMaps.from_tree(tree).normalisers['feature_knn'] == (0.0,
                                                                           1.0,
                                                                           0.1,
                                                                           2.0)
  # One saved before the combination rules: (mean, std) only. evaluate.py
  # refits it (store.load raises this as a FitError) instead of misreading.
  tree['normalisers']['feature_knn'] = np.array([0.0, 1.0])
  with pytest.raises(ValueError, match='older layout.*feature_knn'):
    fitting.FittedMaps.from_tree(tree)


def test_initial_ssim_reads_the_feature_networks_decoder(tiny_config, tmp_path):
  """initial_ssim_calibrated of networks A while B are evaluated equals
  residual_ssim_smooth_calibrated of A evaluated (feature_weights='initial':
  A is the run's initial state, so training cannot change the map)."""
  train, test = run_setup.load_datasets(
      typed_config.from_config(tiny_config), str(tmp_path))
  generator, _ = train_lib.build_models(tiny_config)
  init = jax.jit(generator.init, static_argnums=(2, 3))
  x = test.images[:1].astype(np.float32)
  initial, trained = (init(jax.random.key(k), x, None, False) for k in (0, 1))
  mesh = sharding.make_mesh()
  normal = evaluator_lib.normal_training_images(train)

  def maps(headline, variables, feature_variables):
    tiny_config.eval.map = headline
    tiny_config.eval.maps = 'headline'
    evaluator = evaluator_lib.Evaluator(
        generator,
        test,
        typed_config.from_config(tiny_config).eval,
        mesh,
        normal,
        feature_variables,
    )
    _, predictions = evaluator(variables['params'], variables['batch_stats'])
    return predictions['maps'][headline]

  reference = maps('residual_ssim_smooth_calibrated', initial, None)
  np.testing.assert_allclose(
      maps('initial_ssim_calibrated', trained, initial),
      reference,
      rtol=1e-5,
      atol=1e-5)
  assert not np.allclose(
      maps('residual_ssim_smooth_calibrated', trained, initial),
      reference,
      atol=1e-3)


def test_combined_robust_untrained_is_evaluated_predicted_and_exported(
    tmp_path):
  config = tiny.get_config()
  config.eval.map = 'combined_robust'
  workdir = str(tmp_path / 'run')
  metrics = eval_lib.evaluate(config, workdir, untrained=True)
  assert metrics['pixel_auroc'] == (
      metrics['maps']['combined_robust']['pixel_auroc'])
  # Untrained, the initial decoder is the evaluated one.
  assert (metrics['maps']['initial_ssim_calibrated'] == metrics['maps']
          ['residual_ssim_smooth_calibrated'])
  assert (metrics['maps']['combined_robust_trained'] == metrics['maps']
          ['combined_robust'])
  assert (metrics['maps']['feature_gaussian_shrunk']
          != metrics['maps']['feature_gaussian'])
  fitted = store.load(store.fitted_dir(workdir, 0, untrained=True))
  assert all(
      len(v) == len(combined_maps.STATISTICS)
      for v in fitted.normalisers.values())

  _, test = run_setup.load_datasets(typed_config.from_config(config), workdir)
  images = test.images[:3]
  out = tmp_path / 'out'
  summary = _predict(workdir, images, tmp_path / 'in', out)
  assert summary.scored == len(images)
  with open(out / predict_lib.SCORES_FILE) as f:
    predicted = np.array([float(r['score']) for r in csv.DictReader(f)])
  with open(tmp_path / 'run' / eval_lib.UNTRAINED_DIR / 'scores.csv') as f:
    evaluated = np.array([
        float(r['score_combined_robust']) for r in csv.DictReader(f)
    ])[:len(images)]
  np.testing.assert_allclose(predicted, evaluated, rtol=1e-5, atol=1e-5)
  exported, _ = export.load(str(out / predict_lib.SCORER_DIR))
  _, exported_scores, _ = exported.call(images)
  np.testing.assert_allclose(exported_scores, evaluated, rtol=1e-5, atol=1e-5)
