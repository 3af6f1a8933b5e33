"""Preprocessing: the SPEC's steps, value ranges, and the way back to native size."""

import cv2
import numpy as np
import pytest

from vesseljax.data import preprocess
from vesseljax.data.sample import DataError


def _photo(h=120, w=100, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_clahe_grid_gives_32px_tiles_at_working_size():
  assert preprocess.clahe_grid((512, 512), 32) == (16, 16)
  assert preprocess.clahe_grid((576, 560), 32) == (18, 18)  # (cols, rows) = (W/32, H/32)
  assert preprocess.clahe_grid((1168, 1760), 32) == (55, 36)


def test_green_pipeline_matches_step_by_step_opencv():
  rgb = _photo()
  got = preprocess.preprocess_green(rgb, (64, 48), clahe_clip=5.0, clahe_tile_px=16, gamma=1.2)
  clahe = cv2.createCLAHE(clipLimit=5.0, tileGridSize=(3, 4))
  want = (clahe.apply(rgb[..., 1].copy()) / 255.0) ** (1 / 1.2)
  want = cv2.resize(want.astype(np.float32), (48, 64), interpolation=cv2.INTER_LINEAR)
  assert got.shape == (64, 48, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got[..., 0], want, atol=1e-5)
  assert got.min() >= 0.0 and got.max() <= 1.0


def test_gamma_brightens_midtones():
  rgb = np.full((64, 64, 3), 100, np.uint8)
  no_gamma = preprocess.preprocess_green(rgb, (64, 64), gamma=1.0)
  with_gamma = preprocess.preprocess_green(rgb, (64, 64), gamma=1.2)
  np.testing.assert_allclose(with_gamma, no_gamma ** (1 / 1.2), rtol=1e-5)
  assert with_gamma.mean() > no_gamma.mean()


def test_rgb_path_and_mask_resize():
  rgb = _photo()
  out = preprocess.preprocess_rgb(rgb, (64, 32))
  assert out.shape == (64, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out.mean(), rgb.mean() / 255.0, atol=0.02)
  mask = np.zeros((120, 100), bool)
  mask[30:90, 20:80] = True
  small = preprocess.resize_mask(mask, (60, 50))
  assert small.dtype == np.float32 and set(np.unique(small > 0.5)) == {False, True}


def test_round_trip_to_native_keeps_thick_structures():
  mask = np.zeros((584, 565), bool)
  cv2.circle(mask.view(np.uint8), (280, 290), 200, 1, thickness=9)
  back = preprocess.to_native(preprocess.resize_mask(mask, (512, 512)), mask.shape) >= 0.5
  dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
  assert back.shape == mask.shape
  assert dice > 0.97


def test_bad_inputs_are_rejected_clearly():
  with pytest.raises(DataError, match='uint8 RGB'):
    preprocess.preprocess_green(np.zeros((10, 10), np.uint8), (16, 16))
  with pytest.raises(DataError, match='uint8 RGB'):
    preprocess.preprocess_rgb(np.zeros((10, 10, 3), np.float32), (16, 16))
  with pytest.raises(ValueError, match='shape'):
    preprocess.to_native(np.zeros((4, 4, 1)), (8, 8))
