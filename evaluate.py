"""Evaluates the newest checkpoint of a workdir.

  python evaluate.py --config=configs/default.py --workdir=/tmp/cavga

Writes <workdir>/eval/metrics.json, scores.csv, panels/*.png and report.html,
and the maps fitted on the normal training images to <workdir>/fitted/
(reused by the next evaluation of the same checkpoint and settings, and by
predict.py; --refit fits them again), then prints the headline map's pixel
AUROC, AU-PRO, image AUROC and held-out accuracy and the report's path.
--maps=headline computes only the headline map (config.eval.map) and the
maps it is made of (config.eval.maps; the default 'all' scores every map).
--all_checkpoints instead scores every retained checkpoint with all maps and
writes the learning curve <workdir>/eval_curve.jsonl and eval_curve.png (for
runs trained without --config.train.eval_every); --untrained scores the
freshly initialised networks instead (<workdir>/eval_untrained/), the control
for what training adds to each map. A config that differs from
<workdir>/config.json in a field of the model, the data or the objective
stops with one line naming the fields (evaluation fields may differ).
"""

import functools
import json

from absl import app
from absl import flags

from cavga_jax.programs import evaluate as eval_lib
from cavga_jax.programs import evaluate_vae as vae_eval_lib
from cavga_jax.programs import runtime

_CONFIG = runtime.define_config_flag(
    'The configuration the model was trained with.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training workdir.')
_ALL_CHECKPOINTS = flags.DEFINE_bool(
    'all_checkpoints', False, 'Score every retained checkpoint (CAVGA) and '
    'write the learning curve instead of evaluating the newest one.')
_UNTRAINED = flags.DEFINE_bool(
    'untrained', False, 'Evaluate the freshly initialised networks of '
    'config.seed instead of a checkpoint (CAVGA; written to '
    '<workdir>/eval_untrained): what training adds to each map.')
_REFIT = flags.DEFINE_bool(
    'refit', False, 'Fit the maps on the normal training images again even '
    'when <workdir>/fitted/ holds them for this checkpoint and settings '
    '(CAVGA).')
_MAPS = flags.DEFINE_enum(
    'maps', None, ['all', 'headline'], 'Which maps to fit and score '
    '(CAVGA): every map, or the headline config.eval.map and its parts '
    '(faster; what predict.py needs). Sets config.eval.maps.')
_CACHE = runtime.define_compilation_cache_flag()
flags.mark_flags_as_required(['config', 'workdir'])

# config.task -> program: CAVGA, or the Liu et al. VAE experiments.
_PROGRAM = runtime.task_program(
    {'cavga': eval_lib.evaluate, 'vae': vae_eval_lib.evaluate})


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  program = _PROGRAM
  cavga = _CONFIG.value.get('task', 'cavga') == 'cavga'
  if _MAPS.value is not None:
    if not cavga:
      raise app.UsageError('--maps is for CAVGA configs')
    with _CONFIG.value.unlocked():
      _CONFIG.value.eval.maps = _MAPS.value
  if _ALL_CHECKPOINTS.value and _UNTRAINED.value:
    raise app.UsageError('--all_checkpoints and --untrained exclude each other')
  if _ALL_CHECKPOINTS.value:
    if _CONFIG.value.get('task', 'cavga') != 'cavga':
      raise app.UsageError('--all_checkpoints is for CAVGA configs')
    program = eval_lib.evaluate_checkpoints
  elif _UNTRAINED.value or _REFIT.value:
    if _CONFIG.value.get('task', 'cavga') != 'cavga':
      raise app.UsageError('--untrained and --refit are for CAVGA configs')
    program = functools.partial(
        eval_lib.evaluate, untrained=_UNTRAINED.value, refit=_REFIT.value)
  result = runtime.run_program(program, _CONFIG.value, _WORKDIR.value,
                               _CACHE.value)
  if cavga and not _ALL_CHECKPOINTS.value:
    # metrics.json has every number; the headline's are the ones to read.
    print(
        eval_lib.summary(result,
                         eval_lib.output_dir(_WORKDIR.value, _UNTRAINED.value)))
  else:
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
