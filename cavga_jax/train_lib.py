"""Train state, the jitted CAVGA train step and the training loop.

One step (SPEC section 3) runs, inside a single jitted and donated program:

1. the generator forward pass with Grad-CAM attention (``jax.vjp`` over the
   generator parameters, so it is computed once and reused for the update);
2. the discriminator update on real ``x`` vs the (stopped) reconstruction;
3. the generator update through the *updated* discriminator: the gradient of
   the weighted loss with respect to the forward outputs is pulled back
   through the generator VJP of step 1.

The discriminator's BatchNorm statistics are updated by its own step only;
the forward pass of ``D`` inside the generator loss uses batch statistics
but its running-average update is discarded.

CAVGA_w (``config.model.supervision == 'weak'``; the generator has the
classifier) uses the same step with labelled batches ``(images, labels)`` and
the objective ``rec + kl + adv + bce + cga`` (``weak_generator_loss_terms``);
its training set is the normal images plus the few labelled anomalies of
``cavga_jax.data.weak``.

Non-finite losses or gradients (``config.train.nonfinite``): every step
reports a ``nonfinite`` flag. ``'stop'`` (default) ends the run with
``TrainingError`` at the first flagged step, before any later checkpoint is
written, so the last good checkpoint is kept. ``'skip'`` makes the jitted step
itself keep the previous parameters, batch statistics and optimizer states
(only the step counter advances, so the next step draws the next batch);
``config.train.max_consecutive_skips`` skipped steps in a row end the run.
The host reads the flags without waiting for the device (it polls finished
steps and drains the rest at log and checkpoint steps), so there is no
per-step synchronisation.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
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
import optax

from cavga_jax import attention
from cavga_jax import checkpointing
from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax import eval_lib
from cavga_jax import losses
from cavga_jax import models
from cavga_jax import sharding
from cavga_jax import synthesis
from cavga_jax import train_state
from cavga_jax import visualize
from cavga_jax.errors import CavgaError
from cavga_jax.errors import TrainingError

Array = jax.Array
PyTree = Any

# fold_in tag of the synthetic-anomaly key (the step key itself samples z).
_SYNTHESIS_STREAM = 1


def _vae_gan_terms(outputs: dict[str, Array], images: Array,
                   fake_logits: Array, weights: Array | None = None
                   ) -> dict[str, Array]:
  """rec, kl and adv: the terms CAVGA_u and CAVGA_w share.

  ``weights`` (B,) weighs each image (None: all count equally).
  """
  return dict(
      rec=losses.reconstruction_loss(images, outputs['reconstruction'],
                                     weights),
      kl=losses.kl_loss(outputs['mu'], outputs['logvar'], weights),
      adv=losses.generator_adversarial_loss(fake_logits, weights))


def generator_loss_terms(outputs: dict[str, Array], images: Array,
                         fake_logits: Array) -> dict[str, Array]:
  """CAVGA_u loss terms: rec, kl, adv, ae (weights in ``config.loss_weights``)."""
  return dict(_vae_gan_terms(outputs, images, fake_logits),
              ae=losses.attention_expansion_loss(outputs['attention']))


def weak_generator_loss_terms(outputs: dict[str, Array], images: Array,
                              fake_logits: Array, labels: Array,
                              include_ae: bool = False,
                              masks: Array | None = None,
                              vae_weights: Array | None = None
                              ) -> dict[str, Array]:
  """CAVGA_w loss terms: rec, kl, adv, bce, cga (and ae when ``include_ae``).

  The paper's CAVGA_w objective has no L_ae; ``include_ae`` adds it as an
  ablation (the train step sets it when ``loss_weights['ae']`` is nonzero).
  With synthetic anomalies (``masks`` given) the term ``mask`` is the Dice
  loss of A^ca (resized to image size) against the exact masks of the
  synthetic images (``labels`` 1 and a non-empty mask).

  Args:
    outputs: ``attention.forward_with_attention`` outputs of a generator with
      a classifier ('logits' (B, 2), 'class_attention' (B, 2, h, w), ...).
    images: (B, H, W, C) float in [-1, 1].
    fake_logits: discriminator logits of the reconstructions.
    labels: (B,) int, 0 normal, 1 anomalous.
    include_ae: also return L_ae of CAVGA_u's map.
    masks: (B, H, W) synthetic-anomaly masks (``synthesis.synthesize``).
    vae_weights: (B,) weights of rec, kl and adv (None: every image).
  """
  class_attention = outputs['class_attention']
  terms = dict(
      _vae_gan_terms(outputs, images, fake_logits, vae_weights),
      bce=losses.binary_cross_entropy_loss(outputs['logits'], labels),
      cga=losses.complementary_guided_attention_loss(
          class_attention[:, models.NORMAL],
          class_attention[:, models.ANOMALOUS], outputs['logits'], labels))
  if include_ae:
    terms['ae'] = losses.attention_expansion_loss(outputs['attention'])
  if masks is not None:
    anomalous_map = attention.resize_map(
        class_attention[:, models.ANOMALOUS], images.shape[1])
    terms['mask'] = losses.mask_dice_loss(
        anomalous_map, masks, jnp.any(masks > 0, axis=(1, 2)))
  return terms


WEAK_LOSS_TERMS = ('rec', 'kl', 'adv', 'bce', 'cga')


def check_loss_weights(loss_weights: dict[str, float], supervision: str,
                       synthetic: bool = False) -> None:
  """Raises CavgaError when a loss term of the objective has no weight."""
  needed = WEAK_LOSS_TERMS if supervision == 'weak' else (
      'rec', 'kl', 'adv', 'ae')
  if synthetic:
    needed += ('mask',)
  missing = [name for name in needed if name not in loss_weights]
  if missing:
    hint = (' (start from configs/mvtec_weak.py or configs/tiny_weak.py)'
            if supervision == 'weak' else '')
    raise CavgaError(
        f'config.loss_weights has no {", ".join(missing)} for '
        f"config.model.supervision='{supervision}'{hint}")


def tree_all_finite(tree: PyTree) -> Array:
  """A scalar bool: every element of every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def keep_state_unless_finite(finite: Array, new_state: Any, state: Any) -> Any:
  """``new_state`` if ``finite``, else ``state`` with only ``step`` advanced.

  The selection happens inside the jitted step (``nonfinite='skip'``), so a
  skipped step costs no host synchronisation; advancing ``step`` makes the
  next step draw the next batch and noise.
  """
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                      new_state, state)
  return kept.replace(step=state.step + 1)


def make_train_step(generator: models.CAVGAGenerator,
                    discriminator: models.Discriminator,
                    loss_weights: dict[str, float],
                    nonfinite: str = 'stop',
                    synthetic: synthesis.SynthesisSettings | None = None,
                    ) -> Callable[..., tuple[train_state.TrainState,
                                             dict[str, Array]]]:
  """Returns the pure, jittable CAVGA train step.

  ``train_step(state, images, rng, labels=None) -> (state, metrics)``:
  ``images`` is a uint8 batch (B, H, W, C) (or float in [-1, 1], see
  ``train_state.images_to_float``); ``rng`` is the run's base key,
  folded with ``state.step`` so a resumed run draws the same noise.
  ``labels`` (B,) int (0 normal, 1 anomalous) is required when the generator
  has the CAVGA_w classifier and ignored otherwise. ``metrics`` holds every
  loss term (unweighted), the generator total ``g_loss`` and the
  discriminator loss ``d_loss``, and ``nonfinite``, 1.0 when a loss or a
  gradient of the step is NaN or infinite (else 0.0); CAVGA_w adds
  ``cls_accuracy``, the classifier's batch accuracy, and
  ``anomalous_fraction``, the batch's fraction of labelled anomalies
  (float32 scalars).

  With ``nonfinite='skip'`` a flagged step returns the input state with only
  ``step`` incremented (selected with ``jnp.where`` inside the program);
  with ``'stop'`` the update is applied as computed and the caller stops.

  ``synthetic`` (CAVGA_w only) makes the first images of every batch
  synthetic anomalies inside the step (``synthesis.synthesize``, keyed by the
  step's key, so resuming is bit-identical), labels them anomalous and adds
  the ``mask`` loss term; the discriminator's real images are the clean
  ones, and ``synthetic.reconstruction`` says whether the VAE terms target
  the clean images ('clean') or skip the synthetic ones ('normal_only').
  """
  if nonfinite not in config_checks.NONFINITE_MODES:
    raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
  weak = generator.with_classifier
  if synthetic is not None and not weak:
    raise ValueError('synthetic anomalies need the CAVGA_w classifier '
                     "(model.supervision='weak')")
  include_ae = bool(loss_weights.get('ae', 0.0))

  def train_step(state: train_state.TrainState, images: Array, rng: Array,
                 labels: Array | None = None):
    if weak and labels is None:
      raise ValueError('CAVGA_w train step needs the batch labels')
    rng = jax.random.fold_in(rng, state.step)
    clean = train_state.images_to_float(images)
    x, masks, vae_weights = clean, None, None
    if synthetic is not None:
      x, masks, is_synthetic = synthesis.synthesize(
          jax.random.fold_in(rng, _SYNTHESIS_STREAM), clean, synthetic)
      labels = jnp.where(is_synthetic, models.ANOMALOUS, labels)
      if synthetic.reconstruction == 'normal_only':
        vae_weights = 1.0 - is_synthetic.astype(jnp.float32)

    def gen_forward(params):
      return attention.forward_with_attention(
          generator, params, state.gen_batch_stats, x, rng, train=True)

    outputs, gen_vjp, gen_batch_stats = jax.vjp(
        gen_forward, state.gen_params, has_aux=True)

    def disc_apply(params, batch_stats, inputs):
      logits, updates = discriminator.apply(
          {'params': params, 'batch_stats': batch_stats}, inputs, True,
          mutable=['batch_stats'])
      return logits, updates['batch_stats']

    fake = jax.lax.stop_gradient(outputs['reconstruction'])

    def disc_loss_fn(params):
      real_logits, batch_stats = disc_apply(params, state.disc_batch_stats,
                                            clean)
      fake_logits, batch_stats = disc_apply(params, batch_stats, fake)
      return losses.discriminator_loss(real_logits, fake_logits,
                                       vae_weights), batch_stats

    (d_loss, disc_batch_stats), d_grads = jax.value_and_grad(
        disc_loss_fn, has_aux=True)(state.disc_params)
    d_updates, disc_opt_state = state.disc_tx.update(
        d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)

    def gen_loss_fn(outs):
      fake_logits, _ = disc_apply(disc_params, disc_batch_stats,
                                  outs['reconstruction'])
      if weak:
        terms = weak_generator_loss_terms(outs, clean, fake_logits, labels,
                                          include_ae, masks, vae_weights)
      else:
        terms = generator_loss_terms(outs, clean, fake_logits)
      return losses.weighted_total(terms, loss_weights), terms

    (g_loss, terms), output_grads = jax.value_and_grad(
        gen_loss_fn, has_aux=True)(outputs)
    (g_grads,) = gen_vjp(output_grads)
    g_updates, gen_opt_state = state.gen_tx.update(
        g_grads, state.gen_opt_state, state.gen_params)
    new_state = state.replace(
        step=state.step + 1,
        gen_params=optax.apply_updates(state.gen_params, g_updates),
        gen_batch_stats=gen_batch_stats,
        gen_opt_state=gen_opt_state,
        disc_params=disc_params,
        disc_batch_stats=disc_batch_stats,
        disc_opt_state=disc_opt_state)
    finite = tree_all_finite((g_loss, d_loss, g_grads, d_grads))
    if nonfinite == 'skip':
      new_state = keep_state_unless_finite(finite, new_state, state)
    metrics = dict(terms, g_loss=g_loss, d_loss=d_loss,
                   nonfinite=1.0 - finite.astype(jnp.float32))
    if weak:
      predictions = jnp.argmax(outputs['logits'], axis=-1)
      metrics['cls_accuracy'] = jnp.mean(
          (predictions == labels).astype(jnp.float32))
      # What cls_accuracy is measured on: an all-normal classifier scores
      # exactly 1 - anomalous_fraction.
      metrics['anomalous_fraction'] = jnp.mean(labels.astype(jnp.float32))
    return new_state, metrics

  return train_step


def _log_line(step: int, num_steps: int, metrics: dict[str, float],
              images_per_s: float) -> str:
  terms = ' '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())
  return f'step {step}/{num_steps} | {terms} | {images_per_s:.1f} img/s'


class _NonFiniteGuard:
  """Acts on the steps' ``nonfinite`` flags without a per-step host sync.

  ``add`` queues a step's flag and losses (device scalars) and processes the
  queued steps that have already finished; ``drain`` waits for and processes
  all of them. Processing is in step order, so the step a run stops at does
  not depend on timing.
  """

  def __init__(self, mode: str, max_consecutive_skips: int,
               describe_checkpoint: Callable[[], str],
               loss_keys: tuple[str, ...]):
    self._mode = mode
    self._loss_keys = loss_keys
    self._max_skips = max_consecutive_skips
    self._describe_checkpoint = describe_checkpoint
    self._pending: collections.deque = collections.deque()
    self.consecutive = 0
    self.skipped = 0  # Since the last ``take_skipped``.
    self.skipped_total = 0

  def add(self, step: int, metrics: dict[str, Array]) -> None:
    self._pending.append((step, {k: metrics[k] for k in (
        'nonfinite',) + self._loss_keys}))
    while self._pending and self._pending[0][1]['nonfinite'].is_ready():
      self._process(*self._pending.popleft())

  def drain(self) -> None:
    while self._pending:
      self._process(*self._pending.popleft())

  def take_skipped(self) -> int:
    skipped, self.skipped = self.skipped, 0
    return skipped

  def _process(self, step: int, flags: dict[str, Array]) -> None:
    if not float(flags['nonfinite']):
      self.consecutive = 0
      return
    losses_text = ', '.join(f'{k} {float(flags[k]):.4g}'
                            for k in self._loss_keys)
    if self._mode == 'stop':
      raise TrainingError(
          f'non-finite loss or gradients at step {step} ({losses_text}); '
          f'training stopped, {self._describe_checkpoint()}; lower '
          'optimizer.learning_rate, set optimizer.grad_clip_norm, or set '
          "train.nonfinite='skip' to skip such steps")
    self.consecutive += 1
    self.skipped += 1
    self.skipped_total += 1
    logging.warning('step %d: non-finite loss or gradients (%s), update '
                    'skipped (%d in a row)', step, losses_text,
                    self.consecutive)
    if self.consecutive >= self._max_skips:
      raise TrainingError(
          f'{self.consecutive} consecutive steps up to step {step} had '
          'non-finite losses or gradients and were skipped '
          f'(train.max_consecutive_skips={self._max_skips}); training '
          f'stopped, {self._describe_checkpoint()}')


def _truncate_metrics_log(path: str, last_step: int) -> None:
  """Keeps the metrics lines of steps <= ``last_step`` (the resumed step).

  A run killed after logging a step but before checkpointing it logs that
  step again when resumed; a line torn by the kill is dropped as well.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)['step'] <= last_step:
          kept.append(line if line.endswith('\n') else line + '\n')
      except (ValueError, KeyError, TypeError):
        continue
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def training_loop(config: ml_collections.ConfigDict, workdir: str,
                  state: Any, train_step: Callable[[Any, Any, Array], Any],
                  num_examples: int, put_fn: Callable[[np.ndarray], Any],
                  step_rng: Array, loss_keys: tuple[str, ...],
                  description: str,
                  index_fn: Callable[[int], np.ndarray] | None = None,
                  eval_fn: Callable[[Any, int], dict[str, Any]] | None = None
                  ) -> Any:
  """Resumes, runs, logs and checkpoints a training run (CAVGA and the VAEs).

  Args:
    config: reads ``config.seed`` and ``config.train`` (num_steps,
      batch_size, log_every, checkpoint_every, keep_checkpoints, prefetch,
      nonfinite, max_consecutive_skips).
    workdir: checkpoints go to ``<workdir>/checkpoints``, metrics to
      ``<workdir>/train_metrics.jsonl``.
    state: the freshly initialised state (a flax struct with ``step``); the
      newest checkpoint, if any, replaces it.
    train_step: the jitted ``(state, batch, rng) -> (state, metrics)``;
      metrics hold float scalars incl. ``nonfinite`` and ``loss_keys``.
    num_examples: size of the training set; batches are
      ``put_fn(global_batch_indices)``, a function of ``(seed, step)``.
    put_fn: (batch_size,) example indices -> the step's (sharded) batch.
    step_rng: the run's key (the step folds in ``state.step``).
    loss_keys: metrics named in a non-finite error message.
    description: what is trained, for the log.
    index_fn: step -> the step's (batch_size,) global batch indices, a pure
      function of the step (CAVGA_w's ``data.quota_batch_indices``); None:
      ``data.epoch_permutation_indices`` of ``config.seed``.
    eval_fn: ``(state, step) -> record`` (a JSON-able dict with 'step' and
      'maps'), called every ``config.train.eval_every`` steps and at the
      last step; the records go to ``<workdir>/eval_curve.jsonl`` (truncated
      to the resumed step like the metrics log) and are plotted to
      ``eval_curve.png``. It only observes: no checkpoint is selected.

  Returns:
    The final state.

  Raises:
    TrainingError: non-finite losses or gradients (``config.train.nonfinite``;
      see the module docstring) or parameters; the last good checkpoint is
      kept.
  """
  # Only training removes the temporary folders of saves that a killed run
  # left behind (evaluate.py may run beside a training run).
  manager = checkpointing.make_manager(
      workdir, config.train.get('keep_checkpoints', 3), cleanup_tmp=True)
  restored = checkpointing.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info('resumed from %s at step %d',
                 checkpointing.checkpoint_dir(workdir), int(state.step))
  start_step, num_steps = int(state.step), config.train.num_steps
  metrics_path = os.path.join(workdir, 'train_metrics.jsonl')
  curve_path = os.path.join(workdir, eval_lib.CURVE_FILE)
  primary = sharding.is_primary_process()
  if primary:
    _truncate_metrics_log(metrics_path, start_step)
    _truncate_metrics_log(curve_path, start_step)
  eval_every = config.train.get('eval_every', 0) if eval_fn else 0
  if start_step >= num_steps:
    logging.info('already trained for %d steps (config.train.num_steps=%d)',
                 start_step, num_steps)
    return state

  batch_size = config.train.batch_size
  batches = data.TrainBatches(
      np.arange(num_examples), batch_size, seed=config.seed,
      start_step=start_step, prefetch=config.train.get('prefetch', 2),
      put_fn=put_fn, index_fn=index_fn)
  log_every = config.train.log_every
  ckpt_every = config.train.checkpoint_every
  nonfinite = config.train.get('nonfinite', 'stop')
  guard = _NonFiniteGuard(
      nonfinite, config.train.get('max_consecutive_skips', 10),
      lambda: (f'the last good checkpoint (step {manager.latest_step()}) in '
               f'{checkpointing.checkpoint_dir(workdir)} is kept'),
      loss_keys)
  logging.info('training %s for %d steps, batch %d on %d device(s)',
               description, num_steps, batch_size, jax.device_count())
  with batches, (open(metrics_path, 'a') if primary
                 else contextlib.nullcontext()) as metrics_file:
    tic, tic_step = time.perf_counter(), start_step
    for step in range(start_step, num_steps):
      state, metrics = train_step(state, next(batches), step_rng)
      done = step + 1
      guard.add(done, metrics)
      if done == start_step + 1:
        jax.block_until_ready(metrics)
        logging.info('first step (including compilation) took %.1f s',
                     time.perf_counter() - tic)
        tic, tic_step = time.perf_counter(), done
      if done % log_every == 0 or done == num_steps:
        guard.drain()
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()
                   if k != 'nonfinite'}
        if nonfinite == 'skip':
          metrics['skipped'] = guard.take_skipped()
        elapsed = time.perf_counter() - tic
        speed = (done - tic_step) * batch_size / elapsed if elapsed else 0.0
        tic, tic_step = time.perf_counter(), done
        logging.info(_log_line(done, num_steps, metrics, speed))
        if primary:
          metrics_file.write(json.dumps(
              dict(step=done, images_per_s=speed, **metrics)) + '\n')
          metrics_file.flush()
      if done % ckpt_every == 0 or done == num_steps:
        guard.drain()
        if not bool(tree_all_finite(state)):
          raise TrainingError(
              f'non-finite parameters at step {done}; not saved, the last '
              f'good checkpoint (step {manager.latest_step()}) in '
              f'{checkpointing.checkpoint_dir(workdir)} is kept')
        checkpointing.save(manager, done, state)
        logging.info('saved checkpoint %d', done)
      if eval_every and (done % eval_every == 0 or done == num_steps):
        record = eval_fn(state, done)  # Every process computes its part.
        if primary:
          eval_lib.append_curve_point(curve_path, record)
  if guard.skipped_total:
    logging.warning('%d of %d steps were skipped for non-finite losses or '
                    'gradients', guard.skipped_total, num_steps - start_step)
  return state


def prepare_run(config: ml_collections.ConfigDict, workdir: str
                ) -> jax.sharding.Mesh:
  """Checks the config, writes ``<workdir>/config.json``, returns the mesh.

  Raises:
    CavgaError: an invalid config or a batch size the devices cannot split.
  """
  config_checks.check_config(config)
  os.makedirs(workdir, exist_ok=True)
  if sharding.is_primary_process():
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh,
                            'config.train.batch_size')
  return mesh


def train(config: ml_collections.ConfigDict, workdir: str
          ) -> train_state.TrainState:
  """Trains CAVGA as configured, resuming from ``<workdir>/checkpoints``.

  Logs step, losses and images/s every ``config.train.log_every`` steps and
  appends them to ``<workdir>/train_metrics.jsonl`` (on resume, lines after
  the restored step are dropped first). Non-finite losses or gradients stop
  the run with ``TrainingError``, keeping the last good checkpoint, or skip
  the update (``config.train.nonfinite``; see the module docstring).

  ``config.model.pretrained`` (an .npz of ImageNet weights) replaces the
  initial encoder of a fresh run only: a resumed run restores everything from
  its checkpoint and does not read the file.

  Returns:
    The final train state.

  Raises:
    CavgaError: an invalid config (``config_checks.check_config``) or
      dataset, an unusable pretrained file (``DataError``);
      ``TrainingError`` for non-finite losses.
  """
  mesh = prepare_run(config, workdir)
  batch_size = config.train.batch_size
  supervision = config.model.get('supervision', 'unsupervised')
  synthetic = synthesis.settings_from_fields(config.data.get('synthetic'))
  check_loss_weights(dict(config.loss_weights), supervision,
                     synthetic is not None)
  train_ds, test_ds = data.get_datasets(config, workdir)

  generator, discriminator, init_fn, state_sharding = train_state.setup(
      config, mesh)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  jitted_step = jax.jit(
      make_train_step(generator, discriminator, dict(config.loss_weights),
                      config.train.get('nonfinite', 'stop'), synthetic),
      donate_argnums=0,
      out_shardings=(state_sharding, sharding.replicated(mesh)))

  def train_step(state, batch, rng):
    images, labels = batch  # CAVGA_u's step ignores the labels.
    return jitted_step(state, images, rng, labels)

  host_slice = sharding.host_batch_slice(batch_size)
  images, labels = train_ds.images, train_ds.labels
  description = (f'CAVGA-{config.model.variant}_{supervision} '
                 f'({config.model.latent} latent) on {train_ds.num_examples} '
                 f'images ({int(labels.sum())} anomalous)')
  quota = config.data.get('weak_anomalies_per_batch', 0)
  index_fn = None
  if quota:
    # CAVGA_w: uniform batches would almost never hold one of the few
    # labelled anomalies, leaving the classifier nothing to learn from.
    index_fn = functools.partial(data.quota_batch_indices, labels, batch_size,
                                 quota, seed=config.seed)
    description += f', {quota} anomalous per batch'
  if synthetic is not None:
    description += (f', {synthetic.num_synthetic(batch_size)} synthetic '
                    'anomalies per batch')
    if sharding.is_primary_process():
      _write_synthetic_examples(
          os.path.join(workdir, SYNTHETIC_EXAMPLES_FILE), images, synthetic,
          jax.random.fold_in(step_rng, _SYNTHESIS_STREAM))
  state = init_fn(init_rng)
  pretrained_path = config.model.get('pretrained')
  # A resumed run's checkpoint replaces the whole state in training_loop.
  if pretrained_path and not checkpointing.has_checkpoint(workdir):
    state = train_state.with_pretrained_encoder(state, pretrained_path,
                                                state_sharding)
    logging.info('encoder initialised from %s', pretrained_path)
  return training_loop(
      config, workdir, state, train_step, train_ds.num_examples,
      lambda idx: (sharding.shard_batch(images[idx[host_slice]], mesh),
                   sharding.shard_batch(labels[idx[host_slice]], mesh)),
      step_rng, ('g_loss', 'd_loss'), description, index_fn=index_fn,
      eval_fn=_curve_fn(config, generator, test_ds, mesh))


SYNTHETIC_EXAMPLES_FILE = 'synthetic_examples.png'


def _write_synthetic_examples(path: str, images: np.ndarray,
                              settings: synthesis.SynthesisSettings,
                              rng: Array, num: int = 8) -> None:
  """A panel of synthetic training examples: clean | synthetic | mask rows.

  Drawn from the first ``num`` training images with the run's synthesis
  settings (the same generator as the train step, another key).
  """
  clean = train_state.images_to_float(jnp.asarray(images[:num]))
  altered, masks, _ = jax.jit(synthesis.synthesize, static_argnums=2)(
      rng, clean, dataclasses.replace(settings, fraction=1.0))
  visualize.save_synthetic_panel(
      path, np.asarray(images[:num]),
      np.asarray((altered + 1.0) * 127.5).round().clip(0, 255).astype(
          np.uint8), np.asarray(masks) > 0)
  logging.info('wrote synthetic training examples to %s', path)


def _curve_fn(config: ml_collections.ConfigDict,
              generator: models.CAVGAGenerator,
              test_ds: data.AnomalyDataset, mesh: jax.sharding.Mesh
              ) -> Callable[[Any, int], dict[str, Any]] | None:
  """The learning-curve evaluation of ``config.train.eval_every`` (or None)."""
  if not config.train.get('eval_every', 0):
    return None
  evaluator = eval_lib.make_evaluator(generator, test_ds, config.eval, mesh)

  def eval_fn(state, step):
    result, _ = evaluator(state.gen_params, state.gen_batch_stats)
    return eval_lib.curve_record(step, result)

  return eval_fn
