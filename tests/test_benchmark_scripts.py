"""benchmarks/benchmark.py and profile_step.py run and print their JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paper widths at the smallest size CAVGA-D takes: seconds to compile.
STEP = ['--variant', 'D', '--image-size', '16', '--batch', '2',
        '--mode', 'eval']


def _run(script, *args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                       capture_output=True, text=True, cwd=ROOT, check=True,
                       timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize('xla_defaults', [False, True])
def test_benchmark_prints_one_json_line(xla_defaults):
  flags = ['--xla-defaults'] if xla_defaults else []
  result = _run('benchmarks/benchmark.py', *STEP, '--steps', '2',
                '--warmup', '1', *flags)
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
