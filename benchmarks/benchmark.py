"""Images/s of the CAVGA train step and evaluation step, as one JSON line.

  python benchmarks/benchmark.py --variant R --image-size 256 --batch 8 --mode train

Same measurement as the PyTorch peer (../shared/peer/cavga_torch.py): random
initialisation, synthetic inputs uniform in [-1, 1] (as uint8 here, the
input format of our step), paper widths, latent 128, median step time over
``--steps`` timed steps after ``--warmup`` untimed ones. ``train`` is the full
jitted step (G forward with Grad-CAM, D update, G update through the updated
D with the second-order L_ae gradient); ``eval`` is forward from ``mu`` +
Grad-CAM + ``1 - A`` resized to image size + per-image score, the peer's
evaluation (``--maps all``: every anomaly map of ``evaluate.py``'s step
too).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cavga_jax import sharding  # pylint: disable=wrong-import-position
from cavga_jax import typed_config  # pylint: disable=wrong-import-position
from cavga_jax.evaluation import inference  # pylint: disable=wrong-import-position
from cavga_jax.models import layers  # pylint: disable=wrong-import-position
from cavga_jax.training import cavga_step  # pylint: disable=wrong-import-position
from cavga_jax.training import train_state  # pylint: disable=wrong-import-position
from configs import default  # pylint: disable=wrong-import-position

PAPER_MAPS = ('attention',)  # the eval step the PyTorch peer times


def config_from_args(args) -> ml_collections.ConfigDict:
  """The benchmarked config: paper widths, the flags' variant, size, dtype."""
  config = default.get_config()
  config.data.image_size = args.image_size
  config.data.channels = args.channels
  config.model.variant = args.variant
  config.model.latent_channels = args.latent_channels
  config.model.encoder_widths = ()
  config.model.decoder_widths = ()
  config.model.discriminator_widths = ()
  config.model.compute_dtype = args.dtype
  config.train.batch_size = args.batch
  return config


def time_calls(fn, steps, warmup):
  """(first call s incl. compilation, [s of each of ``steps`` timed calls])
  of ``fn``, after ``warmup`` untimed calls (the first included)."""
  compile_tic = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - compile_tic
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - tic)
  return first, times


def step_compiler_options(config: ml_collections.ConfigDict,
                          xla_defaults: bool) -> dict[str, str] | None:
  """``jax.jit``'s compiler options of the benchmarked programs."""
  return (None
          if xla_defaults else layers.compiler_options(config.model.conv_impl))


def make_step(
    config: ml_collections.ConfigDict,
    mode: str,
    eval_maps: Sequence[str] | None = PAPER_MAPS,
    xla_defaults: bool = False) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """The jitted step of ``mode`` and the inputs of one call, on a fixed batch.

  Args:
    config: a CAVGA config (``config_from_args``); its data.image_size,
      data.channels and train.batch_size give the batch.
    mode: 'train' (``step(state, images, rng) -> (state, metrics)``, the
      state donated) or 'eval' (``step(gen_params, gen_batch_stats, images)
      -> outputs``).
    eval_maps: the maps the eval step computes: the paper's ``1 - A`` (the
      PyTorch peer's evaluation: encoder, decoder, Grad-CAM, ``1 - A`` at
      image size, the per-image error) or, with None, every map
      (``anomaly_maps``: SSIM, blurs, per-unit maps, ...).
    xla_defaults: compile with XLA's default options instead of
      ``layers.compiler_options`` (on the CPU: YNNPACK's convolutions).

  Returns:
    ``(step, inputs)``: ``step(*inputs)`` is one call; ``images`` is uint8
    (batch, image_size, image_size, channels) on the mesh.
  """
  size, channels = config.data.image_size, config.data.channels
  batch = config.train.batch_size
  mesh = sharding.make_mesh()
  generator, discriminator, init_fn, state_sharding = train_state.setup(
      typed_config.from_config(config), mesh)
  state = init_fn(jax.random.key(0))
  images = np.random.default_rng(0).integers(
      0, 256, (batch, size, size, channels), dtype=np.uint8)
  images = sharding.shard_batch(images, mesh)
  options = step_compiler_options(config, xla_defaults)
  if mode == 'train':
    step = jax.jit(
        cavga_step.make_train_step(generator, discriminator,
                                   dict(config.loss_weights)),
        donate_argnums=0,
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        compiler_options=options)
    return step, (state, images, jax.random.key(1))
  step = jax.jit(
      inference.make_eval_step(generator, map_names=eval_maps),
      compiler_options=options)
  return step, (state.gen_params, state.gen_batch_stats, images)


def make_runner(step: Callable[..., Any], inputs: tuple[Any, ...],
                mode: str) -> Callable[[], Any]:
  """``run()`` calls ``step`` (jitted or AOT-compiled) once on ``inputs``.

  In 'train' mode the donated state is threaded from call to call.
  """
  if mode == 'train':
    holder = [inputs[0]]

    def run():
      holder[0], metrics = step(holder[0], *inputs[1:])
      return holder[0].gen_params, metrics
  else:

    def run():
      return step(*inputs)

  return run


def build_step(args) -> Callable[[], Any]:
  """``run()`` performs one jitted step of ``args.mode`` on a fixed batch.

  Args:
    args: variant, image_size, channels, latent_channels, batch, mode
      ('train' or 'eval'), dtype, maps and xla_defaults, as the
      command-line flags.
  """
  eval_maps = None if args.maps == 'all' else PAPER_MAPS
  return make_runner(
      *make_step(
          config_from_args(args), args.mode, eval_maps, args.xla_defaults),
      args.mode)


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags ``build_step`` reads (shared with profile_step.py)."""
  parser.add_argument('--variant', default='R', choices=['R', 'D', 'E'])
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--latent-channels', type=int, default=128)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--mode', default='train', choices=['train', 'eval'])
  parser.add_argument(
      '--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument(
      '--maps',
      default='paper',
      choices=['paper', 'all'],
      help="eval: the paper's 1 - A only (the peer's work) "
      'or every anomaly map')
  parser.add_argument(
      '--xla-defaults',
      action='store_true',
      help="XLA's default compiler options, not "
      "layers.compiler_options (CPU: YNNPACK convolutions)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_step_arguments(parser)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args()

  run = build_step(args)
  first, times = time_calls(run, args.steps, args.warmup)
  median = statistics.median(times)
  device = jax.devices()[0]
  memory = {}
  if device.platform != 'cpu' and device.memory_stats():
    memory['peak_device_bytes'] = device.memory_stats().get('peak_bytes_in_use')
  memory['max_rss_bytes'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  print(
      json.dumps(
          dict(
              framework='jax',
              variant=args.variant,
              mode=args.mode,
              image_size=args.image_size,
              batch=args.batch,
              dtype=args.dtype,
              maps=args.maps if args.mode == 'eval' else None,
              xla_defaults=args.xla_defaults,
              images_per_s=args.batch / median,
              step_ms_median=1000 * median,
              step_ms_all=[round(1000 * t, 1) for t in times],
              first_call_s=first,
              devices=jax.device_count(),
              device_kind=device.device_kind,
              platform=device.platform,
              cpu_threads=len(os.sched_getaffinity(0)),
              jax=jax.__version__,
              python=platform.python_version(),
              **memory)))


if __name__ == '__main__':
  main()
