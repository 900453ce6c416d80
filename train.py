"""Trains CAVGA, or the Liu et al. VAEs of the configs with task='vae'.

  python train.py --config=configs/default.py --workdir=/tmp/cavga \
      [--config.train.num_steps=2000 ...]

Checkpoints go to <workdir>/checkpoints; a rerun resumes from the newest one.
A rerun whose config differs from <workdir>/config.json in a field of the
model, the data or the objective stops with one line naming the fields
(schedule length, logging, checkpointing and evaluation fields may differ);
--overwrite deletes the old run's outputs and starts over.
"""

import functools

from absl import app
from absl import flags
import jax

from cavga_jax.programs import runtime
from cavga_jax.programs import train as train_lib
from cavga_jax.programs import train_vae as vae_lib

_CONFIG = runtime.define_config_flag('Training configuration file.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, '
    'logs and the generated dataset.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call '
    'jax.distributed.initialize() first (multi-host '
    'GPU clusters and TPU pod slices).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --multihost on GPU hosts outside Slurm '
    'or Open MPI: host:port of process 0 (TPU, Slurm, Open MPI: auto).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'With --coordinator_address.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Delete the run in --workdir (checkpoints, logs, '
    'config.json, evaluations) and start over, also when its config differs.')
_CACHE = runtime.define_compilation_cache_flag()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _MULTIHOST.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  # config.task -> program: CAVGA, or the Liu et al. VAE experiments.
  program = runtime.task_program({
      'cavga': functools.partial(train_lib.train, overwrite=_OVERWRITE.value),
      'vae': functools.partial(vae_lib.train, overwrite=_OVERWRITE.value)
  })
  runtime.run_program(program, _CONFIG.value, _WORKDIR.value, _CACHE.value)


if __name__ == '__main__':
  app.run(main)
