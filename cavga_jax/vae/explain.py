"""Gradient-based VAE explanation (Liu et al., CVPR 2020).

Liu et al. explain a VAE by one Grad-CAM map per latent unit: the score of
unit ``k`` is ``s = mu_k`` and its map comes from the last encoder feature
map ``F`` exactly as in ``cavga_jax.models.attention``::

  alpha^k_c = mean_{i,j} d mu_k / dF_{i,j,c}
  A^k       = ReLU(sum_c alpha^k_c F_c) / max(...)      # (h, w) in [0, 1]

What a "unit" is: for a flattened latent (the Liu et al. VAEs, CAVGA's
``latent='flat'``) unit ``k`` is entry ``mu_k``; for a convolutional latent
(h' x w' x c) it is channel ``k`` summed over positions, ``sum_ij mu_ijk``,
so the number of maps stays ``c`` rather than ``h' w' c``.

Two combined maps are returned, because the literature uses both:
* ``sum``: the Grad-CAM of ``s = sum_k mu_k`` -- CAVGA_u's ``A``
  (docs/protocol.md section 2: "and their sum"). By linearity its gradient is the sum of the unit gradients.
* ``mean``: the mean of the per-unit maps ``A^k``, renormalised to [0, 1] --
  Liu et al.'s overall attention map ``M = 1/D sum_k M^k``.

Everything is one forward pass and one VJP whose pullback is ``jax.vmap``-ed
over the one-hot unit cotangents (``attention.class_grad_cam``), so the maps
of all units cost one batched backward pass, run inside ``jax.jit``, and are
differentiable (the attention disentanglement loss ``L_AD`` trains through
them).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from cavga_jax.models import attention

Array = jax.Array


class UnitAttention(NamedTuple):
  """Per-unit and combined Grad-CAM maps of one batch.

  Attributes:
    units: (B, U, h, w) in [0, 1], ``units[:, k]`` the map of unit k.
    sum: (B, h, w) in [0, 1], the map of ``s = sum_k mu_k``.
    mean: (B, h, w) in [0, 1], the renormalised mean of ``units`` over U.
    unit_cams: (B, U, h, w), the unit maps before ReLU and normalisation,
      ``sum_c alpha^k_c F_c`` (``losses.attention_overlap_per_image``).
  """
  units: Array
  sum: Array
  mean: Array
  unit_cams: Array


def unit_attention(latent_fn: Callable[[Array], Any],
                   features: Array,
                   has_aux: bool = False):
  """Grad-CAM maps of every latent unit, their sum and their mean.

  Args:
    latent_fn: ``F (B, h, w, k) -> mu`` of shape (B, U) (flat latent) or
      (B, h', w', U) (convolutional latent), or ``(mu, aux)`` with
      ``has_aux``. Image b's ``mu`` must depend only on image b's features
      (true for per-image encoder heads; not for BatchNorm in training mode).
    features: F, (B, h, w, k), e.g. a model's ``encode`` output.
    has_aux: whether ``latent_fn`` also returns auxiliary outputs.

  Returns:
    ``(UnitAttention, mu)``, or ``(UnitAttention, mu, aux)`` with
    ``has_aux``.
  """

  def scores_fn(f):
    out = latent_fn(f)
    mu, aux = out if has_aux else (out, None)
    scores = attention.unit_scores(mu)
    # The last score is sum_k mu_k: its map comes from the same VJP.
    return jnp.concatenate([scores, jnp.sum(scores, 1, keepdims=True)],
                           axis=1), (mu, aux)

  cams, _, (mu, aux) = attention.class_grad_cam(
      scores_fn, features, has_aux=True, norm='none')
  maps = attention.normalize(cams)
  units = maps[:, :-1]
  result = UnitAttention(
      units=units,
      sum=maps[:, -1],
      mean=attention.unit_mean(units),
      unit_cams=cams[:, :-1])
  return (result, mu, aux) if has_aux else (result, mu)


def explain(model: Any, variables: dict[str, Any],
            images: Array) -> tuple[UnitAttention, dict[str, Array]]:
  """Explains a batch with any model that has ``encode`` and ``latent_params``.

  Works for ``cavga.CAVGAGenerator`` and ``conv_vae.ConvVAE`` (evaluation mode:
  BatchNorm uses running averages, so image b's maps depend on image b only).

  Args:
    model: a Flax module with methods ``encode(x, train) -> F`` and
      ``latent_params(F) -> (mu, logvar)``.
    variables: its variables ({'params': ...[, 'batch_stats': ...]}).
    images: (B, H, W, C) in the model's input range.

  Returns:
    ``(UnitAttention, outputs)``; outputs has 'features', 'mu', 'logvar'.
  """
  features = model.apply(variables, images, False, method='encode')
  maps, mu, logvar = unit_attention(
      lambda f: model.apply(variables, f, method='latent_params'),
      features,
      has_aux=True)
  return maps, dict(features=features, mu=mu, logvar=logvar)
