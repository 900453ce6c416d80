"""Evaluation protocol (SPEC section 4), written once for every model.

For every test image: the reconstruction from ``mu`` (no sampling), the
attention ``A`` and the localization map ``M = 1 - A`` at image size; the image
score ``s_a`` is the mean squared reconstruction error. Metrics come from
``cavga_jax.metrics`` (model-agnostic numpy code).

CAVGA_w (a generator with the classifier) plugs into the same protocol: its
map ``M`` is chosen by ``config.eval.weak_map`` (``attention.WEAK_MAPS``;
default ``'anomalous'``, ``M = A^ca``, the Grad-CAM of the anomalous logit,
which the paper uses to localize anomalies and which ``L_cga`` pushes
towards 0 on normal images), and the classifier's probability of
'anomalous' gives the extra detection metrics ``image_auroc_classifier`` and
``classifier_accuracy`` (argmax of the logits), computed from ``z = mu``.
The test set is the one left after ``cavga_jax.data.weak`` moved the
labelled anomalies to training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cavga_jax import attention
from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import metrics
from cavga_jax import models
from cavga_jax import sharding
from cavga_jax import train_lib
from cavga_jax import visualize
from cavga_jax.errors import CavgaError

Array = jax.Array


def make_eval_step(generator: models.CAVGAGenerator,
                   weak_map: str = 'anomalous'
                   ) -> Callable[[Any, Any, Array], dict[str, Array]]:
  """Returns ``eval_step(params, batch_stats, images) -> outputs``.

  ``images`` is uint8 (B, S, S, C). Outputs: 'reconstruction' uint8
  (B, S, S, C), 'anomaly_map' float32 (B, S, S) in [0, 1], 'attention'
  (B, h, w) and 'score' (B,) (mean squared error in [-1, 1] units). With the
  CAVGA_w classifier also 'class_attention' (B, 2, h, w) and 'p_anomalous'
  (B,), and 'anomaly_map' is the ``weak_map`` of
  ``attention.weak_localization_map``.

  Raises:
    CavgaError: unknown ``weak_map`` for a generator with a classifier.
  """
  if generator.with_classifier and weak_map not in attention.WEAK_MAPS:
    raise CavgaError(f'config.eval.weak_map must be one of '
                     f'{", ".join(attention.WEAK_MAPS)}, got {weak_map!r}')

  def eval_step(params, batch_stats, images):
    x = train_lib.images_to_float(images)
    outputs, _ = attention.forward_with_attention(
        generator, params, batch_stats, x, rng=None, train=False)
    reconstruction = outputs['reconstruction']
    result = dict(
        reconstruction=jnp.round((reconstruction + 1.0) * 127.5).clip(
            0, 255).astype(jnp.uint8),
        attention=outputs['attention'],
        score=jnp.mean(jnp.square(x - reconstruction), axis=(1, 2, 3)))
    if generator.with_classifier:
      result.update(
          anomaly_map=attention.weak_localization_map(
              outputs, images.shape[1], weak_map),
          class_attention=outputs['class_attention'],
          p_anomalous=jax.nn.softmax(outputs['logits'])[:, models.ANOMALOUS])
    else:
      result['anomaly_map'] = attention.localization_map(
          outputs['attention'], images.shape[1])
    return result

  return eval_step


def predict(eval_step: Callable, params: Any, batch_stats: Any,
            dataset: data.AnomalyDataset, batch_size: int,
            mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Runs ``eval_step`` over a dataset; returns host arrays with N rows each."""
  sharding.check_batch_size(batch_size, mesh, 'config.eval.batch_size')
  results: dict[str, list[np.ndarray]] = {}
  tic, done = time.perf_counter(), 0
  for images, num_valid in data.eval_batches(dataset, batch_size):
    out = jax.device_get(eval_step(params, batch_stats,
                                   sharding.shard_batch(images, mesh)))
    for key, value in out.items():
      results.setdefault(key, []).append(value[:num_valid])
    done += num_valid
  elapsed = time.perf_counter() - tic
  logging.info('evaluated %d images in %.1f s (%.1f img/s, incl. compilation)',
               done, elapsed, done / max(elapsed, 1e-9))
  return {k: np.concatenate(v) for k, v in results.items()}


def compute_metrics(predictions: dict[str, np.ndarray],
                    dataset: data.AnomalyDataset) -> dict[str, float]:
  """The flat metrics dict of SPEC section 4 for one test set.

  With CAVGA_w predictions ('p_anomalous') also 'image_auroc_classifier'
  (ROC AUC of the classifier's probability of 'anomalous') and
  'classifier_accuracy' (anomalous iff that probability > 0.5).
  """
  result = dict(
      num_test_images=dataset.num_examples,
      num_anomalous_images=int(dataset.labels.sum()))
  result.update(metrics.localization_metrics(
      predictions['anomaly_map'], dataset.masks, dataset.labels))
  result.update(metrics.detection_metrics(predictions['score'],
                                          dataset.labels))
  if 'p_anomalous' in predictions:
    # CAVGA_w: detection by the classifier instead of the reconstruction.
    p_anomalous = predictions['p_anomalous']
    result['image_auroc_classifier'] = metrics.detection_metrics(
        p_anomalous, dataset.labels)['image_auroc']
    result['classifier_accuracy'] = float(np.mean(
        (p_anomalous > 0.5) == (dataset.labels == 1)))
  return result


def panel_indices(num_examples: int, num_panels: int) -> np.ndarray:
  """Evenly spaced test indices, so panels show normal and every defect type."""
  num_panels = min(num_panels, num_examples)
  return np.unique(np.linspace(0, num_examples - 1, num_panels).round()
                   .astype(int)) if num_panels else np.zeros(0, int)


def write_outputs(out_dir: str, result: dict[str, float],
                  predictions: dict[str, np.ndarray],
                  dataset: data.AnomalyDataset, num_panels: int) -> None:
  """metrics.json, per-image scores.csv and the PNG panels under ``out_dir``."""
  panel_dir = os.path.join(out_dir, 'panels')
  os.makedirs(panel_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, 'scores.csv'), 'w') as f:
    # CAVGA_w adds the classifier's probability of 'anomalous'.
    p_anomalous = predictions.get('p_anomalous')
    f.write('path,label,defect_type,score'
            + (',p_anomalous' if p_anomalous is not None else '') + '\n')
    for i, (path, label, defect, score) in enumerate(zip(
        dataset.paths, dataset.labels, dataset.defect_types,
        predictions['score'])):
      extra = f',{p_anomalous[i]:.6g}' if p_anomalous is not None else ''
      f.write(f'{path},{label},{defect},{score:.6g}{extra}\n')
  for i in panel_indices(dataset.num_examples, num_panels):
    stem = os.path.splitext(os.path.basename(dataset.paths[i]))[0]
    visualize.save_panel(
        os.path.join(panel_dir, f'{i:04d}_{dataset.defect_types[i]}_{stem}.png'),
        dataset.images[i], predictions['reconstruction'][i],
        predictions['anomaly_map'][i], dataset.masks[i])


def evaluate(config: ml_collections.ConfigDict, workdir: str
             ) -> dict[str, float]:
  """Restores the latest checkpoint of ``workdir`` and evaluates it.

  Writes ``<workdir>/eval/metrics.json``, ``scores.csv`` and ``panels/``.

  Returns:
    The metrics dict (also logged).
  """
  config_checks.check_config(config)
  mesh = sharding.make_mesh()
  _, test_ds = data.get_datasets(config, workdir)
  generator, _, init_fn, _ = train_lib.setup(config, mesh)
  target = train_lib.abstract_state(init_fn, mesh)
  state, step = checkpointing.restore_for_eval(workdir, target)
  logging.info('evaluating checkpoint %d on %d test images', step,
               test_ds.num_examples)
  eval_step = jax.jit(make_eval_step(
      generator, config.eval.get('weak_map', 'anomalous')))
  predictions = predict(eval_step, state.gen_params, state.gen_batch_stats,
                        test_ds, config.eval.batch_size, mesh)
  result = compute_metrics(predictions, test_ds)
  result['checkpoint_step'] = step
  write_outputs(os.path.join(workdir, 'eval'), result, predictions, test_ds,
                config.eval.num_panels)
  logging.info('metrics: %s', json.dumps(result, sort_keys=True))
  return result
