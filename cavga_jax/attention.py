"""Grad-CAM attention from the latent space (SPEC section 2).

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

from cavga_jax import models

Array = jax.Array
EPS = 1e-8


def grad_cam(score_fn: Callable[[Array], Any], features: Array,
             has_aux: bool = False):
  """Batched Grad-CAM of per-image scores with respect to ``features``.

  Args:
    score_fn: ``F (B, h, w, k) -> scores (B,)`` (or ``(scores, aux)`` with
      ``has_aux``). Image b's score must depend only on image b's features
      (true for the latent heads and classifier), which makes one VJP with a
      cotangent of ones give every image's gradient exactly.
    features: F, (B, h, w, k).
    has_aux: whether ``score_fn`` also returns auxiliary outputs.

  Returns:
    A (B, h, w) float32 in [0, 1]; ``(A, aux)`` with ``has_aux``.
  """
  out = jax.vjp(score_fn, features, has_aux=has_aux)
  scores, vjp_fn = out[0], out[1]
  (grads,) = vjp_fn(jnp.ones_like(scores))
  attention = cam_from_gradients(features, grads)
  return (attention, out[2]) if has_aux else attention


def class_grad_cam(score_fn: Callable[[Array], Any], features: Array,
                   has_aux: bool = False):
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
  maps = jax.vmap(cam_from_gradients, in_axes=(None, 0))(features, grads)
  attention = jnp.moveaxis(maps, 0, 1)
  return (attention, scores, out[2]) if has_aux else (attention, scores)


def cam_from_gradients(features: Array, grads: Array) -> Array:
  """F (B, h, w, k) and dS/dF (B, h, w, k) -> normalised map A (B, h, w)."""
  # Low-precision (bf16) features are upcast; float64 stays float64.
  dtype = jnp.promote_types(features.dtype, jnp.float32)
  features = features.astype(dtype)
  alpha = jnp.mean(grads.astype(dtype), axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum('bhwk,bk->bhw', features, alpha))
  return cam / (jnp.max(cam, axis=(1, 2), keepdims=True) + EPS)


def resize_map(anomaly_map: Array, image_size: int) -> Array:
  """Bilinear resize to image size: (B, h, w) -> (B, S, S) in [0, 1]."""
  shape = (anomaly_map.shape[0], image_size, image_size)
  return jnp.clip(jax.image.resize(anomaly_map, shape, 'bilinear'), 0, 1)


def localization_map(attention: Array, image_size: int) -> Array:
  """Anomaly map ``1 - A`` resized bilinearly: (B, h, w) -> (B, S, S) in [0, 1]."""
  return resize_map(1.0 - attention, image_size)


# CAVGA_w localization maps (``config.eval.weak_map``), from the class maps
# A^cn = class_attention[:, NORMAL], A^ca = class_attention[:, ANOMALOUS] and
# CAVGA_u's map A of sum(mu):
#   'anomalous'     M = A^ca, where the anomalous-class evidence lies (default);
#   'not_normal'    M = 1 - A^cn, what the normal class does not attend to;
#   'complementary' M = (1 - A^cn + A^ca) / 2, the L_cga integrand rescaled
#                   to [0, 1] (trained towards 0 on normal images);
#   'latent'        M = 1 - A, CAVGA_u's map of sum(mu).
WEAK_MAPS = ('anomalous', 'not_normal', 'complementary', 'latent')


def weak_localization_map(outputs: dict[str, Array], image_size: int,
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
  normal = outputs['class_attention'][:, models.NORMAL]
  anomalous = outputs['class_attention'][:, models.ANOMALOUS]
  if weak_map == 'anomalous':
    anomaly_map = anomalous
  elif weak_map == 'not_normal':
    anomaly_map = 1.0 - normal
  elif weak_map == 'complementary':
    anomaly_map = 0.5 * (1.0 - normal + anomalous)
  elif weak_map == 'latent':
    anomaly_map = 1.0 - outputs['attention']
  else:
    raise ValueError(f'config.eval.weak_map must be one of {WEAK_MAPS}, got '
                     f'{weak_map!r}')
  return resize_map(anomaly_map, image_size)


def forward_with_attention(generator: models.CAVGAGenerator, params: Any,
                           batch_stats: Any, images: Array,
                           rng: Array | None, train: bool
                           ) -> tuple[dict[str, Array], Any]:
  """Generator pass with Grad-CAM attention.

  CAVGA_u (no classifier): ``s = sum(mu)``. With a classifier (CAVGA_w) the
  same VJP also gives the class maps of the logits computed from ``z``
  (``class_grad_cam`` over the scores ``[sum(mu), logit_n, logit_a]``).

  Args:
    generator: the CAVGA generator module.
    params, batch_stats: its variables.
    images: (B, H, W, C) float in [-1, 1].
    rng: key for sampling ``z``; ``None`` decodes ``mu`` (evaluation).
    train: BatchNorm mode (batch statistics and running-average updates).

  Returns:
    (outputs, new_batch_stats): outputs has 'features' (B, h, w, k), 'mu',
    'logvar' (B, h, w, c) or (B, d), 'z', 'reconstruction' (B, H, W, C),
    'attention' (B, h, w) and, with a classifier, 'logits' (B, 2) (from
    ``z``) and 'class_attention' (B, 2, h, w) (``[:, NORMAL]`` = A^cn,
    ``[:, ANOMALOUS]`` = A^ca). new_batch_stats is ``batch_stats`` updated
    when ``train``.
  """
  mutable = ['batch_stats'] if train else False
  variables = {'params': params, 'batch_stats': batch_stats}
  features = generator.apply(variables, images, train, method='encode',
                             mutable=mutable)
  if train:
    features, updates = features
    variables = {'params': params, 'batch_stats': updates['batch_stats']}

  def latent(f):
    mu, logvar = generator.apply({'params': params}, f, method='latent_params')
    sum_mu = jnp.sum(mu.reshape(mu.shape[0], -1), axis=1)
    return sum_mu, mu, logvar

  outputs = {}
  if generator.with_classifier:

    def scores_fn(f):
      sum_mu, mu, logvar = latent(f)
      # The same rng as below gives the same eps, so the classifier, the
      # class maps and the decoder all see one z.
      z = mu if rng is None else models.reparameterize(rng, mu, logvar)
      logits = generator.apply({'params': params}, z, method='classify')
      return (jnp.concatenate([sum_mu[:, None], logits], axis=1),
              (mu, logvar, z))

    maps, scores, (mu, logvar, z) = class_grad_cam(scores_fn, features,
                                                   has_aux=True)
    attention = maps[:, 0]
    outputs.update(logits=scores[:, 1:], class_attention=maps[:, 1:])
  else:

    def sum_mu_fn(f):
      sum_mu, mu, logvar = latent(f)
      return sum_mu, (mu, logvar)

    attention, (mu, logvar) = grad_cam(sum_mu_fn, features, has_aux=True)
    z = mu if rng is None else models.reparameterize(rng, mu, logvar)
  reconstruction = generator.apply(variables, z, train, method='decode',
                                   mutable=mutable)
  if train:
    reconstruction, updates = reconstruction
    variables = {'params': params, 'batch_stats': updates['batch_stats']}
  outputs.update(features=features, mu=mu, logvar=logvar, z=z,
                 reconstruction=reconstruction, attention=attention)
  return outputs, variables['batch_stats']
