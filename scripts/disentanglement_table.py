"""Markdown table of evaluated beta-VAE / L_AD runs: one row per run, then
the mean and spread of each group.

  python scripts/disentanglement_table.py \
      beta-VAE=runs/ad15/beta_seed0 beta-VAE=runs/ad15/beta_seed1 \
      'L_AD distribution'=runs/ad15/dist_w1_seed0 ...

Each argument is ``group=workdir``; the runs of one group (e.g. one variant
over seeds) are averaged. Reads ``<workdir>/eval/metrics.json`` (written by
evaluate.py with a ``task='vae'`` config) and ``<workdir>/config.json`` (for
the seed). The spread is the sample standard deviation (ddof 1) over the
group's runs, blank for a single run.
"""

import argparse
import collections
import json
import os

import numpy as np

# (metrics.json key, column title, digits)
COLUMNS = (
    ('factor_vae_eval_accuracy', 'FactorVAE (eval)', 3),
    ('mig', 'MIG', 3),
    ('nonzero_unit_maps', 'live unit maps', 3),
    ('mean_negative_elbo', 'neg. ELBO', 1),
    ('attention_disentanglement_loss', 'L_AD paper', 3),
    ('attention_overlap_loss', 'L_AD distribution', 2),
)


def _load(workdir: str) -> tuple[dict, int | None]:
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  seed = None
  config_path = os.path.join(workdir, 'config.json')
  if os.path.exists(config_path):
    with open(config_path) as f:
      seed = json.load(f).get('seed')
  return metrics, seed


def _cell(values: list[float], digits: int) -> str:
  mean = f'{np.mean(values):.{digits}f}'
  if len(values) < 2:
    return mean
  return f'{mean} +- {np.std(values, ddof=1):.{digits}f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', metavar='group=workdir')
  args = parser.parse_args()
  groups = collections.defaultdict(list)
  header = '| ' + ' | '.join(['run', 'seed', 'step']
                             + [title for _, title, _ in COLUMNS]) + ' |'
  print(header)
  print('|---|---:|---:|' + '---:|' * len(COLUMNS))
  for run in args.runs:
    group, sep, workdir = run.partition('=')
    if not sep:
      parser.error(f'expected group=workdir, got {run!r}')
    metrics, seed = _load(workdir)
    groups[group].append(metrics)
    cells = [f'{metrics[key]:.{digits}f}' for key, _, digits in COLUMNS]
    print(f'| {group} | {seed} | {metrics.get("checkpoint_step")} | '
          + ' | '.join(cells) + ' |')
  print()
  print('| group | runs | ' + ' | '.join(t for _, t, _ in COLUMNS) + ' |')
  print('|---|---:|' + '---:|' * len(COLUMNS))
  for group, runs in groups.items():
    cells = [
        _cell([m[key] for m in runs], digits) for key, _, digits in COLUMNS
    ]
    print(f'| {group} | {len(runs)} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
