"""Tests of vesseljax.data.datasets: real layouts (few loads) and bad input."""

import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from vesseljax.data import bundle, datasets
from vesseljax.data.sample import DataError, Sample

# ---------------------------------------------------------------------------
# Synthetic data.


def _fundus(h=48, w=52, seed=0):
  """A fake fundus photo: bright disc, dark 'vessels', noisy black surround.

  Returns:
    rgb (h, w, 3) uint8, fov (h, w) bool (the disc), label (h, w) bool.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.45 * min(h, w)) ** 2
  label = fov & ((np.abs(yy - xx * h / w) < 1.5) | (np.abs(xx - w // 3) < 1))
  rgb = rng.integers(0, 6, (h, w, 3)).astype(np.uint8)
  rgb[fov] = (170, 80, 30)
  rgb[label] = (110, 40, 15)
  return rgb, fov, label


def _write(path, arr, params=()):
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), arr, list(params)), path
  return path


def _write_rgb(path, rgb):
  return _write(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_mask(path, mask, rgb=False):
  """Writes a bool mask as {0, 255}; GIF as 3 channels (cv2 encodes it so)."""
  m = mask.astype(np.uint8) * 255
  if path.suffix == '.gif':
    return _write(
        path, np.repeat(m[:, :, None], 3, 2), (cv2.IMWRITE_GIF_QUALITY, 8)
    )
  if rgb:
    m = np.repeat(m[:, :, None], 3, 2)
  return _write(path, m)


def _make_drive(root, train=(21, 22), test=(1, 5), obs2=(5,)):
  folder = root / 'DRIVE'
  for split, nums in (('training', train), ('test', test)):
    for i, nn in enumerate(nums):
      rgb, fov, label = _fundus(seed=nn)
      d = folder / split
      _write_rgb(d / 'images' / f'{nn:02d}_{split}.tif', rgb)
      _write_mask(d / '1st_manual' / f'{nn:02d}_manual1.gif', label)
      _write_mask(d / 'mask' / f'{nn:02d}_{split}_mask.gif', fov)
      if split == 'test' and nn in obs2:
        _write_mask(
            d / '2nd_manual' / f'{nn:02d}_manual2.gif', label & (i % 2 == 0)
        )
  return folder


def _make_chase(root, stems=('01L', '02R', '11L')):
  folder = root / 'CHASEDB1'
  for k, stem in enumerate(stems):
    rgb, _, label = _fundus(seed=k)
    _write_rgb(folder / f'Image_{stem}.jpg', rgb)
    _write(
        folder / f'Image_{stem}_1stHO.png',
        label.astype(np.uint8),
        (cv2.IMWRITE_PNG_BILEVEL, 1),
    )
    _write(
        folder / f'Image_{stem}_2ndHO.png',
        label.astype(np.uint8),
        (cv2.IMWRITE_PNG_BILEVEL, 1),
    )
  return folder


def _make_hrf(root, stems=('01_h', '01_dr', '06_g')):
  folder = root / 'HRF'
  for k, stem in enumerate(stems):
    rgb, fov, label = _fundus(seed=k)
    ext = '.JPG' if stem.endswith('dr') else '.jpg'
    _write_rgb(folder / 'images' / f'{stem}{ext}', rgb)
    _write_mask(folder / 'manual1' / f'{stem}.tif', label)
    _write_mask(folder / 'mask' / f'{stem}_mask.tif', fov, rgb=True)
  return folder


def _write_tiff(path, arr):
  """Minimal uncompressed uint8 TIFF, any channel count (cv2 writes 1, 3, 4)."""
  h, w, c = arr.shape
  data = np.ascontiguousarray(arr, np.uint8).tobytes()
  bps = struct.pack(f'<{c}H', *([8] * c))
  ifd_off = 8 + len(data) + len(bps)
  ifd_off += ifd_off % 2
  tags = [
      (256, 4, 1, w),
      (257, 4, 1, h),
      (258, 3, c, 8 + len(data)),
      (259, 3, 1, 1),
      (262, 3, 1, 2),
      (273, 4, 1, 8),
      (277, 3, 1, c),
      (278, 4, 1, h),
      (279, 4, 1, len(data)),
      (284, 3, 1, 1),
      (338, 3, 1, 0),
  ]
  out = b'II*\0' + struct.pack('<I', ifd_off) + data + bps
  out += b'\0' * (ifd_off - len(out)) + struct.pack('<H', len(tags))
  for tag, typ, cnt, val in tags:
    if typ == 3 and cnt == 1:  # A SHORT value, left-aligned in 4 bytes.
      out += struct.pack('<HHIHH', tag, typ, cnt, val, 0)
    else:
      out += struct.pack('<HHII', tag, typ, cnt, val)
  path.write_bytes(out + struct.pack('<I', 0))
  return path


# ---------------------------------------------------------------------------
# Real data: listings (cheap) and a few loads.

_EXPECTED = {
    ('drive', 'train'): (20, 'drive/21_training', 'drive/40_training'),
    ('drive', 'test'): (20, 'drive/01_test', 'drive/20_test'),
    ('chase_db1', 'train'): (20, 'chase_db1/Image_01L', 'chase_db1/Image_10R'),
    ('chase_db1', 'test'): (8, 'chase_db1/Image_11L', 'chase_db1/Image_14R'),
    ('hrf', 'train'): (15, 'hrf/01_dr', 'hrf/05_h'),
    ('hrf', 'test'): (30, 'hrf/06_dr', 'hrf/15_h'),
}


@pytest.mark.parametrize('name,split', sorted(_EXPECTED))
def test_real_split_listing(shared_datasets, name, split):
  count, first, last = _EXPECTED[(name, split)]
  files = datasets.list_split(name, shared_datasets, split)
  ids = [f.id for f in files]
  assert len(ids) == count and ids == sorted(ids) and len(set(ids)) == count
  assert (ids[0], ids[-1]) == (first, last)
  for f in files:
    assert f.image.is_file() and f.label.is_file()
    assert (f.fov is None) == (name == 'chase_db1')
  with_obs2 = {f.id for f in files if f.observer2 is not None}
  if name == 'drive' and split == 'test':
    missing = {'01', '02', '03', '04', '14'}
    assert with_obs2 == {
        f'drive/{n:02d}_test' for n in range(1, 21) if f'{n:02d}' not in missing
    }
  elif name == 'chase_db1':
    assert with_obs2 == set(ids)
  else:
    assert not with_obs2


def test_real_totals(shared_datasets):
  totals = {
      n: sum(
          len(datasets.list_split(n, shared_datasets, s))
          for s in datasets.SPLITS
      )
      for n in datasets.DATASETS
  }
  assert totals == {'drive': 40, 'chase_db1': 28, 'hrf': 45}


def test_resolve_both_forms(shared_datasets):
  for name, dirname in datasets.DATASET_DIR_NAMES.items():
    assert (
        datasets.resolve_dataset_dir(name, shared_datasets)
        == shared_datasets / dirname
    )
    assert (
        datasets.resolve_dataset_dir(name, shared_datasets / dirname)
        == shared_datasets / dirname
    )


@pytest.mark.parametrize(
    'name,split,index,shape,has_obs2',
    [
        (
            'drive',
            'test',
            4,
            (584, 565, 3),
            True,
        ),  # 05_test: has a second observer.
        ('drive', 'train', 0, (584, 565, 3), False),
        ('chase_db1', 'test', 0, (960, 999, 3), True),
        ('hrf', 'test', 0, (2336, 3504, 3), False),
    ],
)
def test_real_load(shared_datasets, name, split, index, shape, has_obs2):
  files = datasets.list_split(name, shared_datasets, split)[index]
  s = datasets.load_sample(files)
  assert isinstance(s, Sample) and s.id == files.id
  assert s.image.shape == shape and s.image.dtype == np.uint8
  for m in (s.label, s.fov):
    assert m.shape == shape[:2] and m.dtype == np.bool_
  assert (s.observer2 is not None) == has_obs2
  # Plausible labels: vessels 5-20% of the FOV, nearly all inside it.
  frac = s.label[s.fov].mean()
  assert 0.05 < frac < 0.2, frac
  assert s.label[~s.fov].mean() < 0.01
  assert 0.5 < s.fov.mean() < 0.95
  # The RGB order is right: fundus photos are red-dominant inside the FOV.
  mean = s.image[s.fov].mean(axis=0)
  assert mean[0] > mean[1] > mean[2]


def test_derived_fov_matches_drive_masks(shared_datasets):
  files = datasets.list_split('drive', shared_datasets, 'test')[:2]
  files += datasets.list_split('drive', shared_datasets, 'train')[
      12:14
  ]  # Incl. 34_training.
  for f in files:
    s = datasets.load_sample(f)
    derived = datasets.derive_fov(s.image)
    iou = (derived & s.fov).sum() / (derived | s.fov).sum()
    assert iou >= 0.97, (f.id, iou)


def test_real_drive_gif_and_hrf_grey_labels(shared_datasets):
  # DRIVE GIFs decode to {0, 255}; HRF 11_h has grey values (vessel = > 127).
  gif = shared_datasets / 'DRIVE/test/1st_manual/01_manual1.gif'
  assert datasets.read_binary_mask(gif).any()
  tif = shared_datasets / 'HRF/manual1/11_h.tif'
  raw = cv2.imread(str(tif), cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(datasets.read_binary_mask(tif), raw > 127)


# ---------------------------------------------------------------------------
# Fake layouts.


def test_fake_layouts_split_and_ids(tmp_path):
  _make_drive(tmp_path)
  _make_chase(tmp_path)
  _make_hrf(tmp_path)
  ids = lambda n, s: [f.id for f in datasets.list_split(n, tmp_path, s)]
  assert ids('drive', 'train') == ['drive/21_training', 'drive/22_training']
  assert ids('drive', 'test') == ['drive/01_test', 'drive/05_test']
  assert ids('chase_db1', 'train') == [
      'chase_db1/Image_01L',
      'chase_db1/Image_02R',
  ]
  assert ids('chase_db1', 'test') == ['chase_db1/Image_11L']
  assert ids('hrf', 'train') == ['hrf/01_dr', 'hrf/01_h']
  assert ids('hrf', 'test') == ['hrf/06_g']
  drive_test = datasets.load_split('drive', tmp_path / 'DRIVE', 'test')
  assert [s.observer2 is not None for s in drive_test] == [False, True]
  rgb, fov, label = _fundus(seed=1)
  np.testing.assert_array_equal(drive_test[0].image, rgb)  # TIFF: lossless.
  np.testing.assert_array_equal(drive_test[0].label, label)
  np.testing.assert_array_equal(drive_test[0].fov, fov)
  hrf = datasets.load_split('hrf', tmp_path, 'train')
  np.testing.assert_array_equal(hrf[0].fov, _fundus(seed=1)[1])  # RGB FOV mask.


def test_fake_chase_derives_fov(tmp_path):
  _make_chase(tmp_path)
  s = datasets.load_split('chase_db1', tmp_path, 'test')[0]
  _, fov, label = _fundus(seed=2)
  np.testing.assert_array_equal(s.label, label)  # 1-bit PNG.
  iou = (s.fov & fov).sum() / (s.fov | fov).sum()
  assert iou > 0.9


def test_missing_root(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(DataError, match='nowhere'):
    datasets.list_split('drive', missing, 'train')


def test_root_without_dataset(tmp_path):
  with pytest.raises(DataError) as e:
    datasets.resolve_dataset_dir('hrf', tmp_path)
  assert str(tmp_path) in str(e.value) and 'HRF' in str(e.value)


def test_dataset_folder_with_wrong_layout(tmp_path):
  (tmp_path / 'DRIVE').mkdir()
  with pytest.raises(DataError, match='DRIVE'):
    datasets.list_split('drive', tmp_path, 'train')


def test_empty_images_folder(tmp_path):
  (tmp_path / 'DRIVE/training/images').mkdir(parents=True)
  with pytest.raises(DataError) as e:
    datasets.list_split('drive', tmp_path, 'train')
  assert str(tmp_path / 'DRIVE/training/images') in str(e.value)


def test_missing_split_folder(tmp_path):
  _make_drive(tmp_path)
  shutil.rmtree(tmp_path / 'DRIVE/test')
  with pytest.raises(DataError) as e:
    datasets.list_split('drive', tmp_path, 'test')
  assert str(tmp_path / 'DRIVE/test/images') in str(e.value)


def test_empty_chase_folder(tmp_path):
  _make_chase(tmp_path, stems=('01L',))
  with pytest.raises(DataError, match='CHASEDB1'):
    datasets.list_split('chase_db1', tmp_path, 'test')  # No image >= 11.


@pytest.mark.parametrize(
    'maker,name,victim',
    [
        (_make_drive, 'drive', 'DRIVE/training/1st_manual/22_manual1.gif'),
        (_make_drive, 'drive', 'DRIVE/training/mask/21_training_mask.gif'),
        (_make_chase, 'chase_db1', 'CHASEDB1/Image_02R_1stHO.png'),
        (_make_hrf, 'hrf', 'HRF/manual1/01_dr.tif'),
        (_make_hrf, 'hrf', 'HRF/mask/01_h_mask.tif'),
    ],
)
def test_missing_label_or_mask(tmp_path, maker, name, victim):
  maker(tmp_path)
  (tmp_path / victim).unlink()
  with pytest.raises(DataError) as e:
    datasets.list_split(name, tmp_path, 'train')
  assert Path(victim).name in str(e.value)


def test_unknown_name_or_split(tmp_path):
  with pytest.raises(ValueError, match='stare'):
    datasets.list_split('stare', tmp_path, 'train')
  _make_drive(tmp_path)
  with pytest.raises(ValueError, match='val'):
    datasets.list_split('drive', tmp_path, 'val')


# ---------------------------------------------------------------------------
# Bad files.


def _chase_files(tmp_path):
  _make_chase(tmp_path, stems=('01L',))
  return datasets.list_split('chase_db1', tmp_path, 'train')[0]


def test_corrupt_image_bytes(tmp_path):
  f = _chase_files(tmp_path)
  f.image.write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4)
  with pytest.raises(DataError) as e:
    datasets.load_sample(f)
  assert f.image.name in str(e.value)


@pytest.mark.parametrize('ext', ['.jpg', '.png', '.tif'])
def test_truncated_file(tmp_path, ext):
  path = _write_rgb(tmp_path / f'photo{ext}', _fundus(seed=3)[0])
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError) as e:
    datasets.read_rgb(path)
  assert f'photo{ext}' in str(e.value)


def test_empty_and_missing_file(tmp_path):
  empty = tmp_path / 'empty.png'
  empty.write_bytes(b'')
  with pytest.raises(DataError, match='empty.png'):
    datasets.read_rgb(empty)
  with pytest.raises(DataError, match='ghost.png'):
    datasets.read_binary_mask(tmp_path / 'ghost.png')
  with pytest.raises(DataError, match='a_folder'):
    (tmp_path / 'a_folder').mkdir()
    datasets.read_rgb(tmp_path / 'a_folder')


@pytest.mark.parametrize('which', ['label', 'fov', 'observer2'])
def test_size_mismatch(tmp_path, which):
  _make_drive(tmp_path)
  f = datasets.list_split('drive', tmp_path, 'test')[
      1
  ]  # 05_test, with observer2.
  _write_mask(getattr(f, which), np.ones((40, 50), bool))
  with pytest.raises(DataError) as e:
    datasets.load_sample(f)
  msg = str(e.value)
  assert getattr(f, which).name in msg and f.image.name in msg
  assert '50x40' in msg and '52x48' in msg


def test_grayscale_photo_converted(tmp_path):
  gray = np.arange(48 * 52, dtype=np.uint32).reshape(48, 52) % 256
  path = _write(tmp_path / 'gray.png', gray.astype(np.uint8))
  rgb = datasets.read_rgb(path)
  assert rgb.shape == (48, 52, 3) and rgb.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(rgb[:, :, c], gray)


def test_rgba_photo_converted(tmp_path):
  rgb, _, _ = _fundus(seed=4)
  alpha = np.full(rgb.shape[:2], 7, np.uint8)
  bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), alpha])
  path = _write(tmp_path / 'rgba.png', bgra)
  np.testing.assert_array_equal(datasets.read_rgb(path), rgb)


@pytest.mark.parametrize('ext', ['.png', '.tif'])
def test_16bit_photo_scaled(tmp_path, ext):
  rgb, _, _ = _fundus(seed=5)
  wide = rgb.astype(np.uint16) * 257
  wide[0, 0] = (65535, 128, 0)  # 128 / 257 rounds to 0.
  path = _write(tmp_path / f'wide{ext}', cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))
  out = datasets.read_rgb(path)
  expected = rgb.copy()
  expected[0, 0] = (255, 0, 0)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)


def test_unsupported_channels_and_types(tmp_path):
  path = _write_tiff(tmp_path / 'five.tif', np.zeros((6, 7, 5), np.uint8))
  with pytest.raises(DataError, match='five.tif'):
    datasets.read_rgb(path)
  with pytest.raises(DataError, match='two.png'):
    # pylint: disable-next=protected-access
    datasets._as_rgb(np.zeros((6, 7, 2), np.uint8), 'two.png')
  floats = _write(tmp_path / 'float.tif', np.zeros((6, 7, 3), np.float32))
  with pytest.raises(DataError, match='float.tif'):
    datasets.read_rgb(floats)
  wide_mask = _write(tmp_path / 'wide_mask.png', np.zeros((6, 7), np.uint16))
  with pytest.raises(DataError, match='wide_mask.png'):
    datasets.read_binary_mask(wide_mask)


def test_mask_encodings(tmp_path):
  _, _, label = _fundus(seed=6)
  u8 = label.astype(np.uint8)
  grey = u8 * 251
  grey[0, 0] = 127  # Not vessel.
  cases = {
      'bilevel.png': (u8, (cv2.IMWRITE_PNG_BILEVEL, 1)),
      'zero_one.png': (u8, ()),
      'grey.tif': (grey, ()),
      'rgb.tif': (np.repeat(u8[:, :, None] * 255, 3, 2), ()),
      'mask.gif': (
          np.repeat(u8[:, :, None] * 255, 3, 2),
          (cv2.IMWRITE_GIF_QUALITY, 8),
      ),
  }
  for name, (arr, params) in cases.items():
    out = datasets.read_binary_mask(_write(tmp_path / name, arr, params))
    assert out.dtype == np.bool_ and out.shape == label.shape, name
    np.testing.assert_array_equal(out, label, err_msg=name)


def test_corrupt_mask(tmp_path):
  f = _chase_files(tmp_path)
  f.label.write_bytes(f.label.read_bytes()[:40])
  with pytest.raises(DataError, match=f.label.name):
    datasets.load_sample(f)


# ---------------------------------------------------------------------------
# derive_fov.


def test_derive_fov_synthetic():
  rgb, fov, _ = _fundus(h=120, w=130, seed=7)
  rgb[50:60, 50:60] = 2  # A dark lesion inside: a hole to fill.
  rgb[2:4, 2:4] = 200  # A bright speck outside: not the largest component.
  out = datasets.derive_fov(rgb)
  assert out.dtype == np.bool_ and out.shape == fov.shape
  assert out[50:60, 50:60].all() and not out[2:4, 2:4].any()
  assert (out & fov).sum() / (out | fov).sum() > 0.97


def test_derive_fov_bad_input():
  with pytest.raises(DataError):
    datasets.derive_fov(np.zeros((20, 20, 3), np.uint8))
  with pytest.raises(ValueError):
    datasets.derive_fov(np.zeros((20, 20), np.uint8))


def test_all_black_chase_photo_names_file(tmp_path):
  f = _chase_files(tmp_path)
  _write_rgb(f.image, np.zeros((48, 52, 3), np.uint8))
  with pytest.raises(DataError, match=f.image.name):
    datasets.load_sample(f)


# ---------------------------------------------------------------------------
# bundle.copy_compact: a smaller copy that reads back pixel-identical.

_PNG_MAGIC = b'\x89PNG'


@pytest.mark.parametrize('name,splits', [('drive', ('train', 'test')), ('hrf', ('train',)),
                                         ('chase_db1', ('test',))])
def test_compact_copy_reads_back_the_same_samples(shared_datasets, tmp_path, name, splits):
  report = bundle.copy_compact(name, shared_datasets, tmp_path, splits, max_images=1)
  assert report.files == len(splits) * (2 if name == 'chase_db1' else 3)
  for split in splits:
    want = datasets.list_split(name, shared_datasets, split)[:1]
    got = datasets.list_split(name, tmp_path, split)
    assert [f.id for f in got] == [f.id for f in want]  # the copy holds just these, same names
    a, b = datasets.load_sample(want[0]), datasets.load_sample(got[0])
    for key in ('image', 'label', 'fov'):
      np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    for path in (got[0].image, got[0].label, got[0].fov):
      if path is not None:  # TIFFs re-encoded as PNG under their names; the rest byte for byte
        head = path.read_bytes()[:4]
        src = datasets.resolve_dataset_dir(name, shared_datasets) / path.relative_to(
            datasets.resolve_dataset_dir(name, tmp_path))
        assert head == _PNG_MAGIC if path.suffix.lower() == '.tif' else path.read_bytes() == src.read_bytes()
  if name == 'hrf':  # its labels are uncompressed TIFF
    assert report.copy_bytes < report.source_bytes
  with pytest.raises(FileExistsError, match=datasets.DATASET_DIR_NAMES[name]):
    bundle.copy_compact(name, shared_datasets, tmp_path, splits, max_images=1)


def test_compact_copy_names_an_unreadable_tiff(tmp_path):
  _make_hrf(tmp_path / 'src')
  bad = tmp_path / 'src' / 'HRF' / 'manual1' / '01_dr.tif'
  bad.write_bytes(b'II*\0 not a tiff')
  with pytest.raises(DataError, match='01_dr.tif: unreadable'):
    bundle.copy_compact('hrf', tmp_path / 'src', tmp_path / 'out', ('train',))
