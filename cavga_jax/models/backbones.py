"""The convolutional networks CAVGA is assembled from.

ResNet-18 and DCGAN encoders, residual (BigGAN) and DCGAN decoders, and the
DCGAN discriminator (docs/protocol.md section 1); `models.CAVGAGenerator` puts an encoder and a decoder
together (CAVGA-E's encoder is `efficientnet`'s).

All modules are Flax linen modules on NHWC images in [-1, 1]. BatchNorm
statistics live in the ``batch_stats`` collection; ``train=True`` normalises
with batch statistics and updates the running averages (pass
``mutable=['batch_stats']``), ``train=False`` uses the running averages.
BatchNorm uses PyTorch's defaults (momentum 0.1, i.e. Flax ``momentum=0.9``,
``epsilon=1e-5``) so converted torchvision weights behave identically.

Decisions shared with the PyTorch peer (``../shared/peer``), which make both
the same network (G 16,854,723 / D 2,765,568 parameters for CAVGA-R at 256 px,
latent 128; G 6,236,032 for CAVGA-D):
* CAVGA-R decoder: five BigGAN up-blocks (nearest x2) with output widths
  ``decoder_widths`` (512-256-128-64-32) starting from ``z``, then
  BN-ReLU-conv3x3 to the image channels and tanh.
* CAVGA-D encoder: the DCGAN discriminator trunk (H/16); its decoder starts
  with a stride-1 3x3 transposed conv from the latent to 512 channels, then the
  four stride-2 DCGAN layers and tanh.
* Discriminator: DCGAN trunk plus a 4x4 valid conv head (kernel shrunk to the
  feature size when that is smaller, e.g. 2x2 at 32 px); the patch logits are
  averaged by the loss.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cavga_jax.models import layers

Array = jax.Array


class BasicBlock(nn.Module):
  """ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(
        layers.Conv,
        self.features,
        use_bias=False,
        dtype=self.dtype,
        impl=self.conv_impl)
    norm = functools.partial(
        layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
    y = conv(3, self.strides, 1, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(3, 1, 1, name='conv2')(y)
    y = norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(1, self.strides, 0, name='downsample_conv')(x)
      x = norm(name='downsample_bn')(x)
    return nn.relu(x + y)


class ResNet18Encoder(nn.Module):
  """ResNet-18 without avgpool/fc: (B, H, W, C) -> F (B, H/32, W/32, 512).

  Padding is explicit (PyTorch style) so torchvision ImageNet weights
  (``scripts/convert_torchvision_resnet18.py``) give the same features.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self,
               x: Array,
               train: bool,
               start: int = 0,
               stop: int | None = None) -> Array:
    """Runs stages ``start`` .. ``stop - 1`` (stage 0 includes the stem).

    ``stop=s`` returns the output of ``layer<s>`` (H/2^(s+1)); ``start=s``
    continues from it. The defaults run the whole encoder.
    """
    stop = len(self.widths) if stop is None else stop
    if start == 0:
      x = layers.Conv(
          self.widths[0],
          7,
          2,
          3,
          use_bias=False,
          dtype=self.dtype,
          impl=self.conv_impl,
          name='conv1')(
              x)
      x = layers.BatchNorm(
          use_running_average=not train, dtype=self.dtype, name='bn1')(
              x)
      x = nn.relu(x)
      x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, width in enumerate(self.widths):
      if not start <= stage < stop:
        continue
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(
            width,
            strides,
            self.dtype,
            self.conv_impl,
            name=f'layer{stage + 1}_{block}')(x, train)
    return x


class DCGANEncoder(nn.Module):
  """DCGAN discriminator trunk: (B, H, W, C) -> F (B, H/16, W/16, widths[-1]).

  4x4 stride-2 convs (padding 1, no bias), BatchNorm on all but the first,
  LeakyReLU 0.2.
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self,
               x: Array,
               train: bool,
               start: int = 0,
               stop: int | None = None) -> Array:
    """Runs stages ``start`` .. ``stop - 1``; stage i is ``conv<i>`` (H/2^(i+1))."""
    stop = len(self.widths) if stop is None else stop
    for i, width in enumerate(self.widths):
      if not start <= i < stop:
        continue
      x = layers.Conv(
          width,
          4,
          2,
          1,
          use_bias=False,
          dtype=self.dtype,
          impl=self.conv_impl,
          name=f'conv{i}')(
              x)
      if i > 0:
        x = layers.BatchNorm(
            use_running_average=not train, dtype=self.dtype, name=f'bn{i}')(
                x)
      x = nn.leaky_relu(x, 0.2)
    return x


class UpBlock(nn.Module):
  """BigGAN-style residual up-block (x2 spatial).

  BN-ReLU-upsample-conv3x3-BN-ReLU-conv3x3, plus a 1x1 conv shortcut on the
  upsampled input.
  """
  features: int
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    norm = functools.partial(
        layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
    conv = functools.partial(
        layers.Conv, self.features, dtype=self.dtype, impl=self.conv_impl)
    up = lambda t: jnp.repeat(jnp.repeat(t, 2, axis=1), 2, axis=2)  # nearest
    # conv3x3(up(.)) and conv1x1(up(.)) run at the input resolution (same
    # parameters and values, 2.25x and 4x fewer FLOPs; layers.py).
    y = layers.UpsampleConv3x3(
        self.features, self.dtype, self.conv_impl, name='conv1')(
            nn.relu(norm(name='bn1')(x)))
    y = nn.relu(norm(name='bn2')(y))
    y = conv(3, padding=1, name='conv2')(y)
    return y + up(conv(1, name='shortcut')(x))


class ResidualDecoder(nn.Module):
  """CAVGA-R decoder: z (B, h, w, c) -> image (B, h*2^n, w*2^n, channels), tanh."""
  widths: Sequence[int] = (512, 256, 128, 64, 32)
  out_channels: int = 3
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, z: Array, train: bool) -> Array:
    x = z
    for i, width in enumerate(self.widths):
      x = UpBlock(width, self.dtype, self.conv_impl, name=f'block{i}')(x, train)
    x = layers.BatchNorm(
        use_running_average=not train, dtype=self.dtype, name='bn_out')(
            x)
    x = layers.Conv(
        self.out_channels,
        3,
        padding=1,
        dtype=self.dtype,
        impl=self.conv_impl,
        name='conv_out')(
            nn.relu(x))
    return jnp.tanh(x)


class DCGANDecoder(nn.Module):
  """CAVGA-D decoder: z (B, h, w, c) -> image (B, 16h, 16w, channels), tanh.

  A stride-1 3x3 transposed conv to ``widths[0]`` keeps the spatial size, then
  4x4 stride-2 transposed convs (PyTorch padding 1) with BN and ReLU through
  ``widths[1:]`` and a last one to the image channels.
  """
  widths: Sequence[int] = (512, 256, 128, 64)
  out_channels: int = 3
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, z: Array, train: bool) -> Array:
    # A stride-1 transposed conv with padding 1 is a 3x3 conv (flipped
    # kernel, which only matters when loading PyTorch weights).
    x = layers.Conv(
        self.widths[0],
        3,
        padding=1,
        use_bias=False,
        dtype=self.dtype,
        impl=self.conv_impl,
        name='convt0')(
            z)
    x = nn.relu(
        layers.BatchNorm(
            use_running_average=not train, dtype=self.dtype, name='bn0')(x))
    for i, width in enumerate(list(self.widths[1:]) + [self.out_channels]):
      x = layers.ConvTranspose4x4(
          width, self.dtype, self.conv_impl, name=f'convt{i + 1}')(
              x)
      if i < len(self.widths) - 1:
        x = nn.relu(
            layers.BatchNorm(
                use_running_average=not train,
                dtype=self.dtype,
                name=f'bn{i + 1}')(x))
    return jnp.tanh(x)


class Discriminator(nn.Module):
  """DCGAN discriminator: (B, H, W, C) -> patch logits (B, h', w').

  The head is DCGAN's 4x4 valid conv; on feature maps smaller than 4x4 its
  kernel shrinks to the feature size (2x2 at 32 px input).
  """
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    f = DCGANEncoder(
        self.widths, self.dtype, self.conv_impl, name='trunk')(x, train)
    k = min(4, f.shape[1], f.shape[2])
    logits = layers.Conv(
        1,
        k,
        use_bias=False,
        dtype=self.dtype,
        impl=self.conv_impl,
        name='head')(
            f)
    return logits[..., 0].astype(jnp.float32)
