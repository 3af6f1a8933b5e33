"""Tests for vesseljax.data.pipeline."""

import jax
import numpy as np
import pytest

from vesseljax.data import pipeline
from vesseljax.data import synthetic
from vesseljax.data.sample import DataError

SIZE = 48


def _dataset(n=3, size=(SIZE, SIZE)):
  samples = [synthetic.make_fundus(seed, size) for seed in range(n)]
  return pipeline.ArrayDataset(
      images=np.stack([s.image for s in samples]).astype(np.float32) / 255.0,
      labels=np.stack([s.label for s in samples]),
      fovs=np.stack([s.fov for s in samples]),
      ids=[s.id for s in samples])


@pytest.fixture(scope='module')
def data():
  return _dataset()


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_patch_shapes_and_dtypes(data):
  batch = pipeline.patch_batch(data, seed=0, step=0, batch_size=4,
                               patch_size=16)
  assert set(batch) == {'image', 'label', 'fov'}
  assert batch['image'].shape == (4, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  for k in ('label', 'fov'):
    assert batch[k].shape == (4, 16, 16) and batch[k].dtype == np.float32
    assert set(np.unique(batch[k])) <= {0.0, 1.0}


def test_batches_are_a_function_of_seed_and_step(data):
  sampler = pipeline.PatchSampler(data, seed=1, batch_size=4, patch_size=16)
  later = sampler.batch(7)
  sampler.batch(3)
  # A fresh sampler (a resumed run) and the function form agree.
  resumed = pipeline.PatchSampler(data, seed=1, batch_size=4, patch_size=16)
  _assert_batches_equal(later, resumed.batch(7))
  _assert_batches_equal(later, pipeline.patch_batch(data, 1, 7, 4, 16))
  assert not np.array_equal(later['image'], sampler.batch(8)['image'])
  other_seed = pipeline.PatchSampler(data, seed=2, batch_size=4, patch_size=16)
  assert not np.array_equal(later['image'], other_seed.batch(7)['image'])


@pytest.mark.parametrize('fraction', [0.25, 0.9])
def test_patches_meet_the_fov_fraction(data, fraction):
  sampler = pipeline.PatchSampler(data, seed=0, batch_size=8, patch_size=20,
                                  fov_min_fraction=fraction)
  for step in range(20):
    fov = sampler.batch(step)['fov']
    assert fov.mean(axis=(1, 2)).min() >= fraction


def test_patches_are_crops_of_the_right_image(data):
  p = 16
  batch = pipeline.PatchSampler(data, seed=0, batch_size=4,
                                patch_size=p).batch(0)
  windows = np.lib.stride_tricks.sliding_window_view(
      data.images, (p, p), axis=(1, 2))  # (N, H-p+1, W-p+1, C, p, p)
  for k in range(4):
    crop = np.moveaxis(batch['image'][k], -1, 0)
    hits = np.argwhere(np.all(windows == crop, axis=(3, 4, 5)))
    assert len(hits), k
    i, y, x = hits[0]
    np.testing.assert_array_equal(batch['label'][k],
                                  data.labels[i, y:y + p, x:x + p])
    np.testing.assert_array_equal(batch['fov'][k],
                                  data.fovs[i, y:y + p, x:x + p])


@pytest.mark.parametrize('patch_size', [0, SIZE, 2 * SIZE])
def test_whole_images(data, patch_size):
  batch = pipeline.patch_batch(data, seed=0, step=0, batch_size=5,
                               patch_size=patch_size)
  assert batch['image'].shape == (5, SIZE, SIZE, 3)
  for k in range(5):
    matches = [i for i in range(len(data))
               if np.array_equal(batch['image'][k], data.images[i])]
    assert len(matches) == 1
    np.testing.assert_array_equal(batch['label'][k], data.labels[matches[0]])


def test_patch_errors():
  wide = _dataset(n=1, size=(32, 48))
  with pytest.raises(ValueError, match='patch_size 40'):
    pipeline.PatchSampler(wide, seed=0, batch_size=2, patch_size=40)
  with pytest.raises(DataError, match='synthetic/0000'):
    pipeline.PatchSampler(wide, seed=0, batch_size=2, patch_size=30,
                          fov_min_fraction=1.0)
  with pytest.raises(ValueError, match='fov_min_fraction'):
    pipeline.PatchSampler(wide, seed=0, batch_size=2, patch_size=8,
                          fov_min_fraction=1.5)


@pytest.mark.parametrize('n, batch_size', [(5, 2), (4, 2), (3, 4)])
def test_image_batches_cover_each_image_once(n, batch_size):
  data = _dataset(n=n, size=(32, 32))
  batches = list(pipeline.image_batches(data, batch_size))
  assert len(batches) == -(-n // batch_size)
  for batch in batches:
    assert batch['image'].shape == (batch_size, 32, 32, 3)
    assert batch['label'].shape == batch['fov'].shape == (batch_size, 32, 32)
    assert batch['valid'].dtype == np.bool_
  index = np.concatenate([b['index'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(index[valid], np.arange(n))
  assert np.all(index[~valid] == -1)
  assert valid.sum() == n and np.all(valid[:n])
  images = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(images[:n], data.images)
  assert np.all(images[n:] == 0)
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels[:n], data.labels.astype(np.float32))


def test_shard():
  batch = {'image': np.zeros((8, 4, 4, 1)), 'valid': np.ones(8, bool)}
  out = pipeline.shard(batch, jax.local_device_count())
  assert jax.local_device_count() == 4
  assert out['image'].shape == (4, 2, 4, 4, 1) and out['valid'].shape == (4, 2)
  with pytest.raises(ValueError, match=r'batch size 6 .* device count 4'):
    pipeline.shard({'image': np.zeros((6, 2))}, 4)


def test_array_dataset_validates():
  images = np.zeros((2, 8, 8, 1), np.float32)
  masks = np.zeros((2, 8, 8), bool)
  with pytest.raises(DataError, match='labels'):
    pipeline.ArrayDataset(images, masks.astype(np.float32), masks, ['a', 'b'])
  with pytest.raises(DataError, match='ids'):
    pipeline.ArrayDataset(images, masks, masks, ['a'])


def test_process_slices_reassemble_the_global_batch():
  batch = {'image': np.arange(8 * 3).reshape(8, 3), 'label': np.arange(8)}
  parts = [pipeline.process_slice(batch, i, 4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), batch['image'])
  np.testing.assert_array_equal(parts[1]['label'], [2, 3])
  assert pipeline.process_slice(batch, 0, 1) is batch
  with pytest.raises(ValueError, match='not divisible by the 3 hosts'):
    pipeline.process_slice(batch, 0, 3)
  with pytest.raises(ValueError, match='outside'):
    pipeline.process_slice(batch, 4, 4)
  # One host: host_shard is shard over the local devices.
  sharded = pipeline.host_shard(batch)
  assert sharded['image'].shape == (4, 2, 3)
