"""Tests for vesseljax.data.augment (tiny images; each config compiles once)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vesseljax.data import augment

H, W = 24, 32
FULL = dict(max_rotation_deg=15.0, flip=True, elastic_alpha_px=3.0,
            elastic_sigma_px=3.0, elastic_prob=1.0)
NONE = dict(max_rotation_deg=0.0, flip=False, elastic_alpha_px=3.0,
            elastic_sigma_px=3.0, elastic_prob=0.0)


def _example(seed=0, c=2):
  rng = np.random.default_rng(seed)
  image = scipy.ndimage.gaussian_filter(
      rng.random((H, W, c)), (1.5, 1.5, 0)).astype(np.float32)
  label = (image[..., 0] > np.median(image[..., 0])).astype(np.float32)
  yy, xx = np.mgrid[:H, :W]
  fov = ((yy - (H - 1) / 2) ** 2 + (xx - (W - 1) / 2) ** 2
         <= (0.45 * W) ** 2).astype(np.float32)
  return image, label, fov


def _batch(b=3):
  examples = [_example(seed) for seed in range(b)]
  return tuple(np.stack(x) for x in zip(*examples))


@pytest.fixture(scope='module')
def full_fn():
  return augment.make_augment_fn(**FULL)


def test_shapes_dtypes_and_binary_masks(full_fn):
  images, labels, fovs = _batch()
  out = full_fn(jax.random.key(0), images, labels, fovs)
  for got, want in zip(out, (images, labels, fovs)):
    assert got.shape == want.shape and got.dtype == jnp.float32
  for mask in out[1:]:
    assert set(np.unique(np.asarray(mask))) <= {0.0, 1.0}
  assert np.asarray(out[0]).min() >= 0.0 and np.asarray(out[0]).max() <= 1.0


def test_deterministic_per_key_and_keys_differ(full_fn):
  images, labels, fovs = _batch()
  a = full_fn(jax.random.key(1), images, labels, fovs)
  b = full_fn(jax.random.key(1), images, labels, fovs)
  c = full_fn(jax.random.key(2), images, labels, fovs)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  # Examples in one batch get different transforms.
  same_input = np.repeat(images[:1], 3, axis=0)
  d = full_fn(jax.random.key(1), same_input, labels[:1].repeat(3, 0),
              fovs[:1].repeat(3, 0))
  assert not np.array_equal(np.asarray(d[0][0]), np.asarray(d[0][1]))


def test_batch_is_vmap_of_example_over_split_keys(full_fn):
  images, labels, fovs = _batch()
  key = jax.random.key(3)
  out = full_fn(key, images, labels, fovs)
  example = jax.jit(lambda k, i, l, f: augment.augment_example(k, i, l, f,
                                                               **FULL))
  for b, k in enumerate(jax.random.split(key, 3)):
    ref = example(k, images[b], labels[b], fovs[b])
    for got, want in zip(out, ref):
      np.testing.assert_allclose(np.asarray(got[b]), np.asarray(want),
                                 atol=1e-5)


def test_identity_case_returns_inputs():
  images, labels, fovs = _batch()
  out = augment.make_augment_fn(**NONE)(jax.random.key(0), images, labels, fovs)
  for got, want in zip(out, (images, labels, fovs)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_rotation_matches_scipy_in_the_interior():
  image, label, fov = _example()
  kwargs = dict(NONE, max_rotation_deg=15.0)
  key = jax.random.key(7)
  params = augment.sample_params(key, (H, W), **kwargs)
  angle_deg = math.degrees(float(params.angle_rad))
  assert 0.5 < abs(angle_deg) <= 15.0
  out, _, _ = augment.augment_example(key, image, label, fov, **kwargs)
  interior = np.s_[5:-5, 5:-5]
  for ch in range(image.shape[-1]):
    ref = scipy.ndimage.rotate(image[..., ch], angle_deg, reshape=False,
                               order=1)
    np.testing.assert_allclose(np.asarray(out[..., ch])[interior],
                               ref[interior], atol=1e-5)


@pytest.mark.parametrize('angle_deg', [-12.0, 30.0])
def test_fixed_rotation_matches_scipy_and_zero_outside(angle_deg):
  image, label, fov = _example()
  params = augment.AugmentParams(
      jnp.float32(math.radians(angle_deg)), jnp.bool_(False), jnp.bool_(False),
      jnp.zeros((H, W, 2), jnp.float32))
  ys, xs = augment.source_coords(params, (H, W))
  ones = np.ones_like(label)
  out_image, out_ones, out_fov = augment.warp(image, ones, fov, ys, xs)
  ref = scipy.ndimage.rotate(image[..., 0], angle_deg, reshape=False, order=1)
  np.testing.assert_allclose(np.asarray(out_image[..., 0])[6:-6, 6:-6],
                             ref[6:-6, 6:-6], atol=1e-5)
  if abs(angle_deg) >= 30:  # corners come from outside the input
    for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
      assert float(out_ones[corner]) == 0.0
      assert float(out_fov[corner]) == 0.0
      assert np.all(np.asarray(out_image[corner]) == 0.0)


def test_flip_only_equals_np_flip():
  image, label, fov = _example()
  kwargs = dict(NONE, flip=True)
  fn = jax.jit(lambda k: augment.augment_example(k, image, label, fov,
                                                 **kwargs))
  seen = set()
  for seed in range(8):
    key = jax.random.key(seed)
    params = augment.sample_params(key, (H, W), **kwargs)
    flip_h, flip_v = bool(params.flip_h), bool(params.flip_v)
    seen.add((flip_h, flip_v))
    axes = tuple(a for a, f in ((0, flip_v), (1, flip_h)) if f)
    for got, want in zip(fn(key), (image, label, fov)):
      np.testing.assert_array_equal(np.asarray(got), np.flip(want, axes))
  assert len(seen) >= 3


def test_same_transform_hits_image_label_and_fov(full_fn):
  images, labels, fovs = _batch()
  # Channels carry the label and the FOV: thresholded the same way as the
  # masks, they must come out identical to them.
  stacked = np.stack([labels, fovs], axis=-1)
  out_images, out_labels, out_fovs = full_fn(
      jax.random.key(5), stacked, labels, fovs)
  out_images = np.asarray(out_images)
  np.testing.assert_array_equal((out_images[..., 0] >= 0.5).astype(np.float32),
                                np.asarray(out_labels))
  np.testing.assert_array_equal((out_images[..., 1] >= 0.5).astype(np.float32),
                                np.asarray(out_fovs))
  assert not np.array_equal(np.asarray(out_labels), labels)


def test_elastic_field_scale_and_smoothness():
  field = np.asarray(augment.elastic_displacement(
      jax.random.key(0), (64, 64), alpha_px=4.0, sigma_px=4.0))
  assert field.shape == (64, 64, 2) and field.dtype == np.float32
  rms = np.sqrt(np.mean(field ** 2))
  assert 2.0 < rms < 6.0, rms
  # Smooth: neighbouring displacements differ far less than the field does.
  step = np.sqrt(np.mean(np.diff(field, axis=0) ** 2))
  assert step < 0.3 * rms


def test_bad_options_raise():
  with pytest.raises(ValueError, match='elastic_prob'):
    augment.make_augment_fn(**dict(FULL, elastic_prob=1.5))
  with pytest.raises(ValueError, match='max_rotation_deg'):
    augment.make_augment_fn(**dict(FULL, max_rotation_deg=-1.0))
