"""Tests of vesseljax.data.tfds_builders: array_record, no TensorFlow."""

import sys

import cv2
import numpy as np
import pytest

from vesseljax.data import datasets
from vesseljax.data import tfds_builders
from vesseljax.data.sample import DataError


def _assert_same(tfds_samples, samples):
  assert [s.id for s in tfds_samples] == [s.id for s in samples]
  for a, b in zip(tfds_samples, samples):
    assert (
        a.image.dtype == np.uint8
        and a.label.dtype == np.bool_
        and a.fov.dtype == np.bool_
    )
    np.testing.assert_array_equal(a.image, b.image, err_msg=a.id)
    np.testing.assert_array_equal(a.label, b.label, err_msg=a.id)
    np.testing.assert_array_equal(a.fov, b.fov, err_msg=a.id)
    assert (a.observer2 is None) == (b.observer2 is None), a.id
    if b.observer2 is not None:
      assert a.observer2.dtype == np.bool_
      np.testing.assert_array_equal(a.observer2, b.observer2, err_msg=a.id)


def _array_record_files(data_dir):
  return sorted(data_dir.glob('*/*/*.array_record*'))


def test_chase_db1_round_trip_and_reuse(shared_datasets, tmp_path):
  data_dir = tmp_path / 'tfds'
  builder = tfds_builders.build('chase_db1', shared_datasets, data_dir)
  assert builder.name == 'chase_db1'
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 20,
      'test': 8,
  }
  files = _array_record_files(data_dir)
  assert len(files) == 2
  stamps = [f.stat().st_mtime_ns for f in files]

  for split in datasets.SPLITS:
    _assert_same(
        tfds_builders.load_split_tfds(
            'chase_db1', shared_datasets, data_dir, split
        ),
        datasets.load_split('chase_db1', shared_datasets, split),
    )

  # A second build reuses the complete one: it does not even read manual_dir.
  again = tfds_builders.build(
      'chase_db1', tmp_path / 'no_such_folder', data_dir
  )
  assert again.info.splits['test'].num_examples == 8
  assert _array_record_files(data_dir) == files
  assert [f.stat().st_mtime_ns for f in files] == stamps
  # Neither building nor reading imported TensorFlow.
  assert 'tensorflow' not in sys.modules


def _write(path, arr, params=()):
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), arr, list(params))


def _fake_drive(root):
  """Tiny DRIVE layout: train 21, 22; test 01 (no observer2), 05 (with one)."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:30, :34]
  fov = (yy - 15) ** 2 + (xx - 17) ** 2 < 13**2
  for split, nums in (('training', (21, 22)), ('test', (1, 5))):
    for nn in nums:
      d = root / 'DRIVE' / split
      bgr = rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)
      label = (
          np.repeat(
              ((rng.random((30, 34)) > 0.8) & fov)[:, :, None], 3, 2
          ).astype(np.uint8)
          * 255
      )
      gif = (cv2.IMWRITE_GIF_QUALITY, 8)
      _write(d / 'images' / f'{nn:02d}_{split}.tif', bgr)
      _write(d / '1st_manual' / f'{nn:02d}_manual1.gif', label, gif)
      _write(
          d / 'mask' / f'{nn:02d}_{split}_mask.gif',
          np.repeat(fov[:, :, None], 3, 2).astype(np.uint8) * 255,
          gif,
      )
      if nn == 5:
        _write(d / '2nd_manual' / f'{nn:02d}_manual2.gif', 255 - label, gif)


def test_fake_drive_round_trip(tmp_path):
  _fake_drive(tmp_path / 'src')
  data_dir = tmp_path / 'tfds'
  for split in datasets.SPLITS:
    got = tfds_builders.load_split_tfds(
        'drive', tmp_path / 'src' / 'DRIVE', data_dir, split
    )
    _assert_same(got, datasets.load_split('drive', tmp_path / 'src', split))
  assert [s.observer2 is None for s in got] == [True, False]
  assert 'tensorflow' not in sys.modules


def test_builder_names_and_instructions():
  for name, cls in tfds_builders.BUILDERS.items():
    assert cls.name == name
    assert datasets.DATASET_DIR_NAMES[name] in cls.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_bad_manual_dir(tmp_path):
  with pytest.raises(DataError, match='HRF'):
    tfds_builders.build('hrf', tmp_path, tmp_path / 'tfds')
  with pytest.raises(ValueError, match='stare'):
    tfds_builders.build('stare', tmp_path, tmp_path / 'tfds')
