"""Conditional denoiser: the latent-diffusion U-Net of the refiner.

Paper section 3.3.5: a U-Net with 4 resolution levels, residual blocks with
FiLM conditioning on a 512-d sinusoidal timestep embedding, cross-attention
to image features at each level, and reverse-attention guidance; about 3.1M
parameters. Our reading (`shared/SPEC.md`): it predicts the noise eps of a
noised latent z_t of the ground-truth mask, conditioned on the autoencoder's
latent of the coarse mask and on the coarse model's reverse-attention map
(both concatenated to z_t as input channels) and on the image (its tokens by
cross-attention, its pooled vector by FiLM). The layout follows the DDPM/ADM
U-Net (Ho et al. 2020; Dhariwal & Nichol 2021), as vdm's `ScoreUNet`.

Architecture (latent (B, h, w, C), h and w divisible by 8; widths
w = (16, 32, 48, 72), n = num_res_blocks = 2; level l works at h/2^l;
A = attention_levels = (1, 2, 3)):

  stage       operation                                            output
  cond        emb = MLP(sinusoid_512(t)) + Dense(pooled);           (B, 512)
              pooled, tokens := learned nulls where drop_image
  conv_in     3x3 conv of concat[z_t, coarse_latent, ra_map]        w0 @ h
              (+ 3x3 conv 'detail_in' of pixel_detail, if any)
  down_l      l = 0..3: n ResBlocks at w_l, cross-attention if      w_l @ h/2^l
              l in A; 3x3 stride-2 conv (l < 3)
  mid         ResBlock, cross-attention, ResBlock                   w3 @ h/8
  up_l        l = 3..0: n + 1 ResBlocks at w_l on concat[x, skip],  w_l @ h/2^l
              cross-attention if l in A; nearest 2x + 3x3 conv
              (l > 0)
  out         GroupNorm, SiLU, 3x3 conv (zero-initialised)          C @ h

  MLP:          Dense(512), SiLU, Dense(512)
  ResBlock(c):  GroupNorm, SiLU, 3x3 conv -> c, GroupNorm, FiLM, SiLU,
                3x3 conv (zero-initialised); + skip (1x1 when channels change)
  FiLM:         (scale, shift) = Dense(2c)(silu(emb)) (zero-initialised);
                h * (1 + scale) + shift
  CrossAttn(c): GroupNorm, q from the map (h*w queries), k, v from the
                tokens, num_heads heads, output projection (zero-initialised),
                residual

The skips are ADM's: conv_in's output, each encoder ResBlock's output (the
last of a level after its cross-attention, if any) and each downsampling's
output, popped in reverse by the decoder's ResBlocks. GroupNorm uses
min(8, c) groups. FiLM follows the second GroupNorm's normalisation (ADM's
"scale-shift norm"): applied before a GroupNorm, as one might read the paper,
a per-channel scale and shift would be normalised away (entirely so with one
channel per group). Every residual branch and the output conv start at zero,
so the initial model outputs eps = 0 and each block starts as the identity.

Cross-attention sits at every level but the finest by default (the paper:
"at each level"; `attention_levels=(0, 1, 2, 3)` gives that). At the finest
level (128 x 128 for a 512 mask) each call computes 16384 x 256 attention
weights per head, and on the 2-core CPU the exponentials alone take ~0.1 s
at batch 2: measured, a forward with attention there too took 0.64-0.68 s
instead of 0.23 s, which would put Diff(20) with guidance at ~13 s per image.

Classifier-free guidance: where `drop_image` is True, both the pooled vector
and the tokens of that example are replaced by learned nulls ('null_pooled'
(D,), 'null_tokens' (N, D)), per example with `jnp.where` (jittable).

Sizes: with the defaults, C = 4 and image tokens (N, D) = (256, 128):
3,127,900 parameters (the paper: 3.1M), of which 525,312 are the timestep
MLP. The widths are front-light: the h x w level is 16 wide, where most of
the compute is; 2.06M parameters sit at h/4 and h/8. One jitted forward at
batch 2 (a guided step), 128x128x4 latent, on the 2-core CPU shared with two
other busy processes: 0.23 s median (Diff(20) with guidance ~4.7 s).

3x3 convs are `nn.Conv` (`lax.conv_general_dilated`: on the 2-core CPU 7-8x
faster than `layers.Conv3x3`'s im2col form at 128x128 and 16-48 channels); 1x1
projections of feature maps are `layers.Pointwise` (a matmul, with a blocked
kernel gradient) and those of vectors and tokens `nn.Dense`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vesseljax.models import layers

Array = jax.Array
Dtype = Any

# Width of the timestep / conditioning embedding (the paper's 512-d).
EMBED_DIM = 512
# Sinusoid periods range from 2*pi to about 10000 * 2*pi (DDPM, ADM, vdm).
MAX_PERIOD = 10_000.0


def timestep_embedding(t: Array, dim: int = EMBED_DIM,
                       max_period: float = MAX_PERIOD) -> Array:
  """Sinusoidal embedding of integer timesteps, as in DDPM / ADM.

  Args:
    t: (B,) timesteps (int or float), e.g. int32 in [0, 1000).
    dim: even embedding width.
    max_period: the slowest sinusoid's period, in timesteps (divided by 2 pi).

  Returns:
    (B, dim) float32: [sin(t * f_k), cos(t * f_k)] for frequencies
    f_k = max_period^(-k / (dim/2)), k = 0..dim/2-1 (first half sin, second
    half cos).
  """
  if dim % 2:
    raise ValueError(f'dim must be even, got {dim}')
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period)
                  * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _groups(channels: int) -> int:
  """GroupNorm groups: min(8, channels)."""
  return min(8, channels)


class ResBlock(nn.Module):
  """ADM residual block with FiLM ("scale-shift norm"); see module docstring.

  Submodules: 'norm_0', 'conv_0', 'film', 'norm_1', 'conv_1' (zero-init),
  'skip' (1x1 `layers.Pointwise`, only when the channels change).

  Attributes:
    features: output channels c.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """x (B, h, w, c_in), emb (B, E) (after SiLU) -> (B, h, w, features)."""
    c = self.features
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.GroupNorm(_groups(x.shape[-1]), name='norm_0', **kw)(x)
    h = nn.Conv(c, (3, 3), padding='SAME', name='conv_0', **kw)(nn.silu(h))
    film = nn.Dense(2 * c, kernel_init=nn.initializers.zeros, name='film',
                    **kw)(emb)
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = nn.GroupNorm(_groups(c), name='norm_1', **kw)(h)
    h = nn.silu(h * (1 + scale) + shift)
    h = nn.Conv(c, (3, 3), padding='SAME', kernel_init=nn.initializers.zeros,
                name='conv_1', **kw)(h)
    if x.shape[-1] != c:
      x = layers.Pointwise(c, name='skip', **kw)(x)
    return x + h


class CrossAttention(nn.Module):
  """Residual cross-attention from a feature map to image tokens.

  Submodules: 'norm' (GroupNorm), 'query' (`layers.Pointwise`), 'key',
  'value' (`nn.Dense` on the tokens), 'out' (`layers.Pointwise`,
  zero-initialised).

  Attributes:
    num_heads: attention heads; must divide the map's channels c.
    dtype: compute dtype (the softmax is float32).
    param_dtype: parameter dtype.
  """
  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, tokens: Array) -> Array:
    """x (B, h, w, c), tokens (B, N, D) -> (B, h, w, c)."""
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(
          f'num_heads {self.num_heads} must divide the channels {c}')
    head_dim = c // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.GroupNorm(_groups(c), name='norm', **kw)(x)
    q = layers.Pointwise(c, name='query', **kw)(y)
    k = nn.Dense(c, name='key', **kw)(tokens)
    v = nn.Dense(c, name='value', **kw)(tokens)
    q = q.reshape(b, h * w, self.num_heads, head_dim)
    k = k.reshape(b, -1, self.num_heads, head_dim)
    v = v.reshape(b, -1, self.num_heads, head_dim)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    y = y.reshape(b, h, w, c)
    y = layers.Pointwise(c, kernel_init=nn.initializers.zeros, name='out',
                         **kw)(y)
    return x + y


class Denoiser(nn.Module):
  """Conditional latent-diffusion U-Net predicting eps; see module docstring.

  Submodules (names are checkpoint paths): 'time_dense_0', 'time_dense_1',
  'pooled_dense', 'conv_in', 'down_{l}_block_{i}', 'down_{l}_attn',
  'down_{l}_downsample', 'mid_block_0', 'mid_attn', 'mid_block_1',
  'up_{l}_block_{i}', 'up_{l}_attn', 'up_{l}_upsample', 'out_norm',
  'conv_out'; parameters 'null_pooled' (D,) and 'null_tokens' (N, D).

  Attributes:
    widths: channels per resolution level, finest first; the latent sides
      must be divisible by 2 ** (len(widths) - 1).
    num_res_blocks: ResBlocks per encoder level (decoder: one more).
    num_heads: heads of every cross-attention; divides every width.
    attention_levels: levels (0 = finest) whose encoder and decoder stages
      end in cross-attention; the middle always has one.
    embed_dim: width of the timestep / conditioning embedding (even).
    detail_channels: P > 0 adds a pixel-detail input (B, h, w, P) on the
      latent grid (our departure, `diffusion.pixel_detail`): a zero-initialised
      3x3 conv 'detail_in' of it is added to conv_in's output, so a model
      warm-started from one without it starts as that model.
    dtype: compute dtype; the output is float32.
    param_dtype: parameter dtype.
  """
  widths: Sequence[int] = (16, 32, 48, 72)
  num_res_blocks: int = 2
  num_heads: int = 4
  attention_levels: Sequence[int] = (1, 2, 3)
  embed_dim: int = EMBED_DIM
  detail_channels: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _attends(self, level: int) -> bool:
    """Whether encoder and decoder level `level` end in cross-attention."""
    return level in self.attention_levels

  def _check_inputs(self, z_t, t, coarse_latent, ra_map, image_tokens,
                    image_pooled, drop_image, pixel_detail) -> None:
    """Raises ValueError on inconsistent shapes (static, not traced)."""
    divisor = 2 ** (len(self.widths) - 1)
    if z_t.ndim != 4 or z_t.shape[1] % divisor or z_t.shape[2] % divisor:
      raise ValueError(
          f'Denoiser needs z_t (B, h, w, C) with h and w divisible by '
          f'{divisor}; got shape {tuple(z_t.shape)}')
    b, h, w, _ = z_t.shape
    expected = {
        't': (t.shape, (b,)),
        'coarse_latent': (coarse_latent.shape, z_t.shape),
        'ra_map': (ra_map.shape, (b, h, w, 1)),
        'image_pooled': (image_pooled.shape, (b, image_tokens.shape[-1])),
        'drop_image': (drop_image.shape, (b,)),
    }
    if self.detail_channels:
      if pixel_detail is None:
        raise ValueError(f'Denoiser with detail_channels={self.detail_channels} '
                         'needs pixel_detail (B, h, w, P)')
      expected['pixel_detail'] = (pixel_detail.shape, (b, h, w, self.detail_channels))
    elif pixel_detail is not None:
      raise ValueError('Denoiser got pixel_detail but has detail_channels=0')
    for name, (shape, want) in expected.items():
      if tuple(shape) != tuple(want):
        raise ValueError(f'Denoiser: {name} has shape {tuple(shape)}, '
                         f'expected {tuple(want)}')
    if image_tokens.ndim != 3 or image_tokens.shape[0] != b:
      raise ValueError(f'Denoiser: image_tokens must be (B={b}, N, D); got '
                       f'shape {tuple(image_tokens.shape)}')

  @nn.compact
  def __call__(self, z_t: Array, t: Array, coarse_latent: Array,
               ra_map: Array, image_tokens: Array, image_pooled: Array,
               drop_image: Array, pixel_detail: Array | None = None) -> Array:
    """Predicts the noise in z_t.

    Args:
      z_t: (B, h, w, C) noised latent of the ground-truth mask; h, w
        divisible by 8 (with 4 levels).
      t: (B,) int32 timesteps in [0, 1000).
      coarse_latent: (B, h, w, C) the autoencoder's encoding of the coarse
        mask.
      ra_map: (B, h, w, 1) the coarse model's reverse-attention map in
        [0, 1], resized to the latent grid.
      image_tokens: (B, N, D) image tokens (`ImageEncoder`).
      image_pooled: (B, D) pooled image vector (`ImageEncoder`).
      drop_image: (B,) bool; True replaces that example's image condition
        (tokens and pooled) by the learned nulls (classifier-free guidance).
      pixel_detail: (B, h, w, P) with P = detail_channels, else None: pixels
        of the tile on the latent grid (`refiner.space_to_depth`).

    Returns:
      eps: (B, h, w, C) float32, the predicted noise.

    Raises:
      ValueError: on shapes that do not fit together or latent sides not
        divisible by 2 ** (len(widths) - 1).
    """
    self._check_inputs(z_t, t, coarse_latent, ra_map, image_tokens,
                       image_pooled, drop_image, pixel_detail)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = len(self.widths)
    _, num_tokens, token_dim = image_tokens.shape

    # Conditioning: image (or its learned null) and timestep embedding.
    null_pooled = self.param('null_pooled', nn.initializers.normal(0.02),
                             (token_dim,), self.param_dtype)
    null_tokens = self.param('null_tokens', nn.initializers.normal(0.02),
                             (num_tokens, token_dim), self.param_dtype)
    drop = jnp.asarray(drop_image, bool)
    pooled = jnp.where(drop[:, None], null_pooled[None],
                       image_pooled).astype(self.dtype)
    tokens = jnp.where(drop[:, None, None], null_tokens[None],
                       image_tokens).astype(self.dtype)
    emb = timestep_embedding(t, self.embed_dim)
    emb = nn.Dense(self.embed_dim, name='time_dense_0', **kw)(emb)
    emb = nn.Dense(self.embed_dim, name='time_dense_1', **kw)(nn.silu(emb))
    emb = emb + nn.Dense(self.embed_dim, name='pooled_dense', **kw)(pooled)
    emb = nn.silu(emb)  # Every FiLM projection reads silu(emb), as ADM.

    def block(features, name):
      return ResBlock(features, name=name, **kw)

    def attention(name):
      return CrossAttention(self.num_heads, name=name, **kw)

    # Encoder.
    x = jnp.concatenate([z_t, coarse_latent, ra_map], axis=-1)
    x = nn.Conv(self.widths[0], (3, 3), padding='SAME', name='conv_in',
                **kw)(x.astype(self.dtype))
    if self.detail_channels:
      x = x + nn.Conv(self.widths[0], (3, 3), padding='SAME',
                      kernel_init=nn.initializers.zeros, name='detail_in',
                      **kw)(pixel_detail.astype(self.dtype))
    skips = [x]
    for l, width in enumerate(self.widths):
      for i in range(self.num_res_blocks):
        x = block(width, f'down_{l}_block_{i}')(x, emb)
        if i == self.num_res_blocks - 1 and self._attends(l):
          x = attention(f'down_{l}_attn')(x, tokens)
        skips.append(x)
      if l < levels - 1:
        x = nn.Conv(width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    name=f'down_{l}_downsample', **kw)(x)
        skips.append(x)

    # Middle, at the coarsest level.
    x = block(self.widths[-1], 'mid_block_0')(x, emb)
    x = attention('mid_attn')(x, tokens)
    x = block(self.widths[-1], 'mid_block_1')(x, emb)

    # Decoder.
    for l in reversed(range(levels)):
      width = self.widths[l]
      for i in range(self.num_res_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = block(width, f'up_{l}_block_{i}')(x, emb)
      if self._attends(l):
        x = attention(f'up_{l}_attn')(x, tokens)
      if l > 0:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :],
                             (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        x = nn.Conv(width, (3, 3), padding='SAME', name=f'up_{l}_upsample',
                    **kw)(x)
    assert not skips, len(skips)

    x = nn.silu(nn.GroupNorm(_groups(x.shape[-1]), name='out_norm', **kw)(x))
    eps = nn.Conv(z_t.shape[-1], (3, 3), padding='SAME',
                  kernel_init=nn.initializers.zeros, name='conv_out', **kw)(x)
    return eps.astype(jnp.float32)
