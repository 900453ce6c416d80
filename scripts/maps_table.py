"""Markdown table of every map of one or more evaluated runs.

  python scripts/maps_table.py runs/bottle_D_u 'w_ae 1'=runs/i12/bottle_ae1 \
      [--metrics=pixel_auroc,aupro,iou_held_out] [--maps=attention,residual,prior]

Reads ``<workdir>/eval/metrics.json`` (written by evaluate.py; or the
``metrics.json`` of a folder given directly, e.g. ``<workdir>/eval_untrained``)
and prints
one row per run (an argument ``label=workdir`` names the row, else the
workdir does) and one column per map (all of the first run's, or
``--maps`` in that order), each cell ``metric1 / metric2 / ...`` (default
pixel AUROC / AU-PRO / IoU@0.5), then a second table with the maps' image
AUROC (their own image score) beside the reconstruction error's (``s_a``).
"""

import argparse
import json
import os


def _load(path: str) -> dict:
  """metrics.json of a workdir, or of an evaluation folder (eval_untrained)."""
  if not os.path.exists(os.path.join(path, 'metrics.json')):
    path = os.path.join(path, 'eval')
  with open(os.path.join(path, 'metrics.json')) as f:
    return json.load(f)


def _reconstruction_auroc(result: dict) -> float:
  """``s_a``'s image AUROC. metrics.json files written before the flat keys
  became the headline map's hold it under 'image_auroc' (docs/raw and older
  workdirs are compared with new ones)."""
  return result.get('image_auroc_reconstruction', result['image_auroc'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--metrics', default='pixel_auroc,aupro,iou')
  parser.add_argument(
      '--maps', default=None, help='comma-separated maps (default: every map)')
  args = parser.parse_args()
  names = args.metrics.split(',')
  # Split at the last '=': a label may hold one (a config flag), a workdir
  # path does not.
  labelled = [
      arg.rsplit('=', 1) if '=' in arg else (os.path.normpath(arg), arg)
      for arg in args.workdirs
  ]
  results = {label: _load(workdir) for label, workdir in labelled}
  maps = (
      args.maps.split(',') if args.maps else list(
          next(iter(results.values()))['maps']))
  print('| run | step | ' + ' | '.join(maps) + ' |')
  print('|---|---|' + '---|' * len(maps))
  for label, result in results.items():
    # '-' for a metric a map does not have (the priors' held-out IoU).
    cells = [
        ' / '.join(
            f'{result["maps"][m][k]:.3f}' if k in result['maps'][m] else '-'
            for k in names) if m in result['maps'] else ''
        for m in maps
    ]
    print(f'| {label} | {result.get("checkpoint_step")} | ' + ' | '.join(cells)
          + ' |')
  print()
  print('| run | image AUROC: MSE | ' + ' | '.join(maps) + ' |')
  print('|---|---|' + '---|' * len(maps))
  for label, result in results.items():
    cells = [
        f'{result["maps"][m]["image_auroc"]:.3f}' if m in result['maps'] else ''
        for m in maps
    ]
    print(f'| {label} | {_reconstruction_auroc(result):.3f} | '
          + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
