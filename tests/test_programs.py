"""train.py and evaluate.py as a user runs them (tiny config, subprocesses)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from conftest import REPO_ROOT

METRIC_KEYS = ('pixel_auroc', 'iou', 'image_auroc', 'detection_accuracy_minmax',
               'aupro', 'pixel_f1_max')
MAPS = ('attention', 'attention_liu', 'residual', 'residual_ssim',
        'residual_ssim_smooth', 'residual_x_ssim', 'attention_x_residual',
        'prior', 'residual_calibrated', 'residual_ssim_smooth_calibrated',
        'residual_x_ssim_calibrated', 'feature_gaussian', 'prior_normal')


def _run(script, *args, cache_dir):
  return subprocess.run([
      sys.executable,
      os.path.join(REPO_ROOT, script), f'--compilation_cache={cache_dir}', *args
  ],
                        cwd=REPO_ROOT,
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=False)


@pytest.fixture(scope='module')
def cli_cache():
  """The suite's compilation cache (conftest), shared with the in-process
  tests that compile the same tiny programs."""
  return jax.config.jax_compilation_cache_dir


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, cli_cache):
  workdir = tmp_path_factory.mktemp('run')
  cache = cli_cache
  args = ('--config=configs/tiny.py', f'--workdir={workdir}')
  train = _run(
      'train.py',
      *args,
      '--config.train.num_steps=2',
      '--config.train.eval_every=1',
      '--config.train.checkpoint_every=1',
      cache_dir=cache)
  assert train.returncode == 0, train.stderr[-3000:]
  evaluate = _run('evaluate.py', *args, cache_dir=cache)
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  return workdir, train, evaluate


def test_train_then_evaluate_writes_metrics_and_panels(trained_workdir):
  workdir, train, evaluate = trained_workdir
  # The config flag override reached the run.
  assert 'for 2 steps' in train.stderr
  assert 'step 2/2' in train.stderr and 'img/s' in train.stderr
  with open(workdir / 'eval' / 'metrics.json') as f:
    result = json.load(f)
  for key in METRIC_KEYS:
    assert 0.0 <= result[key] <= 1.0, key
  assert result['num_test_images'] == 10
  assert result['checkpoint_step'] == 2
  # num_panels 2: each a headline panel and a grid of the other maps.
  panels = sorted(os.listdir(workdir / 'eval' / 'panels'))
  assert len(panels) == 4 and all(p.endswith('.png') for p in panels)
  assert sum(p.endswith('_maps.png') for p in panels) == 2
  # The report shows all 10 test images: 2 panels and 8 overlays.
  overlays = os.listdir(workdir / 'eval' / 'overlays')
  assert len(overlays) == 8
  report = (workdir / 'eval' / 'report.html').read_text()
  assert all(
      f'panels/{p}' in report for p in panels if not p.endswith('_maps.png'))
  assert all(f'overlays/{p}' in report for p in overlays)
  with open(workdir / 'eval' / 'scores.csv') as f:
    lines = f.readlines()
  assert len(lines) == 1 + 10
  # Every map's image score but the priors' (a constant 0).
  assert all(f'score_{name}' in lines[0]
             for name in MAPS
             if name not in ('prior', 'prior_normal'))
  assert 'score_prior' not in lines[0]
  # Every map with every metric; the flat keys hold the headline map's.
  assert result['map'] == 'feature_gaussian'
  assert set(MAPS) <= set(result['maps'])
  for name in MAPS:
    for key in METRIC_KEYS:
      assert 0.0 <= result['maps'][name][key] <= 1.0, (name, key)
  assert result['maps']['feature_gaussian']['aupro'] == result['aupro']
  # evaluate.py ends with the headline's numbers and the report's path.
  printed = evaluate.stdout.splitlines()
  assert printed[-1] == f'report: {workdir / "eval" / "report.html"}'
  assert (f'pixel AUROC {result["pixel_auroc"]:.4f}  AU-PRO '
          f'{result["aupro"]:.4f}  image AUROC {result["image_auroc"]:.4f}  '
          'accuracy at the held-out threshold '
          f'{result["detection_accuracy_held_out"]:.4f}') in printed[-2]
  assert result['maps']['prior']['image_auroc'] == 0.5
  # Thresholds fixed on held-out normal training images, for every map but
  # the priors.
  for name in set(MAPS) - {'prior', 'prior_normal'}:
    assert 0.0 <= result['maps'][name]['iou_held_out'] <= 1.0, name
    assert 0.0 <= result['maps'][name]['detection_accuracy_held_out'] <= 1.0


def test_learning_curve_has_every_map_at_every_eval_step(trained_workdir):
  workdir, train, _ = trained_workdir
  with open(workdir / 'eval_curve.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1, 2]
  assert all(set(MAPS) <= set(r['maps']) for r in records)
  assert os.path.getsize(workdir / 'eval_curve.png') > 0
  assert 'eval at step 2' in train.stderr


def test_all_checkpoints_scores_every_retained_checkpoint(
    trained_workdir, cli_cache, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir[0], workdir)
  with open(workdir / 'eval_curve.jsonl') as f:
    during_training = [json.loads(line) for line in f]
  (workdir / 'eval_curve.jsonl').unlink()
  (workdir / 'eval_curve.png').unlink()
  proc = _run(
      'evaluate.py',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      '--all_checkpoints',
      cache_dir=cli_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'eval_curve.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1, 2]  # checkpoint_every=1
  assert os.path.getsize(workdir / 'eval_curve.png') > 0
  # Each record scores its own checkpoint: the curve that training recorded
  # from the same states, and for the newest one evaluate.py's metrics.
  with open(workdir / 'eval' / 'metrics.json') as f:
    newest = json.load(f)['maps']
  for record, seen in zip(records, during_training):
    assert record['step'] == seen['step']
    for name in MAPS:
      for key in METRIC_KEYS:
        assert record['maps'][name][key] == pytest.approx(
            seen['maps'][name][key], abs=1e-6), (record['step'], name, key)
  for name in MAPS:
    for key in METRIC_KEYS:
      assert records[1]['maps'][name][key] == pytest.approx(
          newest[name][key], abs=1e-6), (name, key)
  assert records[0]['maps'] != records[1]['maps']


def test_rerun_with_another_model_stops_unless_overwrite(
    trained_workdir, cli_cache, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir[0], workdir)
  config_json = (workdir / 'config.json').read_bytes()
  checkpoints = sorted(os.listdir(workdir / 'checkpoints'))
  args = ('--config=configs/tiny.py', f'--workdir={workdir}',
          '--config.model.latent_channels=16', '--config.train.num_steps=2')
  proc = _run('train.py', *args, cache_dir=cli_cache)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'config.model.latent_channels 8 -> 16' in (
      errors[0]), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert (workdir / 'config.json').read_bytes() == config_json
  assert sorted(os.listdir(workdir / 'checkpoints')) == checkpoints
  proc = _run('evaluate.py', *args, cache_dir=cli_cache)
  assert proc.returncode == 1
  assert 'config.model.latent_channels 8 -> 16' in proc.stderr
  assert (workdir / 'eval').exists()  # The old evaluation is kept.

  proc = _run('train.py', *args, '--overwrite', cache_dir=cli_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'config.json') as f:
    assert json.load(f)['model']['latent_channels'] == 16
  assert 'resumed' not in proc.stderr and 'step 2/2' in proc.stderr
  assert not (workdir / 'eval').exists()  # The old run's evaluation is gone.
  assert not (workdir / 'eval_curve.jsonl').exists()


def test_evaluate_without_checkpoint_is_one_clear_line(tmp_path):
  proc = _run(
      'evaluate.py',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path}',
      cache_dir=tmp_path / 'cache')
  assert proc.returncode == 1
  assert 'no checkpoint found' in proc.stderr
  assert 'Traceback' not in proc.stderr
  # The untrained control needs no checkpoint and writes beside eval/.
  proc = _run(
      'evaluate.py',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path}',
      '--untrained',
      cache_dir=tmp_path / 'cache')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'eval_untrained' / 'metrics.json') as f:
    result = json.load(f)
  assert result['checkpoint_step'] == 0 and set(MAPS) <= set(result['maps'])
  assert not (tmp_path / 'eval').exists()


def test_missing_dataset_root_is_one_clear_line(tmp_path):
  proc = _run(
      'train.py',
      '--config=configs/mvtec.py',
      f'--workdir={tmp_path}',
      f'--config.data.root={tmp_path}/nowhere',
      cache_dir=tmp_path / 'cache')
  assert proc.returncode == 1
  assert f'{tmp_path}/nowhere' in proc.stderr
  assert 'Traceback' not in proc.stderr


# (program, override, expected one-line error). Bad
# types and unknown fields are caught by the flag parser, bad values by
# config_checks before any data is generated or anything compiled.
_BAD_CONFIG_FLAGS = [
    ('train.py', '--config.train.num_steps=abc',
     'Flags parsing error: flag --config.train.num_steps=abc: invalid literal '
     'for int()'),
    ('train.py', '--config.train.batch_size=0',
     'error: config.train.batch_size=0 must be an integer >= 1'),
    ('train.py', "--config.train.nonfinite=ignore",
     "error: config.train.nonfinite='ignore' must be one of 'stop', 'skip'"),
    ('evaluate.py', '--config.eval.batch_size=0',
     'error: config.eval.batch_size=0 must be an integer >= 1'),
    ('train.py', '--config.train.num_stepz=3',
     "unknown config field 'num_stepz'"),
    ('evaluate.py', '--config.task=gan',
     "error: config.task='gan' must be one of 'cavga', 'vae'"),
]


@pytest.mark.parametrize(
    'program, override, expected',
    _BAD_CONFIG_FLAGS,
    ids=[f'{p}:{o[9:]}' for p, o, _ in _BAD_CONFIG_FLAGS])
def test_bad_config_flag_is_rejected_before_any_work(tmp_path, program,
                                                     override, expected):
  workdir = tmp_path / 'run'
  proc = _run(
      program,
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      override,
      cache_dir=tmp_path / 'cache')
  assert proc.returncode == 1
  assert expected in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()  # No dataset generated, nothing written.


def test_feature_map_variants_reproduce_the_evaluated_map(trained_workdir):
  # The script's grid-/4 Gaussian at the default blur (tiny: 32 px / 64 =
  # 0.5 px) is evaluate.py's feature_gaussian on the same checkpoint.
  workdir, _, _ = trained_workdir
  out = subprocess.run([
      sys.executable,
      os.path.join(REPO_ROOT, 'scripts', 'feature_map_variants.py'),
      '--config=configs/tiny.py', f'--workdir={workdir}', '--sigmas=0.5',
      '--grid_divisors=4', '--bank_size=64', '--radii=0'
  ],
                       cwd=REPO_ROOT,
                       capture_output=True,
                       text=True,
                       timeout=600,
                       check=False,
                       env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  variants = json.loads(out.stdout)
  with open(workdir / 'eval' / 'metrics.json') as f:
    evaluated = json.load(f)['maps']['feature_gaussian']
  for key in ('pixel_auroc', 'aupro', 'image_auroc'):
    assert abs(variants['gaussian_grid4_sigma0.5'][key]
               - evaluated[key]) <= 5e-4, key
  for name in ('knn_free', 'knn_free_whitened', 'knn_radius0'):
    assert 0.0 <= variants[name]['pixel_auroc'] <= 1.0
  assert variants['checkpoint_step'] == 2


def test_maps_table_rows_are_labelled_and_columns_chosen(trained_workdir):
  workdir, _, _ = trained_workdir
  out = subprocess.run([
      sys.executable,
      os.path.join(REPO_ROOT, 'scripts', 'maps_table.py'), f'w_ae=1={workdir}',
      '--maps=residual,prior', '--metrics=pixel_auroc,aupro'
  ],
                       cwd=REPO_ROOT,
                       capture_output=True,
                       text=True,
                       timeout=60,
                       check=True)
  with open(workdir / 'eval' / 'metrics.json') as f:
    maps = json.load(f)['maps']
  lines = out.stdout.splitlines()
  assert lines[0] == '| run | step | residual | prior |'
  assert lines[2] == (
      f'| w_ae=1 | 2 | {maps["residual"]["pixel_auroc"]:.3f} / '
      f'{maps["residual"]["aupro"]:.3f} | {maps["prior"]["pixel_auroc"]:.3f}'
      f' / {maps["prior"]["aupro"]:.3f} |')
