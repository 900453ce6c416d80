"""Run by test_multihost.py: one of two CPU processes of a multi-host run.

  python tests/multihost_check.py <process_id> <port> <workdir> <record>

Joins a 2-process JAX cluster on 127.0.0.1 (CPU collectives over gloo),
trains the tiny config in the shared ``workdir`` (both processes, one global
batch split between them) and evaluates it, then writes to ``record`` (JSON,
outside the workdir) the final parameters' leaves, the evaluation's
metrics and every file this process opened for writing inside the workdir,
checkpoints excluded (the checkpoint manager coordinates its own writes),
and to ``<record>.npz`` the evaluation's predictions (``save_predictions``).
"""

import builtins
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cavga_jax.evaluation import artifacts  # pylint: disable=wrong-import-position
from cavga_jax.programs import evaluate as eval_lib  # pylint: disable=wrong-import-position
from cavga_jax.programs import train as train_lib  # pylint: disable=wrong-import-position
from configs import tiny_weak  # pylint: disable=wrong-import-position


def config_for_test():
  """The config both the two processes and the one-process reference use."""
  config = tiny_weak.get_config()  # CAVGA_w: also writes weak_split.json.
  config.train.log_every = 1
  config.train.eval_every = config.train.num_steps  # ... and the curve.
  return config


def capture_predictions() -> dict:
  """The predictions the next evaluation writes (filled when it writes)."""
  captured = {}
  write = artifacts.write_outputs

  def capturing(out_dir, result, predictions, *args, **kwargs):
    captured.update(predictions)
    artifacts.write_outputs = write
    return write(out_dir, result, predictions, *args, **kwargs)

  artifacts.write_outputs = capturing
  return captured


def save_predictions(path, predictions):
  """The scored predictions to ``path`` (npz): 'maps/<name>',
  'map_scores/<name>', 'score' and 'p_anomalous'."""
  arrays = {
      f'{group}/{name}': np.asarray(values) for group in ('maps', 'map_scores')
      for name, values in predictions[group].items()
  }
  arrays.update({
      k: np.asarray(predictions[k])
      for k in ('score', 'p_anomalous')
      if k in predictions
  })
  np.savez(path, **arrays)


def load_predictions(path):
  """``save_predictions``'s file as the predictions dict scoring takes."""
  with np.load(path) as saved:
    predictions = {'maps': {}, 'map_scores': {}}
    for key in saved.files:
      group, _, name = key.partition('/')
      if name:
        predictions[group][name] = saved[key]
      else:
        predictions[key] = saved[key]
  return predictions


def main(process_id, port, workdir, record_path):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}',
      num_processes=2,
      process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 2
  workdir = os.path.abspath(workdir)
  written = []
  real_open = builtins.open

  def recording_open(file, mode='r', *args, **kwargs):
    path = os.path.abspath(os.fspath(file)) if isinstance(
        file, (str, os.PathLike)) else ''
    if (any(m in mode for m in 'wax+') and path.startswith(workdir)
        and '/checkpoints' not in path[len(workdir):]):
      written.append(os.path.relpath(path, workdir))
    return real_open(file, mode, *args, **kwargs)

  builtins.open = recording_open
  try:
    config = config_for_test()
    state = train_lib.train(config, workdir)
    predictions = capture_predictions()
    result = eval_lib.evaluate(config, workdir)
  finally:
    builtins.open = real_open
  save_predictions(record_path + '.npz', predictions)
  leaves = [
      np.asarray(x).tolist()
      for x in jax.tree.leaves(jax.device_get(state.gen_params))
  ]
  with open(record_path, 'w') as f:
    json.dump({'written': written, 'gen_params': leaves, 'metrics': result}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
