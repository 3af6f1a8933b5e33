"""Preprocessing (paper 4.2, as SPEC.md reads it) and the way back to native size.

Coarse-model input, per image:
  1. green channel of the RGB photo (native resolution);
  2. CLAHE, clip limit 5.0, with a tile grid chosen so that each tile covers
     32x32 pixels *at the working resolution* (SPEC: "tiles of 32x32 pixels at
     the working resolution"): grid = (W_work / 32, H_work / 32) tiles, applied
     at native resolution so no detail is lost before the enhancement;
  3. gamma, out = in ** (1 / 1.2) on [0, 1] intensities;
  4. bilinear resize to the working resolution (H_work, W_work);
  5. float32 in [0, 1].
The refiner's image encoder sees the RGB photo resized the same way, in [0, 1].

Predictions go back with `to_native`: bilinear resize of the *probability* map to
the label's native size; thresholding happens only after that (SPEC, "Working
resolution caps the score").
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from vesseljax.data.sample import DataError


def _check_rgb(rgb: np.ndarray) -> None:
  if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
    raise DataError(f'expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}')


def clahe_grid(work_size: Sequence[int], tile_px: int) -> tuple[int, int]:
  """OpenCV tileGridSize (columns, rows) giving `tile_px` tiles at `work_size` (H, W)."""
  h, w = work_size
  return max(1, round(w / tile_px)), max(1, round(h / tile_px))


def enhance_green(rgb: np.ndarray, work_size: Sequence[int], clahe_clip: float = 5.0,
                  clahe_tile_px: int = 32, gamma: float = 1.2) -> np.ndarray:
  """Steps 1-3 at native resolution.

  Args:
    rgb: (H, W, 3) uint8 RGB photo.
    work_size: (H_work, W_work) working resolution, pixels (sets the CLAHE grid).
    clahe_clip: CLAHE clip limit.
    clahe_tile_px: CLAHE tile side at the working resolution, pixels.
    gamma: out = in ** (1 / gamma).

  Returns:
    (H, W) float32 in [0, 1].
  """
  _check_rgb(rgb)
  green = np.ascontiguousarray(rgb[..., 1])
  clahe = cv2.createCLAHE(clipLimit=float(clahe_clip),
                          tileGridSize=clahe_grid(work_size, clahe_tile_px))
  enhanced = clahe.apply(green).astype(np.float32) / 255.0
  return np.power(enhanced, 1.0 / gamma, dtype=np.float32)


def resize(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Bilinear resize of an (H, W) or (H, W, C) float array to `size` = (H', W')."""
  h, w = int(size[0]), int(size[1])
  if array.shape[:2] == (h, w):
    return array.astype(np.float32, copy=True)
  out = cv2.resize(array.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
  if array.ndim == 3 and out.ndim == 2:
    out = out[..., None]
  return out


def preprocess_green(rgb: np.ndarray, work_size: Sequence[int], clahe_clip: float = 5.0,
                     clahe_tile_px: int = 32, gamma: float = 1.2) -> np.ndarray:
  """The coarse model's input: (H_work, W_work, 1) float32 in [0, 1]."""
  enhanced = enhance_green(rgb, work_size, clahe_clip, clahe_tile_px, gamma)
  return np.clip(resize(enhanced, work_size), 0.0, 1.0)[..., None]


def preprocess_rgb(rgb: np.ndarray, work_size: Sequence[int]) -> np.ndarray:
  """The refiner's image-encoder input: (H_work, W_work, 3) float32 in [0, 1]."""
  _check_rgb(rgb)
  return np.clip(resize(rgb.astype(np.float32) / 255.0, work_size), 0.0, 1.0)


def resize_mask(mask: np.ndarray, work_size: Sequence[int]) -> np.ndarray:
  """A bool (H, W) mask at the working size, as float32 in [0, 1] (bilinear).

  Training targets stay soft here; the pipeline thresholds them at 0.5 so that
  labels stay binary.
  """
  return resize(mask.astype(np.float32), work_size)


def to_native(prob: np.ndarray, native_size: Sequence[int]) -> np.ndarray:
  """Resize an (h, w) probability map back to the label's (H, W); float32 in [0, 1].

  Threshold only after this (SPEC: thresholding before resizing costs up to 4
  Dice points on HRF).
  """
  if prob.ndim != 2:
    raise ValueError(f'to_native expects an (h, w) map, got shape {prob.shape}')
  return np.clip(resize(prob, native_size), 0.0, 1.0)
