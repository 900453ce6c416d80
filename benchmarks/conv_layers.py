"""Where a CAVGA step's convolution time goes, layer by layer, as JSON.

  python benchmarks/conv_layers.py --variant D --image-size 256 --batch 8 --mode train

``profile_step.py`` cannot see XLA:CPU's own (Eigen) convolutions, which
``layers.compiler_options`` selects on the CPU: they leave no trace events.
This script records every convolution layer of the generator and the
discriminator with the input it gets in the benchmarked step (intercepting
the models' calls, ``flax.linen.intercept_methods``), then times each layer
alone, jitted with the step's compiler options: its forward pass, its input
gradient and its parameter gradient (best of ``--repeats`` calls). Each
time is multiplied by how often the step runs it:

- train: a generator layer 1 forward, 1 parameter and 1 input gradient (none
  for the first layer, whose input is the image); a discriminator layer 3
  forwards (real, fake, and fake through the updated D), 2 parameter
  gradients (the D update) and 3 input gradients (1 for the first layer:
  only the generator update differentiates D down to its input);
- eval: each generator layer 1 forward.

The sum against the whole step's median time (``benchmark.py``'s step) is
the convolutions' share; what is left is elementwise work (BatchNorm,
activations, the phase shuffles), the optimiser and the losses.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmark  # pylint: disable=wrong-import-position
import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from cavga_jax.models import layers  # pylint: disable=wrong-import-position
from cavga_jax.programs import train as train_lib  # pylint: disable=wrong-import-position

CONV_MODULES = (layers.Conv, layers.ConvTranspose4x4, layers.UpsampleConv3x3,
                nn.Conv)


def record_conv_layers(
    model: nn.Module,
    *args) -> list[tuple[str, nn.Module, jax.ShapeDtypeStruct]]:
  """``(path, unbound layer, input)`` of every conv ``model.init`` calls.

  In call order, in training mode; nothing is computed (``jax.eval_shape``).
  """
  calls = []

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, CONV_MODULES):
      x = call_args[0]
      calls.append(('/'.join(module.scope.path), module.clone(parent=None),
                    jax.ShapeDtypeStruct(x.shape, x.dtype)))
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda key, *args: model.init(key, *args, train=True),
                   jax.random.key(0), *args)
  return calls


def step_counts(mode: str, role: str, first: bool) -> dict[str, int]:
  """How often one ``mode`` step runs a layer's forward and gradients."""
  if mode == 'eval':
    return dict(
        forward=1 if role == 'generator' else 0, input_grad=0, param_grad=0)
  if role == 'generator':
    return dict(forward=1, input_grad=0 if first else 1, param_grad=1)
  return dict(forward=3, input_grad=1 if first else 3, param_grad=2)


def time_layer(layer: nn.Module, x_spec: jax.ShapeDtypeStruct,
               passes: Sequence[str], options,
               repeats: int) -> dict[str, float]:
  """Best ms of each of ``passes`` ('forward', 'input_grad', 'param_grad')."""
  key_x, key_init, key_g = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, x_spec.shape, x_spec.dtype)
  variables = layer.init(key_init, x)
  g = jax.random.normal(key_g,
                        jax.eval_shape(layer.apply, variables, x).shape,
                        x_spec.dtype)
  apply = lambda v, x: layer.apply(v, x)
  programs = dict(
      forward=(apply, (variables, x)),
      input_grad=(lambda v, x, g: jax.vjp(lambda x: apply(v, x), x)[1]
                  (g)[0], (variables, x, g)),
      param_grad=(lambda v, x, g: jax.vjp(lambda v: apply(v, x), v)[1]
                  (g)[0], (variables, x, g)))
  best_ms = {}
  for name in passes:
    fn, args = programs[name]
    call = functools.partial(jax.jit(fn, compiler_options=options), *args)
    _, times = benchmark.time_calls(call, repeats, warmup=1)
    best_ms[name] = 1000 * min(times)
  return best_ms


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  benchmark.add_step_arguments(parser)
  parser.add_argument(
      '--repeats',
      type=int,
      default=5,
      help='timed calls per layer and pass (best is kept)')
  parser.add_argument(
      '--steps',
      type=int,
      default=3,
      help='timed calls of the whole step (median is kept)')
  args = parser.parse_args()

  config = benchmark.config_from_args(args)
  generator, discriminator = train_lib.build_models(config)
  options = benchmark.step_compiler_options(config, args.xla_defaults)
  size, channels = args.image_size, args.channels
  images = jnp.zeros((args.batch, size, size, channels), jnp.float32)
  recorded = [
      ('generator', call)
      for call in record_conv_layers(generator, images, jax.random.key(1))
  ]
  recorded += [('discriminator', call)
               for call in record_conv_layers(discriminator, images)]

  rows, first_seen = [], set()
  for role, (path, layer, x_spec) in recorded:
    counts = step_counts(args.mode, role, first=role not in first_seen)
    first_seen.add(role)
    if not any(counts.values()):
      continue
    ms = time_layer(layer, x_spec, [p for p, n in counts.items() if n], options,
                    args.repeats)
    step_ms = sum(counts[p] * ms[p] for p in ms)
    rows.append(
        dict(
            role=role,
            path=path,
            input=list(x_spec.shape),
            kind=type(layer).__name__,
            **{f'{p}_ms': round(ms[p], 2) if p in ms else None for p in counts},
            counts=counts,
            ms_per_step=round(step_ms, 1)))
    print(
        f'{role:13s} {path:40s} {str(tuple(x_spec.shape)):22s} '
        + '  '.join(f'{p} {t:6.1f} x{counts[p]}' for p, t in ms.items())
        + f' = {step_ms:7.1f} ms',
        file=sys.stderr,
        flush=True)

  run = benchmark.build_step(args)
  _, times = benchmark.time_calls(run, args.steps, warmup=2)
  step_ms = 1000 * statistics.median(times)
  conv_ms = sum(row['ms_per_step'] for row in rows)
  print(
      json.dumps(
          dict(
              variant=args.variant,
              mode=args.mode,
              image_size=size,
              batch=args.batch,
              dtype=args.dtype,
              xla_defaults=args.xla_defaults,
              step_ms_median=round(step_ms, 1),
              conv_ms_sum=round(conv_ms, 1),
              conv_share=round(conv_ms / step_ms, 3),
              layers=rows,
              cpu_threads=len(os.sched_getaffinity(0)),
              backend=jax.default_backend(),
              machine=platform.machine(),
              jax=jax.__version__)))


if __name__ == '__main__':
  main()
