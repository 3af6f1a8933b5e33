"""Image encoder: an RGB image -> a grid of feature tokens and a pooled vector.

The refiner's image condition (paper section 3.3.3: "3 conv layers
3->32->64->128 with max-pooling"). The paper conditions on one 128-d vector,
but cross-attention to a single key is a no-op (its softmax weight is 1), so
our reading (`shared/SPEC.md`) keeps a grid of tokens for cross-attention and
their pooled mean for FiLM.

Architecture (image (B, H, W, 3), H and W divisible by 8; widths w =
(32, 64, 128); token grid g = 16):

  layer         operation                               output
  conv_0        3x3 conv, SiLU, 2x2 max-pool            (B, H/2, W/2, w0)
  conv_1        3x3 conv, SiLU, 2x2 max-pool            (B, H/4, W/4, w1)
  conv_2        3x3 conv, SiLU, 2x2 max-pool            (B, H/8, W/8, w2)  F
  grid pool     F resampled to the token grid           (B, g, g, w2)      G
  pooled        mean of G over the grid                 (B, w2)
  tokens        G + pos_embedding, flattened row-major  (B, g*g, w2)

Grid pooling: when g divides H/8 and W/8 (512 -> 64 -> 16: blocks of 4x4),
G is the exact mean of each block of F, so `pooled` is also the global mean
of F. Otherwise (e.g. training patches whose feature map is smaller than the
grid) G = jax.image.resize(F, 'linear', antialias=True): bilinear when
enlarging, a triangle-filter average when shrinking.

`pooled` is the mean of the tokens *before* the positional embedding is
added: pooled = tokens.mean(axis=1) - pos_embedding.mean((0, 1)). It carries
no position, only content; the positional embedding (g, g, w2), learned, is
added only to the tokens, which feed cross-attention.

Parameters (default): 93,248 in the convs + 32,768 positional = 126,016.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vesseljax.models import layers

Array = jax.Array
Dtype = Any

# Image sides must be divisible by this (three 2x2 max-pools).
SIZE_DIVISOR = 8


def pool_to_grid(features: Array, grid: int) -> Array:
  """Resamples a feature map to a (grid, grid) map; see the module docstring.

  Args:
    features: (B, h, w, D).
    grid: side of the output grid.

  Returns:
    (B, grid, grid, D): block means if grid divides h and w, else an
    antialiased bilinear resize.
  """
  b, h, w, d = features.shape
  if h % grid == 0 and w % grid == 0:
    blocks = features.reshape(b, grid, h // grid, grid, w // grid, d)
    return blocks.mean(axis=(2, 4))
  return jax.image.resize(features, (b, grid, grid, d), 'linear',
                          antialias=True)


class ImageEncoder(nn.Module):
  """RGB image -> (tokens, pooled); see the module docstring.

  Submodules: 'conv_0', 'conv_1', 'conv_2' (`nn.Conv` 3x3); parameter
  'pos_embedding' (token_grid, token_grid, widths[-1]).

  Attributes:
    widths: channels of the three conv layers; the last is the token dim D.
    token_grid: g, the side of the token grid (N = g * g tokens).
    dtype: compute dtype; outputs are float32.
    param_dtype: parameter dtype.
  """
  widths: Sequence[int] = (32, 64, 128)
  token_grid: int = 16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: Array) -> tuple[Array, Array]:
    """Encodes images.

    Args:
      image: (B, H, W, 3) RGB float in [0, 1]; H and W divisible by 8.

    Returns:
      tokens: (B, N, D) float32, N = token_grid ** 2 (row-major grid order),
        D = widths[-1]; positional embedding included.
      pooled: (B, D) float32, the mean of the tokens without the positional
        embedding.

    Raises:
      ValueError: if image is not (B, H, W, 3) with H, W divisible by 8.
    """
    if len(self.widths) != 3:
      raise ValueError(f'widths must have 3 entries, got {self.widths!r}')
    if (image.ndim != 4 or image.shape[-1] != 3
        or image.shape[1] % SIZE_DIVISOR or image.shape[2] % SIZE_DIVISOR):
      raise ValueError(
          f'ImageEncoder needs an image (B, H, W, 3) with H and W divisible '
          f'by {SIZE_DIVISOR}; got shape {tuple(image.shape)}')
    x = jnp.asarray(image, self.dtype)
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), padding='SAME', dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f'conv_{i}')(x)
      x = layers.max_pool2x2(nn.silu(x))
    grid = pool_to_grid(x.astype(jnp.float32), self.token_grid)  # (B,g,g,D)
    b, g, _, d = grid.shape
    pos_embedding = self.param('pos_embedding',
                               nn.initializers.normal(stddev=0.02),
                               (g, g, d), self.param_dtype)
    pooled = grid.mean(axis=(1, 2))
    tokens = (grid + pos_embedding.astype(jnp.float32)).reshape(b, g * g, d)
    return tokens, pooled
