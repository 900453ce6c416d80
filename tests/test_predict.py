"""A trained run deployed: fitted maps saved with the checkpoint, predict.py,
the scorer and its jax.export serialization in a process without cavga_jax."""

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from cavga_jax import data
from cavga_jax import typed_config
from cavga_jax.deploy import export
from cavga_jax.deploy import scorer as scorer_lib
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import inference
from cavga_jax.evaluation import registry
from cavga_jax.evaluation import store
from cavga_jax.models import attention
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import predict as predict_lib
from cavga_jax.programs import train as train_lib
from cavga_jax.training import run_setup
from configs import tiny
from conftest import REPO_ROOT


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir, metrics) of a tiny run trained and evaluated once."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny.get_config()
  train_lib.train(config, workdir)
  return config, workdir, eval_lib.evaluate(config, workdir)


def _count_training_passes(monkeypatch) -> list[str]:
  """Records each pass over normal training images (fit or held out)."""
  passes = []
  original = inference.host_batches

  def counting(step, images, batch_size, mesh, what='images'):
    if 'training images' in what:
      passes.append(what)
    return original(step, images, batch_size, mesh, what)

  monkeypatch.setattr(inference, 'host_batches', counting)
  return passes


def test_evaluate_reuses_the_saved_fit_and_equals_a_refit(trained, monkeypatch):
  config, workdir, first = trained
  directory = store.fitted_dir(workdir, first['checkpoint_step'])
  assert store.saved_key(directory)['step'] == first['checkpoint_step']
  passes = _count_training_passes(monkeypatch)
  reused = eval_lib.evaluate(config, workdir)
  assert passes == []
  assert reused == first
  refitted = eval_lib.evaluate(config, workdir, refit=True)
  assert passes == ['normal training images', 'held-out normal training images']
  assert refitted == first
  # A setting that changes the fit refits by itself (in a copy of the run:
  # the other tests score with the run's own fit).
  passes.clear()
  other = config.copy_and_resolve_references()
  other.eval.feature_dims = 8
  copy = shutil.copytree(workdir,
                         os.path.join(os.path.dirname(workdir), 'copy'))
  eval_lib.evaluate(other, copy)
  assert len(passes) == 2
  with pytest.raises(CavgaError, match='feature_dims'):
    scorer_lib.load_scorer(copy)  # config.json's settings were not fitted


def test_headline_maps_fit_only_the_headline_and_score_like_all(
    trained, monkeypatch):
  config, workdir, first = trained
  copy = shutil.copytree(workdir,
                         os.path.join(os.path.dirname(workdir), 'headline'))
  headline = config.copy_and_resolve_references()
  headline.eval.maps = 'headline'
  headline.eval.map = 'combined_features'
  parts = ('feature_gaussian', 'feature_knn', 'combined_features')

  def no_grad_cam(*args, **kwargs):
    raise AssertionError('Grad-CAM ran for a feature map')

  monkeypatch.setattr(attention, 'forward_with_attention', no_grad_cam)
  result = eval_lib.evaluate(headline, copy, refit=True)
  fitted = store.load(store.fitted_dir(copy, result['checkpoint_step']))
  # The fit holds the headline's parts and nothing else: no calibration.
  assert fitted.available() == parts and set(fitted.maps) == set(parts[:2])
  assert set(fitted.thresholds) == set(parts)
  assert set(result['maps']) == set(parts) | {'prior', 'prior_normal'}
  for name in parts:
    for key, value in first['maps'][name].items():
      assert result['maps'][name][key] == pytest.approx(
          value, abs=1e-6), (name, key)
  assert result['pixel_auroc'] == result['maps']['combined_features'][
      'pixel_auroc']
  # predict.py scores with that fit.
  scorer = scorer_lib.load_scorer(copy, config=headline)
  assert scorer.thresholds == fitted.thresholds['combined_features']
  # An evaluation of every map refits: the saved fit lacks the others.
  monkeypatch.undo()
  passes = _count_training_passes(monkeypatch)
  assert eval_lib.evaluate(config, copy) == first
  assert len(passes) == 2


def _write_inputs(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Images of every kind predict.py takes, and a corrupt file.

  Returns:
    file name -> (width, height) of each readable image.
  """
  rng = np.random.default_rng(0)
  (folder / 'sub').mkdir(parents=True)
  sizes = {}

  def save(name, array, **kwargs):
    Image.fromarray(array).save(folder / name, **kwargs)
    sizes[name] = (array.shape[1], array.shape[0])

  save('rgb.png', rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
  save(
      'photo.jpg',
      rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
      quality=90)
  save('sub/wide16.png', rng.integers(0, 65536, (30, 70), dtype=np.uint16))
  save('gray.bmp', rng.integers(0, 256, (32, 32), dtype=np.uint8))
  save('alpha.tif', rng.integers(0, 256, (33, 35, 4), dtype=np.uint8))
  (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'x' * 40)
  assert Image.open(folder / 'sub/wide16.png').mode.startswith('I;16')
  return sizes


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
  return {
      str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
      for p in sorted(folder.rglob('*'))
      if p.is_file()
  }


def test_predict_scores_every_readable_image_and_names_the_corrupt_one(
    trained, tmp_path):
  config, workdir, _ = trained
  inputs = tmp_path / 'inputs'
  sizes = _write_inputs(inputs)
  before = _snapshot(inputs)
  out = tmp_path / 'out'
  run = subprocess.run([
      sys.executable, 'predict.py', f'--workdir={workdir}', f'--input={inputs}',
      f'--output={out}'
  ],
                       cwd=REPO_ROOT,
                       capture_output=True,
                       text=True,
                       timeout=300)
  assert run.returncode == 2, run.stderr[-2000:]
  assert 'corrupt.png' in run.stdout and 'cannot decode' in run.stdout
  assert _snapshot(inputs) == before  # nothing written into the input

  with open(out / predict_lib.SCORES_FILE) as f:
    rows = {
        pathlib.Path(r['path']).relative_to(inputs).as_posix(): r
        for r in csv.DictReader(f)
    }
  assert set(rows) == set(sizes)
  scorer = scorer_lib.load_scorer(workdir)
  for name, (width, height) in sizes.items():
    mask = Image.open(out / 'masks' / f'{name}.png')
    assert mask.size == (width, height)  # the map back at the image's size
    overlay = Image.open(out / 'overlays' / f'{name}.png')
    assert overlay.size[1] >= height and overlay.size[0] > width
    # The row's score is the scorer's on the image resized to the model's.
    image = data.folder.read_image(inputs / name, scorer.channels).resize(
        (scorer.image_size,) * 2, Image.BILINEAR)
    maps, scores = scorer.score(np.asarray(image)[None])
    row = rows[name]
    assert float(row['score']) == pytest.approx(float(scores[0]), rel=1e-5)
    assert float(row['map_max']) == pytest.approx(float(maps.max()), rel=1e-5)
    assert int(row['anomalous']) == int(scores[0] > scorer.thresholds[1])
  summary = json.loads((out / predict_lib.SUMMARY_FILE).read_text())
  assert summary['scored'] == len(sizes)
  assert [s['path'] for s in summary['skipped']
         ] == [str(inputs / 'corrupt.png')]
  assert summary['map'] == config.eval.map


def test_a_corrupted_fit_is_never_scored_normal(trained, monkeypatch, tmp_path):
  config, workdir, _ = trained
  scorer = scorer_lib.load_scorer(workdir)
  fitted = scorer.state['fitted']
  gaussian = dict(fitted.maps['feature_gaussian'])
  gaussian['mean'] = np.array(gaussian['mean'])
  gaussian['mean'].flat[0] = np.nan  # one value of the fitted Gaussians
  scorer = dataclasses.replace(
      scorer,
      state=dict(
          scorer.state,
          fitted=dataclasses.replace(
              fitted, maps=dict(fitted.maps, feature_gaussian=gaussian))))
  images = run_setup.load_datasets(typed_config.from_config(config),
                                   workdir)[1].images[:2]
  anomalous, finite = scorer.decide(*scorer.score(images))
  assert anomalous.all() and not finite.any()
  assert np.asarray(export.export_scorer(scorer).call(images)[2]).all()
  monkeypatch.setattr(scorer_lib, 'load_scorer', lambda *a, **k: scorer)
  (tmp_path / 'in').mkdir()
  Image.fromarray(images[0]).save(tmp_path / 'in' / 'a.png')
  summary = predict_lib.predict(workdir, str(tmp_path / 'in'),
                                str(tmp_path / 'out'))
  assert summary.scored == 0 and 'not finite' in summary.skipped[0][1]


def test_predict_never_writes_into_the_input_or_over_an_earlier_output(
    tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  files = [inputs / 'a.png']
  with pytest.raises(CavgaError, match='inside the input folder'):
    predict_lib.prepare_output(str(inputs / 'out'), files, inputs, False)
  with pytest.raises(CavgaError, match='inside the input folder'):
    predict_lib.prepare_output(str(inputs), files, inputs, True)
  out = tmp_path / 'out'
  predict_lib.prepare_output(str(out), files, inputs, False)
  (out / predict_lib.SCORES_FILE).write_text('earlier')
  with pytest.raises(CavgaError, match='--overwrite'):
    predict_lib.prepare_output(str(out), files, inputs, False)
  (out / 'notes.txt').write_text('the user\'s')
  predict_lib.prepare_output(str(out), files, inputs, True)
  assert sorted(p.name for p in out.iterdir()) == [
      'notes.txt', 'predict_manifest.json'
  ]  # only the listed file went
  (out / 'predict_manifest.json').unlink()
  with pytest.raises(CavgaError, match='did not write'):
    predict_lib.prepare_output(str(out), files, inputs, True)
  with pytest.raises(CavgaError, match='no image files'):
    predict_lib.list_inputs(str(tmp_path / 'empty*'))


def test_scorer_maps_equal_the_evaluation_and_skip_what_they_do_not_need(
    trained, monkeypatch):
  config, workdir, _ = trained
  _, test_ds = run_setup.load_datasets(
      typed_config.from_config(config), workdir)
  scores_csv = os.path.join(workdir, 'eval', 'scores.csv')
  with open(scores_csv) as f:
    evaluated = np.array(
        [float(r[f'score_{config.eval.map}']) for r in csv.DictReader(f)])

  def no_grad_cam(*args, **kwargs):
    raise AssertionError('the feature map needs no Grad-CAM')

  monkeypatch.setattr(attention, 'forward_with_attention', no_grad_cam)
  assert registry.needs([config.eval.map]) == {registry.ENCODER}
  scorer = scorer_lib.load_scorer(workdir)
  _, scores = scorer.score(test_ds.images)
  np.testing.assert_allclose(scores, evaluated, rtol=1e-5)


def test_untrained_scorer_uses_the_untrained_fit(trained):
  config, workdir, _ = trained
  with pytest.raises(CavgaError, match='--untrained'):
    scorer_lib.load_scorer(workdir, untrained=True)
  eval_lib.evaluate(config, workdir, untrained=True)
  _, test_ds = run_setup.load_datasets(
      typed_config.from_config(config), workdir)
  with open(os.path.join(workdir, eval_lib.UNTRAINED_DIR, 'scores.csv')) as f:
    evaluated = np.array(
        [float(r[f'score_{config.eval.map}']) for r in csv.DictReader(f)])
  scorer = scorer_lib.load_scorer(workdir, untrained=True)
  assert scorer.step == 0
  np.testing.assert_allclose(
      scorer.score(test_ds.images)[1], evaluated, rtol=1e-5)


def test_registry_declares_what_each_map_reads():
  assert registry.needs(['combined_features']) == {registry.ENCODER}
  assert registry.needs(['residual_ssim_smooth_calibrated'
                        ]) == {registry.RECONSTRUCTION}
  assert registry.needs(['combined_all'
                        ]) == {registry.ENCODER, registry.RECONSTRUCTION}
  assert registry.needs(['attention_liu'
                        ]) == {registry.ATTENTION, registry.UNIT_MAPS}
  assert registry.closure(['combined_knn_ssim'
                          ]) == ('feature_knn', 'residual_ssim_smooth',
                                 'residual_ssim_smooth_calibrated',
                                 'combined_knn_ssim')
  assert not registry.spec('residual').bounded
  assert registry.spec('attention').bounded
  with pytest.raises(KeyError, match='known'):
    registry.spec('no_such_map')
  with pytest.raises(CavgaError, match='baseline'):
    scorer_lib.make_score_fn(None,
                             typed_config.from_config(tiny.get_config()).eval,
                             32, 'prior')


_FRESH_PROCESS = """
import json, sys
import jax
import numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
expected = np.load(sys.argv[2])
for batch in (1, 3):
  maps, scores, anomalous = exported.call(expected['images'][:batch])
  np.testing.assert_allclose(np.asarray(maps), expected['maps'][:batch],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), expected['scores'][:batch],
                             rtol=1e-5, atol=1e-5)
  assert (np.asarray(anomalous) == (expected['scores'][:batch]
                                    > expected['threshold'])).all()
print(json.dumps(sorted(m for m in sys.modules if m.startswith('cavga'))))
"""


def test_exported_scorer_equals_the_library_in_a_process_without_it(
    trained, tmp_path):
  config, workdir, _ = trained
  scorer = scorer_lib.load_scorer(workdir)
  _, test_ds = run_setup.load_datasets(
      typed_config.from_config(config), workdir)
  images = test_ds.images[:3]
  maps, scores = scorer.score(images)
  np.savez(
      tmp_path / 'expected.npz',
      images=images,
      maps=maps,
      scores=scores,
      threshold=scorer.thresholds[1])
  path = export.save(str(tmp_path / 'scorer'), scorer)
  _, metadata = export.load(str(tmp_path / 'scorer'))
  assert metadata['headline'] == config.eval.map
  assert metadata['pixel_threshold'] == scorer.thresholds[0]
  # -I: no PYTHONPATH or working directory on the path; cavga_jax is
  # installed, so the check is that nothing imports it.
  run = subprocess.run([
      sys.executable, '-I', '-c', _FRESH_PROCESS, path,
      str(tmp_path / 'expected.npz')
  ],
                       capture_output=True,
                       text=True,
                       timeout=300,
                       cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert json.loads(run.stdout.strip().splitlines()[-1]) == []
