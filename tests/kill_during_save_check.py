"""Trains the tiny config and SIGKILLs itself at a chosen point (test helper).

  python tests/kill_during_save_check.py --workdir=DIR --kill_at=save:2
  python tests/kill_during_save_check.py --workdir=DIR --kill_at=step:3

``save:N`` kills the process inside the N-th checkpoint save, after orbax
has written every file of ``<step>.orbax-checkpoint-tmp`` and just before it
commits the save (writes the success marker and renames the folder): the
latest point at which a save can still be incomplete. ``step:N`` kills it
when the training loop asks for the batch of step N (0-based), while step
N - 1 may still be running on the device.

The library has no test hooks; the kill points are installed here by
patching orbax's commit and the batch iterator. ``tests/test_reliability.py``
runs this script in a subprocess and then resumes the run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from orbax.checkpoint._src.path import atomicity

from cavga_jax.data import pipeline
from cavga_jax.programs import runtime
from cavga_jax.programs import train as train_lib
from configs import tiny


def _kill() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_save(n: int) -> None:
  """Kills the process in the commit of the n-th step folder (1-based)."""
  calls = [0]
  for cls in (atomicity.AtomicRenameTemporaryPath,
              atomicity.CommitFileTemporaryPath):
    original = cls.finalize

    async def finalize(self, *args, _original=original, **kwargs):
      # Items inside a step folder are committed too; count step folders.
      if self.get_final().parent.name == 'checkpoints':
        calls[0] += 1
      if calls[0] == n:
        print(f'killing in the commit of {self.get()}', flush=True)
        _kill()
      return await _original(self, *args, **kwargs)

    cls.finalize = finalize


def _kill_at_step(n: int) -> None:
  """Kills the process when the loop asks for the batch of step n."""
  original = pipeline.TrainBatches.__next__

  def next_batch(self):
    if self.step == n:
      print(f'killing before step {n}', flush=True)
      _kill()
    return original(self)

  pipeline.TrainBatches.__next__ = next_batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', required=True)
  parser.add_argument(
      '--kill_at',
      required=True,
      help='save:N (N-th save, 1-based) or step:N (0-based)')
  parser.add_argument('--num_steps', type=int, default=4)
  parser.add_argument('--checkpoint_every', type=int, default=2)
  parser.add_argument('--compilation_cache', default='')
  args = parser.parse_args()

  if args.compilation_cache:
    runtime.enable_compilation_cache(args.compilation_cache)
  where, n = args.kill_at.split(':')
  if where == 'save':
    _kill_in_save(int(n))
  elif where == 'step':
    _kill_at_step(int(n))
  else:
    parser.error(f'--kill_at={args.kill_at}: expected save:N or step:N')
  config = tiny.get_config()
  config.train.num_steps = args.num_steps
  config.train.checkpoint_every = args.checkpoint_every
  train_lib.train(config, args.workdir)
  sys.exit('error: training finished without reaching the kill point')


if __name__ == '__main__':
  main()
