"""Grad-CAM attention from the latent space (SPEC section 2).

For a per-image scalar ``s`` computed from the last encoder feature map ``F``
(B, h, w, k)::

  alpha_k = mean_{i,j} ds/dF_{i,j,k}
  cam     = ReLU(sum_k alpha_k F_k)
  A       = cam / (max_{i,j} cam + 1e-8)        # (B, h, w), in [0, 1]

CAVGA_u uses ``s = sum(mu)``. The maps are computed with ``jax.vjp`` inside
whatever function calls them (e.g. the jitted train step), for the whole batch
at once, and they are differentiable: the attention losses backpropagate
through ``dS/dF`` (second order). The max in the normaliser is not
stop-gradiented (as in the PyTorch reproductions). If a whole cam is
negative, ``A = 0`` and that image gets no attention gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cavga_jax import models

Array = jax.Array
_EPS = 1e-8


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


def cam_from_gradients(features: Array, grads: Array) -> Array:
  """F (B, h, w, k) and dS/dF (B, h, w, k) -> normalised map A (B, h, w)."""
  # Low-precision (bf16) features are upcast; float64 stays float64.
  dtype = jnp.promote_types(features.dtype, jnp.float32)
  features = features.astype(dtype)
  alpha = jnp.mean(grads.astype(dtype), axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum('bhwk,bk->bhw', features, alpha))
  return cam / (jnp.max(cam, axis=(1, 2), keepdims=True) + _EPS)


def localization_map(attention: Array, image_size: int) -> Array:
  """Anomaly map ``1 - A`` resized bilinearly: (B, h, w) -> (B, S, S) in [0, 1]."""
  shape = (attention.shape[0], image_size, image_size)
  return jnp.clip(jax.image.resize(1.0 - attention, shape, 'bilinear'), 0, 1)


def forward_with_attention(generator: models.CAVGAGenerator, params: Any,
                           batch_stats: Any, images: Array,
                           rng: Array | None, train: bool
                           ) -> tuple[dict[str, Array], Any]:
  """Generator pass with CAVGA_u attention (``s = sum(mu)``).

  Args:
    generator: the CAVGA generator module.
    params, batch_stats: its variables.
    images: (B, H, W, C) float in [-1, 1].
    rng: key for sampling ``z``; ``None`` decodes ``mu`` (evaluation).
    train: BatchNorm mode (batch statistics and running-average updates).

  Returns:
    (outputs, new_batch_stats): outputs has 'features' (B, h, w, k), 'mu',
    'logvar' (B, h, w, c) or (B, d), 'z', 'reconstruction' (B, H, W, C),
    'attention' (B, h, w) and, with a classifier, 'logits' (B, 2).
    new_batch_stats is ``batch_stats`` updated when ``train``.
  """
  mutable = ['batch_stats'] if train else False
  variables = {'params': params, 'batch_stats': batch_stats}
  features = generator.apply(variables, images, train, method='encode',
                             mutable=mutable)
  if train:
    features, updates = features
    variables = {'params': params, 'batch_stats': updates['batch_stats']}

  def sum_mu(f):
    mu, logvar = generator.apply({'params': params}, f, method='latent_params')
    return jnp.sum(mu.reshape(mu.shape[0], -1), axis=1), (mu, logvar)

  attention, (mu, logvar) = grad_cam(sum_mu, features, has_aux=True)
  z = mu if rng is None else models.reparameterize(rng, mu, logvar)
  reconstruction = generator.apply(variables, z, train, method='decode',
                                   mutable=mutable)
  if train:
    reconstruction, updates = reconstruction
    variables = {'params': params, 'batch_stats': updates['batch_stats']}
  outputs = dict(features=features, mu=mu, logvar=logvar, z=z,
                 reconstruction=reconstruction, attention=attention)
  if generator.with_classifier:
    outputs['logits'] = generator.apply({'params': params}, z,
                                        method='classify')
  return outputs, variables['batch_stats']
