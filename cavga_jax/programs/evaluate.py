"""The evaluation program (docs/protocol.md): ``evaluate.py``'s jobs.

``evaluate`` restores the newest checkpoint (or, with ``untrained``, the
state training starts from), reuses the maps fitted for it when
``<workdir>/fitted/`` holds them under the same key (``evaluation.store``)
and fits them otherwise, scores the test set and writes ``<workdir>/eval``
(``evaluation.artifacts``). ``evaluate_checkpoints`` draws the learning curve
after the fact. The library underneath is ``cavga_jax.evaluation``:
``inference`` (the jitted steps), ``fitting`` (maps fitted on normal
images), ``registry`` (every map, declared once), ``scoring`` (metrics as
pure functions), ``outputs``, ``report`` and ``store``.

An evaluation holds ``<workdir>/.evaluate.lock`` while it writes
(``workdirs.lock``; it may run beside training, not beside another
evaluation), refits a saved fit that is unreadable or fails its checksum
(``store.FitError``, logged) and checks the test set first
(``check_test_set``): without defect images the metrics that need them are
null in ``metrics.json`` and ``no_defect_images`` says why.

``metrics.json``'s flat keys are the headline map's, ``config.eval.map``
(``configs/default.py``: ``'feature_gaussian'``; ``'attention'`` is the
paper's ``M = 1 - A``); ``s_a``'s detection metrics are suffixed
``_reconstruction``, and ``maps.<name>.<metric>`` has every map evaluated
(``config.eval.maps``: all, or the headline and its parts;
``evaluation.scoring``). ``summary`` is the short block ``evaluate.py``
ends with.

CAVGA_w (a generator with the classifier) plugs into the same protocol: its
class maps are ``weak_<name>`` (``weak_anomalous`` = ``A^ca``, the Grad-CAM
of the anomalous logit; configs/mvtec_weak.py makes it the headline map),
and the classifier's probability of 'anomalous' gives the extra detection
metrics ``image_auroc_classifier`` and ``classifier_accuracy_argmax``. The test set
is the one left after ``cavga_jax.data.weak`` moved the labelled anomalies
to training.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import ml_collections

from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.errors import CavgaError
from cavga_jax.errors import DataError
from cavga_jax.evaluation import artifacts
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import store
from cavga_jax.training import detector_training
from cavga_jax.training import run_setup

UNTRAINED_DIR = 'eval_untrained'


def output_dir(workdir: str, untrained: bool = False) -> str:
  """Where ``evaluate`` writes: ``<workdir>/eval`` or ``eval_untrained``."""
  return os.path.join(workdir, UNTRAINED_DIR if untrained else 'eval')


def summary(result: dict[str, Any], out_dir: str) -> str:
  """The headline's pixel AUROC, AU-PRO, image AUROC and held-out accuracy,
  and where the report is: what ``evaluate.py`` prints last."""

  def number(key):
    value = result.get(key)
    return '-' if value is None else f'{value:.4f}'

  return '\n'.join([
      f'headline map {result["map"]} (checkpoint {result["checkpoint_step"]}'
      f', {result["num_test_images"]} test images):',
      f'  pixel AUROC {number("pixel_auroc")}  AU-PRO {number("aupro")}  '
      f'image AUROC {number("image_auroc")}  accuracy at the held-out '
      f'threshold {number("detection_accuracy_held_out")}',
      f'report: {os.path.abspath(os.path.join(out_dir, "report.html"))}'
  ])


def evaluation_setup(
    config: ml_collections.ConfigDict,
    workdir: str,
    untrained: bool = False,
    restore: bool = True) -> tuple[run_setup.RunSetup, evaluator_lib.Evaluator]:
  """(setup, evaluator) of a run's config: the one read of the config.

  ``setup`` (``run_setup.setup``) holds the typed settings, the datasets,
  the networks, the evaluated state (with ``restore``: the newest
  checkpoint, or ``untrained`` the state the run started from) and, with
  ``eval.feature_weights='initial'``, the variables the evaluator takes the
  feature maps' features from.

  Raises:
    CavgaError: an invalid config or, unless ``untrained``, one that differs
      from the workdir's ``config.json`` in a field of the model, data or
      objective (``workdirs.check_rerun``).
  """
  run = config_checks.check_config(config)
  if not untrained:
    workdirs.check_rerun(config, workdir, 'evaluate.py')
  made = run_setup.setup(
      run,
      workdir,
      restore=restore,
      untrained=untrained,
      check_test_set=check_test_set)
  # The detector train.py trained (none with ``untrained``: the map is
  # then the initial network, the control).
  evaluator = evaluator_lib.Evaluator(
      made.generator,
      made.test_ds,
      run.eval,
      made.mesh,
      evaluator_lib.normal_training_images(made.train_ds),
      made.feature_variables,
      {} if untrained else detector_training.trained_maps(workdir),
      detector_config=run.detector)
  return made, evaluator


# metrics.json's field for a test set without defect images (its metrics
# that need them are null instead of NaN).
NO_DEFECTS_FIELD = 'no_defect_images'
_NULL_METRICS = ('the pixel metrics and the image AUROC need defect images '
                 'with masks, so metrics.json gives them as null')


def check_test_set(test_ds: data.AnomalyDataset) -> None:
  """Logs what the test set's labels and masks leave undefined.

  Without defect images the pixel metrics and image AUROC are undefined
  (``evaluate`` writes them as null, ``NO_DEFECTS_FIELD`` says why). Defect
  images whose masks have no defect pixel at the evaluated size (empty mask
  files, or defects smaller than a pixel after resizing) count as normal
  pixels; named unless no defect image has any (a dataset without pixel
  ground truth, e.g. the one-class TFDS sets).
  """
  anomalous = test_ds.labels == 1
  if not anomalous.any():
    logging.warning('%s', _no_defects(test_ds, _NULL_METRICS))
    return
  empty = anomalous & ~test_ds.masks.reshape(len(anomalous), -1).any(axis=1)
  if empty.any() and not empty[anomalous].all():
    names = [p for p, e in zip(test_ds.paths, empty) if e]
    logging.warning(
        '%d of %d defect test images have no defect pixel at %d px, so the '
        'pixel metrics count all their pixels as normal (their masks are '
        'empty, or their defects vanish when resized): %s%s', len(names),
        int(anomalous.sum()), test_ds.masks.shape[1], ', '.join(names[:3]),
        ', ...' if len(names) > 3 else '')


def _no_defects(test_ds: data.AnomalyDataset, consequence: str) -> str:
  """'<test folder>: the test set has no defect images ...; <consequence>'."""
  folder = os.path.commonpath(
      [os.path.dirname(os.path.abspath(p)) for p in test_ds.paths])
  return (f'{folder}: the test set has no defect images (all '
          f'{test_ds.num_examples} are normal); {consequence}')


def _nan_to_none(value: Any) -> Any:
  """``value`` with every float NaN (nested in dicts) replaced by None."""
  if isinstance(value, dict):
    return {k: _nan_to_none(v) for k, v in value.items()}
  return None if isinstance(value, float) and math.isnan(value) else value


def evaluate_checkpoints(config: ml_collections.ConfigDict,
                         workdir: str) -> list[dict[str, Any]]:
  """The learning curve after the fact: every retained checkpoint, all maps.

  For runs trained without ``config.train.eval_every`` (keep checkpoints
  with ``config.train.keep_checkpoints``). Replaces
  ``<workdir>/eval_curve.jsonl`` and ``eval_curve.png``. Each checkpoint's
  fitted maps are reused or fitted and saved like ``evaluate``'s.

  Returns:
    The curve records, in step order.
  """
  made, evaluator = evaluation_setup(config, workdir, restore=False)
  if not made.test_ds.labels.any():
    raise DataError(
        _no_defects(
            made.test_ds, 'a learning curve of the '
            'pixel metrics needs defect images'))
  with workdirs.lock(workdir, 'evaluate.py', workdirs.EVALUATE_LOCK_FILE):
    return _curve(config, made.run, workdir, evaluator, made.abstract_state())


def _curve(config: ml_collections.ConfigDict, run: typed_config.RunSettings,
           workdir: str, evaluator: evaluator_lib.Evaluator,
           target: Any) -> list[dict[str, Any]]:
  """``evaluate_checkpoints`` with the evaluation lock held."""
  manager = checkpointing.make_manager(workdir)
  steps = sorted(manager.all_steps())
  if not steps:
    raise CavgaError(f'{checkpointing.checkpoint_dir(workdir)}: no checkpoint '
                     'found; run train.py with this --workdir first')
  path = os.path.join(workdir, artifacts.CURVE_FILE)
  if os.path.exists(path):
    os.remove(path)
  records = []
  for step in steps:
    state = checkpointing.restore(manager, step, target)
    fitted = fitted_maps(config, run.eval, workdir, evaluator, state, step)
    result, _ = evaluator(state.gen_params, state.gen_batch_stats, fitted)
    records.append(artifacts.curve_record(step, result))
    artifacts.append_curve_point(path, records[-1])
  return records


def fitted_maps(config: ml_collections.ConfigDict,
                eval_settings: typed_config.EvalSettings,
                workdir: str,
                evaluator: evaluator_lib.Evaluator,
                state: Any,
                step: int,
                untrained: bool = False,
                refit: bool = False):
  """The maps fitted for ``state``: loaded from ``store`` when saved there
  under the same key (and not ``refit``), else fitted and saved (with
  ``config`` as their ``config.json``). A saved fit that is unreadable or
  fails its checksum is fitted again, saying why.
  """
  directory = store.fitted_dir(workdir, step, untrained)
  key = store.fit_key(eval_settings, step, state, evaluator.image_size,
                      evaluator.num_normal_images, evaluator.trained,
                      evaluator.detector_config)
  fitted = None
  if not refit:
    try:
      fitted = store.load(directory, key)
    except store.FitError as e:
      logging.warning('refitting the maps: %s', e.problem)
  missing = [] if fitted is None else evaluator.missing(fitted)
  if missing:  # saved by an evaluation of other maps (config.eval.maps)
    logging.info('refitting: the maps saved in %s lack %s', directory,
                 ', '.join(missing))
    fitted = None
  if fitted is None:
    fitted = evaluator.fit(state.gen_params, state.gen_batch_stats)
    store.save(directory, fitted, key, config.to_json_best_effort(indent=2))
  return fitted


def evaluate(config: ml_collections.ConfigDict,
             workdir: str,
             untrained: bool = False,
             refit: bool = False) -> dict[str, Any]:
  """Restores the latest checkpoint of ``workdir`` and evaluates it.

  Writes ``<workdir>/eval/metrics.json``, ``scores.csv``, ``panels/`` and
  ``report.html`` (process 0 only; every process computes), and the fitted
  maps to ``<workdir>/fitted/`` (``fitted_maps``). Always the final
  checkpoint: the learning curve of ``config.train.eval_every`` never
  selects one.

  Args:
    config: the run's configuration.
    workdir: the training workdir.
    untrained: evaluate the freshly initialised networks of ``config.seed``
      instead (no checkpoint needed; written to ``<workdir>/eval_untrained``,
      ``checkpoint_step`` 0): the control that says what training added to
      each map.
    refit: fit the maps on the normal images again even when they were
      saved for this checkpoint.

  Returns:
    The metrics dict (also logged).
  """
  made, evaluator = evaluation_setup(config, workdir, untrained)
  with workdirs.lock(workdir, 'evaluate.py', workdirs.EVALUATE_LOCK_FILE):
    return _evaluate(config, workdir, untrained, refit, made, evaluator)


def _evaluate(config: ml_collections.ConfigDict, workdir: str, untrained: bool,
              refit: bool, made: run_setup.RunSetup,
              evaluator: evaluator_lib.Evaluator) -> dict[str, Any]:
  """``evaluate`` after its setup, with the evaluation lock held."""
  state, step, test_ds = made.state, made.step, made.test_ds
  if untrained:
    logging.info(
        'evaluating the untrained networks (seed %d) on %d test '
        'images', made.run.seed, test_ds.num_examples)
  else:
    logging.info('evaluating checkpoint %d on %d test images', step,
                 test_ds.num_examples)
  fitted = fitted_maps(config, made.run.eval, workdir, evaluator, state, step,
                       untrained, refit)
  result, predictions = evaluator(state.gen_params, state.gen_batch_stats,
                                  fitted)
  result['checkpoint_step'] = step
  if not test_ds.labels.any():
    result = _nan_to_none(result)
    result[NO_DEFECTS_FIELD] = _no_defects(test_ds, _NULL_METRICS)
  curve = os.path.join(workdir,
                       os.path.splitext(artifacts.CURVE_FILE)[0] + '.png')
  out_dir = output_dir(workdir, untrained)
  artifacts.write_outputs(
      out_dir, result, predictions, test_ds, made.run.eval.num_panels,
      fitted.thresholds,
      os.path.join('..', os.path.basename(curve))
      if os.path.exists(curve) else None)
  # The caller reports it (evaluate.py prints ``summary``).
  return result
