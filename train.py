"""Trains CAVGA.

  python train.py --config=configs/default.py --workdir=/tmp/cavga \
      [--config.train.num_steps=2000 ...]

Checkpoints go to <workdir>/checkpoints; a rerun resumes from the newest one.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from cavga_jax import runtime
from cavga_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'logs and the generated dataset.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call '
                               'jax.distributed.initialize() first (multi-host '
                               'GPU clusters and TPU pod slices).')
_CACHE = runtime.define_compilation_cache_flag()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _MULTIHOST.value:
    jax.distributed.initialize()
  runtime.run_program(train_lib.train, _CONFIG.value, _WORKDIR.value,
                      _CACHE.value)


if __name__ == '__main__':
  app.run(main)
