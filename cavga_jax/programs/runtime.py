"""Process-level settings and run setup shared by the programs and the tests."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Mapping

from absl import flags
from absl import logging as absl_logging
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags

from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.errors import CavgaError

DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'cavga_jax', 'xla')


def define_config_flag(help_string: str,
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None) -> flags.FlagHolder:
  """The locked ``--config`` file flag, with one-line errors for bad fields.

  ``ml_collections`` rejects an override of an unknown field
  (``--config.train.num_stepz=3``) with an ``AttributeError`` that absl
  prints as a long traceback; this flag turns it into absl's one-line
  ``FATAL Flags parsing error``, like a value of the wrong type.

  Args:
    help_string: the flag's help.
    flag_values: where to define the flag (tests use their own).
    sys_argv: the command line to read overrides from (default sys.argv).
  """
  holder = config_flags.DEFINE_config_file(
      'config',
      None,
      help_string,
      flag_values=flag_values,
      lock_config=True,
      sys_argv=sys_argv)
  flag = flag_values[holder.name]
  parse = flag._parse  # pylint: disable=protected-access

  def parse_with_one_line_errors(argument):
    try:
      return parse(argument)
    except (AttributeError, KeyError) as e:
      # ml_collections wraps a KeyError("'field'\nDid you mean ...").
      while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
      text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
      raise flags.IllegalFlagValueError(
          f'{argument}: unknown config field {" ".join(text.split())}'
      ) from None

  flag._parse = parse_with_one_line_errors  # pylint: disable=protected-access
  return holder


def define_compilation_cache_flag() -> flags.FlagHolder:
  """The ``--compilation_cache`` flag shared by the command-line programs."""
  return flags.DEFINE_string(
      'compilation_cache', DEFAULT_CACHE_DIR,
      'Persistent XLA compilation cache directory (empty: off).')


def enable_compilation_cache(cache_dir: str = DEFAULT_CACHE_DIR) -> None:
  """Persists compiled XLA programs in ``cache_dir`` (reused by later runs).

  Every program is cached, however quick it was to compile: on small CPUs
  even the initialiser of a small model takes seconds to compile.
  """
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


class _DropInfoFrom(logging.Filter):
  """Drops INFO-and-below records logged from files under given packages."""

  def __init__(self, *packages: str):
    super().__init__()
    self._parts = tuple(f'{os.sep}{p}{os.sep}' for p in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno > logging.INFO
            or not any(p in record.pathname for p in self._parts))


def quiet_dependency_logs() -> None:
  """Keeps Orbax's per-save INFO lines out of the training log."""
  absl_logging.get_absl_logger().addFilter(_DropInfoFrom('orbax'))


def task_program(
    programs: Mapping[str, Callable[[Any, str],
                                    Any]]) -> Callable[[Any, str], Any]:
  """``(config, workdir) -> programs[config.task](config, workdir)``.

  ``config.task`` defaults to 'cavga' (``settings``); the program then
  checks the rest of the config.

  Raises:
    CavgaError: a task without a program (one line, as ``config_checks``).
  """

  def program(config, workdir):
    task = config.get('task', typed_config.default('task'))
    if task not in programs:
      raise CavgaError(f'config.task={task!r} must be one of '
                       f'{", ".join(repr(t) for t in programs)}')
    return programs[task](config, workdir)

  return program


def run_program(program: Callable[[Any, str], Any], config: Any, workdir: str,
                compilation_cache: str) -> Any:
  """Runs ``program(config, workdir)`` for a command-line entry point.

  Sets up logging and the compilation cache; every program checks the
  config first thing (``config_checks.check_config``, once per run: before
  the training programs lock the workdir, or in the evaluation's setup). A ``CavgaError`` (bad input,
  bad config, failed run) ends the process with its one-line message and
  exit status 1 instead of a traceback.
  """
  quiet_dependency_logs()
  if compilation_cache:
    enable_compilation_cache(compilation_cache)
  try:
    absl_logging.info('JAX devices: %s', jax.devices())
    return program(config, workdir)
  except CavgaError as e:
    absl_logging.error('%s', e)
    sys.exit(f'error: {e}')


def prepare_run(config: Any,
                workdir: str,
                overwrite: bool = False) -> jax.sharding.Mesh:
  """Checks the workdir, writes ``<workdir>/config.json``.

  The first thing every training program does (CAVGA and the VAEs) once it
  has checked the config (``config_checks.check_config``) and locked the
  workdir (``workdirs.lock``). A
  workdir whose ``config.json`` defines another run stops the run
  (``workdirs.check_rerun``) unless ``overwrite``, which deletes the old
  run's outputs first (``workdirs.start_over``). Only process 0 deletes and
  writes; the others wait for it.

  Args:
    config: the run configuration.
    workdir: the run folder.
    overwrite: start over instead of resuming (``train.py --overwrite``).

  Returns:
    The device mesh.

  Raises:
    CavgaError: a workdir of another run, or a batch size the devices
      cannot split.
  """
  primary = sharding.is_primary_process()
  if overwrite:
    if primary:
      workdirs.start_over(workdir)
  else:
    workdirs.check_rerun(config, workdir, 'train.py')
  if jax.process_count() > 1:
    # No process resumes from a checkpoint that process 0 is deleting, and
    # none reads config.json while process 0 rewrites it.
    multihost_utils.sync_global_devices('cavga_jax workdir checked')
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, workdirs.CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh,
                            'config.train.batch_size')
  return mesh
