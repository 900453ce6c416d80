"""The evaluation program (docs/protocol.md): ``evaluate.py``'s jobs.

``evaluate`` restores the newest checkpoint (or, with ``untrained``, the
state training starts from), reuses the maps fitted for it when
``<workdir>/fitted/`` holds them under the same key (``evaluation.store``)
and fits them otherwise, scores the test set and writes ``<workdir>/eval``
(``evaluation.outputs``). ``evaluate_checkpoints`` draws the learning curve
after the fact. The library underneath is ``cavga_jax.evaluation``:
``inference`` (the jitted steps), ``fitting`` (maps fitted on normal
images), ``registry`` (every map, declared once), ``scoring`` (metrics as
pure functions), ``outputs``, ``report`` and ``store``.

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
import os
from typing import Any, Callable

import jax
import ml_collections

from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import sharding
from cavga_jax import train_state
from cavga_jax import workdirs
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import evaluator as evaluator_lib
from cavga_jax.evaluation import outputs
from cavga_jax.evaluation import store

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
      f'report: {os.path.abspath(os.path.join(out_dir, "report.html"))}'])


def evaluation_setup(config: ml_collections.ConfigDict, workdir: str,
                     untrained: bool = False):
  """(test set, evaluator, init fn, initial state fn, mesh) of a run's config.

  The initial state fn gives ``train_state.initial_state``, the state the
  run started from; with ``eval.feature_weights='initial'`` the evaluator
  takes the feature maps' features from it.

  Raises:
    CavgaError: an invalid config or, unless ``untrained``, one that differs
      from the workdir's ``config.json`` in a field of the model, data or
      objective (``workdirs.check_rerun``).
  """
  config_checks.check_config(config)
  if not untrained:
    workdirs.check_rerun(config, workdir, 'evaluate.py')
  mesh = sharding.make_mesh()
  train_ds, test_ds = data.get_datasets(config, workdir)
  generator, _, init_fn, state_sharding = train_state.setup(config, mesh)
  initial = lambda: train_state.initial_state(config, init_fn, state_sharding)
  feature_variables = None
  if evaluator_lib.eval_field(config.eval, 'feature_weights') == 'initial':
    state = initial()
    feature_variables = {'params': state.gen_params,
                         'batch_stats': state.gen_batch_stats}
  evaluator = evaluator_lib.Evaluator(
      generator, test_ds, config.eval, mesh,
      evaluator_lib.normal_training_images(train_ds), feature_variables)
  return test_ds, evaluator, init_fn, initial, mesh


def evaluate_checkpoints(config: ml_collections.ConfigDict, workdir: str
                         ) -> list[dict[str, Any]]:
  """The learning curve after the fact: every retained checkpoint, all maps.

  For runs trained without ``config.train.eval_every`` (keep checkpoints
  with ``config.train.keep_checkpoints``). Replaces
  ``<workdir>/eval_curve.jsonl`` and ``eval_curve.png``. Each checkpoint's
  fitted maps are reused or fitted and saved like ``evaluate``'s.

  Returns:
    The curve records, in step order.
  """
  _, evaluator, init_fn, _, mesh = evaluation_setup(config, workdir)
  target = train_state.abstract_state(init_fn, mesh)
  manager = checkpointing.make_manager(workdir)
  steps = sorted(manager.all_steps())
  if not steps:
    raise CavgaError(f'{checkpointing.checkpoint_dir(workdir)}: no checkpoint '
                     'found; run train.py with this --workdir first')
  path = os.path.join(workdir, outputs.CURVE_FILE)
  if os.path.exists(path):
    os.remove(path)
  records = []
  for step in steps:
    state = checkpointing.restore(manager, step, target)
    fitted = fitted_maps(config, workdir, evaluator, state, step)
    result, _ = evaluator(state.gen_params, state.gen_batch_stats, fitted)
    records.append(outputs.curve_record(step, result))
    outputs.append_curve_point(path, records[-1])
  return records


def evaluated_state(workdir: str, init_fn: Callable,
                    initial: Callable[[], Any], mesh: jax.sharding.Mesh,
                    untrained: bool = False) -> tuple[Any, int]:
  """(train state, step): the newest checkpoint of ``workdir``, or with
  ``untrained`` the state training starts from (``initial()``: the run's
  initialisation key and ``model.pretrained``; step 0).
  """
  if untrained:
    return initial(), 0
  return checkpointing.restore_for_eval(
      workdir, train_state.abstract_state(init_fn, mesh))


def fitted_maps(config: ml_collections.ConfigDict, workdir: str,
                evaluator: evaluator_lib.Evaluator, state: Any, step: int,
                untrained: bool = False, refit: bool = False):
  """The maps fitted for ``state``: loaded from ``store`` when saved there
  under the same key (and not ``refit``), else fitted and saved."""
  directory = store.fitted_dir(workdir, step, untrained)
  key = store.fit_key(config.eval, step, state.gen_params,
                      evaluator.image_size, evaluator.num_normal_images)
  fitted = None if refit else store.load(directory, key)
  missing = [] if fitted is None else evaluator.missing(fitted)
  if missing:  # saved by an evaluation of other maps (config.eval.maps)
    logging.info('refitting: the maps saved in %s lack %s', directory,
                 ', '.join(missing))
    fitted = None
  if fitted is None:
    fitted = evaluator.fit(state.gen_params, state.gen_batch_stats)
    store.save(directory, fitted, key, config.to_json_best_effort(indent=2))
  return fitted


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             untrained: bool = False, refit: bool = False) -> dict[str, Any]:
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
  test_ds, evaluator, init_fn, initial, mesh = evaluation_setup(
      config, workdir, untrained)
  state, step = evaluated_state(workdir, init_fn, initial, mesh, untrained)
  if untrained:
    logging.info('evaluating the untrained networks (seed %d) on %d test '
                 'images', config.seed, test_ds.num_examples)
  else:
    logging.info('evaluating checkpoint %d on %d test images', step,
                 test_ds.num_examples)
  fitted = fitted_maps(config, workdir, evaluator, state, step, untrained,
                       refit)
  result, predictions = evaluator(state.gen_params, state.gen_batch_stats,
                                  fitted)
  result['checkpoint_step'] = step
  curve = os.path.join(workdir, os.path.splitext(outputs.CURVE_FILE)[0]
                       + '.png')
  out_dir = output_dir(workdir, untrained)
  outputs.write_outputs(
      out_dir, result, predictions, test_ds, config.eval.num_panels,
      fitted.thresholds,
      os.path.join('..', os.path.basename(curve))
      if os.path.exists(curve) else None)
  logging.info('%s', summary(result, out_dir))
  return result
