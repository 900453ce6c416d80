"""A workdir is never silently mixed: reruns with another config stop."""

import hashlib
import json
import logging
import os

import pytest

from cavga_jax import workdirs
from cavga_jax.errors import CavgaError
from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import train as train_lib
from cavga_jax.training import detector_training


def _snapshot(workdir):
  """{relative path: sha256} of every file under ``workdir``."""
  out = {}
  for folder, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path,
                            workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_rerun_with_another_model_stops_and_overwrite_starts_over(
    tiny_config, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  tiny_config.train.num_steps = 2
  train_lib.train(tiny_config, workdir)
  before = _snapshot(workdir)
  assert 'checkpoints/2/_CHECKPOINT_METADATA' in before

  other = tiny_config.copy_and_resolve_references()
  other.model.latent_channels = 16
  other.train.num_steps = 4
  with pytest.raises(CavgaError) as info:
    train_lib.train(other, workdir)
  message = str(info.value)
  assert 'config.model.latent_channels 8 -> 16' in message
  assert 'num_steps' not in message  # Allowed to differ: not named.
  assert '--overwrite' in message and '\n' not in message
  # Evaluation with that config stops too, before restoring anything.
  with pytest.raises(CavgaError, match='config.model.latent_channels 8 -> 16'):
    eval_lib.evaluate(other, workdir)
  assert _snapshot(workdir) == before  # Nothing written, nothing deleted.

  # Schedule length, logging and evaluation fields may differ (logged).
  longer = tiny_config.copy_and_resolve_references()
  longer.train.num_steps = 3
  longer.train.log_every = 1
  longer.eval.map = 'residual'
  with caplog.at_level(logging.INFO):
    state = train_lib.train(longer, workdir)
  assert int(state.step) == 3
  assert ("config.eval.map 'feature_gaussian' -> 'residual', "
          'config.train.log_every 2 -> 1, config.train.num_steps 2 -> 3 '
          'differ from' in caplog.text)
  assert 'checkpoints/2/_CHECKPOINT_METADATA' in _snapshot(workdir)

  state = train_lib.train(other, workdir, overwrite=True)
  assert int(state.step) == 4
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['latent_channels'] == 16
  with open(os.path.join(workdir, 'train_metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [2, 4]  # The old run's log lines are gone.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_a_field_absent_from_an_old_config_json_is_its_default(tiny_config):
  saved = json.loads(tiny_config.to_json_best_effort())
  del saved['model']['attention_norm']  # Written before the field existed.
  del saved['data']['num_workers']
  defining, allowed = workdirs.differing_fields(saved, tiny_config)
  assert defining == {} and allowed == {}
  tiny_config.model.attention_norm = 'minmax'
  defining, _ = workdirs.differing_fields(saved, tiny_config)
  assert defining == {'model.attention_norm': ('max', 'minmax')}


@pytest.mark.parametrize('field, value, defining', [
    ('model.latent_channels', 16, True),
    ('data.image_size', 64, True),
    ('data.num_train', 8, True),
    ('loss_weights.ae', 0.5, True),
    ('optimizer.learning_rate', 1e-3, True),
    ('train.batch_size', 4, True),
    ('seed', 1, True),
    ('model.compute_dtype', 'bfloat16', True),
    ('train.num_steps', 40, False),
    ('train.checkpoint_every', 1, False),
    ('eval.map', 'attention', False),
    ('eval.feature_dims', 10, False),
    ('data.num_workers', 1, False),
    ('model.conv_impl', 'lax', False),
])
def test_which_fields_define_a_run(tiny_config, field, value, defining):
  saved = json.loads(tiny_config.to_json_best_effort())
  *parents, name = field.split('.')
  node = tiny_config
  for parent in parents:
    node = node[parent]
  node[name] = value
  found = workdirs.differing_fields(saved, tiny_config)
  assert (field in found[0], field in found[1]) == (defining, not defining)


def test_start_over_deletes_only_run_outputs(tmp_path):
  for name in ('checkpoints/2', 'eval/panels', 'data/textures', 'notes',
               f'{detector_training.DETECTOR_DIR}/checkpoints/4'):
    (tmp_path / name).mkdir(parents=True)
  for name in ('config.json', 'train_metrics.jsonl', 'notes/mine.txt'):
    (tmp_path / name).write_text('x')
  deleted = workdirs.start_over(str(tmp_path))
  assert sorted(deleted) == [
      'checkpoints', 'config.json', 'detector', 'eval', 'train_metrics.jsonl'
  ]
  assert sorted(os.listdir(tmp_path)) == ['data', 'notes']
