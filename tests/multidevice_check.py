"""Run by test_sharding.py in a subprocess with 8 forced CPU devices.

Trains the tiny config (or ``configs/<argv[2]>.py``, for ``argv[3]`` steps) on a
mesh of 1 device and on a mesh of 8 devices (same global batches), evaluates
the 1-device parameters on both meshes with the full evaluator (every map:
the headline, the calibrated and feature maps, thresholds from held-out
normal images; with ``argv[4]``, that map as the headline and its parts
only), and prints the largest differences as JSON, with the error
of a global batch that 8 devices cannot split.
"""

import importlib
import json
import os
import sys

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + ' --xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cavga_jax import data  # pylint: disable=wrong-import-position
from cavga_jax import sharding  # pylint: disable=wrong-import-position
from cavga_jax import typed_config  # pylint: disable=wrong-import-position
from cavga_jax.errors import CavgaError  # pylint: disable=wrong-import-position
from cavga_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=wrong-import-position
from cavga_jax.maps import detector  # pylint: disable=wrong-import-position
from cavga_jax.programs import runtime  # pylint: disable=wrong-import-position
from cavga_jax.training import cavga_step  # pylint: disable=wrong-import-position
from cavga_jax.training import detector_training  # pylint: disable=wrong-import-position
from cavga_jax.training import run_setup  # pylint: disable=wrong-import-position
from cavga_jax.training import train_state  # pylint: disable=wrong-import-position


def run(config, workdir, devices, num_steps=3):
  mesh = sharding.make_mesh(devices)
  train_ds, test_ds = run_setup.load_datasets(
      typed_config.from_config(config), workdir)
  generator, discriminator, init_fn, state_sharding = train_state.setup(
      typed_config.from_config(config), mesh)
  state = init_fn(jax.random.key(config.seed))
  step = jax.jit(
      cavga_step.make_train_step(generator, discriminator,
                                 dict(config.loss_weights)),
      out_shardings=(state_sharding, sharding.replicated(mesh)))
  losses = []
  for i in range(num_steps):
    idx = data.epoch_permutation_indices(train_ds.num_examples,
                                         config.train.batch_size, i,
                                         config.seed)
    batch = sharding.shard_batch(train_ds.images[idx], mesh)
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append({k: float(v) for k, v in metrics.items()})
  return jax.device_get(state), losses


def evaluate(config, workdir, devices, state):
  """(predictions, metrics) of evaluate.py's evaluator on ``devices``."""
  mesh = sharding.make_mesh(devices)
  train_ds, test_ds = run_setup.load_datasets(
      typed_config.from_config(config), workdir)
  generator, _, _, _ = train_state.setup(typed_config.from_config(config), mesh)
  params, batch_stats = sharding.replicate(
      (state.gen_params, state.gen_batch_stats), mesh)
  evaluator = evaluator_lib.Evaluator(
      generator, test_ds,
      typed_config.from_config(config).eval, mesh,
      evaluator_lib.normal_training_images(train_ds))
  result, predictions = evaluator(params, batch_stats)
  return predictions, result


def train_detector(workdir, devices):
  """The detector's map state after 4 sharded steps on ``devices``."""
  cells = np.random.default_rng(0).normal(1.0, 2.0, (256, 8)).astype(np.float32)
  settings = detector_training.Settings(
      map=detector.DetectorSettings(hidden=16),
      train=detector.TrainSettings(
          num_steps=4, batch_size=64, checkpoint_every=4, log_every=4),
      seed=0,
      eval_batch_size=8,
      threshold_holdout=0.1)
  state = detector_training.train_on_cells(settings, workdir, cells,
                                           cells.mean(0), cells.std(0),
                                           sharding.make_mesh(devices))
  return jax.device_get(state.map_state())


def batch_size_error(config, workdir):
  """The one-line error of train.py for a batch 8 devices cannot split."""
  config = config.copy_and_resolve_references()
  config.train.batch_size = 12
  try:
    runtime.prepare_run(config, workdir)
  except CavgaError as e:
    return str(e)
  return None


def max_abs_diff(a, b):
  return max(
      float(
          np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(workdir, config_name='tiny', num_steps='3', headline=''):
  assert jax.device_count() == 8, jax.devices()
  config = importlib.import_module(f'configs.{config_name}').get_config()
  if headline:  # that map and its parts only (``eval.maps='headline'``)
    config.eval.map = headline
    config.eval.maps = 'headline'
  one = run(config, workdir, jax.devices()[:1], int(num_steps))
  eight = run(config, workdir, jax.devices(), int(num_steps))
  # Evaluation of the same parameters on 1 and on 8 devices.
  one += evaluate(config, workdir, jax.devices()[:1], one[0])
  eight += evaluate(config, workdir, jax.devices(), one[0])
  # The detector's check trains the tiny config's features whatever the
  # run's config, so it runs once, in the tiny run (test_sharding).
  detector_one = detector_eight = None
  if config_name == 'tiny':
    detector_one = train_detector(
        os.path.join(workdir, 'det1'),
        jax.devices()[:1])
    detector_eight = train_detector(
        os.path.join(workdir, 'det8'), jax.devices())
  print(
      json.dumps(
          dict(
              num_devices=[1, 8],
              detector=(None if detector_one is None else max_abs_diff(
                  detector_one, detector_eight)),
              batch_size_error=batch_size_error(
                  config, os.path.join(workdir, 'batch_12')),
              params=max_abs_diff(one[0].gen_params, eight[0].gen_params),
              disc_params=max_abs_diff(one[0].disc_params,
                                       eight[0].disc_params),
              batch_stats=max_abs_diff(one[0].gen_batch_stats,
                                       eight[0].gen_batch_stats),
              losses=max((abs(a[k] - b[k])
                          for a, b in zip(one[1], eight[1])
                          for k in a),
                         default=None),  # None: no step was run
              # Per map: the largest difference relative to the map's range.
              anomaly_maps={
                  name:
                      max_abs_diff(one[2]['maps'][name], eight[2]['maps'][name])
                      / max(float(np.ptp(one[2]['maps'][name])), 1e-12)
                  for name in one[2]['maps']
              },
              headline=[one[3]['map'], eight[3]['map']],
              metrics={
                  k: [v, flat_metrics(eight[3])[k]]
                  for k, v in flat_metrics(one[3]).items()
              })))


def flat_metrics(result):
  """The numeric metrics, every map's as 'maps.<name>.<metric>'."""
  flat = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  for name, values in result['maps'].items():
    flat.update({f'maps.{name}.{k}': v for k, v in values.items()})
  return flat


if __name__ == '__main__':
  main(*sys.argv[1:])
