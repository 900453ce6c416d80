"""Grad-CAM attention from the latent space (docs/protocol.md section 2).

For a per-image scalar ``s`` computed from the last encoder feature map ``F``
(B, h, w, k)::

  alpha_k = mean_{i,j} ds/dF_{i,j,k}
  cam     = ReLU(sum_k alpha_k F_k)
  A       = cam / (max_{i,j} cam + 1e-8)        # (B, h, w), in [0, 1]

CAVGA_u uses ``s = sum(mu)``. CAVGA_w adds the class-specific maps
``A^cn``, ``A^ca`` of the classifier logits ``s = logit_c``, computed with
``class_grad_cam`` (one forward, one VJP vmapped over the classes). The maps
are computed with ``jax.vjp`` inside whatever function calls them (e.g. the
jitted train step), for the whole batch at once, and they are differentiable:
the attention losses backpropagate through ``dS/dF`` (second order). The max
in the normaliser is not stop-gradiented (as in the PyTorch reproductions).
If a whole cam is negative, ``A = 0`` and that image gets no attention
gradient.

CAVGA_w's class scores go through the *same* latent the decoder and the
classifier use: during training the sampled ``z = mu + sigma * eps`` (with
``eps`` held fixed, so the path through ``logvar`` counts too), at
evaluation ``z = mu``. The maps therefore explain exactly the prediction
``p`` that ``L_bce`` trains and that gates ``L_cga``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cavga_jax.models import cavga

Array = jax.Array
EPS = 1e-8


def grad_cam(score_fn: Callable[[Array], Any],
             features: Array,
             has_aux: bool = False,
             norm: str = 'max'):
  """Batched Grad-CAM of per-image scores with respect to ``features``.

  Args:
    score_fn: ``F (B, h, w, k) -> scores (B,)`` (or ``(scores, aux)`` with
      ``has_aux``). Image b's score must depend only on image b's features
      (true for the latent heads and classifier), which makes one VJP with a
      cotangent of ones give every image's gradient exactly.
    features: F, (B, h, w, k).
    has_aux: whether ``score_fn`` also returns auxiliary outputs.
    norm: the per-image normalisation (``normalize``).

  Returns:
    A (B, h, w) float32 in [0, 1]; ``(A, aux)`` with ``has_aux``.
  """
  out = jax.vjp(score_fn, features, has_aux=has_aux)
  scores, vjp_fn = out[0], out[1]
  (grads,) = vjp_fn(jnp.ones_like(scores))
  attention = cam_from_gradients(features, grads, norm)
  return (attention, out[2]) if has_aux else attention


def class_grad_cam(score_fn: Callable[[Array], Any],
                   features: Array,
                   has_aux: bool = False,
                   norm: str = 'max'):
  """Grad-CAM maps of several per-image scores at once (e.g. class logits).

  One forward pass and one VJP whose pullback is ``jax.vmap``-ed over the K
  one-hot cotangents, so the K maps cost one batched backward pass through
  ``score_fn``; like ``grad_cam`` the result is exact when image b's scores
  depend only on image b's features, and differentiable (second order).

  Args:
    score_fn: ``F (B, h, w, k) -> scores (B, K)`` (or ``(scores, aux)`` with
      ``has_aux``), e.g. the classifier logits computed from F.
    features: F, (B, h, w, k).
    has_aux: whether ``score_fn`` also returns auxiliary outputs.
    norm: the per-image normalisation of each map (``normalize``).

  Returns:
    ``(A, scores)``: A (B, K, h, w) float32 in [0, 1], ``A[:, c]`` the map of
    score c; scores (B, K) the primal scores. ``(A, scores, aux)`` with
    ``has_aux``.
  """
  out = jax.vjp(score_fn, features, has_aux=has_aux)
  scores, vjp_fn = out[0], out[1]
  num_scores = scores.shape[-1]
  # Cotangent c selects score c of every image: (K, B, K).
  cotangents = jnp.broadcast_to(
      jnp.eye(num_scores, dtype=scores.dtype)[:, None, :],
      (num_scores,) + scores.shape)
  (grads,) = jax.vmap(vjp_fn)(cotangents)  # (K, B, h, w, k)
  maps = jax.vmap(
      cam_from_gradients, in_axes=(None, 0, None))(features, grads, norm)
  attention = jnp.moveaxis(maps, 0, 1)
  return (attention, scores, out[2]) if has_aux else (attention, scores)


def cam_from_gradients(features: Array,
                       grads: Array,
                       norm: str = 'max') -> Array:
  """F (B, h, w, k) and dS/dF (B, h, w, k) -> normalised map A (B, h, w)."""
  # Low-precision (bf16) features are upcast; float64 stays float64.
  dtype = jnp.promote_types(features.dtype, jnp.float32)
  features = features.astype(dtype)
  alpha = jnp.mean(grads.astype(dtype), axis=(1, 2))
  return normalize(jnp.einsum('bhwk,bk->bhw', features, alpha), norm)


def normalize(cam: Array, norm: str = 'max') -> Array:
  """Per-image normalisation of maps (B, h, w) to [0, 1].

  'max' (the paper, Grad-CAM): ``ReLU(cam) / (max ReLU(cam) + 1e-8)``; an
  image whose cam is nowhere positive gets ``A = 0`` and no gradient.
  'minmax': ``(cam - min) / (max - min + 1e-8)`` without the ReLU, so
  negative evidence keeps its ranking and a map is never all zero.
  'none': the raw ``cam`` (for losses that normalise it themselves).
  The last two axes are the map's; any leading ones are kept.

  Raises:
    ValueError: unknown ``norm``.
  """
  spatial = (-2, -1)
  if norm == 'max':
    cam = jax.nn.relu(cam)
    return cam / (jnp.max(cam, axis=spatial, keepdims=True) + EPS)
  if norm == 'minmax':
    low = jnp.min(cam, axis=spatial, keepdims=True)
    return (cam - low) / (jnp.max(cam, axis=spatial, keepdims=True) - low + EPS)
  if norm == 'none':
    return cam
  raise ValueError(f"attention norm must be 'max', 'minmax' or 'none', got "
                   f'{norm!r}')


def unit_scores(mu: Array) -> Array:
  """Liu et al.'s per-unit scores: (B, U) from ``mu`` (B, U) or (B, h', w', U).

  A unit of a convolutional latent is a channel summed over positions.
  """
  return mu if mu.ndim == 2 else jnp.sum(mu, axis=tuple(range(1, mu.ndim - 1)))


def unit_mean(unit_maps: Array, norm: str = 'max') -> Array:
  """Liu et al.'s overall map: the mean of (B, U, h, w) maps, renormalised."""
  return normalize(jnp.mean(unit_maps, axis=1), norm)


def resize_map(anomaly_map: Array, image_size: int) -> Array:
  """Bilinear resize to image size: (B, h, w) -> (B, S, S) in [0, 1]."""
  shape = (anomaly_map.shape[0], image_size, image_size)
  return jnp.clip(jax.image.resize(anomaly_map, shape, 'bilinear'), 0, 1)


def localization_map(attention: Array, image_size: int) -> Array:
  """Anomaly map ``1 - A`` resized bilinearly: (B, h, w) -> (B, S, S) in [0, 1]."""
  return resize_map(1.0 - attention, image_size)


# CAVGA_w localization maps (``anomaly_maps`` scores them as 'weak_<name>'),
# from the class maps A^cn = class_attention[:, NORMAL],
# A^ca = class_attention[:, ANOMALOUS] and CAVGA_u's map A of sum(mu):
#   'anomalous'     M = A^ca, where the anomalous-class evidence lies (default);
#   'not_normal'    M = 1 - A^cn, what the normal class does not attend to;
#   'complementary' M = (1 - A^cn + A^ca) / 2, the L_cga integrand rescaled
#                   to [0, 1] (trained towards 0 on normal images);
#   'latent'        M = 1 - A, CAVGA_u's map of sum(mu).
WEAK_MAPS = ('anomalous', 'not_normal', 'complementary', 'latent')


def weak_localization_map(outputs: dict[str, Array],
                          image_size: int,
                          weak_map: str = 'anomalous') -> Array:
  """CAVGA_w anomaly map at image size, (B, S, S) in [0, 1].

  Args:
    outputs: ``forward_with_attention`` outputs of a generator with a
      classifier ('class_attention' (B, 2, h, w) and 'attention' (B, h, w)).
    image_size: S.
    weak_map: one of ``WEAK_MAPS`` (see there).

  Raises:
    ValueError: unknown ``weak_map``.
  """
  normal = outputs['class_attention'][:, cavga.NORMAL]
  anomalous = outputs['class_attention'][:, cavga.ANOMALOUS]
  if weak_map == 'anomalous':
    anomaly_map = anomalous
  elif weak_map == 'not_normal':
    anomaly_map = 1.0 - normal
  elif weak_map == 'complementary':
    anomaly_map = 0.5 * (1.0 - normal + anomalous)
  elif weak_map == 'latent':
    anomaly_map = 1.0 - outputs['attention']
  else:
    raise ValueError(f'weak_map must be one of {WEAK_MAPS}, got '
                     f'{weak_map!r}')
  return resize_map(anomaly_map, image_size)


def forward_with_attention(
    generator: cavga.CAVGAGenerator,
    params: Any,
    batch_stats: Any,
    images: Array,
    rng: Array | None,
    train: bool,
    unit_maps: bool = False) -> tuple[dict[str, Array], Any]:
  """Generator pass with Grad-CAM attention.

  The attention is formed as the generator's ``attention_score``,
  ``attention_stage`` and ``attention_norm`` say (defaults: the paper's
  ``s = sum(mu)`` at the last feature map ``F``, max-normalised). At an
  earlier stage ``F_s`` the score is differentiated through the rest of the
  encoder; in training mode its BatchNorm layers use batch statistics, so
  the one-VJP batched map is the Grad-CAM of the batch's summed score (each
  image's own gradient plus O(1/B) terms through the batch statistics, as
  with ``autograd.grad`` in PyTorch); in evaluation it is exact. With a
  classifier (CAVGA_w) the same VJP also gives the class maps of the logits
  computed from ``z``. All maps come from one forward pass and one VJP whose
  pullback is vmapped over the scores (``class_grad_cam``).

  Args:
    generator: the CAVGA generator module.
    params, batch_stats: its variables.
    images: (B, H, W, C) float in [-1, 1].
    rng: key for sampling ``z``; ``None`` decodes ``mu`` (evaluation).
    train: BatchNorm mode (batch statistics and running-average updates).
    unit_maps: also compute Liu et al.'s per-unit maps (evaluation: the
      ``attention_liu`` anomaly map), whatever ``attention_score`` is.

  Returns:
    (outputs, new_batch_stats): outputs has 'features' (B, h, w, k) (the
    last feature map ``F``), 'attention_features' (the stage the maps are
    taken at), 'mu', 'logvar' (B, h, w, c) or (B, d), 'z',
    'reconstruction' (B, H, W, C), 'attention' (B, h_s, w_s) (the configured
    map ``A``) and 'attention_sum' (the map of ``sum(mu)``); with unit maps
    'unit_attention' (B, U, h_s, w_s) and 'attention_unit_mean'; with a
    classifier 'logits' (B, 2) (from ``z``) and 'class_attention'
    (B, 2, h_s, w_s) (``[:, NORMAL]`` = A^cn, ``[:, ANOMALOUS]`` = A^ca).
    new_batch_stats is ``batch_stats`` updated when ``train``.
  """
  mutable = ['batch_stats'] if train else False
  variables = {'params': params, 'batch_stats': batch_stats}
  stage = generator.attention_stage
  at_last = stage >= cavga.NUM_ENCODER_STAGES
  stage_features = generator.apply(
      variables,
      images,
      train,
      None if at_last else stage,
      method='encode',
      mutable=mutable)
  if train:
    stage_features, updates = stage_features
    variables = {'params': params, 'batch_stats': updates['batch_stats']}
  with_units = unit_maps or generator.attention_score == 'unit_mean'
  weak = generator.with_classifier

  def scores_fn(f):
    new_stats = variables['batch_stats']
    if at_last:
      features = f
    else:
      features = generator.apply(
          variables, f, stage, train, method='encode_from', mutable=mutable)
      if train:
        features, updates = features
        new_stats = updates['batch_stats']
    mu, logvar = generator.apply({'params': params},
                                 features,
                                 method='latent_params')
    # The same rng as the decoder's below gives the same eps, so the
    # classifier, the class maps and the decoder all see one z.
    z = mu if rng is None else cavga.reparameterize(rng, mu, logvar)
    units = unit_scores(mu)
    columns = [jnp.sum(units, axis=1, keepdims=True)]  # sum(mu)
    if with_units:
      columns.append(units)
    if weak:
      columns.append(generator.apply({'params': params}, z, method='classify'))
    return (jnp.concatenate(columns, axis=1) if len(columns) > 1 else
            columns[0][:, 0]), (features, mu, logvar, z, new_stats)

  norm = generator.attention_norm
  outputs = {}
  if with_units or weak:
    maps, scores, (features, mu, logvar, z, new_stats) = class_grad_cam(
        scores_fn, stage_features, has_aux=True, norm=norm)
    if with_units:
      units = maps[:, 1:1 + mu.shape[-1]]
      outputs.update(
          unit_attention=units, attention_unit_mean=unit_mean(units, norm))
    if weak:
      outputs.update(logits=scores[:, -2:], class_attention=maps[:, -2:])
    attention_sum = maps[:, 0]
  else:
    attention_sum, (features, mu, logvar, z, new_stats) = grad_cam(
        scores_fn, stage_features, has_aux=True, norm=norm)
  variables = {'params': params, 'batch_stats': new_stats}
  reconstruction = generator.apply(
      variables, z, train, method='decode', mutable=mutable)
  if train:
    reconstruction, updates = reconstruction
    variables = {'params': params, 'batch_stats': updates['batch_stats']}
  attention = (
      outputs['attention_unit_mean']
      if generator.attention_score == 'unit_mean' else attention_sum)
  outputs.update(
      features=features,
      attention_features=stage_features,
      mu=mu,
      logvar=logvar,
      z=z,
      reconstruction=reconstruction,
      attention=attention,
      attention_sum=attention_sum)
  return outputs, variables['batch_stats']
