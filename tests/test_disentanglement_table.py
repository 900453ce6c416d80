"""scripts/disentanglement_table.py: per-run rows and group mean +- spread."""

import json
import sys

from conftest import load_script


def _workdir(root, name, seed, mig, live):
  workdir = root / name
  (workdir / 'eval').mkdir(parents=True)
  metrics = dict(
      factor_vae_eval_accuracy=0.5,
      mig=mig,
      nonzero_unit_maps=live,
      mean_negative_elbo=60.0,
      attention_disentanglement_loss=0.1,
      attention_overlap_loss=9.0,
      checkpoint_step=10000)
  (workdir / 'eval' / 'metrics.json').write_text(json.dumps(metrics))
  (workdir / 'config.json').write_text(json.dumps(dict(seed=seed)))
  return str(workdir)


def test_rows_and_group_statistics(tmp_path, monkeypatch, capsys):
  script = load_script('scripts/disentanglement_table.py')
  runs = [
      f'variant={_workdir(tmp_path, "a", 0, 0.1, 0.8)}',
      f'variant={_workdir(tmp_path, "b", 1, 0.3, 0.6)}',
      f'beta={_workdir(tmp_path, "c", 0, 0.05, 0.9)}'
  ]
  monkeypatch.setattr(sys, 'argv', ['disentanglement_table.py', *runs])
  script.main()
  lines = capsys.readouterr().out.splitlines()
  assert lines[2].startswith('| variant | 0 | 10000 | 0.500 | 0.100 | 0.800 ')
  group = next(line for line in lines if line.startswith('| variant | 2 |'))
  # mean 0.2, sample standard deviation of (0.1, 0.3) = 0.141.
  assert '0.200 +- 0.141' in group and '0.700 +- 0.141' in group
  assert next(line for line in lines if line.startswith('| beta | 1 |'))
