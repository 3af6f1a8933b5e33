"""A degradation model: coarse-segmenter-like probability maps from a ground truth.

The refiner must learn to repair the errors a coarse model makes on images it
has not seen (SPEC: never train it on in-fold coarse masks, it would learn the
identity). Out-of-fold coarse maps (`--mode=holdout` of k-fold coarse runs) are
the faithful source; this module is the cheap one, usable without any coarse
training: it imitates the coarse model's typical failures on a label.

  1. thin vessels go missing: pixels of vessels thinner than ~3 px (the label
     minus its 3x3 opening) are erased where a smooth random field is below a
     random level (whole stretches vanish, as in coarse maps);
  2. widths are wrong: a random 3x3 dilation or erosion of the rest (p = 1/3 each);
  3. false positives: smooth random blobs inside the FOV, thresholded high;
  4. soft borders: Gaussian blur (sigma 0.7-1.5 px), then a random confidence
     p = sigmoid(gain * (blurred - 0.5)), gain in [6, 14].

The reverse-attention map that goes with it is 1 - blur(p, sigma 2 px), the same
quantity (1 - sigmoid of a smoother, coarser prediction) LU-Net+RA returns.
All randomness comes from the NumPy generator passed in.
"""

from __future__ import annotations

import cv2
import numpy as np

_KERNEL = np.ones((3, 3), np.uint8)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
  """Gaussian-smoothed white noise scaled to [0, 1], (H, W) float32."""
  noise = rng.standard_normal(shape).astype(np.float32)
  field = cv2.GaussianBlur(noise, (0, 0), sigma_px)
  lo, hi = field.min(), field.max()
  return (field - lo) / max(hi - lo, 1e-6)


def degrade(label: np.ndarray, fov: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A coarse-like (probability, reverse-attention) pair for one label.

  Args:
    label: (H, W) bool vessel label.
    fov: (H, W) bool field of view (false positives stay inside it).
    rng: the source of randomness.

  Returns:
    prob: (H, W) float32 in [0, 1], a soft, imperfect vessel map.
    ra_map: (H, W) float32 in [0, 1], 1 - blur(prob, sigma 2 px).
  """
  if label.shape != fov.shape or label.ndim != 2:
    raise ValueError(f'label {label.shape} and fov {fov.shape} must be the same (H, W)')
  h, w = label.shape
  lab = label.astype(np.uint8)
  thick = cv2.morphologyEx(lab, cv2.MORPH_OPEN, _KERNEL)
  thin = lab & (1 - thick)
  keep_thin = _smooth_field(rng, (h, w), 8.0) > rng.uniform(0.2, 0.6)
  vessels = thick | (thin & keep_thin)
  op = rng.integers(3)
  if op == 1:
    vessels = cv2.dilate(vessels, _KERNEL)
  elif op == 2:
    vessels = cv2.erode(vessels, _KERNEL)
  blobs = (_smooth_field(rng, (h, w), 3.0) > rng.uniform(0.82, 0.92)) & fov
  noisy = np.maximum(vessels.astype(np.float32), blobs * rng.uniform(0.3, 0.8))
  blurred = cv2.GaussianBlur(noisy, (0, 0), rng.uniform(0.7, 1.5))
  prob = 1.0 / (1.0 + np.exp(-rng.uniform(6.0, 14.0) * (blurred - 0.5)))
  prob = (prob * fov).astype(np.float32)
  ra_map = 1.0 - cv2.GaussianBlur(prob, (0, 0), 2.0)
  return prob, np.clip(ra_map, 0.0, 1.0).astype(np.float32)
