"""A workdir holds one run, never two silently mixed.

``train.py`` writes the run's config to ``<workdir>/config.json``. A later
``train.py`` (resume) or ``evaluate.py`` on that workdir compares its config
with the saved one (``check_rerun``): a field that defines the model, the
data or the objective may not differ, and the rerun stops with one line
naming the fields before anything is read, generated or written. Fields that
only change how long to train, logging, checkpointing or evaluation
(``MAY_DIFFER``) may differ; they are logged. ``train.py --overwrite``
(``start_over``) deletes the run's outputs first, and is the only thing that
deletes them.

A field that is absent from an older ``config.json`` compares as its
library default (``settings``), so adding a config field does not lock old
workdirs; a new field defines the run unless it is added to ``MAY_DIFFER``.

One workdir, one writer: ``train.py`` holds ``<workdir>/.lock`` while it
runs (``lock``), ``evaluate.py`` ``<workdir>/.evaluate.lock`` (it may run
beside training, not beside another evaluation). ``read_json_object`` reads
the JSON files a workdir holds (``config.json``, ``fit.json``) with one-line
errors.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import stat
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np

from cavga_jax import typed_config
from cavga_jax.errors import CavgaError

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'  # train.py's
EVALUATE_LOCK_FILE = '.evaluate.lock'
# config.json and fit.json are a few KB; a file far larger is not one.
MAX_JSON_BYTES = 1 << 20

# Fields (or whole sections) a rerun of a workdir may change: the length of
# the schedule, logging and checkpointing, failure handling, the evaluation,
# the data loading threads and the convolution implementation (the same
# function to float rounding, layers.CONV_IMPLS). With
# optimizer.schedule='cosine' the decay follows train.num_steps, so a longer
# run changes the learning rates of the steps after the resumed one.
MAY_DIFFER = (
    'train.num_steps',
    'train.log_every',
    'train.checkpoint_every',
    'train.keep_checkpoints',
    'train.prefetch',
    'train.eval_every',
    'train.nonfinite',
    'train.max_consecutive_skips',
    'eval',
    'data.num_workers',
    'model.conv_impl',
    'detector.num_steps',
    'detector.validate_every',
    'detector.checkpoint_every',
    'detector.log_every',
)

# What a run writes into its workdir, deleted by start_over. The generated
# dataset (<workdir>/data) is not: generate_dataset replaces a folder it
# wrote when its parameters change and never touches any other. 'detector'
# is detector_training.DETECTOR_DIR (the trained detector's checkpoints: left
# behind, a new run would resume the old run's detector).
RUN_OUTPUTS = (
    'checkpoints',
    CONFIG_FILE,
    'train_metrics.jsonl',
    'eval_curve.jsonl',
    'eval_curve.png',
    'eval',
    'eval_untrained',
    'synthetic_examples.png',
    'weak_split.json',
    'detector',
)


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'section.name': value} of a JSON tree (tuples as lists)."""
  if isinstance(tree, dict):
    out = {}
    for name, value in tree.items():
      out.update(_flatten(value, f'{prefix}{name}.'))
    return out
  return {prefix[:-1]: tree}


def _json_tree(config: Any) -> dict[str, Any]:
  """The config as ``config.json`` stores it (the same JSON encoding)."""
  return json.loads(config.to_json_best_effort())


def _may_differ(field: str) -> bool:
  return any(field == f or field.startswith(f + '.') for f in MAY_DIFFER)


def differing_fields(
    saved: dict[str, Any], config: Any
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """(defining, allowed): {field: (saved value, new value)} that differ.

  Args:
    saved: the JSON tree of ``config.json``.
    config: the new run configuration.
  """
  old, new = _flatten(saved), _flatten(_json_tree(config))
  task = new.get('task', typed_config.default('task'))
  missing = object()

  def value(values, field):
    if field in values:
      return values[field]
    if typed_config.has_default(field, task):
      return json.loads(json.dumps(typed_config.default(field, task)))
    return missing

  defining, allowed = {}, {}
  for field in sorted(set(old) | set(new)):
    before, after = value(old, field), value(new, field)
    if before != after:
      pair = tuple(None if v is missing else v for v in (before, after))
      (allowed if _may_differ(field) else defining)[field] = pair
  return defining, allowed


def check_rerun(config: Any, workdir: str, program: str = 'train.py') -> None:
  """Stops a rerun on ``workdir`` whose config defines another run.

  Nothing to compare (no ``config.json``: a new workdir) passes.

  Args:
    config: the new run configuration.
    workdir: the run folder.
    program: named in the message ('train.py', 'evaluate.py').

  Raises:
    CavgaError: one line naming the fields that define the model, data or
      objective and differ, with both values.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  saved = read_json_object(path, 'rerun train.py with --overwrite to start '
                           'over')
  defining, allowed = differing_fields(saved, config)
  if allowed:
    logging.info('%s: %s differ from %s (allowed)', program, _describe(allowed),
                 path)
  if defining:
    hint = ('use another --workdir, or --overwrite to start over'
            if program == 'train.py' else
            'evaluate with the config the run was trained with')
    raise CavgaError(f'{path} is another run: {_describe(defining)}; {hint}')


def _describe(fields: dict[str, tuple[Any, Any]]) -> str:
  return ', '.join(f'config.{field} {before!r} -> {after!r}'
                   for field, (before, after) in fields.items())


def start_over(workdir: str) -> list[str]:
  """Deletes the run outputs (``RUN_OUTPUTS``) of ``workdir``.

  Returns:
    The names deleted.
  """
  deleted = []
  for name in RUN_OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
    else:
      continue
    deleted.append(name)
  if deleted:
    logging.info('--overwrite: deleted %s from %s', ', '.join(deleted), workdir)
  return deleted


def read_json_object(path: str, hint: str = '') -> dict[str, Any]:
  """The JSON object (a dict) in the file ``path``.

  Raises:
    CavgaError: one line naming ``path`` and the problem (unreadable, empty,
      larger than ``MAX_JSON_BYTES``, not JSON, not an object), then
      ``hint``.
  """

  def error(problem):
    return CavgaError(f'{path}: {problem}' + (f'; {hint}' if hint else ''))

  try:
    with open(path, 'rb') as f:
      raw = f.read(MAX_JSON_BYTES + 1)
  except OSError as e:
    raise error(f'unreadable ({e.strerror or e})') from None
  if not raw.strip():
    raise error('empty file, expected a JSON object')
  if len(raw) > MAX_JSON_BYTES:
    raise error(f'over {MAX_JSON_BYTES} bytes, not a JSON object of ours')
  try:
    value = json.loads(raw)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError included
    raise error(f'not valid JSON ({one_line(e)})') from None
  if not isinstance(value, dict):
    raise error(f'holds a JSON {type(value).__name__}, expected an object')
  return value


def one_line(error: BaseException) -> str:
  """The first line of an error's message (at most 200 characters), for
  one-line errors that wrap a library's (Orbax's are hundreds of lines)."""
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return lines[0][:200]


def _holder(raw: bytes) -> str | None:
  """'train.py (pid 12 on host h, since ...)' from a lock file's content;
  None for content that is not a holder record of ``lock``."""
  try:
    holder = json.loads(raw)
    return (f'{holder["program"]} (pid {int(holder["pid"])} on host '
            f'{holder["host"]}, since {holder["since"]})')
  except (ValueError, KeyError, TypeError):
    return None


@contextlib.contextmanager
def lock(workdir: str, program: str, name: str = LOCK_FILE) -> Iterator[None]:
  """Holds ``<workdir>/<name>`` for this run while the block runs.

  An exclusive ``fcntl.flock`` on the file, which the kernel releases when
  the holder ends however it ends (also over NFS), so a lock is never
  stuck; the file names the holder (JSON: program, pid, host, since) for
  the message of the process that is refused. A file that names a holder
  but is not locked was left by a holder that died: it is taken over, with
  a warning. On leaving, the file is emptied and unlocked (not deleted, so
  a process that opened it meanwhile cannot lock a deleted file). In a
  multi-host run process 0 holds it for all, and all stop when it is
  refused.

  Args:
    workdir: the run folder (created if absent).
    program: named to a refused process ('train.py').
    name: the lock file (``LOCK_FILE``, ``EVALUATE_LOCK_FILE``).

  Raises:
    CavgaError: another live process holds the lock (the message names
      it), or the lock file cannot be made or is not one (a link, a folder,
      a file of other content: never written over).
  """
  with contextlib.ExitStack() as stack:
    refused = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(_file_lock(workdir, program, name))
      except CavgaError as e:
        refused = e
    if jax.process_count() > 1:
      # Every process learns whether process 0 holds it: none goes on alone.
      held = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
      if not int(held):
        raise refused or CavgaError(f'{workdir}: process 0 could not lock '
                                    'the workdir; its log says why')
    elif refused is not None:
      raise refused
    yield


@contextlib.contextmanager
def _file_lock(workdir: str, program: str, name: str) -> Iterator[None]:
  """``lock`` in this process."""
  path = os.path.join(workdir, name)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o644)
  except OSError as e:
    raise CavgaError(f'{path}: cannot open the workdir lock file '
                     f'({e.strerror or e})') from None
  try:
    locked = _take(fd, path, workdir, program)
    try:
      yield
    finally:
      if locked:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def _take(fd: int, path: str, workdir: str, program: str) -> bool:
  """Locks the open lock file ``fd`` and writes this process into it.

  Returns False (with a warning) where the filesystem has no locks.
  """
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    raise CavgaError(f'{path}: not a regular file; {program} locks the '
                     'workdir with it')
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(os.pread(fd, 4096, 0)) or 'another process'
    raise CavgaError(f'{workdir} is in use: {path} is held by {holder}; wait '
                     'for it to end, or use another --workdir') from None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      raise
    logging.warning(
        '%s: this filesystem cannot lock files (%s); nothing '
        'stops a second %s on this workdir', path, e.strerror, program)
    return False
  left = os.pread(fd, 4096, 0)
  if left.strip():
    holder = _holder(left)
    if holder is None:
      fcntl.flock(fd, fcntl.LOCK_UN)
      raise CavgaError(f'{path}: not a lock file of cavga_jax (it is not '
                       'empty and names no process); move it away')
    logging.warning(
        '%s: taking over the lock of %s, which ended without '
        'releasing it', path, holder)
  record = json.dumps(
      dict(
          program=program,
          pid=os.getpid(),
          host=socket.gethostname(),
          since=datetime.datetime.now().isoformat(timespec='seconds')))
  os.ftruncate(fd, 0)
  os.pwrite(fd, record.encode() + b'\n', 0)
  return True
