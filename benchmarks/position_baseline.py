"""Pixel AUROC / AU-PRO of trained MVTec runs vs their image-independent mean map.

  python benchmarks/position_baseline.py --root=../shared/data/mvtec_bottle_256 \
      --image_size=128 runs/bottle_R_u_ae0.01:R runs/bottle_D_u_ae1:D

If averaging the anomaly maps over the test set (the same map for every
image) scores as well as the per-image maps, the model's "localization" is a
positional prior, not a response to the defects (docs/results.md).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cavga_jax import checkpointing  # pylint: disable=wrong-import-position
from cavga_jax import data  # pylint: disable=wrong-import-position
from cavga_jax import eval_lib  # pylint: disable=wrong-import-position
from cavga_jax import metrics  # pylint: disable=wrong-import-position
from cavga_jax import sharding  # pylint: disable=wrong-import-position
from cavga_jax import train_lib  # pylint: disable=wrong-import-position
from configs import mvtec  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True)
  parser.add_argument('--category', default='bottle')
  parser.add_argument('--image_size', type=int, default=256)
  parser.add_argument('runs', nargs='+', help='WORKDIR:VARIANT (R or D)')
  args = parser.parse_args()
  mesh = sharding.make_mesh()
  for run in args.runs:
    workdir, variant = run.rsplit(':', 1)
    config = mvtec.get_config()
    config.data.root, config.data.category = args.root, args.category
    config.data.image_size, config.model.variant = args.image_size, variant
    _, test = data.get_datasets(config, workdir)
    generator, _, init_fn, _ = train_lib.setup(config, mesh)
    target = train_lib.abstract_state(init_fn, mesh)
    state, _ = checkpointing.restore_for_eval(workdir, target)
    maps = eval_lib.predict(jax.jit(eval_lib.make_eval_step(generator)),
                            state.gen_params, state.gen_batch_stats, test,
                            config.eval.batch_size, mesh)['anomaly_map']
    mean_map = np.broadcast_to(maps.mean(0), maps.shape)
    print(f'{workdir}: pixel AUROC {metrics.pixel_auroc(maps, test.masks):.3f} '
          f'(mean map {metrics.pixel_auroc(mean_map, test.masks):.3f}), '
          f'AU-PRO {metrics.aupro(maps, test.masks):.3f} '
          f'(mean map {metrics.aupro(mean_map, test.masks):.3f}), '
          f'std across images {maps.std(0).mean():.4f}, '
          f'across positions {maps.mean(0).std():.4f}')


if __name__ == '__main__':
  main()
