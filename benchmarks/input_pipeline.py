"""Images/s of the input pipeline alone (no model), as JSON lines.

  python benchmarks/input_pipeline.py [--steps 1000] [--mvtec_root DIR]

Both data sources end as in-memory `AnomalyDataset` arrays that the same
`TrainBatches` batches, so the pipeline is measured on synthetic arrays of
the two shapes that matter:

* ``mvtec256``: 209 x 256 x 256 x 3 uint8 (the size of MVTec's bottle train
  split), batch 16 (configs/mvtec.py);
* ``mnist32``: 6,000 x 32 x 32 x 1 uint8 (one MNIST class after the
  28 -> 32 px resize), batch 64 (configs/mnist.py).

For each: `TrainBatches` with ``put_fn`` = `sharding.shard_batch` (a
`jax.device_put` onto the batch sharding of a mesh over all devices, what
training uses) and, for reference, without ``put_fn`` (host gather only).
The consumer only waits for each batch (`jax.block_until_ready`), so the
number is the most the pipeline can feed a model (median of ``--repeats``
runs). On a CPU backend `device_put` may alias host memory instead of
copying; on an accelerator it is the host-to-device copy. ``--mvtec_root`` also
times the one-off decoding of an MVTec-layout category with `load_split`,
``--tfds_name`` (with ``--tfds_data_dir``) the one-off loading of a prepared
one-class TFDS dataset with `tfds_data.load_one_class` (class 0, 32 px).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cavga_jax import data  # pylint: disable=wrong-import-position
from cavga_jax import sharding  # pylint: disable=wrong-import-position
from cavga_jax.data import tfds_data  # pylint: disable=wrong-import-position

_SHAPES = {
    'mvtec256': dict(num=209, size=256, channels=3, batch=16),
    'mnist32': dict(num=6000, size=32, channels=1, batch=64),
}


def _time_batches(images: np.ndarray, batch: int, steps: int, warmup: int,
                  put_fn) -> float:
  """Images/s of `steps` batches after `warmup` untimed ones."""
  with data.TrainBatches(images, batch, seed=0, put_fn=put_fn) as batches:
    for _ in range(warmup):
      jax.block_until_ready(next(batches))
    tic = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(batches))
    return steps * batch / (time.perf_counter() - tic)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument(
      '--mvtec_root',
      default='',
      help='also time load_split on <root>/<category>')
  parser.add_argument('--category', default='bottle')
  parser.add_argument(
      '--tfds_name',
      default='',
      help='also time load_one_class on this prepared TFDS '
      'dataset (mnist, fashion_mnist, cifar10)')
  parser.add_argument('--tfds_data_dir', default='')
  args = parser.parse_args()

  mesh = sharding.make_mesh()
  common = dict(
      date=datetime.date.today().isoformat(),
      machine=f'{platform.machine()} {os.cpu_count()} cpus',
      device=str(jax.devices()[0].device_kind),
      num_devices=mesh.size,
      jax=jax.__version__)
  rng = np.random.default_rng(0)
  for name, shape in _SHAPES.items():
    images = rng.integers(
        0, 256, (shape['num'], shape['size'], shape['size'], shape['channels']),
        np.uint8)
    for put in ('device_put', 'host'):
      put_fn = ((lambda b: sharding.shard_batch(b, mesh))
                if put == 'device_put' else None)
      speed = statistics.median(
          _time_batches(images, shape['batch'], args.steps, args.warmup, put_fn)
          for _ in range(args.repeats))
      print(
          json.dumps(
              dict(
                  common,
                  data=name,
                  put=put,
                  batch=shape['batch'],
                  images_per_s=round(speed, 1),
                  mb_per_s=round(speed * images[0].nbytes / 1e6, 1))),
          flush=True)
  if args.mvtec_root:
    tic = time.perf_counter()
    split = data.load_split(args.mvtec_root, args.category, 'train', 256, 3)
    elapsed = time.perf_counter() - tic
    print(
        json.dumps(
            dict(
                common,
                data=f'load_split {args.category} 256px',
                images=split.num_examples,
                images_per_s=round(split.num_examples / elapsed, 1))),
        flush=True)
  if args.tfds_name:
    tic = time.perf_counter()
    train, test = tfds_data.load_one_class(
        args.tfds_name,
        0,
        32,
        3 if args.tfds_name == 'cifar10' else 1,
        data_dir=args.tfds_data_dir or None,
        download=False)
    elapsed = time.perf_counter() - tic
    print(
        json.dumps(
            dict(
                common,
                data=f'load_one_class {args.tfds_name}',
                train=train.num_examples,
                test=test.num_examples,
                seconds=round(elapsed, 2))),
        flush=True)


if __name__ == '__main__':
  main()
