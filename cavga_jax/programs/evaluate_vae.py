"""Evaluation of the Liu et al. VAE experiments (``config.task='vae'``).

The per-unit attention of ``cavga_jax.vae.explain`` scored as ``vae_lib``'s
module docstring describes: the FactorVAE metric and MIG on the sprites,
the attention map against pseudo-masks on one-class MNIST, and against the
real defect masks on MVTec-layout folders (the protocol of docs/protocol.md
section 4, the outputs of ``evaluation.artifacts``). Split from ``vae_lib``
(training), which
it imports for the run's setup and data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import sharding
from cavga_jax import typed_config
from cavga_jax import workdirs
from cavga_jax.data import tfds_data
from cavga_jax.errors import CavgaError
from cavga_jax.evaluation import artifacts
from cavga_jax.evaluation import inference
from cavga_jax.metrics import image_metrics
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import attention
from cavga_jax.models import layers
from cavga_jax.programs import train_vae as vae_lib
from cavga_jax.training import losses
from cavga_jax.training import train_state
from cavga_jax.training import training_pictures
from cavga_jax.vae import conv_vae
from cavga_jax.vae import disentanglement
from cavga_jax.vae import explain

Array = jax.Array
PyTree = Any


def make_explain_step(
    model: conv_vae.ConvVAE,
    attention_map: str = 'mean') -> Callable[[PyTree, Array], dict[str, Array]]:
  """``explain_step(params, images) -> outputs`` for evaluation.

  ``images`` uint8 (B, S, S, C). Outputs: 'reconstruction' uint8
  (B, S, S, C) (Bernoulli means of ``z = mu``), 'mu' (B, D), 'units'
  (B, D, h, w), 'anomaly_map' (B, S, S) (the ``attention_map`` of
  ``conv_vae.ATTENTION_MAPS`` resized bilinearly), 'score' (B,) the per-image
  negative ELBO, 'ad' (B,) the per-image L_AD of the paper and
  'ad_distribution' (B,) that of the 'distribution' variant.
  """
  if attention_map not in conv_vae.ATTENTION_MAPS:
    raise ValueError(f'attention_map must be one of {conv_vae.ATTENTION_MAPS}, '
                     f'got {attention_map!r}')

  def explain_step(params, images):
    x = vae_lib.images_to_unit(images)
    maps, outputs = explain.explain(model, {'params': params}, x)
    logits = model.apply({'params': params}, outputs['mu'], method='decode')
    return dict(
        reconstruction=jnp.round(jax.nn.sigmoid(logits) * 255).astype(
            jnp.uint8),
        mu=outputs['mu'],
        units=maps.units,
        anomaly_map=attention.resize_map(
            getattr(maps, attention_map), images.shape[1]),
        score=(
            losses.bernoulli_reconstruction_per_image(x, logits)
            + losses.kl_divergence_per_image(outputs['mu'], outputs['logvar'])),
        ad=losses.attention_disentanglement_per_image(maps.units),
        ad_distribution=losses.attention_overlap_per_image(maps.unit_cams))

  return explain_step


def _disentanglement_metrics(eval_settings: typed_config.VaeEvalSettings, model,
                             explain_step, params, factors, mesh,
                             out_dir: str) -> dict[str, float]:

  @functools.partial(
      jax.jit, compiler_options=layers.compiler_options(model.conv_impl))
  def encode_mu(images):
    variables = {'params': params}
    features = model.apply(
        variables, vae_lib.images_to_unit(images), method='encode')
    return model.apply(variables, features, method='latent_params')[0]

  def representation_fn(images: np.ndarray) -> np.ndarray:
    return np.asarray(encode_mu(images))

  seed = eval_settings.metric_seed
  result = {}
  factor_vae = disentanglement.factor_vae_score(
      representation_fn,
      factors,
      np.random.default_rng(seed),
      num_train=eval_settings.factor_vae_num_train,
      num_eval=eval_settings.factor_vae_num_eval,
      num_variance_estimate=eval_settings.factor_vae_num_variance)
  result.update({f'factor_vae_{k}': v for k, v in factor_vae.items()})
  mig = disentanglement.mig_score(
      representation_fn,
      factors,
      np.random.default_rng(seed + 1),
      num_samples=eval_settings.mig_num_samples)
  result['mig'] = mig['mig']
  result.update(
      {f'mig_{name}': gap for name, gap in mig['mig_per_factor'].items()})
  result['mig_skipped_factors'] = mig['skipped_factors']
  # (latent unit, factor) mutual information in nats: which unit codes what.
  result['mutual_info'] = np.round(mig['mutual_info'], 4).tolist()
  # Losses and panels on a fixed sample.
  rng = np.random.default_rng(seed + 2)
  indices = factors.sample_indices(eval_settings.num_loss_samples, rng)
  images = factors.images(indices)
  predictions = inference.predict(lambda batch: explain_step(params, batch),
                                  images, eval_settings.batch_size, mesh)
  result['mean_negative_elbo'] = float(predictions['score'].mean())
  result['attention_disentanglement_loss'] = float(predictions['ad'].mean())
  result['attention_overlap_loss'] = float(
      predictions['ad_distribution'].mean())
  # L_AD is also 0 when unit maps are all zero (cam <= 0 everywhere): the
  # fraction of (image, unit) maps that are not tells the two apart.
  result['nonzero_unit_maps'] = float(
      losses.live_unit_share(predictions['units']))
  _write_unit_panels(out_dir, images, predictions, eval_settings.num_panels)
  return result


def _write_unit_panels(out_dir: str, images: np.ndarray,
                       predictions: dict[str,
                                         np.ndarray], num_panels: int) -> None:
  if not sharding.is_primary_process():
    return
  panel_dir = os.path.join(out_dir, 'panels')
  os.makedirs(panel_dir, exist_ok=True)
  for i in range(min(num_panels, len(images))):
    training_pictures.save_unit_panel(
        os.path.join(panel_dir, f'{i:04d}_units.png'), images[i],
        predictions['reconstruction'][i], predictions['units'][i])


def pseudo_masks(images: np.ndarray, normal_mean: np.ndarray,
                 support: float) -> np.ndarray:
  """Strokes outside the normal class's support: (N, S, S) bool.

  Args:
    images: (N, S, S, C) uint8 test images.
    normal_mean: (S, S) mean normal training image in [0, 1].
    support: pixels where ``normal_mean < support`` are outside the normal
      class's support.
  """
  strokes = images.mean(axis=-1) >= 127.5
  return strokes & (normal_mean < support)[None]


def _explain_class_split(
    run: typed_config.VaeRunSettings, test: data.AnomalyDataset,
    normal_mean: np.ndarray) -> tuple[data.AnomalyDataset, dict[str, Any]]:
  """The normal test images and those of ``config.eval.explain_class``.

  Their masks are the ``pseudo_masks`` (all False for normal images).
  """
  explain_class = run.eval.explain_class
  names = tfds_data.class_names(run.data.name, run.data.root or None,
                                run.data.download)
  if explain_class is None or not 0 <= explain_class < len(names) or (
      explain_class == run.data.normal_class):
    raise CavgaError(f'config.eval.explain_class={explain_class} must be a '
                     f'class in [0, {len(names)}) other than '
                     f'config.data.normal_class={run.data.normal_class}')
  target = names[explain_class]
  keep = np.flatnonzero(
      [d in (data.folder.NORMAL_DEFECT, target) for d in test.defect_types])
  if not test.labels[keep].any():
    raise CavgaError(f'config.eval.explain_class={explain_class}: no test '
                     f'image of class {target!r}')
  images, labels = test.images[keep], test.labels[keep]
  masks = pseudo_masks(images, normal_mean, run.eval.pseudo_mask_support)
  masks[labels == 0] = False
  subset = data.AnomalyDataset(
      images=images,
      masks=masks,
      labels=labels,
      defect_types=tuple(test.defect_types[i] for i in keep),
      paths=tuple(test.paths[i] for i in keep))
  return subset, dict(explain_class=explain_class, explain_class_name=target)


def _localization_metrics(
    run: typed_config.VaeRunSettings,
    explain_step,
    params,
    training_data,
    mesh,
    out_dir: str,
    step: int,
) -> dict[str, Any]:
  """docs/protocol.md section 4's metrics, the attention map as the anomaly
  map."""
  test, result = training_data.test, dict(checkpoint_step=step)
  if run.data.name in conv_vae.ONE_CLASS_DATASETS:
    test, info = _explain_class_split(run, test, training_data.normal_mean)
    result.update(info)
  predictions = inference.predict(lambda batch: explain_step(params, batch),
                                  test.images, run.eval.batch_size, mesh)
  result.update(
      num_test_images=test.num_examples,
      num_anomalous_images=int(test.labels.sum()))
  result.update(
      pixel_metrics.localization_metrics(predictions['anomaly_map'], test.masks,
                                         test.labels))
  result.update(
      image_metrics.detection_metrics(predictions['score'], test.labels))
  artifacts.write_outputs(out_dir, result, predictions, test,
                          run.eval.num_panels)
  return result


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Restores the newest checkpoint and writes ``<workdir>/eval/metrics.json``.

  Raises:
    CavgaError: an invalid config, or one that differs from the run's
      ``config.json`` in a field of the model, data or objective.
  """
  run = config_checks.check_config(config)
  workdirs.check_rerun(config, workdir, 'evaluate.py')
  mesh = sharding.make_mesh()
  training_data = vae_lib.TrainingData(run, workdir)
  model, init_fn, _ = vae_lib.setup(run, mesh)
  state, step = checkpointing.restore_for_eval(
      workdir, train_state.abstract_state(init_fn, mesh))
  explain_step = jax.jit(
      make_explain_step(model, run.eval.map),
      compiler_options=layers.compiler_options(model.conv_impl))
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  if training_data.factors is not None:
    result = _disentanglement_metrics(run.eval, model, explain_step,
                                      state.params, training_data.factors, mesh,
                                      out_dir)
    result['checkpoint_step'] = step
    if sharding.is_primary_process():
      with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump(result, f, indent=2, sort_keys=True)
  else:
    result = _localization_metrics(run, explain_step, state.params,
                                   training_data, mesh, out_dir, step)
  logging.info('evaluated checkpoint %d in %.1f s: %s', step,
               time.perf_counter() - start, json.dumps(result, sort_keys=True))
  return result
