"""A real two-process run on localhost equals one process; files written once."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

from cavga_jax import data
from cavga_jax import typed_config
from cavga_jax.evaluation import scoring
from cavga_jax.evaluation import store
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import train as train_lib
from cavga_jax.training import run_setup
from conftest import load_script

_SCRIPT = os.path.join(os.path.dirname(__file__), 'multihost_check.py')
multihost_check = load_script('tests/multihost_check.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_and_only_process_0_writes(tmp_path):
  workdir, port = tmp_path / 'shared', _free_port()
  records = [tmp_path / f'record_{i}.json' for i in range(2)]
  # One CPU device per process (the suite's other XLA flags kept).
  env = dict(
      os.environ,
      XLA_FLAGS=' '.join(
          flag for flag in os.environ.get('XLA_FLAGS', '').split()
          if 'device_count' not in flag))
  procs = [
      subprocess.Popen([
          sys.executable, _SCRIPT,
          str(i),
          str(port),
          str(workdir),
          str(records[i])
      ],
                       env=env,
                       stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE,
                       text=True) for i in range(2)
  ]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  primary, other = (json.loads(r.read_text()) for r in records)

  # Process 0 writes every shared file (the generated dataset too), process
  # 1 none of them.
  assert other['written'] == []
  for name in ('config.json', 'train_metrics.jsonl', 'weak_split.json',
               'eval_curve.jsonl', 'eval/metrics.json', 'eval/scores.csv',
               'data/'):
    # weak_split.json and the dataset are written to a temporary name
    # first and renamed into place.
    assert any(w.startswith(name) for w in primary['written']), name
  config = multihost_check.config_for_test()
  with open(workdir / 'train_metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == list(range(1, config.train.num_steps + 1))  # no duplicates

  # The same global batch on one process gives the same run: the losses
  # agree to float rounding, so the data, the host slices and the sharded
  # step are the same.
  reference = train_lib.train(config, str(tmp_path / 'one'))
  with open(tmp_path / 'one' / 'train_metrics.jsonl') as f:
    expected_logs = [json.loads(line) for line in f]
  with open(workdir / 'train_metrics.jsonl') as f:
    logs = [json.loads(line) for line in f]
  for got, want in zip(logs, expected_logs):
    for key in ('rec', 'kl', 'adv', 'bce', 'cga', 'g_loss', 'd_loss',
                'cls_accuracy'):
      np.testing.assert_allclose(
          got[key],
          want[key],
          rtol=1e-4,
          atol=1e-6,
          err_msg=f'step {got["step"]} {key}')
  # Both processes end with the same (replicated) parameters.
  for a, b in zip(primary['gen_params'], other['gen_params']):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The parameters differ only by the order of float32 reductions (the
  # global batch's sums split over two processes): observed at most 3e-8
  # after 4 steps. Adam could turn the rounding of a gradient far below its
  # eps into a step of up to lr (2e-4), so a failure here that is a few
  # multiples of lr would point at that, anything else at the data or the
  # step.
  expected = jax.tree.leaves(jax.device_get(reference.gen_params))
  assert len(primary['gen_params']) == len(expected)
  for got, want in zip(primary['gen_params'], expected):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
  # The evaluation. Both processes score the same gathered maps...
  saved = [np.load(f'{r}.npz') for r in records]
  assert saved[0].files == saved[1].files
  assert {'maps/weak_anomalous', 'p_anomalous'} <= set(saved[0].files)
  for key in saved[0].files:
    np.testing.assert_array_equal(saved[0][key], saved[1][key], err_msg=key)
  predictions = multihost_check.load_predictions(f'{records[0]}.npz')
  # ... which are one process's maps of the same checkpoint, fitted again
  # in one process, to float rounding: batch shapes and reduction orders
  # differ (observed: at most 1.7e-5 of a map's range, residual_ssim's
  # 11-pixel windows; thresholds 6e-6). Comparing the metrics of the two
  # runs instead failed on near-ties that rounding reorders (the tiny maps
  # are bilinear upsamplings of 2x2 attention: iou_best moved by 2.4e-3 on
  # another machine).
  same_checkpoint = tmp_path / 'same_checkpoint'
  shutil.copytree(workdir, same_checkpoint)
  one_process = multihost_check.capture_predictions()
  eval_lib.evaluate(config, str(same_checkpoint), refit=True)
  pairs = [(f'{group}/{name}', got, one_process[group][name])
           for group in ('maps', 'map_scores')
           for name, got in predictions[group].items()]
  pairs += [
      (k, predictions[k], one_process[k]) for k in ('score', 'p_anomalous')
  ]
  assert len(pairs) == len(saved[0].files)
  for key, got, want in pairs:
    want = np.asarray(want)
    np.testing.assert_allclose(
        got,
        want,
        rtol=1e-4,
        atol=1e-4 * float(np.ptp(want) or 1.0),
        err_msg=key)
  step = primary['metrics']['checkpoint_step']
  fitted = store.load(store.fitted_dir(str(workdir), step))
  refitted = store.load(store.fitted_dir(str(same_checkpoint), step))
  assert fitted.thresholds.keys() == refitted.thresholds.keys()
  for name, values in fitted.thresholds.items():
    np.testing.assert_allclose(
        values, refitted.thresholds[name], rtol=1e-4, atol=1e-5, err_msg=name)
  # The metrics of the two processes are those of their maps, computed in
  # one process (so exactly equal), with the thresholds they fitted.
  _, test_ds = run_setup.load_datasets(
      typed_config.from_config(config), str(workdir))
  scored = scoring.compute_metrics(predictions, test_ds, config.eval.map,
                                   fitted.thresholds)
  scored = _flat(json.loads(json.dumps(scored)))
  for process in (primary, other):
    got = _flat(process['metrics'])
    assert 'maps.weak_anomalous.iou_held_out' in got
    assert got.keys() - {'checkpoint_step'} == scored.keys()
    for key, want in scored.items():
      assert got[key] == want or (np.isnan(got[key])
                                  and np.isnan(want)), (key, got[key], want)


def _flat(result):
  """The numeric metrics, every map's as 'maps.<name>.<metric>'."""
  flat = {
      k: v
      for k, v in result.items()
      if isinstance(v, (int, float)) and not isinstance(v, bool)
  }
  for name, values in result['maps'].items():
    flat.update({f'maps.{name}.{k}': v for k, v in values.items()})
  return flat
