"""Config validation and runs killed by SIGKILL (during a save or a step)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

from absl import flags
import jax
import ml_collections
import pytest

from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax.errors import CavgaError
from cavga_jax.programs import runtime
from cavga_jax.programs import train as train_lib
from cavga_jax.training import training_loop
from conftest import REPO_ROOT
from conftest import tree_equal

_KILL_SCRIPT = os.path.join(REPO_ROOT, 'tests', 'kill_during_save_check.py')

# ---------------------------------------------------------------------------
# Config validation.


def _set(field: str, value):

  def apply(config: ml_collections.ConfigDict) -> None:
    *parents, name = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    with node.ignore_type():  # Configs built in Python are not type-checked.
      node[name] = value

  return apply


_BAD_CONFIGS = [
    # (field, bad value, expected text)
    ('seed', -1, 'config.seed=-1 must be an integer >= 0'),
    ('data.name', 'imagenet', "config.data.name='imagenet' must be one of"),
    ('data.image_size', 0, 'config.data.image_size=0 must be an integer >= 1'),
    ('data.image_size', 40, 'must be a multiple of 16'),
    ('data.image_size', 32.0, 'config.data.image_size=32.0 must be an integer'),
    ('data.channels', 2, 'config.data.channels=2 must be one of 1, 3'),
    ('model.variant', 'X', "config.model.variant='X' must be one of 'R', 'D'"),
    ('model.latent', 'dense', "config.model.latent='dense' must be one of"),
    ('model.supervision', 'semi', "config.model.supervision='semi' must be"),
    ('model.compute_dtype', 'float64', 'config.model.compute_dtype='),
    ('model.latent_channels', 0, 'config.model.latent_channels=0 must be'),
    ('model.encoder_widths', (8, 16, 0, 32), 'config.model.encoder_widths='),
    ('model.encoder_widths', (8, 16), 'needs 4 entries'),
    ('loss_weights.rec', float('nan'), 'config.loss_weights.rec=nan must be a '
     'finite number >= 0'),
    ('loss_weights.adv', -1.0, 'config.loss_weights.adv=-1.0 must be'),
    ('optimizer.learning_rate', 'fast',
     "config.optimizer.learning_rate='fast'"),
    ('optimizer.b1', 1.0, 'config.optimizer.b1=1.0 must be a finite number >= '
     '0.0 and < 1.0'),
    ('optimizer.schedule', 'linear', "config.optimizer.schedule='linear'"),
    ('train.num_steps', -1,
     'config.train.num_steps=-1 must be an integer >= 0'),
    ('train.num_steps', 2.5, 'config.train.num_steps=2.5 must be an integer'),
    ('train.batch_size', 0,
     'config.train.batch_size=0 must be an integer >= 1'),
    ('train.batch_size', '8', "config.train.batch_size='8' must be an integer"),
    ('train.log_every', 0, 'config.train.log_every=0 must be'),
    ('train.checkpoint_every', 0, 'config.train.checkpoint_every=0 must be an '
     'integer >= 1'),
    ('train.keep_checkpoints', 0, 'config.train.keep_checkpoints=0 must be'),
    ('train.nonfinite', 'ignore', "config.train.nonfinite='ignore' must be one "
     "of 'stop', 'skip'"),
    ('train.max_consecutive_skips', 0, 'config.train.max_consecutive_skips=0'),
    ('eval.batch_size', 0, 'config.eval.batch_size=0 must be'),
    ('eval.num_panels', -1, 'config.eval.num_panels=-1 must be'),
]


@pytest.mark.parametrize(
    'field, value, expected',
    _BAD_CONFIGS,
    ids=[f'{f}={v!r}' for f, v, _ in _BAD_CONFIGS])
def test_check_config_rejects_bad_values(tiny_config, field, value, expected):
  _set(field, value)(tiny_config)
  with pytest.raises(CavgaError) as info:
    config_checks.check_config(tiny_config)
  assert expected in str(info.value)
  assert '\n' not in str(info.value)


def test_check_config_accepts_every_shipped_config():
  configs_dir = pathlib.Path(REPO_ROOT) / 'configs'
  names = sorted(
      p.stem for p in configs_dir.glob('*.py') if not p.stem.startswith('_'))
  assert 'default' in names and 'tiny' in names
  for name in names:
    module = __import__(f'configs.{name}', fromlist=['get_config'])
    config_checks.check_config(module.get_config())


def test_check_config_reports_a_loss_term_without_weight(tiny_config):
  del tiny_config.loss_weights['ae']
  with pytest.raises(
      CavgaError,
      match="config.loss_weights has no ae for "
      "config.model.supervision='unsupervised'"):
    config_checks.check_config(tiny_config)


def test_check_config_reports_missing_required_field(tiny_config):
  del tiny_config.train['batch_size']
  with pytest.raises(CavgaError, match='config.train.batch_size is missing'):
    config_checks.check_config(tiny_config)


def test_train_checks_the_config_before_doing_anything(tiny_config, tmp_path):
  tiny_config.train.checkpoint_every = 0
  with pytest.raises(CavgaError, match='checkpoint_every=0'):
    train_lib.train(tiny_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('override, expected', [
    ('--config.train.num_stepz=3', "unknown config field 'num_stepz' Did you "
     'mean "num_steps"'),
    ('--config.trian.num_steps=3', "unknown config field 'trian'"),
    ('--config.train.num_steps=abc', 'invalid literal for int()'),
])
def test_config_flag_errors_are_one_line(override, expected):
  argv = ['train.py', f'--config={REPO_ROOT}/configs/tiny.py', override]
  flag_values = flags.FlagValues()
  runtime.define_config_flag('config', flag_values, sys_argv=argv)
  with pytest.raises(flags.IllegalFlagValueError) as info:
    flag_values(argv)
  assert expected in str(info.value) and '\n' not in str(info.value)


def test_config_flag_applies_overrides():
  argv = [
      'train.py', f'--config={REPO_ROOT}/configs/tiny.py',
      '--config.train.num_steps=7'
  ]
  flag_values = flags.FlagValues()
  holder = runtime.define_config_flag('config', flag_values, sys_argv=argv)
  flag_values(argv)
  assert holder.value.train.num_steps == 7


# ---------------------------------------------------------------------------
# The metrics log of a resumed run.


def test_truncate_metrics_log_drops_steps_after_the_checkpoint(tmp_path):
  truncate = training_loop.truncate_metrics_log
  path = tmp_path / 'train_metrics.jsonl'
  path.write_text('{"step": 2, "g_loss": 1.0}\n{"step": 4, "g_loss": 2.0}\n'
                  '{"step": 6, "g_lo')  # A line torn by SIGKILL.
  truncate(str(path), 4)
  assert path.read_text() == ('{"step": 2, "g_loss": 1.0}\n'
                              '{"step": 4, "g_loss": 2.0}\n')
  truncate(str(path), 0)
  assert not path.read_text()


# ---------------------------------------------------------------------------
# SIGKILL during a checkpoint save or a step, then resume.


def _logged_losses(workdir: pathlib.Path) -> list[dict[str, float]]:
  with open(workdir / 'train_metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  for line in lines:
    del line['images_per_s']
  return lines


def _final_checkpoint(workdir: pathlib.Path, target):
  manager = checkpointing.make_manager(str(workdir))
  return manager.latest_step(), checkpointing.restore_latest(manager, target)


def _tmp_folders(workdir: pathlib.Path) -> list[str]:
  return sorted(
      p.name for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The tiny run (4 steps, checkpoints at 2 and 4) without interruption."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('uninterrupted')
  state = train_lib.train(tiny.get_config(), str(workdir))
  return workdir, state


@pytest.mark.parametrize(
    'kill_at, checkpoint_every, left_behind',
    [
        # Killed while committing the save of step 4, after the step-4 metrics
        # line was logged: checkpoint 2 and an unfinished 4 remain.
        ('save:2', 2, ['4.orbax-checkpoint-tmp']),
        # Killed in the very first save (checkpoint_every=1): no complete
        # checkpoint at all, and the resumed run (checkpoint_every=2) never
        # saves step 1 again, so only the cleanup removes the unfinished save.
        ('save:1', 1, ['1.orbax-checkpoint-tmp']),
        # Killed between saves, while step 3 (index 2) may be running.
        ('step:3', 2, []),
    ])
def test_sigkill_then_resume_equals_uninterrupted_run(uninterrupted,
                                                      tiny_config, tmp_path,
                                                      kill_at, checkpoint_every,
                                                      left_behind):
  reference_dir, reference = uninterrupted
  workdir = tmp_path / 'run'
  proc = subprocess.run([
      sys.executable, _KILL_SCRIPT, f'--workdir={workdir}',
      f'--kill_at={kill_at}', f'--checkpoint_every={checkpoint_every}',
      '--compilation_cache='
      f'{jax.config.jax_compilation_cache_dir or ""}'
  ],
                        cwd=REPO_ROOT,
                        capture_output=True,
                        text=True,
                        timeout=300,
                        check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert 'killing' in proc.stdout

  # The unfinished save is not a checkpoint.
  assert _tmp_folders(workdir) == left_behind
  complete = checkpointing.make_manager(str(workdir)).all_steps()
  expected_latest = {'save:2': 2, 'save:1': None, 'step:3': 2}[kill_at]
  assert max(complete, default=None) == expected_latest

  resumed = train_lib.train(tiny_config, str(workdir))  # checkpoint_every=2

  # The resumed run removed the unfinished save and ends bit-identical to
  # the uninterrupted run: final checkpoints, returned states, logged losses.
  assert not _tmp_folders(workdir)
  step, restored = _final_checkpoint(workdir, resumed)
  ref_step, ref_restored = _final_checkpoint(reference_dir, reference)
  assert step == ref_step == 4
  assert tree_equal(restored, ref_restored)
  assert tree_equal(resumed, reference)
  assert _logged_losses(workdir) == _logged_losses(reference_dir)
