#!/usr/bin/env python
"""One-class detection on every class of MNIST, Fashion-MNIST or CIFAR-10.

  python scripts/one_class.py --config=configs/mnist.py --workdir=runs/mnist \
      [--classes=0,1] [--config.train.num_steps=...]

Trains and evaluates one model per normal class (`<workdir>/class_<c>`) and
writes `<workdir>/one_class.md` and `one_class.json` with the per-class
image AUROC and the mean. Rerunning resumes unfinished classes.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cavga_jax.programs import one_class  # pylint: disable=g-import-not-at-top,wrong-import-position
from cavga_jax.programs import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = runtime.define_config_flag(
    'One-class configuration (configs/mnist.py, ...).')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Sweep folder; class c runs '
    'in <workdir>/class_<c>.')
_CLASSES = flags.DEFINE_list('classes', None, 'Normal classes to run '
                             '(default: all 10).')
_CACHE = runtime.define_compilation_cache_flag()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    classes = None if _CLASSES.value is None else [
        int(c) for c in _CLASSES.value
    ]
  except ValueError:
    raise app.UsageError(f'--classes must be integers, got '
                         f'{_CLASSES.value}') from None
  result = runtime.run_program(
      lambda config, workdir: one_class.run_one_class(config, workdir, classes),
      _CONFIG.value, _WORKDIR.value, _CACHE.value)
  print(one_class.format_table(result), end='')


if __name__ == '__main__':
  app.run(main)
