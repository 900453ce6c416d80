"""CAVGA's generator (docs/protocol.md section 1) and its table of variants.

`CAVGAGenerator` assembles an encoder and a decoder of `backbones` (CAVGA-E:
`efficientnet`'s encoder) with the latent heads and CAVGA_w's classifier;
`build_models` builds it and `backbones.Discriminator` from the typed model
settings (`typed_config.ModelSettings`), with the paper's widths per variant
(`PAPER_WIDTHS`). Images are NHWC in [-1, 1];
BatchNorm behaves as `backbones` says.

The generator is split in the places where CAVGA needs to reach inside it:
``encode`` gives the last encoder feature map ``F``, ``latent`` maps ``F`` to
``(mu, logvar)`` (the function Grad-CAM differentiates), ``decode`` maps a
latent sample to an image and ``classify`` gives CAVGA_w's two logits.

Both networks equal the PyTorch peer's (``../shared/peer``; the layer
decisions are in `backbones`): G 16,854,723 / D 2,765,568 parameters for
CAVGA-R at 256 px, latent 128; G 6,236,032 for CAVGA-D.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cavga_jax import typed_config
from cavga_jax.errors import CavgaError
from cavga_jax.models import backbones
from cavga_jax.models import efficientnet
from cavga_jax.models import layers

Array = jax.Array

# Class indices of CAVGA_w's classifier logits; equal to the dataset labels
# (0 normal, 1 anomalous) so logits and labels index the same way.
NORMAL = 0
ANOMALOUS = 1
SUPERVISIONS = ('unsupervised', 'weak')
# ResNet-18 or DCGAN networks (docs/protocol.md section 1), or CAVGA-E: an
# EfficientNet-Lite encoder (cavga_jax.models.efficientnet) with CAVGA-R's
# decoder.
VARIANTS = ('R', 'D', 'E')
# The encoder's total stride: F is image_size / STRIDES[variant] a side.
STRIDES = {'R': 32, 'D': 16, 'E': 32}
LATENTS = ('conv', 'flat')
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
# Encoder input normalisations (CAVGAGenerator.input_norm): 'none' feeds the
# [-1, 1] images as they are; 'imagenet' feeds what torchvision's ImageNet
# weights were trained on, (u - mean) / std with u = (x + 1) / 2 in [0, 1].
INPUT_NORMS = ('none', 'imagenet')
# CAVGAGenerator.attention_score / attention_norm (see there); the first
# entries are the paper's choices.
ATTENTION_SCORES = ('sum', 'unit_mean')
ATTENTION_NORMS = ('max', 'minmax')
NUM_ENCODER_STAGES = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CAVGAGenerator(nn.Module):
  """Encoder + latent heads + decoder (+ classifier for CAVGA_w).

  Attributes:
    variant: 'R' (ResNet-18 encoder, residual decoder), 'D' (DCGAN) or 'E'
      (EfficientNet-Lite encoder, residual decoder).
    backbone: CAVGA-E's network, a key of ``efficientnet.NETWORKS``
      (``build_models``: the one ``config.model.pretrained`` names); unused
      by 'R' and 'D'.
    image_size: input height = width (a multiple of ``STRIDES[variant]``).
    latent: 'conv' (1x1 conv heads, latent h x w x latent_channels) or 'flat'
      (dense heads on the flattened F, latent vector of latent_dim; the
      paper's ablation ``*``).
    latent_channels: channels of the convolutional latent.
    latent_dim: size of the flattened latent.
    image_channels: channels of the reconstructed image.
    encoder_widths / decoder_widths: stage widths (defaults = the paper's).
    with_classifier: adds CAVGA_w's dense layer from flattened z to 2 logits
      (normal, anomalous).
    input_norm: what the encoder sees (``INPUT_NORMS``): 'none' the [-1, 1]
      images, 'imagenet' torchvision's ImageNet normalisation of them (see
      ``normalize_input``). Only the encoder input changes; reconstructions
      and their targets stay in [-1, 1].
    attention_score, attention_stage, attention_norm: how CAVGA's Grad-CAM
      attention ``A`` is formed (``attention.forward_with_attention``; no
      parameters): the score (``ATTENTION_SCORES``: 'sum' = ``s = sum(mu)``,
      the paper; 'unit_mean' = Liu et al.'s mean of the per-unit maps), the
      encoder stage whose output it is taken at (4 = the last, ``F``; 2 =
      ResNet ``layer2``), and the per-image normalisation
      (``ATTENTION_NORMS``: 'max' = ``ReLU(cam) / max``, the paper;
      'minmax' = ``(cam - min) / (max - min)``).
    dtype: compute dtype (parameters stay float32).
    conv_impl: 'phase' (custom-VJP CPU rewrites, reverse mode only) or 'lax'
      (XLA's convolutions; forward mode too); ``build_models`` resolves
      ``config.model.conv_impl`` ('auto' = phase on CPU, lax elsewhere).
  """
  variant: str = 'R'
  backbone: str = efficientnet.DEFAULT_NETWORK
  image_size: int = 256
  latent: str = 'conv'
  latent_channels: int = 128
  latent_dim: int = 512
  image_channels: int = 3
  encoder_widths: Sequence[int] = (64, 128, 256, 512)
  decoder_widths: Sequence[int] = (512, 256, 128, 64, 32)
  with_classifier: bool = False
  input_norm: str = 'none'
  attention_score: str = 'sum'
  attention_stage: int = 4
  attention_norm: str = 'max'
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  def setup(self):
    if self.variant == 'R':
      self.encoder = backbones.ResNet18Encoder(self.encoder_widths, self.dtype,
                                               self.conv_impl)
      self.decoder = backbones.ResidualDecoder(self.decoder_widths,
                                               self.image_channels, self.dtype,
                                               self.conv_impl)
    elif self.variant == 'D':
      self.encoder = backbones.DCGANEncoder(self.encoder_widths, self.dtype,
                                            self.conv_impl)
      self.decoder = backbones.DCGANDecoder(self.decoder_widths,
                                            self.image_channels, self.dtype,
                                            self.conv_impl)
    elif self.variant == 'E':
      self.encoder = efficientnet.EfficientNetLiteEncoder(
          tuple(self.encoder_widths), self.backbone, self.dtype, self.conv_impl)
      self.decoder = backbones.ResidualDecoder(self.decoder_widths,
                                               self.image_channels, self.dtype,
                                               self.conv_impl)
    else:
      raise ValueError(f'model.variant must be one of {VARIANTS}, got '
                       f'{self.variant!r}')
    if self.latent == 'conv':
      self.mu_head = nn.Conv(self.latent_channels, (1, 1), name='mu')
      self.logvar_head = nn.Conv(self.latent_channels, (1, 1), name='logvar')
    elif self.latent == 'flat':
      self.mu_head = nn.Dense(self.latent_dim, name='mu')
      self.logvar_head = nn.Dense(self.latent_dim, name='logvar')
      self.flat_to_map = nn.Dense(
          math.prod(self.feature_shape), name='flat_to_map')
    else:
      raise ValueError(
          f"model.latent must be 'conv' or 'flat', got {self.latent!r}")
    if self.with_classifier:
      self.classifier = nn.Dense(2, name='classifier')

  def encode(self, x: Array, train: bool, stop: int | None = None) -> Array:
    """Images (B, H, W, C) in [-1, 1] -> last encoder feature map F (B, h, w, k).

    The images are normalised by ``input_norm`` first. ``stop=s`` (1..4)
    returns the output of encoder stage s instead (ResNet ``layer<s>``,
    H/2^(s+1); DCGAN ``conv<s-1>``, H/2^s; EfficientNet-Lite, H/2^(s+1),
    ``efficientnet``), which ``encode_from`` continues.
    """
    x = normalize_input(x, self.input_norm)
    return self.encoder(x.astype(self.dtype), train, stop=stop)

  def encode_from(self, features: Array, start: int, train: bool) -> Array:
    """The output of encoder stage ``start`` -> last feature map F."""
    return self.encoder(features, train, start=start)

  def encode_stages(self, x: Array, train: bool,
                    stages: Sequence[int]) -> list[Array]:
    """The outputs of encoder stages ``stages`` (increasing, 1..4), one pass.

    Stage s is what ``encode(x, train, stop=s)`` returns.
    """
    h = normalize_input(x, self.input_norm).astype(self.dtype)
    outputs, start = [], 0
    for stop in stages:
      h = self.encoder(h, train, start=start, stop=stop)
      outputs.append(h)
      start = stop
    return outputs

  def latent_params(self, features: Array) -> tuple[Array, Array]:
    """F (B, h, w, k) -> (mu, logvar), each (B, h, w, c) or (B, latent_dim).

    Each image's output depends only on that image's features, which makes
    the batched Grad-CAM of ``attention.grad_cam`` exact.
    """
    f = features.astype(jnp.float32)
    if self.latent == 'flat':
      f = f.reshape(f.shape[0], -1)
    return self.mu_head(f), self.logvar_head(f)

  @property
  def feature_shape(self) -> tuple[int, int, int]:
    """(h, w, k) of F for ``image_size`` input."""
    h = self.image_size // STRIDES[self.variant]
    return (h, h, self.encoder_widths[-1])

  def decode(self, z: Array, train: bool) -> Array:
    """Latent (B, h, w, c) or (B, latent_dim) -> image (B, H, W, image_channels).

    The flat latent's decoder starts with a dense layer back to F's shape.
    """
    if self.latent == 'flat':
      z = self.flat_to_map(z).reshape(-1, *self.feature_shape)
    return self.decoder(z.astype(self.dtype), train).astype(jnp.float32)

  def classify(self, z: Array) -> Array:
    """Latent (B, h, w, c) or (B, d) -> (B, 2) logits; CAVGA_w only.

    Column ``NORMAL`` (0) is the normal class, ``ANOMALOUS`` (1) the
    anomalous one. The dense layer sees the flattened latent, so each image's
    logits depend only on that image's latent.
    """
    return self.classifier(z.reshape(z.shape[0], -1))

  def __call__(self, x: Array, rng: Array | None,
               train: bool) -> dict[str, Array]:
    """Full pass; samples z when ``rng`` is given, else decodes ``mu``.

    Returns a dict with 'features', 'mu', 'logvar', 'z', 'reconstruction'
    (and 'logits' with the classifier).
    """
    features = self.encode(x, train)
    mu, logvar = self.latent_params(features)
    z = mu if rng is None else reparameterize(rng, mu, logvar)
    out = dict(
        features=features,
        mu=mu,
        logvar=logvar,
        z=z,
        reconstruction=self.decode(z, train))
    if self.with_classifier:
      out['logits'] = self.classify(z)
    return out


def normalize_input(x: Array, input_norm: str) -> Array:
  """The encoder input for images ``x`` (B, H, W, C) in [-1, 1], same shape.

  Args:
    x: images in [-1, 1], C = 3 or 1.
    input_norm: 'none' returns ``x``; 'imagenet' returns
      ``((x + 1) / 2 - mean) / std`` per channel with torchvision's
      ``IMAGENET_MEAN`` / ``IMAGENET_STD`` (for C = 1 their averages, 0.449
      and 0.226, matching the RGB conv1 kernel summed for grayscale by
      ``pretrained``), computed in float32.

  Raises:
    ValueError: unknown ``input_norm`` (configs are checked earlier by
      ``config_checks``).
  """
  if input_norm == 'none':
    return x
  if input_norm != 'imagenet':
    raise ValueError(f'model.input_norm must be one of {INPUT_NORMS}, got '
                     f'{input_norm!r}')
  mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
  if x.shape[-1] == 1:
    mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
  return ((x.astype(jnp.float32) + 1.0) / 2.0 - mean) / std


def reparameterize(rng: Array, mu: Array, logvar: Array) -> Array:
  """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I); any shape."""
  return mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape, mu.dtype)


def _check_choice(field: str, value, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise CavgaError(f'config.{field}={value!r} must be one of '
                     f'{", ".join(repr(c) for c in choices)}')


def resolved_widths(model: typed_config.ModelSettings,
                    image_size: int) -> tuple[str, dict[str, tuple[int, ...]]]:
  """(encoder backbone, widths) of ``model``, checked by arithmetic alone.

  Empty width tuples select the paper's widths for the variant
  (``PAPER_WIDTHS``). CAVGA-E's encoder is the EfficientNet-Lite network
  whose ImageNet weights ``model.pretrained`` names (Lite0 for none;
  ``efficientnet.network_for``), its widths that network's. Builds no
  network: ``config_checks`` calls it to check a config.

  Raises:
    CavgaError: an unknown variant or supervision, widths of the wrong
      length (or, for 'E', other than the network's), or an image size the
      variant's stride does not divide.
  """
  variant = model.variant
  _check_choice('model.variant', variant, VARIANTS)
  backbone = efficientnet.network_for(model.pretrained)
  paper_widths = dict(PAPER_WIDTHS[variant])
  if variant == 'E':
    paper_widths['encoder_widths'] = efficientnet.stage_widths(backbone)
  widths = {
      name: tuple(getattr(model, name) or default)
      for name, default in paper_widths.items()
  }
  expected = dict(
      encoder_widths=4,
      decoder_widths=len(PAPER_WIDTHS[variant]['decoder_widths']),
      discriminator_widths=4)
  for name, length in expected.items():
    if len(widths[name]) != length:
      raise CavgaError(
          f'config.model.{name}={widths[name]} needs {length} entries for '
          f'CAVGA-{variant} (or () for the paper\'s {paper_widths[name]})')
  if (variant == 'E'
      and widths['encoder_widths'] != paper_widths['encoder_widths']):
    raise CavgaError(
        f'config.model.encoder_widths={widths["encoder_widths"]}: CAVGA-E\'s '
        f'{efficientnet.NETWORKS[backbone].title} stages are '
        f'{paper_widths["encoder_widths"]}; use ()')
  _check_choice('model.supervision', model.supervision, SUPERVISIONS)
  stride = STRIDES[variant]
  if image_size % stride:
    raise CavgaError(f'config.data.image_size={image_size} must be a '
                     f'multiple of {stride} for CAVGA-{variant}')
  return backbone, widths


def build_models(
    model: typed_config.ModelSettings,
    image_size: int,
    channels: int = 3) -> tuple[CAVGAGenerator, backbones.Discriminator]:
  """Generator and discriminator of ``model`` for (S, S, C) images.

  ``model.supervision == 'weak'`` adds the CAVGA_w classifier to the
  generator; the widths are ``resolved_widths``'s. From a run config:
  ``run_setup.build_models(config)`` (``cavga_jax.build_models``).

  Raises:
    CavgaError: as ``resolved_widths``.
  """
  backbone, widths = resolved_widths(model, image_size)
  dtype = jnp.dtype(model.compute_dtype)
  conv_impl = layers.resolve_conv_impl(model.conv_impl)
  generator = CAVGAGenerator(
      variant=model.variant,
      backbone=backbone,
      image_size=image_size,
      latent=model.latent,
      latent_channels=model.latent_channels,
      latent_dim=model.latent_dim,
      image_channels=channels,
      encoder_widths=widths['encoder_widths'],
      decoder_widths=widths['decoder_widths'],
      with_classifier=model.supervision == 'weak',
      input_norm=model.input_norm,
      attention_score=model.attention_score,
      attention_stage=model.attention_stage,
      attention_norm=model.attention_norm,
      dtype=dtype,
      conv_impl=conv_impl)
  discriminator = backbones.Discriminator(widths['discriminator_widths'], dtype,
                                          conv_impl)
  return generator, discriminator


# The paper's layer widths (docs/protocol.md section 1).
PAPER_WIDTHS = {
    'R':
        dict(
            encoder_widths=(64, 128, 256, 512),
            decoder_widths=(512, 256, 128, 64, 32),
            discriminator_widths=(64, 128, 256, 512)),
    'D':
        dict(
            encoder_widths=(64, 128, 256, 512),
            decoder_widths=(512, 256, 128, 64),
            discriminator_widths=(64, 128, 256, 512)),
    # Not the paper's: CAVGA-R's decoder and discriminator; the encoder's
    # widths are the EfficientNet-Lite network's stage outputs (fixed by its
    # weights): Lite0's here, the network's of model.pretrained in
    # build_models.
    'E':
        dict(
            encoder_widths=efficientnet.stage_widths(
                efficientnet.DEFAULT_NETWORK),
            decoder_widths=(512, 256, 128, 64, 32),
            discriminator_widths=(64, 128, 256, 512)),
}
