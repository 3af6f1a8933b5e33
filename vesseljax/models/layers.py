"""Convolution layers in a fast CPU form and a reference form.

Every layer here exists twice, chosen by a module attribute
`impl: 'fast' | 'reference'`:

- 'fast': forms measured to be fast on XLA:CPU (`shared/PERF_NOTES.md`):
  a depthwise 3x3 conv as nine shifted multiply-adds with a custom VJP whose
  kernel gradient is accumulated over cache-sized blocks of rows; a 1x1 conv
  as a matmul over the channel axis; an exact 2x bilinear upsampling made of
  slices and concatenations, with a hand-written transpose as its gradient;
  a full 3x3 conv (the stem) as nine shifted copies concatenated on the
  channel axis and one matmul (im2col).
- 'reference': the textbook forms, `lax.conv_general_dilated` (with
  `feature_group_count=C` for the depthwise conv) and `jax.image.resize`;
  these are also the faster forms on a GPU.

Both forms use `max_pool2x2`, a 2x2 max-pool whose gradient routes through an
argmax recorded in the forward pass (robust and fast on CPU).

Both forms compute the same function (tests/test_layers.py checks values and
gradients) and the modules declare identical parameter trees, so parameters
trained with one form run unchanged in the other.

Parameter layouts (`param_dtype`, float32 by default):
  DepthwiseConv3x3: kernel (3, 3, C).
  Pointwise:        kernel (C_in, C_out), bias (C_out,)   (as `nn.Dense`).
  Conv3x3:          kernel (3, 3, C_in, C_out), bias (C_out,)   (as `nn.Conv`).

Arrays are NHWC: x (B, H, W, C). All convolutions use SAME zero padding and
stride 1, and are cross-correlations, as `lax.conv_general_dilated`.
"""

import math
from typing import Any, Literal

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Impl = Literal['fast', 'reference']

IMPLS = ('fast', 'reference')

# Fan-in scaling for a depthwise kernel (3, 3, C): fan_in = 9, as `nn.Conv`'s
# lecun_normal on the grouped kernel (3, 3, 1, C).
depthwise_kernel_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal', in_axis=(0, 1), out_axis=2)


def check_impl(impl: str) -> None:
  """Raises ValueError unless impl is 'fast' or 'reference'."""
  if impl not in IMPLS:
    raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')


# --------------------------------------------------------------------------
# Depthwise 3x3 convolution.


def _shifted_conv(x: Array, kernel: Array) -> Array:
  """Depthwise 3x3 SAME cross-correlation as nine shifted multiply-adds.

  Args:
    x: (B, H, W, C).
    kernel: (3, 3, C).

  Returns:
    (B, H, W, C), out[b, y, x, c] = sum_ij xpad[b, y+i, x+j, c] kernel[i, j, c].
  """
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = xp[:, 0:h, 0:w, :] * kernel[0, 0]
  for i in range(3):
    for j in range(3):
      if i or j:
        out = out + xp[:, i:i + h, j:j + w, :] * kernel[i, j]
  return out


def _kernel_grad_block(xp: Array, g: Array) -> Array:
  """Kernel gradient of one block of rows, summed over all axes but the last.

  Args:
    xp: (..., h+2, w+2, C) zero-padded input rows (with a one-pixel halo).
    g: (..., h, w, C) output cotangent.

  Returns:
    (3, 3, C) in float32 (or wider).
  """
  h, w = g.shape[-3:-1]
  axes = tuple(range(g.ndim - 1))
  acc = jnp.promote_types(g.dtype, jnp.float32)
  return jnp.stack([
      jnp.stack([
          jnp.sum(xp[..., i:i + h, j:j + w, :] * g, axis=axes, dtype=acc)
          for j in range(3)])
      for i in range(3)])


# Rows per block of the kernel gradient: blocks of about this many bytes of
# the cotangent stay in cache while the nine reductions read them.
_KERNEL_GRAD_BLOCK_BYTES = 512 * 1024


def _rows_per_block(h: int, w: int, c: int, itemsize: int) -> int:
  """The largest divisor of h with rows * w * c * itemsize <= the block size."""
  limit = max(1, _KERNEL_GRAD_BLOCK_BYTES // (w * c * itemsize))
  return max(d for d in range(1, min(h, limit) + 1) if h % d == 0)


def _shifted_kernel_grad(x: Array, g: Array) -> Array:
  """d(sum(g * conv(x, k)))/dk, accumulated one block of rows at a time.

  Nine reductions over the whole batch re-read both tensors from memory nine
  times (memory-bound). Instead a `lax.scan` walks over blocks of rows of one
  image (about 512 KiB of cotangent each, plus a one-pixel halo sliced from
  the padded input) and accumulates a (3, 3, C) carry, so each block is read
  from cache nine times. A tensor that fits in one block is reduced directly
  (no loop). Measured on the 2-core CPU (busy, load ~3), kernel
  gradient of a (16, 128, 128, 32) tensor: nine whole-batch reductions
  172 ms, per image 76-91 ms, blocks of 8-32 rows 62-69 ms; of a
  (4, 512, 512, 32) tensor: per image 595 ms, blocks of 8 rows 261 ms.

  Args:
    x: (B, H, W, C) forward input.
    g: (B, H, W, C) output cotangent.

  Returns:
    (3, 3, C) in float32 (or wider), to be cast to the kernel's dtype.
  """
  b, h, w, c = x.shape
  itemsize = jnp.dtype(g.dtype).itemsize
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  if b * h * w * c * itemsize <= _KERNEL_GRAD_BLOCK_BYTES:
    # The whole batch fits in one block: no loop (also compiles faster).
    return _kernel_grad_block(xp, g)
  rows = _rows_per_block(h, w, c, itemsize)
  n_blocks = h // rows
  g_blocks = g.reshape(b * n_blocks, rows, w, c)  # Free: rows are contiguous.
  acc = jnp.promote_types(g.dtype, jnp.float32)

  def body(carry, xs):
    k, g_k = xs
    x_k = lax.dynamic_slice(
        xp, (k // n_blocks, (k % n_blocks) * rows, 0, 0),
        (1, rows + 2, w + 2, c))[0]
    return carry + _kernel_grad_block(x_k, g_k), None

  init = jnp.zeros((3, 3, c), acc)
  dk, _ = lax.scan(body, init, (jnp.arange(b * n_blocks), g_blocks))
  return dk


@jax.custom_vjp
def depthwise_conv3x3_shifted(x: Array, kernel: Array) -> Array:
  """Depthwise 3x3 conv, SAME zero padding, as nine shifted multiply-adds.

  Same function as `depthwise_conv3x3_reference`; ~10x faster on XLA:CPU.
  The custom VJP computes the input gradient as the same shifted conv with the
  flipped kernel and the kernel gradient over cache-sized blocks of rows
  (`_shifted_kernel_grad`); an LU-Net+RA training step (16 x 128 x 128, busy
  2-core CPU) took 7.3 s with it and 12.1 s with autodiff's gradient.
  Reverse mode only (custom_vjp: no jvp).

  Args:
    x: (B, H, W, C).
    kernel: (3, 3, C), same dtype as x.

  Returns:
    (B, H, W, C).
  """
  return _shifted_conv(x, kernel)


def _dw_fwd(x, kernel):
  return _shifted_conv(x, kernel), (x, kernel)


def _dw_bwd(res, g):
  x, kernel = res
  dx = _shifted_conv(g, kernel[::-1, ::-1, :]).astype(x.dtype)
  dk = _shifted_kernel_grad(x, g).astype(kernel.dtype)
  return dx, dk


depthwise_conv3x3_shifted.defvjp(_dw_fwd, _dw_bwd)


def depthwise_conv3x3_reference(x: Array, kernel: Array) -> Array:
  """Depthwise 3x3 conv via `lax.conv_general_dilated(feature_group_count=C)`.

  Args:
    x: (B, H, W, C).
    kernel: (3, 3, C).

  Returns:
    (B, H, W, C).
  """
  c = x.shape[-1]
  return lax.conv_general_dilated(
      x, kernel[:, :, None, :], window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


def depthwise_conv3x3(x: Array, kernel: Array, impl: Impl = 'fast') -> Array:
  """Depthwise 3x3 conv in the form `impl`: x (B,H,W,C), kernel (3,3,C)."""
  check_impl(impl)
  if impl == 'fast':
    return depthwise_conv3x3_shifted(x, kernel)
  return depthwise_conv3x3_reference(x, kernel)


# --------------------------------------------------------------------------
# Pointwise (1x1) convolution.


# Rows per block of the pointwise kernel gradient (see `_pointwise_bwd`).
_DENSE_GRAD_BLOCK_ROWS = 4096


def _channel_matmul(x: Array, kernel: Array) -> Array:
  """(..., C_in) @ (C_in, C_out) -> (..., C_out)."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _pointwise_matmul(x: Array, kernel: Array) -> Array:
  """`_channel_matmul` with a blocked kernel gradient (`_pointwise_bwd`)."""
  return _channel_matmul(x, kernel)


def _pointwise_fwd(x, kernel):
  return _channel_matmul(x, kernel), (x, kernel)


def _pointwise_bwd(res, g):
  """dx = g kernel^T; dkernel = x^T g as a batch of (rows x C) blocks.

  Inside a training step XLA computed x^T g by writing g transposed, fused
  into g's producer (BatchNorm's backward): ~120 ms per (16, 128, 128, 32)
  layer, 1.7 s of a 6.5 s LU-Net+RA step (profiled). A batched matmul over
  blocks of rows needs no transpose of the whole tensor: the step (16 x
  128 x 128, busy 2-core CPU) went from 6.6 s to 4.6 s.
  """
  x, kernel = res
  c_in, c_out = kernel.shape
  dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
  n = math.prod(x.shape[:-1])
  rows = max(d for d in range(1, min(n, _DENSE_GRAD_BLOCK_ROWS) + 1)
             if n % d == 0)
  acc = jnp.promote_types(g.dtype, jnp.float32)
  dk = lax.dot_general(
      x.reshape(n // rows, rows, c_in), g.reshape(n // rows, rows, c_out),
      (((1,), (1,)), ((0,), (0,))), preferred_element_type=acc).sum(0)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_pointwise_matmul.defvjp(_pointwise_fwd, _pointwise_bwd)


def pointwise_dense(x: Array, kernel: Array,
                    bias: Array | None = None) -> Array:
  """1x1 conv as a matmul over the channel axis (as `nn.Dense`).

  Its kernel gradient is computed block by block (`_pointwise_bwd`).

  Args:
    x: (B, H, W, C_in).
    kernel: (C_in, C_out).
    bias: (C_out,) or None.

  Returns:
    (B, H, W, C_out).
  """
  y = _pointwise_matmul(x, kernel)
  if bias is not None:
    y = y + bias
  return y


def pointwise_reference(x: Array, kernel: Array,
                        bias: Array | None = None) -> Array:
  """1x1 conv via `lax.conv_general_dilated`, as a 1x1 `nn.Conv` computes it.

  The same (C_in, C_out) kernel as `pointwise_dense`; `nn.Conv`'s kernel is
  `kernel[None, None]` (1, 1, C_in, C_out).

  Args:
    x: (B, H, W, C_in).
    kernel: (C_in, C_out).
    bias: (C_out,) or None.

  Returns:
    (B, H, W, C_out).
  """
  y = lax.conv_general_dilated(
      x, kernel[None, None], window_strides=(1, 1), padding='VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if bias is not None:
    y = y + bias
  return y


# --------------------------------------------------------------------------
# Full 3x3 convolution (the stem).


def conv3x3_im2col(x: Array, kernel: Array) -> Array:
  """Full 3x3 SAME conv as nine shifted copies and one matmul.

  Cheap for the few input channels of a stem (C_in = 1 or 3).

  Args:
    x: (B, H, W, C_in).
    kernel: (3, 3, C_in, C_out).

  Returns:
    (B, H, W, C_out).
  """
  _, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate(
      [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)],
      axis=-1)  # (B, H, W, 9 * C_in), ordered (i, j, c) like the kernel.
  return pointwise_dense(cols, kernel.reshape(9 * c, kernel.shape[-1]))


def conv3x3_reference(x: Array, kernel: Array) -> Array:
  """Full 3x3 SAME conv via `lax.conv_general_dilated`: kernel (3,3,Ci,Co)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# --------------------------------------------------------------------------
# 2x bilinear upsampling.


def _upsample2x_axis(x: Array, axis: int) -> Array:
  """Exact 2x half-pixel bilinear upsampling along one axis, edges clamped."""
  n = x.shape[axis]
  first = lax.slice_in_dim(x, 0, 1, axis=axis)
  last = lax.slice_in_dim(x, n - 1, n, axis=axis)
  prev = jnp.concatenate(
      [first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  nxt = jnp.concatenate(
      [lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
  even = 0.75 * x + 0.25 * prev  # output 2k samples input k - 1/4.
  odd = 0.75 * x + 0.25 * nxt  # output 2k+1 samples input k + 1/4.
  y = jnp.stack([even, odd], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] = 2 * n
  return y.reshape(shape)


def _upsample2x_axis_transpose(g: Array, axis: int) -> Array:
  """Transpose of `_upsample2x_axis`: (.., 2n, ..) -> (.., n, ..).

  dx[k] = 0.75 (g[2k] + g[2k+1]) + 0.25 (g[2k+2] + g[2k-1]), where the
  clamped edges send g[0] and g[2n-1] back to x[0] and x[n-1] (g[-1] := g[0],
  g[2n] := g[2n-1]).
  """
  n = g.shape[axis] // 2
  shape = list(g.shape)
  shape[axis:axis + 1] = [n, 2]
  g2 = g.reshape(shape)
  even = lax.index_in_dim(g2, 0, axis + 1, keepdims=False)  # g[2k]
  odd = lax.index_in_dim(g2, 1, axis + 1, keepdims=False)  # g[2k+1]
  next_even = jnp.concatenate(  # g[2k+2], edge g[2n-1].
      [lax.slice_in_dim(even, 1, n, axis=axis),
       lax.slice_in_dim(odd, n - 1, n, axis=axis)], axis=axis)
  prev_odd = jnp.concatenate(  # g[2k-1], edge g[0].
      [lax.slice_in_dim(even, 0, 1, axis=axis),
       lax.slice_in_dim(odd, 0, n - 1, axis=axis)], axis=axis)
  return 0.75 * (even + odd) + 0.25 * (next_even + prev_odd)


@jax.custom_vjp
def upsample2x_bilinear(x: Array) -> Array:
  """Exact 2x bilinear upsampling, equal to `jax.image.resize(..., 'bilinear')`.

  Half-pixel centres: output row 2k samples input row k - 1/4 (weights
  0.25 x[k-1] + 0.75 x[k]) and row 2k+1 samples k + 1/4 (0.75 x[k] +
  0.25 x[k+1]). At the borders `jax.image.resize` drops the weight of the
  missing neighbour and renormalises, which equals clamping the index
  (x[-1] := x[0], x[H] := x[H-1]). Same for columns.

  The gradient is the hand-written transpose (a 2x downsampling with weights
  0.25, 0.75, 0.75, 0.25): 33 ms vs autodiff's 80 ms for a (16, 64, 64, 32)
  input on the busy 2-core CPU. (custom_vjp: reverse mode only, no jvp.)

  Args:
    x: (B, H, W, C).

  Returns:
    (B, 2H, 2W, C), same dtype.
  """
  return _upsample2x_axis(_upsample2x_axis(x, 1), 2)


def _upsample_fwd(x):
  return _upsample2x_axis(_upsample2x_axis(x, 1), 2), None


def _upsample_bwd(_, g):
  return (_upsample2x_axis_transpose(_upsample2x_axis_transpose(g, 2), 1),)


upsample2x_bilinear.defvjp(_upsample_fwd, _upsample_bwd)


def upsample2x_reference(x: Array) -> Array:
  """2x bilinear upsampling by `jax.image.resize`: (B,H,W,C) -> (B,2H,2W,C)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), 'bilinear')


def upsample2x(x: Array, impl: Impl = 'fast') -> Array:
  """2x bilinear upsampling in the form `impl`: (B,H,W,C) -> (B,2H,2W,C)."""
  check_impl(impl)
  if impl == 'fast':
    return upsample2x_bilinear(x)
  return upsample2x_reference(x)


def upsample_pow2(x: Array, times: int, impl: Impl = 'fast') -> Array:
  """`times` successive 2x bilinear upsamplings: (B,H,W,C) -> (B,2^t H,2^t W,C).

  Both forms repeat the 2x step (one 2^t resize is a different function).
  """
  for _ in range(times):
    x = upsample2x(x, impl)
  return x


def _pool_phases(x: Array) -> tuple[Array, Array, Array, Array]:
  """The four pixels of each 2x2 window: x[2i, 2j], x[2i, 2j+1], ..."""
  return (x[:, 0::2, 0::2], x[:, 0::2, 1::2],
          x[:, 1::2, 0::2], x[:, 1::2, 1::2])


def _max_pool_fwd(x: Array) -> tuple[Array, Array]:
  """Max and argmax (0..3, first in row-major order on ties) per window."""
  x00, x01, x10, x11 = _pool_phases(x)
  top = x00 >= x01
  m0, i0 = jnp.where(top, x00, x01), jnp.where(top, 0, 1)
  bottom = x10 >= x11
  m1, i1 = jnp.where(bottom, x10, x11), jnp.where(bottom, 2, 3)
  first = m0 >= m1
  return (jnp.where(first, m0, m1),
          jnp.where(first, i0, i1).astype(jnp.int8))


@jax.custom_vjp
def max_pool2x2(x: Array) -> Array:
  """2x2 max-pooling with stride 2: (B, H, W, C) -> (B, H/2, W/2, C).

  H and W must be even. The same values and gradient as
  `nn.max_pool(x, (2, 2), strides=(2, 2))`: each window's cotangent goes to
  its first maximum in row-major order. The forward pass records that argmax
  (int8) beside the maximum, so the gradient never compares a recomputed
  operand with the maximum: JAX's gradient of a reshape-max divides by the
  number of elements equal to the maximum, and we measured NaN gradients
  (0/0) from it in a jitted LU-Net with XLA optimisations off, where XLA
  recomputed the operand with different rounding. `nn.max_pool`'s
  select-and-scatter gradient is robust but slow on CPU. Gradient of a
  (16, 128, 128, 32) input (busy 2-core CPU): this 25 ms, reshape-max 63 ms,
  `nn.max_pool` 190 ms. Reverse mode only (custom_vjp: no jvp).
  """
  return _max_pool_fwd(x)[0]


def _max_pool_bwd(argmax: Array, g: Array) -> tuple[Array]:
  """Routes each window's cotangent g (B, H/2, W/2, C) to its argmax."""
  b, h, w, c = g.shape
  zero = jnp.zeros((), g.dtype)
  phases = [jnp.where(argmax == k, g, zero) for k in range(4)]
  # (B, H, 2, W, 2, C) -> (B, 2H, 2W, C): phase (r, s) lands at (2i+r, 2j+s).
  top = jnp.stack(phases[:2], axis=3)
  bottom = jnp.stack(phases[2:], axis=3)
  dx = jnp.stack([top, bottom], axis=2).reshape(b, 2 * h, 2 * w, c)
  return (dx,)


max_pool2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


# --------------------------------------------------------------------------
# Modules. Each declares the same parameters for both forms.


class DepthwiseConv3x3(nn.Module):
  """Depthwise 3x3 conv, SAME zero padding, no bias.

  Attributes:
    impl: 'fast' (shifted multiply-adds) or 'reference' (grouped conv).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  impl: Impl = 'fast'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x (B, H, W, C) -> (B, H, W, C)."""
    kernel = self.param('kernel', depthwise_kernel_init,
                        (3, 3, x.shape[-1]), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return depthwise_conv3x3(x, kernel, self.impl)


class Pointwise(nn.Module):
  """1x1 conv with `nn.Dense`'s parameters: kernel (C_in, C_out), bias (C_out,).

  Attributes:
    features: C_out.
    use_bias: whether to add a bias.
    impl: 'fast' (matmul) or 'reference' (1x1 `lax.conv_general_dilated`).
    kernel_init: initialiser of the (C_in, C_out) kernel (lecun normal).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int
  use_bias: bool = True
  impl: Impl = 'fast'
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x (B, H, W, C_in) -> (B, H, W, C_out)."""
    check_impl(self.impl)
    kernel = self.param('kernel', self.kernel_init,
                        (x.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', nn.initializers.zeros, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    fn = pointwise_dense if self.impl == 'fast' else pointwise_reference
    return fn(x, kernel, bias)


class SeparableConv(nn.Module):
  """Depthwise-separable conv: depthwise 3x3, then pointwise 1x1 (+ bias).

  Parameters: depthwise/kernel (3, 3, C_in), pointwise/kernel (C_in, C_out),
  pointwise/bias (C_out,) when use_bias.

  Attributes:
    features: C_out.
    use_bias: bias of the pointwise conv (False when a norm follows).
    impl: 'fast' or 'reference'.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int
  use_bias: bool = True
  impl: Impl = 'fast'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x (B, H, W, C_in) -> (B, H, W, C_out)."""
    x = DepthwiseConv3x3(impl=self.impl, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='depthwise')(x)
    return Pointwise(self.features, use_bias=self.use_bias, impl=self.impl,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='pointwise')(x)


class Conv3x3(nn.Module):
  """Full 3x3 conv with `nn.Conv`'s parameters (kernel (3,3,C_in,C_out), bias).

  Attributes:
    features: C_out.
    use_bias: whether to add a bias.
    impl: 'fast' (im2col + matmul) or 'reference' (`lax.conv_general_dilated`).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int
  use_bias: bool = True
  impl: Impl = 'fast'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x (B, H, W, C_in) -> (B, H, W, C_out)."""
    check_impl(self.impl)
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', nn.initializers.zeros, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    fn = conv3x3_im2col if self.impl == 'fast' else conv3x3_reference
    y = fn(x, kernel)
    return y if bias is None else y + bias


class ConvNormAct(nn.Module):
  """Conv (separable or full 3x3, no bias), BatchNorm, ReLU.

  Submodules: 'conv', 'norm'. BatchNorm uses batch statistics when `train`
  (and, with `norm_axis_name`, averages them over that mapped axis) and the
  running averages (collection 'batch_stats') otherwise; its variance is the
  numerically stable two-pass form.

  Attributes:
    features: C_out.
    separable: depthwise-separable conv if True, else a full 3x3 conv.
    impl: 'fast' or 'reference'.
    norm_axis_name: axis name over which BatchNorm averages batch statistics
      (the caller's pmap/shard_map axis), or None.
    norm_momentum: BatchNorm running-average momentum.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int
  separable: bool = True
  impl: Impl = 'fast'
  norm_axis_name: str | None = None
  norm_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x (B, H, W, C_in) -> (B, H, W, C_out), after ReLU (>= 0)."""
    conv_cls = SeparableConv if self.separable else Conv3x3
    x = conv_cls(self.features, use_bias=False, impl=self.impl,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 name='conv')(x)
    # Two-pass variance, mean((x - mean)^2): flax's default E[x^2] - E[x]^2
    # cancels in float32 when |mean| >> std (few pixels at deep levels).
    x = nn.BatchNorm(use_running_average=not train,
                     axis_name=self.norm_axis_name,
                     momentum=self.norm_momentum, epsilon=1e-5,
                     use_fast_variance=False,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='norm')(x)
    return nn.relu(x)
