"""scripts/benchmark_table.py on two tiny generated MVTec-layout categories."""

import json
import sys

from absl import flags
import numpy as np
import pytest

from cavga_jax import data
from cavga_jax.errors import DataError
from cavga_jax.programs import train as train_lib
from conftest import load_script
from conftest import REPO_ROOT

CATEGORIES = ('cat_a', 'cat_b')


@pytest.fixture(scope='module')
def script():
  return load_script('scripts/benchmark_table.py')


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('mvtec')
  for seed, category in enumerate(CATEGORIES):
    data.generate_dataset(
        str(root),
        seed=seed,
        image_size=32,
        category=category,
        num_train=16,
        num_test_good=4,
        num_test_per_defect=2)
  (root / 'not_a_category').mkdir()  # No train/good: not listed.
  return root


def _run_main(script, monkeypatch, *args):
  """script.main as `python scripts/benchmark_table.py *args` runs it."""
  argv = [
      'benchmark_table.py', '--config=configs/tiny.py', '--compilation_cache=',
      *args
  ]  # conftest's cache stays on.
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads overrides here.
  monkeypatch.chdir(REPO_ROOT)
  try:
    flags.FLAGS(argv)
    script.main(argv[:1])
  finally:
    # The override flags are defined while parsing; a second parse would
    # define them twice.
    for name in [n for n in flags.FLAGS if n.startswith('config.')]:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def test_benchmark_table_then_rerun_skips(script, root, tmp_path, monkeypatch,
                                          caplog):
  workdir = tmp_path / 'bench'
  args = (f'--root={root}', f'--workdir={workdir}', '--title=tiny',
          '--config.train.num_steps=2')
  _run_main(script, monkeypatch, *args)

  with open(workdir / 'benchmark_table.json') as f:
    result = json.load(f)
  assert [r['category'] for r in result['rows']] == list(CATEGORIES)
  for key, _ in script.METRICS:
    values = [r[key] for r in result['rows']]
    assert all(0.0 <= v <= 1.0 for v in values), key
    np.testing.assert_allclose(result['mean'][key], np.mean(values))
  for row in result['rows']:
    assert row['checkpoint_step'] == 2 and row['map'] == 'feature_gaussian'
    assert row['train_s'] > 0 and row['eval_s'] > 0
  table = (workdir / 'benchmark_table.md').read_text().splitlines()
  assert table[0] == '# tiny: 2 steps, map feature_gaussian'
  assert 'AU-PRO' in table[2] and 'eval s' in table[2]
  assert [line.split(' | ')[0] for line in table[4:]
         ] == ['| cat_a', '| cat_b', '| mean']

  # Finished categories are neither trained nor evaluated again.
  def fail(*unused_args):
    raise AssertionError('a finished category was run again')

  monkeypatch.setattr(train_lib, 'train', fail)
  monkeypatch.setattr(script.eval_lib, 'evaluate', fail)
  caplog.set_level('INFO', logger='absl')
  _run_main(script, monkeypatch, *args)
  assert 'category 2/2 cat_b: finished (step 2), skipping' in caplog.text
  with open(workdir / 'benchmark_table.json') as f:
    assert json.load(f) == result


@pytest.mark.parametrize('categories, message', [
    (['cat_a', 'cat_c'], 'unknown categories cat_c (categories found: '
     'cat_a, cat_b)'),
    (None, 'no category folder with train/good'),
])
def test_bad_root_or_category(script, root, tmp_path, tiny_config, categories,
                              message):
  bad_root = str(root) if categories else str(root / 'not_a_category')
  with pytest.raises(
      DataError, match=message.replace('(', r'\(').replace(')', r'\)')):
    script.run_benchmark(tiny_config, str(tmp_path / 'bench'), bad_root,
                         categories)
  assert not (tmp_path / 'bench').exists()
