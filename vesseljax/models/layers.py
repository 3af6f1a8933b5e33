"""Convolution layers in a fast CPU form and a reference form.

Every layer here exists twice, chosen by a module attribute
`impl: 'fast' | 'reference'`:

- 'fast': forms measured to be fast on XLA:CPU (`shared/PERF_NOTES.md`):
  a depthwise 3x3 conv as nine shifted multiply-adds with a custom VJP whose
  kernel gradient is accumulated over blocks of rows (cache-friendly), a 1x1
  conv as a matmul over the channel axis, an exact 2x bilinear upsampling made
  of slices and concatenations, and a full 3x3 conv as nine shifted copies
  concatenated on the channel axis followed by one matmul (im2col).
- 'reference': the textbook forms, `lax.conv_general_dilated` (with
  `feature_group_count=C` for the depthwise conv) and `jax.image.resize`;
  these are also the faster forms on a GPU.

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


def _check_impl(impl: str) -> None:
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


def _kernel_grad_one(xp: Array, g: Array) -> Array:
  """Kernel gradient of one image: (H+2, W+2, C), (H, W, C) -> (3, 3, C)."""
  h, w, _ = g.shape
  acc = jnp.promote_types(g.dtype, jnp.float32)
  rows = []
  for i in range(3):
    rows.append(jnp.stack([
        jnp.sum(xp[i:i + h, j:j + w, :] * g, axis=(0, 1), dtype=acc)
        for j in range(3)]))
  return jnp.stack(rows)


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
  from cache nine times. Measured on the 2-core CPU (busy, load ~3), kernel
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
  rows = _rows_per_block(h, w, c, jnp.dtype(g.dtype).itemsize)
  n_blocks = h // rows
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g_blocks = g.reshape(b * n_blocks, rows, w, c)  # Free: rows are contiguous.
  acc = jnp.promote_types(g.dtype, jnp.float32)

  def body(carry, xs):
    k, g_k = xs
    x_k = lax.dynamic_slice(
        xp, (k // n_blocks, (k % n_blocks) * rows, 0, 0),
        (1, rows + 2, w + 2, c))[0]
    return carry + _kernel_grad_one(x_k, g_k), None

  init = jnp.zeros((3, 3, c), acc)
  dk, _ = lax.scan(body, init, (jnp.arange(b * n_blocks), g_blocks))
  return dk


@jax.custom_vjp
def depthwise_conv3x3_shifted(x: Array, kernel: Array) -> Array:
  """Depthwise 3x3 conv, SAME zero padding, as nine shifted multiply-adds.

  Same function as `depthwise_conv3x3_reference`; ~10x faster on XLA:CPU.
  The custom VJP computes the input gradient as the same shifted conv with the
  flipped kernel and the kernel gradient over cache-sized blocks of rows.

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
  _check_impl(impl)
  if impl == 'fast':
    return depthwise_conv3x3_shifted(x, kernel)
  return depthwise_conv3x3_reference(x, kernel)


# --------------------------------------------------------------------------
# Pointwise (1x1) convolution.


def pointwise_dense(x: Array, kernel: Array,
                    bias: Array | None = None) -> Array:
  """1x1 conv as a matmul over the channel axis (as `nn.Dense`).

  Args:
    x: (B, H, W, C_in).
    kernel: (C_in, C_out).
    bias: (C_out,) or None.

  Returns:
    (B, H, W, C_out).
  """
  y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
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


def upsample2x_bilinear(x: Array) -> Array:
  """Exact 2x bilinear upsampling, equal to `jax.image.resize(..., 'bilinear')`.

  Half-pixel centres: output row 2k samples input row k - 1/4 (weights
  0.25 x[k-1] + 0.75 x[k]) and row 2k+1 samples k + 1/4 (0.75 x[k] +
  0.25 x[k+1]). At the borders `jax.image.resize` drops the weight of the
  missing neighbour and renormalises, which equals clamping the index
  (x[-1] := x[0], x[H] := x[H-1]). Same for columns.

  Args:
    x: (B, H, W, C).

  Returns:
    (B, 2H, 2W, C), same dtype.
  """
  return _upsample2x_axis(_upsample2x_axis(x, 1), 2)


def upsample2x_reference(x: Array) -> Array:
  """2x bilinear upsampling by `jax.image.resize`: (B,H,W,C) -> (B,2H,2W,C)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), 'bilinear')


def upsample2x(x: Array, impl: Impl = 'fast') -> Array:
  """2x bilinear upsampling in the form `impl`: (B,H,W,C) -> (B,2H,2W,C)."""
  _check_impl(impl)
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


def max_pool2x2(x: Array) -> Array:
  """2x2 max-pooling with stride 2: (B, H, W, C) -> (B, H/2, W/2, C)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


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
    _check_impl(self.impl)
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
    _check_impl(self.impl)
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
  running averages (collection 'batch_stats') otherwise.

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
    x = nn.BatchNorm(use_running_average=not train,
                     axis_name=self.norm_axis_name,
                     momentum=self.norm_momentum, epsilon=1e-5,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='norm')(x)
    return nn.relu(x)
