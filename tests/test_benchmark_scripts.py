"""benchmarks/: benchmark.py, profile_step.py and conv_layers.py run and
print their JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paper widths at the smallest size CAVGA-D takes: seconds to compile.
STEP = [
    '--variant', 'D', '--image-size', '16', '--batch', '2', '--mode', 'eval'
]


def _run(script, *args):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, script), *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      check=True,
      timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize('xla_defaults', [False, True])
def test_benchmark_prints_one_json_line(xla_defaults):
  flags = ['--xla-defaults'] if xla_defaults else []
  result = _run('benchmarks/benchmark.py', *STEP, '--steps', '2', '--warmup',
                '1', *flags)
  assert result['xla_defaults'] is xla_defaults
  assert (result['variant'], result['mode'], result['batch']) == ('D', 'eval',
                                                                  2)
  assert len(result['step_ms_all']) == 2 and result['images_per_s'] > 0


def test_profile_step_attributes_the_step_time():
  result = _run('benchmarks/profile_step.py', *STEP, '--steps', '1',
                '--xla-defaults')
  assert result['step_ms_median'] > 0 and result['op_ms_sum'] > 0
  assert result['unattributed_ms'] == pytest.approx(
      result['step_ms_median'] - result['op_ms_sum'], abs=0.2)
  shares = [kind['share'] for kind in result['by_kind'].values()]
  assert sum(shares) == pytest.approx(1.0, abs=0.01)
  assert result['top'] and all(op['ms'] >= 0 for op in result['top'])


def test_conv_layers_times_every_conv_of_the_train_step():
  result = _run('benchmarks/conv_layers.py', *STEP[:-1], 'train', '--repeats',
                '1', '--steps', '1')
  paths = [(row['role'], row['path']) for row in result['layers']]
  # CAVGA-D: 4 encoder convs, the two latent heads, 5 decoder convs; the
  # discriminator's 4 trunk convs and its head.
  assert [p for r, p in paths if r == 'generator'] == [
      *(f'encoder/conv{i}' for i in range(4)), 'mu', 'logvar',
      *(f'decoder/convt{i}' for i in range(5))
  ]
  assert [p for r, p in paths if r == 'discriminator'
         ] == [*(f'trunk/conv{i}' for i in range(4)), 'head']
  first_gen, first_disc = result['layers'][0], result['layers'][11]
  assert first_gen['input'] == first_disc['input'] == [2, 16, 16, 3]
  assert first_gen['counts'] == dict(forward=1, input_grad=0, param_grad=1)
  assert first_disc['counts'] == dict(forward=3, input_grad=1, param_grad=2)
  assert result['layers'][12]['counts'] == dict(
      forward=3, input_grad=3, param_grad=2)
  for row in result['layers']:
    timed = [p for p, count in row['counts'].items() if count]
    assert all(
        (row[f'{p}_ms'] is None) == (p not in timed) for p in row['counts'])
    expected = sum(row['counts'][p] * row[f'{p}_ms'] for p in timed)
    assert row['ms_per_step'] == pytest.approx(expected, abs=0.2)
  assert result['conv_ms_sum'] == pytest.approx(
      sum(row['ms_per_step'] for row in result['layers']), abs=0.5)
  assert result['conv_share'] == pytest.approx(
      result['conv_ms_sum'] / result['step_ms_median'], abs=0.01)
