"""LU-Net and LU-Net+RA: a lightweight U-Net of depthwise-separable convs.

The coarse vessel segmenter of the paper (section 3.2), after
Hernandez-Gutierrez et al., "Retinal Vessel Segmentation Based on a Lightweight
U-Net and Reverse Attention", Mathematics 13(13):2203, 2025. The paper gives no
layer table; this is our reading, sized to its 1.94M parameters.

Architecture (input x (B, H, W, C_in), H and W divisible by 16; level l works
at resolution H/2^l; widths w = (32, 64, 128, 256), bottleneck 640):

  stem        full 3x3 conv C_in -> w0, BatchNorm, ReLU.
  enc_l       l = 0..3: three (separable conv, BatchNorm, ReLU) at width w_l;
              its output is the skip s_l; 2x2 max-pool to the next level.
  bottleneck  three (separable conv, BN, ReLU) at width 640, at H/16.
  dec_l       l = 3..0: F_l = three (separable conv, BN, ReLU) at width w_l of
              concat[upsample2x(F_{l+1}), s_l]   (F_4 = bottleneck output).
  side_4      1x1 conv to one logit: P_4 (B, H/16, W/16, 1).

Predictions P_l (logits at level l, (B, H/2^l, W/2^l, 1)), for l = 3..0:

  LU-Net:     P_l = side_l(F_l), a 1x1 conv per level (deep supervision).
  LU-Net+RA:  reverse attention as in PraNet (Fan et al., MICCAI 2020), on the
              decoder features:
                A_l   = upsample2x(P_{l+1})              deeper prediction
                G_l   = F_l * (1 - sigmoid(A_l))          reverse-attention gate
                                                          (as sigmoid(-A_l))
                P_l   = A_l + ra_l(G_l)                   residual refinement
              where ra_l is two (separable conv, BN, ReLU) at width w_l and a
              1x1 conv to one logit, zero-initialised so that every P_l starts
              equal to the upsampled P_4. The gate erases what the deeper level
              already calls vessel, so each level learns what the deeper level
              missed (thin, peripheral vessels); its prediction is a residual on
              the deeper one. Gradients flow through A_l (no stop-gradient). The
              main decoder path F_l is the same as LU-Net's: RA adds only the
              ra_l branches (LU-Net+RA = LU-Net + ra_0..ra_3 parameters).

Outputs (all float32, full resolution (B, H, W, 1)):
  'logits':      P_0, the final prediction.
  'side_logits': (P_1, P_2, P_3, P_4), each upsampled to (B, H, W, 1) by
                 repeated exact 2x bilinear upsampling (shallowest first), for
                 deep supervision.
  'ra_map':      1 - sigmoid(A_0) = 1 - sigmoid(upsample2x(P_1)) in [0, 1]:
                 the reverse-attention map the last decoder level used; equal
                 to 1 - sigmoid(side_logits[0]). Plain LU-Net has no attention;
                 it returns the same formula (1 - sigmoid of its level-1 side
                 prediction), so both models hand the refiner the same quantity.

`impl='fast'` (shifted depthwise convs, 1x1 convs as matmuls, exact 2x
upsampling; fast on CPU) and `impl='reference'` (grouped `lax.conv`, 1x1 conv,
`jax.image.resize`; fast on GPU) are the same function with the same parameter
tree (tests/test_lunet.py). Default widths: LU-Net 1,727,717 parameters and
10.5 G multiply-adds per 512x512 image; LU-Net+RA 1,912,357 parameters (the
cited paper: 1.94M) and 13.0 G multiply-adds (the paper's "12.21 GFLOPs").
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vesseljax.models import layers

Array = jax.Array
Dtype = Any

# Input sides must be divisible by this with the default four levels
# (2 ** len(widths) in general: one 2x2 max-pool per level).
SIZE_DIVISOR = 16


class ConvStage(nn.Module):
  """`num_convs` (conv, BatchNorm, ReLU) blocks at one width.

  Submodules: 'conv_0', 'conv_1', ... (`layers.ConvNormAct`).

  Attributes:
    features: output channels of every block.
    num_convs: number of blocks.
    impl: 'fast' or 'reference'.
    norm_axis_name: BatchNorm's axis name for batch statistics, or None.
    dtype: compute dtype.
  """
  features: int
  num_convs: int = 3
  impl: layers.Impl = 'fast'
  norm_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x (B, H, W, C_in) -> (B, H, W, features), >= 0."""
    for i in range(self.num_convs):
      x = layers.ConvNormAct(
          self.features, impl=self.impl, norm_axis_name=self.norm_axis_name,
          dtype=self.dtype, name=f'conv_{i}')(x, train)
    return x


class ReverseAttention(nn.Module):
  """Reverse-attention branch: residual logits from gated decoder features.

  Submodules: 'stage' (`ConvStage` of `num_convs` blocks), 'out' (1x1 conv to
  one logit, zero-initialised).

  Attributes:
    features: width of the branch's convs.
    num_convs: number of (separable conv, BN, ReLU) blocks.
    impl: 'fast' or 'reference'.
    norm_axis_name: BatchNorm's axis name for batch statistics, or None.
    dtype: compute dtype.
  """
  features: int
  num_convs: int = 2
  impl: layers.Impl = 'fast'
  norm_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Array, deeper_logits: Array,
               train: bool) -> Array:
    """Residual logits for this level.

    Args:
      feats: (B, h, w, C) decoder features F.
      deeper_logits: (B, h, w, 1) the deeper prediction A, upsampled to (h, w).
      train: BatchNorm mode.

    Returns:
      (B, h, w, 1) logits R; the level's prediction is A + R.
    """
    # 1 - sigmoid(A) as sigmoid(-A): exact where sigmoid(A) rounds to 1.
    x = feats * nn.sigmoid(-deeper_logits.astype(feats.dtype))
    x = ConvStage(self.features, num_convs=self.num_convs, impl=self.impl,
                  norm_axis_name=self.norm_axis_name, dtype=self.dtype,
                  name='stage')(x, train)
    return layers.Pointwise(1, impl=self.impl,
                            kernel_init=nn.initializers.zeros,
                            dtype=self.dtype, name='out')(x)


class LUNet(nn.Module):
  """LU-Net (reverse_attention=False) or LU-Net+RA (True); see module doc.

  Attributes:
    widths: encoder/decoder widths per level, shallowest first.
    bottleneck: width of the bottleneck at 1/2^len(widths) resolution.
    reverse_attention: LU-Net+RA if True, else plain LU-Net.
    convs_per_level: (separable conv, BN, ReLU) blocks per encoder/decoder
      level and in the bottleneck.
    ra_convs: blocks in each reverse-attention branch.
    impl: 'fast' (CPU forms) or 'reference' (grouped conv, jax.image.resize).
    norm_axis_name: axis name over which BatchNorm averages batch statistics
      in training (the caller's pmap/shard_map axis), or None.
    dtype: compute dtype; outputs are float32.
  """
  widths: Sequence[int] = (32, 64, 128, 256)
  bottleneck: int = 640
  reverse_attention: bool = True
  convs_per_level: int = 3
  ra_convs: int = 2
  impl: layers.Impl = 'fast'
  norm_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  def _stage(self, features: int, name: str) -> ConvStage:
    return ConvStage(features, num_convs=self.convs_per_level, impl=self.impl,
                     norm_axis_name=self.norm_axis_name, dtype=self.dtype,
                     name=name)

  def _side(self, name: str) -> layers.Pointwise:
    return layers.Pointwise(1, impl=self.impl, dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> dict[str, Any]:
    """Segments vessels.

    Args:
      x: (B, H, W, C_in) image(s) in [0, 1] (C_in = 1: preprocessed green
        channel); H and W divisible by 16.
      train: BatchNorm uses batch statistics (and updates 'batch_stats') if
        True, running averages otherwise.

    Returns:
      dict with 'logits' (B, H, W, 1), 'side_logits' a tuple of len(widths)
      (B, H, W, 1) arrays (levels 1..len(widths), shallowest first) and
      'ra_map' (B, H, W, 1) in [0, 1]; all float32.

    Raises:
      ValueError: if x is not (B, H, W, C) with H, W divisible by 16.
    """
    layers.check_impl(self.impl)
    levels = len(self.widths)
    divisor = 2 ** levels
    if x.ndim != 4 or x.shape[1] % divisor or x.shape[2] % divisor:
      raise ValueError(
          f'LUNet needs input (B, H, W, C) with H and W divisible by '
          f'{divisor}; got shape {tuple(x.shape)}')
    up = functools.partial(layers.upsample2x, impl=self.impl)

    x = jnp.asarray(x, self.dtype)
    x = layers.ConvNormAct(self.widths[0], separable=False, impl=self.impl,
                           norm_axis_name=self.norm_axis_name,
                           dtype=self.dtype, name='stem')(x, train)
    skips = []
    for l, width in enumerate(self.widths):
      x = self._stage(width, f'enc_{l}')(x, train)
      skips.append(x)
      x = layers.max_pool2x2(x)
    x = self._stage(self.bottleneck, 'bottleneck')(x, train)

    preds = {levels: self._side(f'side_{levels}')(x)}  # level -> P_l.
    attention = None
    for l in reversed(range(levels)):
      x = jnp.concatenate([up(x), skips[l]], axis=-1)
      x = self._stage(self.widths[l], f'dec_{l}')(x, train)
      if self.reverse_attention:
        attention = up(preds[l + 1])
        preds[l] = attention + ReverseAttention(
            self.widths[l], num_convs=self.ra_convs, impl=self.impl,
            norm_axis_name=self.norm_axis_name, dtype=self.dtype,
            name=f'ra_{l}')(x, attention, train)
      else:
        preds[l] = self._side(f'side_{l}')(x)

    side_logits = tuple(
        layers.upsample_pow2(preds[l], l, self.impl).astype(jnp.float32)
        for l in range(1, levels + 1))
    if attention is None:  # Plain LU-Net: the same formula, A_0 = up(P_1).
      attention = side_logits[0]
    return {
        'logits': preds[0].astype(jnp.float32),
        'side_logits': side_logits,
        'ra_map': nn.sigmoid(-attention.astype(jnp.float32)),  # 1 - sigmoid.
    }


lunet = functools.partial(LUNet, reverse_attention=False)
lunet_ra = functools.partial(LUNet, reverse_attention=True)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (e.g. variables['params'])."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
