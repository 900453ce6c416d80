"""benchmarks/accelerator_check.py: --smoke on the CPU, skips, helpers."""

import json
import os

import pytest

from conftest import load_script
from conftest import REPO_ROOT

PEER = os.path.join(
    os.path.dirname(REPO_ROOT), 'shared', 'peer', 'cavga_torch.py')


@pytest.fixture(scope='module')
def check():
  return load_script('benchmarks/accelerator_check.py')


def _assert_keys(check, report):
  """Every dict of the report has its key list, in a full run as in --smoke."""
  assert tuple(report) == check.TOP_KEYS
  assert tuple(report['environment']) == check.ENVIRONMENT_KEYS
  assert tuple(report['settings']) == check.SETTINGS_KEYS
  assert tuple(report['torch_peer']) == check.TORCH_PEER_KEYS
  assert tuple(report['bottle']) == check.BOTTLE_KEYS
  # Every (variant, mode, dtype) has a row, measured or not.
  assert sorted((r['variant'], r['mode'], r['dtype'])
                for r in report['jax_steps']) == sorted((v, m, d)
                                                        for v in check.VARIANTS
                                                        for m in check.MODES
                                                        for d in check.DTYPES)
  assert all(tuple(r) == check.JAX_ROW_KEYS for r in report['jax_steps'])
  assert sorted((r['variant'], r['mode'])
                for r in report['torch_peer']['rows']) == sorted(
                    (v, m) for v in check.VARIANTS for m in check.MODES)
  assert all(
      tuple(r) == check.TORCH_ROW_KEYS for r in report['torch_peer']['rows'])
  assert all(tuple(r) == check.COMPARISON_KEYS for r in report['comparison'])


def _load(out):
  assert sorted(
      os.listdir(out)) == ['accelerator_check.json', 'accelerator_check.md']
  with open(os.path.join(out, 'accelerator_check.json')) as f:
    return json.load(f)


def test_smoke_measures_every_part_with_the_full_runs_keys(check, tmp_path):
  out = tmp_path / 'out'
  # No time budget: on a loaded machine the smoke parts can outlast the
  # default one, and the test checks what is measured, not how fast.
  argv = ['--smoke', '--out', str(out), '--budget_s', '1e9']
  if os.path.isfile(PEER):
    argv += ['--peer', PEER]  # Skipped with a reason where torch is missing.
  check.main(argv)
  report = _load(out)
  _assert_keys(check, report)
  assert report['smoke'] and not report['errors']
  measured = [r for r in report['jax_steps'] if r['status'] == 'ok']
  assert {(r['variant'], r['mode'], r['dtype']) for r in measured
         } == set(check.SMOKE_JAX_ROWS)
  for row in measured:
    for key in ('images_per_s', 'step_ms_median', 'lower_s', 'compile_s',
                'first_call_s', 'flops_per_step_lowered', 'flops_per_image',
                'achieved_flops_per_s', 'program_bytes'):
      assert row[key] > 0, (key, row)
  # The CPU has no peak in the table and no device memory statistics.
  assert report['environment']['peak_flops_per_s'] is None
  assert measured[0]['fraction_of_peak'] is None
  assert report['peak_device_bytes'] is None
  peer = report['torch_peer']
  assert peer['status'] in ('ok', 'skipped'), peer['reason']
  for row in peer['rows']:
    assert row['status'] == peer['status']
    if row['status'] == 'ok':
      assert row['images_per_s'] > 0
  bottle = report['bottle']
  assert bottle['status'] == 'ok', bottle['reason']
  assert bottle['steps_per_s'] > 0 and bottle['train_wall_s'] > 0
  assert bottle['headline'] in bottle['maps']
  for values in bottle['maps'].values():
    for key in ('pixel_auroc', 'aupro', 'image_auroc'):
      assert 0 <= values[key] <= 1, (key, values)
  text = (out / 'accelerator_check.md').read_text()
  assert '## JAX train and eval steps' in text
  assert '| D | train | float32 |' in text


def test_no_budget_or_inputs_skips_every_part_with_the_same_keys(
    check, tmp_path):
  out = tmp_path / 'out'
  check.main([
      '--out',
      str(out), '--budget_s', '0', '--peer',
      str(tmp_path / 'missing.py'), '--data_root',
      str(tmp_path / 'no_data')
  ])
  report = _load(out)
  _assert_keys(check, report)
  assert report['torch_peer']['status'] == 'skipped'
  assert 'no peer script' in report['torch_peer']['reason']
  assert all(r['status'] == 'skipped' and 'budget' in r['reason']
             for r in report['jax_steps'])
  assert report['bottle']['status'] == 'skipped'
  assert 'no bottle data' in report['bottle']['reason']
  assert len(report['skipped']) == 1 + 8 + 1


def test_helpers(check):
  assert check.peak_flops('NVIDIA H200')['bfloat16'] == 989.4e12
  assert check.peak_flops('NVIDIA H100 PCIe')['bfloat16'] == 756e12
  assert check.peak_flops('NVIDIA H100 80GB HBM3')['float32'] == 66.9e12
  assert check.peak_flops('cpu') is None
  assert check._cost(None) == {}
  assert check._cost([{'flops': 2.0}]) == {'flops': 2.0}
  assert check._cost({'flops': 2.0}) == {'flops': 2.0}
  assert check._finite({'a': [float('nan'), 1.0]}) == {'a': [None, 1.0]}
  jax_row = check._row(
      check.JAX_ROW_KEYS,
      variant='R',
      mode='eval',
      dtype='bfloat16',
      status='ok',
      images_per_s=30.0)
  torch_row = check._row(
      check.TORCH_ROW_KEYS,
      variant='R',
      mode='eval',
      status='ok',
      images_per_s=20.0)
  report = dict(
      smoke=False, jax_steps=[jax_row], torch_peer=dict(rows=[torch_row]))
  (row,) = check.comparison(report)
  assert row['jax_over_torch'] == 1.5 and row['jax_dtype'] == 'bfloat16'
  with pytest.raises(KeyError):
    check._row(check.JAX_ROW_KEYS, not_a_key=1)
