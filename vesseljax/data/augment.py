"""Jitted, vmapped geometric augmentation: rotations, flips, elastic warps.

One example's transform is drawn from its own key (`sample_params`), turned
into a single sampling grid (`source_coords`) and applied once to the image,
label and FOV together (`warp`), so the three stay aligned. The batch form
vmaps over `jax.random.split(key, B)`.

The grid maps each output pixel p (row y, column x) to a source point:
  1. elastic: p1 = p + d(p), d a smooth random displacement field;
  2. rotation about the centre ((H - 1) / 2, (W - 1) / 2): p2 = R(-angle) p1;
  3. flips: x -> W - 1 - x and/or y -> H - 1 - y.
So, read forwards, the input is flipped, rotated by `angle` (counter-clockwise
as displayed, row 0 at the top, as `cv2.getRotationMatrix2D`), then warped.
The image is sampled bilinearly; label and FOV are sampled bilinearly and
thresholded at 0.5 (value >= 0.5 -> 1), so they stay exactly {0, 1}. Source
points outside the input read 0 for the image, label and FOV alike.

All options are static Python values: bind them with `functools.partial`
before `jax.jit`, as `make_augment_fn` does.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class AugmentParams(NamedTuple):
  """One example's random transform.

  Attributes:
    angle_rad: () float32 rotation, radians, counter-clockwise as displayed.
    flip_h: () bool, mirror left-right (along W).
    flip_v: () bool, mirror top-bottom (along H).
    displacement: (H, W, 2) float32 elastic displacement (dy, dx) in pixels,
      added to the output grid before rotation; zeros when not applied.
  """
  angle_rad: jax.Array
  flip_h: jax.Array
  flip_v: jax.Array
  displacement: jax.Array


def _check_options(max_rotation_deg: float, elastic_alpha_px: float,
                   elastic_sigma_px: float, elastic_prob: float) -> None:
  if max_rotation_deg < 0:
    raise ValueError(f'max_rotation_deg must be >= 0, got {max_rotation_deg}')
  if elastic_alpha_px < 0:
    raise ValueError(f'elastic_alpha_px must be >= 0, got {elastic_alpha_px}')
  if elastic_sigma_px < 0:
    raise ValueError(f'elastic_sigma_px must be >= 0, got {elastic_sigma_px}')
  if not 0.0 <= elastic_prob <= 1.0:
    raise ValueError(f'elastic_prob must be in [0, 1], got {elastic_prob}')


@functools.lru_cache(maxsize=32)
def _smoothing_matrix(n: int, sigma_px: float) -> tuple[np.ndarray, float]:
  """A valid 1-D Gaussian convolution as a matrix, and its noise gain.

  Returns:
    g: (n, n + 2r) float32 with g[i, i:i + 2r + 1] = the normalised Gaussian
      kernel of radius r = ceil(3 sigma); g @ x is the valid convolution of
      x (n + 2r,) with the kernel.
    gain: sum of squared kernel taps: the standard deviation of 2-D white
      unit-variance noise after smoothing along both axes.
  """
  r = int(math.ceil(3.0 * sigma_px))
  t = np.arange(-r, r + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma_px) ** 2)
  k /= k.sum()
  g = np.zeros((n, n + 2 * r), np.float32)
  for i in range(n):
    g[i, i:i + 2 * r + 1] = k
  return g, float(np.sum(k ** 2))


def elastic_displacement(key: jax.Array, shape: tuple[int, int],
                         alpha_px: float, sigma_px: float) -> jax.Array:
  """A smooth random displacement field.

  White noise, uniform in [-1, 1) (as in Simard et al. 2003; 4x cheaper to
  draw than normals on CPU), on a grid padded by 3 sigma on each side is
  smoothed by a separable Gaussian convolution (valid, as two matrix products,
  so the field's statistics are the same up to the border), divided by its
  analytic standard deviation and scaled by `alpha_px`. After smoothing over
  many taps the field is close to Gaussian.

  Args:
    key: PRNG key.
    shape: (H, W), static.
    alpha_px: RMS displacement per axis, pixels (static, >= 0).
    sigma_px: Gaussian smoothing standard deviation, pixels (static, >= 0;
      0 leaves the noise white).

  Returns:
    (H, W, 2) float32 displacement (dy, dx), pixels.
  """
  h, w = shape
  noise_std = 1.0 / math.sqrt(3.0)  # of uniform [-1, 1)
  if sigma_px <= 0:
    noise = jax.random.uniform(key, (2, h, w), jnp.float32, -1.0, 1.0)
    return jnp.moveaxis((alpha_px / noise_std) * noise, 0, -1)
  gy, gain = _smoothing_matrix(h, float(sigma_px))
  gx, _ = _smoothing_matrix(w, float(sigma_px))
  noise = jax.random.uniform(key, (2, gy.shape[1], gx.shape[1]), jnp.float32,
                             -1.0, 1.0)
  hp = jax.lax.Precision.HIGHEST
  field = jnp.matmul(jnp.matmul(jnp.asarray(gy), noise, precision=hp),
                     jnp.asarray(gx).T, precision=hp)  # (2, H, W)
  return jnp.moveaxis((alpha_px / (noise_std * gain)) * field, 0, -1)


def sample_params(key: jax.Array, shape: tuple[int, int], *,
                  max_rotation_deg: float, flip: bool,
                  elastic_alpha_px: float, elastic_sigma_px: float,
                  elastic_prob: float) -> AugmentParams:
  """Draws one example's transform.

  Args:
    key: PRNG key; split here, each part used once.
    shape: (H, W), static.
    max_rotation_deg: angle drawn uniformly in [-max, max] degrees.
    flip: whether to mirror left-right and top-bottom, each with p = 0.5.
    elastic_alpha_px: RMS elastic displacement per axis, pixels.
    elastic_sigma_px: smoothing of the displacement field, pixels.
    elastic_prob: probability that the elastic warp is applied, in [0, 1].

  Returns:
    `AugmentParams`.
  """
  _check_options(max_rotation_deg, elastic_alpha_px, elastic_sigma_px,
                 elastic_prob)
  h, w = shape
  k_rot, k_flip_h, k_flip_v, k_apply, k_field = jax.random.split(key, 5)
  if max_rotation_deg > 0:
    max_rad = math.radians(max_rotation_deg)
    angle = jax.random.uniform(k_rot, (), jnp.float32, -max_rad, max_rad)
  else:
    angle = jnp.zeros((), jnp.float32)
  if flip:
    flip_h = jax.random.bernoulli(k_flip_h, 0.5)
    flip_v = jax.random.bernoulli(k_flip_v, 0.5)
  else:
    flip_h = flip_v = jnp.zeros((), jnp.bool_)
  if elastic_prob > 0 and elastic_alpha_px > 0:
    field = elastic_displacement(k_field, (h, w), elastic_alpha_px,
                                 elastic_sigma_px)
    apply = jax.random.bernoulli(k_apply, elastic_prob)
    # A scalar factor: 0 * a finite field is exactly 0.
    displacement = field * apply.astype(jnp.float32)
  else:
    displacement = jnp.zeros((h, w, 2), jnp.float32)
  return AugmentParams(angle, flip_h, flip_v, displacement)


def source_coords(params: AugmentParams,
                  shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """The composed sampling grid (see the module docstring).

  Args:
    params: one example's `AugmentParams`.
    shape: (H, W), static.

  Returns:
    (ys, xs): each (H, W) float32, the source row and column, pixels, of each
    output pixel; the identity transform gives exactly the integer grid.
  """
  h, w = shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing='ij')
  # Offsets from the centre: half-integers or integers, exact in float32.
  y1 = yy - cy + params.displacement[..., 0]
  x1 = xx - cx + params.displacement[..., 1]
  cos, sin = jnp.cos(params.angle_rad), jnp.sin(params.angle_rad)
  xs = cx + cos * x1 - sin * y1
  ys = cy + sin * x1 + cos * y1
  xs = jnp.where(params.flip_h, (w - 1) - xs, xs)
  ys = jnp.where(params.flip_v, (h - 1) - ys, ys)
  return ys, xs


def bilinear_sample(values: jax.Array, ys: jax.Array,
                    xs: jax.Array) -> jax.Array:
  """Samples (H, W, C) `values` at (ys, xs) bilinearly, 0 outside.

  Neighbours outside the input count as 0 (so a point half a pixel outside
  the border reads half the border value); integer points read the input
  exactly. One gather fetches each point's 2x2 neighbourhood from a
  zero-padded (H + 1, W + 1, 4C) stack of shifted copies (XLA's CPU backend
  recomputes the grid inside every gather, so one beats four).

  Args:
    values: (H, W, C) float32.
    ys: (Ho, Wo) float32 source rows, pixels.
    xs: (Ho, Wo) float32 source columns, pixels.

  Returns:
    (Ho, Wo, C) float32.
  """
  h, w, c = values.shape
  padded = jnp.pad(values, ((1, 1), (1, 1), (0, 0)))
  # neighbours[i, j] = values at (i-1, j-1), (i-1, j), (i, j-1), (i, j).
  neighbours = jnp.concatenate(
      [padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]],
      axis=-1).reshape((h + 1) * (w + 1), 4 * c)
  y0 = jnp.floor(ys)
  x0 = jnp.floor(xs)
  fy = (ys - y0)[..., None]
  fx = (xs - x0)[..., None]
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  # With y0 in [-1, H - 1] at least one neighbour row is inside (the other
  # reads the zero pad); further out all four are outside.
  inside = (y0 >= -1) & (y0 <= h - 1) & (x0 >= -1) & (x0 <= w - 1)
  idx = ((jnp.clip(y0, -1, h - 1) + 1) * (w + 1)
         + jnp.clip(x0, -1, w - 1) + 1)
  v = jnp.where(inside[..., None], neighbours[idx], 0.0)
  v00, v01, v10, v11 = jnp.split(v, 4, axis=-1)
  return ((1.0 - fy) * ((1.0 - fx) * v00 + fx * v01)
          + fy * ((1.0 - fx) * v10 + fx * v11))


def warp(image: jax.Array, label: jax.Array, fov: jax.Array, ys: jax.Array,
         xs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Applies one sampling grid to an image, its label and its FOV.

  Args:
    image: (H, W, C) float32 in [0, 1].
    label: (H, W) float32 in {0, 1}.
    fov: (H, W) float32 in {0, 1}.
    ys, xs: (H, W) float32 source coordinates from `source_coords`.

  Returns:
    image (H, W, C) float32 (bilinear, 0 outside the input), label and fov
    (H, W) float32 in {0, 1} (bilinear, then >= 0.5; 0 outside the input).
  """
  c = image.shape[-1]
  stacked = jnp.concatenate(
      [image.astype(jnp.float32), label.astype(jnp.float32)[..., None],
       fov.astype(jnp.float32)[..., None]], axis=-1)
  out = bilinear_sample(stacked, ys, xs)
  binary = (out[..., c:] >= 0.5).astype(jnp.float32)
  return out[..., :c], binary[..., 0], binary[..., 1]


def augment_example(
    key: jax.Array, image: jax.Array, label: jax.Array, fov: jax.Array, *,
    max_rotation_deg: float, flip: bool, elastic_alpha_px: float,
    elastic_sigma_px: float, elastic_prob: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Randomly rotates, flips and elastically warps one example.

  Args:
    key: PRNG key for this example.
    image: (H, W, C) float32 in [0, 1].
    label: (H, W) float32 in {0, 1}.
    fov: (H, W) float32 in {0, 1}.
    max_rotation_deg: rotation drawn uniformly in [-max, max] degrees.
    flip: random left-right and top-bottom mirroring, each with p = 0.5.
    elastic_alpha_px: RMS elastic displacement per axis, pixels.
    elastic_sigma_px: Gaussian smoothing of the displacement field, pixels.
    elastic_prob: probability of the elastic warp, in [0, 1].

  Returns:
    (image, label, fov) with the input shapes, all float32; label and fov
    exactly {0, 1}. With rotation 0, no flip and elastic_prob 0 they equal
    the inputs.
  """
  shape = image.shape[:2]
  params = sample_params(
      key, shape, max_rotation_deg=max_rotation_deg, flip=flip,
      elastic_alpha_px=elastic_alpha_px, elastic_sigma_px=elastic_sigma_px,
      elastic_prob=elastic_prob)
  ys, xs = source_coords(params, shape)
  return warp(image, label, fov, ys, xs)


def augment_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, fovs: jax.Array, *,
    max_rotation_deg: float, flip: bool, elastic_alpha_px: float,
    elastic_sigma_px: float, elastic_prob: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`augment_example` vmapped over a batch, one key per example.

  Args:
    key: PRNG key; example b uses `jax.random.split(key, B)[b]`.
    images: (B, H, W, C) float32 in [0, 1].
    labels: (B, H, W) float32 in {0, 1}.
    fovs: (B, H, W) float32 in {0, 1}.
    max_rotation_deg, flip, elastic_alpha_px, elastic_sigma_px, elastic_prob:
      as `augment_example`; static under `jit`.

  Returns:
    (images, labels, fovs) with the input shapes, float32.
  """
  keys = jax.random.split(key, images.shape[0])
  fn = functools.partial(
      augment_example, max_rotation_deg=max_rotation_deg, flip=flip,
      elastic_alpha_px=elastic_alpha_px, elastic_sigma_px=elastic_sigma_px,
      elastic_prob=elastic_prob)
  return jax.vmap(fn)(keys, images, labels, fovs)


def make_augment_fn(
    *, max_rotation_deg: float, flip: bool, elastic_alpha_px: float,
    elastic_sigma_px: float, elastic_prob: float,
) -> Callable[[jax.Array, jax.Array, jax.Array, jax.Array],
              tuple[jax.Array, jax.Array, jax.Array]]:
  """A jitted `augment_batch` with the options bound.

  Returns:
    fn(key, images (B, H, W, C), labels (B, H, W), fovs (B, H, W)) ->
    (images, labels, fovs), float32, as `augment_batch`.
  """
  _check_options(max_rotation_deg, elastic_alpha_px, elastic_sigma_px,
                 elastic_prob)
  return jax.jit(functools.partial(
      augment_batch, max_rotation_deg=float(max_rotation_deg), flip=bool(flip),
      elastic_alpha_px=float(elastic_alpha_px),
      elastic_sigma_px=float(elastic_sigma_px),
      elastic_prob=float(elastic_prob)))
