"""Convolutions with PyTorch semantics, with a fast-gradient path for the CPU.

XLA:CPU has no fast kernel for *input-dilated* convolutions, which are what
the input gradient of a strided conv and both gradients of a transposed conv
lower to (5-20x slower than the forward pass in our measurements, see
docs/benchmarks.md). The 'phase' implementation rewrites those as stride-1
convolutions over the four output phases plus a depth-to-space shuffle
(custom VJPs, so reverse mode only: ``jax.jvp`` / ``jax.jacfwd`` fail on
it). The 'lax' implementation is XLA's own convolutions (what GPUs and TPUs
have fast kernels for; forward and reverse mode). Both take the same
parameters (HWIO kernels, PyTorch's weights transposed) and agree to float
rounding. ``resolve_conv_impl('auto')`` picks 'phase' on the CPU and 'lax'
elsewhere (``config.model.conv_impl``). Programs of 'phase' models are
compiled with ``compiler_options``: XLA:CPU's own convolutions instead of
YNNPACK's.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_DIMS = ('NHWC', 'HWIO', 'NHWC')
CONV_IMPLS = ('auto', 'phase', 'lax')
# XLA:CPU hands convolutions, dots and reductions to YNNPACK by default
# (jaxlib 0.10); with XLA's own (Eigen) convolutions our train and eval steps
# run 1.3-1.7x faster (docs/benchmarks.md), so 'phase' programs keep
# YNNPACK for dots and reductions only.
_EIGEN_CONVOLUTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'
}

# PyTorch's BatchNorm2d defaults (momentum 0.1, i.e. Flax momentum=0.9,
# epsilon 1e-5), so converted torchvision and timm weights behave identically.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
  """'auto' -> 'phase' on the CPU, 'lax' on GPU/TPU; others unchanged.

  Raises:
    ValueError: ``impl`` not in ``CONV_IMPLS``.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  return 'phase' if (backend or jax.default_backend()) == 'cpu' else 'lax'


@functools.cache
def compiler_options(impl: str,
                     backend: str | None = None) -> dict[str, str] | None:
  """``jax.jit``'s ``compiler_options`` for programs built with ``impl``.

  For 'phase' on the CPU: XLA's own (Eigen) convolutions instead of
  YNNPACK's, where this jaxlib has that option (checked once by compiling
  a trivial program); otherwise None (XLA's defaults). Programs and tests
  that run the models on the CPU pass it to ``jax.jit``; results agree to
  float rounding either way.

  Args:
    impl: a ``CONV_IMPLS`` value ('auto' is resolved for ``backend``).
    backend: the platform the program runs on (default: JAX's default).
  """
  if resolve_conv_impl(impl, backend) != 'phase' or (
      (backend or jax.default_backend()) != 'cpu'):
    return None
  probe = jax.jit(lambda x: x, compiler_options=_EIGEN_CONVOLUTIONS)
  try:
    probe.lower(jax.ShapeDtypeStruct((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError:  # an XLA without YNNPACK or the option
    return None
  return dict(_EIGEN_CONVOLUTIONS)


def _conv(x: Array, kernel: Array, strides: int, padding: int) -> Array:
  """XLA's ``conv2d(x, kernel, stride, padding)`` in NHWC/HWIO."""
  return jax.lax.conv_general_dilated(
      x,
      kernel, (strides, strides), ((padding, padding),) * 2,
      dimension_numbers=_DIMS)


def lax_conv_transpose(y: Array, kernel: Array, strides: int, padding: int,
                       out_size: tuple[int, int]) -> Array:
  """``conv_transpose_stride2``'s adjoint by XLA's own transposition.

  Args as ``conv_transpose_stride2`` (kernel (k, k, C, F) of the forward
  conv); any ``strides``.
  """
  x = jnp.zeros((y.shape[0], *out_size, kernel.shape[2]), y.dtype)
  (result,) = jax.linear_transpose(lambda t: _conv(t, kernel, strides, padding),
                                   x)(
                                       y)
  return result


def _depth_to_space(y: Array, features: int) -> Array:
  """(B, H, W, 4F) with channels (row phase, col phase, F) -> (B, 2H, 2W, F)."""
  b, h, w, _ = y.shape
  y = y.reshape(b, h, w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, features)


def _phase_kernels(kernel: Array) -> Array:
  """Stride-2 transposed-conv phases of a (k, k, F, C) kernel.

  Phase r of output row 2q + r collects ``kernel[2j + r]`` applied to input
  row ``q - j``, i.e. a correlation with the flipped sub-kernel
  ``kernel[r::2][::-1]``. Sub-kernels are zero-padded to ceil(k/2) taps.
  Returns (L, L, F, 4C), output channel = (row phase, col phase, C).
  """
  k = kernel.shape[0]
  taps = (k + 1) // 2
  phases = []
  for r in range(2):
    for s in range(2):
      sub = kernel[r::2, s::2]
      sub = jnp.pad(sub, ((0, taps - sub.shape[0]), (0, taps - sub.shape[1]),
                          (0, 0), (0, 0)))
      phases.append(sub[::-1, ::-1])
  return jnp.stack(
      phases, axis=-2).reshape(taps, taps, kernel.shape[2], 4 * kernel.shape[3])


def conv_transpose_stride2(y: Array, kernel: Array, padding: int,
                           out_size: tuple[int, int]) -> Array:
  """Adjoint of ``conv(x, kernel, stride 2, padding)`` applied to ``y``.

  Args:
    y: (B, Ho, Wo, F).
    kernel: (k, k, C, F), the forward conv's HWIO kernel.
    padding: the forward conv's symmetric padding.
    out_size: (H, W) of the forward conv's input.

  Returns:
    (B, H, W, C): ``x`` with ``<conv(x), y> = <x, result>`` for all ``x``.
  """
  k = kernel.shape[0]
  taps = (k + 1) // 2
  h, w = out_size
  # Input position i + padding = 2q + r; q runs over ceil((H + p) / 2) rows.
  qh, qw = -(-(h + padding) // 2), -(-(w + padding) // 2)
  pad = lambda n, q: (taps - 1, max(q - n, 0))
  y = jnp.pad(y, ((0, 0), pad(y.shape[1], qh), pad(y.shape[2], qw), (0, 0)))
  phase_kernels = _phase_kernels(jnp.swapaxes(kernel, 2, 3)).astype(y.dtype)
  phases = _conv(y, phase_kernels, 1, 0)[:, :qh, :qw]
  full = _depth_to_space(phases, kernel.shape[2])
  return full[:, padding:padding + h, padding:padding + w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_stride2(x: Array, kernel: Array, padding: int) -> Array:
  """PyTorch ``conv2d(x, kernel, stride=2, padding)`` in NHWC/HWIO."""
  return jax.lax.conv_general_dilated(
      x, kernel, (2, 2), ((padding, padding),) * 2, dimension_numbers=_DIMS)


def _conv_stride2_fwd(x, kernel, padding):
  return conv_stride2(x, kernel, padding), (x, kernel)


def _conv_stride2_bwd(padding, residuals, g):
  x, kernel = residuals
  # The kernel gradient of a strided conv is a fast (non-dilated) conv.
  _, kernel_vjp = jax.vjp(
      lambda k: jax.lax.conv_general_dilated(
          x, k, (2, 2), ((padding, padding),) * 2, dimension_numbers=_DIMS),
      kernel)
  dx = conv_transpose_stride2(g, kernel, padding, x.shape[1:3])
  return dx.astype(x.dtype), kernel_vjp(g)[0]


conv_stride2.defvjp(_conv_stride2_fwd, _conv_stride2_bwd)


class Conv(nn.Module):
  """PyTorch-style ``Conv2d`` (square kernel, symmetric padding, stride 1 or 2).

  Parameters are named like ``flax.linen.Conv`` ('kernel' HWIO, 'bias').
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Any = jnp.float32
  impl: str = 'phase'  # 'phase' | 'lax' (resolve_conv_impl)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.strides not in (1, 2):
      raise ValueError(f'strides must be 1 or 2, got {self.strides}')
    if self.strides == 2 and self.impl == 'phase':
      y = conv_stride2(x, kernel, self.padding)
    else:
      y = _conv(x, kernel, self.strides, self.padding)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,),
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class ConvTranspose4x4(nn.Module):
  """PyTorch ``ConvTranspose2d(k=4, stride=2, padding=1, bias=False)``.

  (B, H, W, C) -> (B, 2H, 2W, F). The parameter 'kernel' is (4, 4, C, F):
  PyTorch's ``weight`` (C, F, 4, 4) transposed to (2, 3, 0, 1). The layer is
  the adjoint of a stride-2 conv with that kernel seen as (4, 4, F, C).
  """
  features: int
  dtype: Any = jnp.float32
  impl: str = 'phase'  # 'phase' | 'lax' (resolve_conv_impl)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (4, 4, x.shape[-1], self.features), jnp.float32)
    h, w = x.shape[1:3]
    adjoint = (
        conv_transpose_stride2 if self.impl == 'phase' else functools.partial(
            lax_conv_transpose, strides=2))
    return adjoint(
        x.astype(self.dtype),
        jnp.swapaxes(kernel, 2, 3).astype(self.dtype),
        padding=1,
        out_size=(2 * h, 2 * w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2x2(x: Array, kernel: Array, padding: int) -> Array:
  """2x2 conv, padding 0 or 1: (B, H, W, C) x (2, 2, C, F) -> (B, H', W', F).

  Its kernel gradient is one conv in the form XLA:CPU hands to Eigen as is
  (``_conv2x2_bwd``): XLA's own kernel gradient of this conv runs at Eigen
  speed alone but took the R train step from 2.3 to 35 s per step
  (docs/benchmarks.md). The input gradient is the correlation of the output
  gradient with the flipped kernel, padded ``1 - padding``.
  """
  return _conv(x, kernel, 1, padding)


def _conv2x2_fwd(x, kernel, padding):
  return _conv(x, kernel, 1, padding), (x, kernel)


def _conv2x2_bwd(padding, residuals, g):
  x, kernel = residuals
  dx = _conv(g, jnp.swapaxes(kernel[::-1, ::-1], 2, 3), 1, 1 - padding)
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  # dk[i, j, c, f] = sum_{b, h, w} xp[b, h + i, w + j, c] g[b, h, w, f]: a
  # conv of xp with g as the kernel, x's channels as its batch and the
  # images as its input features, in the NHWC/HWIO form XLA:CPU's Eigen
  # convolution takes as is.
  dk = _conv(
      jnp.transpose(xp, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), 1, 0)
  return dx, jnp.transpose(dk, (1, 2, 0, 3)).astype(kernel.dtype)


_conv2x2.defvjp(_conv2x2_fwd, _conv2x2_bwd)


def _merge_taps(kernel: Array, phase: int, axis: int) -> Array:
  """The 2 taps that output ``phase`` of a 3-tap ``axis`` sees after x2 nearest up-sampling."""
  k0, k1, k2 = (jnp.take(kernel, i, axis) for i in range(3))
  return jnp.stack([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], axis)


def upsample_conv3x3(x: Array, kernel: Array) -> Array:
  """``conv3x3(nearest_upsample_x2(x))`` (padding 1) computed at input resolution.

  Output pixel (2i + a, 2j + b) sees input rows i - 1 + a + {0, 1} only (the
  upsampled rows repeat), so output phase a of the 3 kernel rows is a 2-tap
  kernel: a = 0 -> [k0, k1 + k2], a = 1 -> [k0 + k1, k2] (the same for
  columns). All four phases are one 2x2 conv over the once-padded input with
  4x the output channels, then a depth-to-space shuffle: 16 instead of 36
  multiply-adds per input pixel and channel pair, and the gradients shrink
  the same way. Equal to the direct form up to float rounding.

  Args:
    x: (B, H, W, C).
    kernel: (3, 3, C, F) HWIO.

  Returns:
    (B, 2H, 2W, F).
  """
  phases = [
      _merge_taps(_merge_taps(kernel, a, 0), b, 1)
      for a in range(2)
      for b in range(2)
  ]
  features = kernel.shape[-1]
  stacked = jnp.stack(
      phases, axis=-2).reshape(2, 2, kernel.shape[2], 4 * features)
  y = _conv2x2(x, stacked, 1)
  h, w = x.shape[1:3]
  # Phase (a, b) reads the window starting at (a, b) of the (H+1, W+1) output.
  y = y.reshape(*y.shape[:3], 4, features)
  y = jnp.concatenate(
      [y[:, a:a + h, b:b + w, 2 * a + b] for a in range(2) for b in range(2)],
      axis=-1)
  return _depth_to_space(y, features)


class UpsampleConv3x3(nn.Module):
  """Nearest x2 upsampling then a 3x3 conv (padding 1, bias), fused ('phase').

  Parameters are exactly ``Conv(features, 3, padding=1)``'s ('kernel' HWIO,
  'bias'), so checkpoints and converted weights do not change; the 'phase'
  compute is ``upsample_conv3x3``'s, the 'lax' one the direct form.
  """
  features: int
  dtype: Any = jnp.float32
  impl: str = 'phase'  # 'phase' | 'lax' (resolve_conv_impl)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,),
                      jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.impl == 'phase':
      y = upsample_conv3x3(x, kernel)
    else:
      up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      y = _conv(up, kernel, 1, 1)
    return y + bias.astype(self.dtype)
