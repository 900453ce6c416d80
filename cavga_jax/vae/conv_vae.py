"""The convolutional VAE of the Liu et al. experiments (MNIST, dSprites).

Liu et al. (CVPR 2020) do not publish their layer sizes; we use the beta-VAE
architecture of Higgins et al. (2017) / Burgess et al. (2018), the standard
one for dSprites, and a three-layer version of it for 32 px MNIST:

* encoder: 4x4 stride-2 convs (padding 1) with ReLU, ``encoder_widths``
  channels, to the feature map ``F`` (B, S/2^n, S/2^n, widths[-1]) that the
  attention maps explain (64 px, widths (32, 32, 64, 64): 4 x 4 x 64);
* latent head: flatten F, dense ``hidden`` + ReLU, two dense layers to
  ``mu`` and ``logvar`` (``latent_dim`` each: 10 for dSprites, 32 for MNIST);
* decoder: dense ``hidden`` + ReLU, dense to F's shape + ReLU, 4x4 stride-2
  transposed convs back through the reversed widths to the image channels,
  returning *logits* of a Bernoulli likelihood (images in [0, 1]).

No BatchNorm: each image's ``mu`` depends on that image alone in training
too, which keeps the batched Grad-CAM exact inside the L_AD objective. The
methods ``encode``, ``latent_params`` and ``decode`` have the signatures of
``cavga.CAVGAGenerator``'s, so ``explain.explain`` serves both.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax

from cavga_jax import typed_config
from cavga_jax.data import sprites
from cavga_jax.errors import CavgaError
from cavga_jax.models import cavga
from cavga_jax.models import layers

# The datasets and anomaly maps of the VAE experiments (``vae_lib``):
ONE_CLASS_DATASETS = ('mnist', 'fashion_mnist')
# MVTec-layout folders (incl. the embedded generated textures): localization
# against the real defect masks.
FOLDER_DATASETS = ('generated', 'mvtec')
# Factor datasets (dSprites): the disentanglement metrics.
SPRITES_DATASETS = sprites.SPRITES_DATASETS
DATASETS = sprites.SPRITES_DATASETS + ONE_CLASS_DATASETS + FOLDER_DATASETS
ATTENTION_MAPS = ('mean', 'sum')

Array = jax.Array


class ConvVAE(nn.Module):
  """Beta-VAE with a convolutional encoder and a flat latent.

  Attributes:
    image_size: input height = width, a multiple of 2^len(encoder_widths).
    image_channels: channels of the input and of the reconstruction logits.
    encoder_widths: channels of the stride-2 conv layers.
    hidden: width of the dense layers around the latent.
    latent_dim: number of latent units.
    conv_impl: 'phase' or 'lax' (``layers.resolve_conv_impl``).
  """
  image_size: int = 64
  image_channels: int = 1
  encoder_widths: Sequence[int] = (32, 32, 64, 64)
  hidden: int = 256
  latent_dim: int = 10
  conv_impl: str = 'phase'

  def setup(self):
    self.convs = [
        layers.Conv(width, 4, 2, 1, impl=self.conv_impl, name=f'conv{i}')
        for i, width in enumerate(self.encoder_widths)
    ]
    self.encoder_hidden = nn.Dense(self.hidden, name='encoder_hidden')
    self.mu_head = nn.Dense(self.latent_dim, name='mu')
    self.logvar_head = nn.Dense(self.latent_dim, name='logvar')
    self.decoder_hidden = nn.Dense(self.hidden, name='decoder_hidden')
    self.to_map = nn.Dense(math.prod(self.feature_shape), name='to_map')
    widths = list(self.encoder_widths[::-1][1:]) + [self.image_channels]
    self.deconvs = [
        layers.ConvTranspose4x4(width, impl=self.conv_impl, name=f'deconv{i}')
        for i, width in enumerate(widths)
    ]

  @property
  def feature_shape(self) -> tuple[int, int, int]:
    """(h, w, k) of F."""
    h = self.image_size // 2**len(self.encoder_widths)
    return (h, h, self.encoder_widths[-1])

  def encode(self, x: Array, train: bool = False) -> Array:
    """Images (B, S, S, C) in [0, 1] -> F (B, h, w, k); ``train`` is unused."""
    del train  # No BatchNorm or dropout.
    for conv in self.convs:
      x = nn.relu(conv(x))
    return x

  def latent_params(self, features: Array) -> tuple[Array, Array]:
    """F (B, h, w, k) -> (mu, logvar), each (B, latent_dim)."""
    h = nn.relu(self.encoder_hidden(features.reshape(features.shape[0], -1)))
    return self.mu_head(h), self.logvar_head(h)

  def decode(self, z: Array, train: bool = False) -> Array:
    """z (B, latent_dim) -> reconstruction logits (B, S, S, C)."""
    del train
    x = nn.relu(self.decoder_hidden(z))
    x = nn.relu(self.to_map(x)).reshape(-1, *self.feature_shape)
    for i, deconv in enumerate(self.deconvs):
      x = deconv(x)
      if i < len(self.deconvs) - 1:
        x = nn.relu(x)
    return x

  def __call__(self,
               x: Array,
               rng: Array | None = None,
               train: bool = False) -> dict[str, Array]:
    """Full pass; samples z when ``rng`` is given, else decodes ``mu``.

    Returns 'features', 'mu', 'logvar', 'z' and 'logits' (B, S, S, C).
    """
    features = self.encode(x, train)
    mu, logvar = self.latent_params(features)
    z = mu if rng is None else cavga.reparameterize(rng, mu, logvar)
    return dict(
        features=features,
        mu=mu,
        logvar=logvar,
        z=z,
        logits=self.decode(z, train))


def check_image_size(encoder_widths: Any, image_size: int) -> None:
  """Raises CavgaError if the encoder cannot halve ``image_size`` that often."""
  widths = tuple(encoder_widths)
  if not widths or image_size % 2**len(widths):
    raise CavgaError(
        f'config.data.image_size={image_size} must be a multiple of '
        f'{2 ** len(widths)} for config.model.encoder_widths={widths}')


def build_vae(model: typed_config.VaeModelSettings,
              image_size: int,
              channels: int = 1) -> ConvVAE:
  """The ConvVAE of ``model`` (``config.model``) for (S, S, C) images.

  Raises:
    CavgaError: an image size the encoder cannot halve that often.
  """
  widths = tuple(model.encoder_widths)
  check_image_size(widths, image_size)
  return ConvVAE(
      image_size=image_size,
      image_channels=channels,
      encoder_widths=widths,
      hidden=model.hidden,
      latent_dim=model.latent_dim,
      conv_impl=layers.resolve_conv_impl(model.conv_impl))
