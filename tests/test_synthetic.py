"""Tests for vesseljax.data.synthetic."""

import numpy as np
import pytest

from vesseljax.data import synthetic
from vesseljax.data.sample import Sample


def test_same_seed_gives_identical_arrays():
  a = synthetic.make_fundus(3, (64, 64))
  b = synthetic.make_fundus(3, (64, 64))
  assert a.id == b.id == 'synthetic/0003'
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.label, b.label)
  np.testing.assert_array_equal(a.fov, b.fov)


def test_different_seeds_differ():
  a = synthetic.make_fundus(1, (64, 64))
  b = synthetic.make_fundus(2, (64, 64))
  assert not np.array_equal(a.image, b.image)
  assert not np.array_equal(a.label, b.label)


@pytest.mark.parametrize('size', [(64, 64), (48, 80)])
def test_shapes_and_dtypes(size):
  s = synthetic.make_fundus(0, size)
  assert isinstance(s, Sample)
  assert s.image.shape == size + (3,) and s.image.dtype == np.uint8
  assert s.label.shape == size and s.label.dtype == np.bool_
  assert s.fov.shape == size and s.fov.dtype == np.bool_
  assert s.observer2 is None


def test_label_inside_fov_and_fov_is_a_disc():
  s = synthetic.make_fundus(5, (96, 96))
  assert not np.any(s.label & ~s.fov)
  assert s.fov[48, 48] and not s.fov[0, 0] and not s.fov[-1, -1]
  # Dark outside the FOV, bright inside.
  assert s.image[~s.fov].mean() < 10
  assert s.image[s.fov].mean() > 40


@pytest.mark.parametrize('size', [(64, 64), (96, 128), (256, 256)])
def test_vessel_fraction_like_real_data(size):
  seeds = range(3) if size[0] > 200 else range(8)
  for seed in seeds:
    s = synthetic.make_fundus(seed, size)
    fraction = s.label.sum() / s.fov.sum()
    assert 0.07 <= fraction <= 0.14, (seed, fraction)


def test_vessels_darker_mainly_in_green():
  for seed in range(4):
    s = synthetic.make_fundus(seed, (128, 128))
    img = s.image.astype(np.float64)
    background = s.fov & ~s.label
    vessel_mean = img[s.label].mean(axis=0)
    background_mean = img[background].mean(axis=0)
    assert vessel_mean[1] < background_mean[1] - 10, (seed, vessel_mean)
    relative_drop = 1.0 - vessel_mean / background_mean  # R, G, B
    assert relative_drop[1] > relative_drop[0], (seed, relative_drop)


def test_splits_use_disjoint_seeds():
  train = synthetic.make_split('train', 3, (48, 48))
  test = synthetic.make_split('test', 2, (48, 48))
  assert len(train) == 3 and len(test) == 2
  assert not {s.id for s in train} & {s.id for s in test}
  for a in train:
    for b in test:
      assert not np.array_equal(a.image, b.image)
  # Without drawing images: whole splits and other base seeds are disjoint.
  seeds = [set(synthetic.split_seeds(split, 10_000, base))
           for split in ('train', 'test') for base in (0, 1)]
  assert sum(map(len, seeds)) == len(set().union(*seeds))
  again = synthetic.make_split('train', 3, (48, 48))
  np.testing.assert_array_equal(train[2].image, again[2].image)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='split'):
    synthetic.make_split('val', 2, (48, 48))
  with pytest.raises(ValueError, match='size'):
    synthetic.make_fundus(0, (8, 64))
  with pytest.raises(ValueError, match='seed'):
    synthetic.make_fundus(-1)
