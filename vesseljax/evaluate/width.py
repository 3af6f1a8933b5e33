"""Errors by vessel width: where a segmentation gains or loses against another.

A label's vessel pixels are split by the width of the vessel they lie in,
measured by granulometry: a pixel lies in a vessel at least d pixels wide when
the binary opening of the label with a disc of diameter d keeps it (the disc
fits inside the vessel there). With diameters (3, 5):

  class   vessel width at the pixel
  thin    < 3 px   (removed by the 3-px opening)
  medium  3-4 px   (kept by the 3-px opening, removed by the 5-px one)
  thick   >= 5 px  (kept by the 5-px opening)

False positives are split the same way by distance: 'near' within `near_px`
pixels of a label vessel (a border too wide), 'far' beyond (a spurious vessel
or blob). All counts are inside the field of view.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

WIDTH_CLASSES = ('thin', 'medium', 'thick')


def disc(diameter: int) -> np.ndarray:
  """Boolean (diameter, diameter) disc footprint; diameter odd >= 1."""
  if diameter < 1 or diameter % 2 == 0:
    raise ValueError(f'disc diameter must be odd and >= 1, got {diameter}')
  r = diameter // 2
  y, x = np.mgrid[-r:r + 1, -r:r + 1]
  return (y * y + x * x) <= r * r + r  # diameter 3: the 3x3 square; 5: 21 pixels, no corners


def width_classes(label: np.ndarray, diameters: tuple[int, int] = (3, 5)) -> np.ndarray:
  """(H, W) int8: 0 background, 1 thin, 2 medium, 3 thick (see the module docstring)."""
  vessel = np.asarray(label, bool)
  small, large = diameters
  keeps_small = ndimage.binary_opening(vessel, structure=disc(small))
  keeps_large = ndimage.binary_opening(vessel, structure=disc(large))
  classes = np.zeros(vessel.shape, np.int8)
  classes[vessel] = 1
  classes[keeps_small] = 2
  classes[keeps_large] = 3
  return classes


def error_breakdown(prob: np.ndarray, label: np.ndarray, fov: np.ndarray, threshold: float = 0.5,
                    near_px: int = 2, classes: np.ndarray | None = None) -> dict[str, float]:
  """Sensitivity per width class and false positives near / far from vessels.

  Args:
    prob: (H, W) vessel probability; label, fov: (H, W) bool-like.
    threshold: prob >= threshold is a vessel.
    near_px: false positives within this many pixels (chessboard distance)
      of a label vessel count as 'near'.
    classes: width_classes(label), if already computed.

  Returns:
    {'sens_thin', 'sens_medium', 'sens_thick' (NaN where a class is empty),
     'n_thin', 'n_medium', 'n_thick' (label pixels of each class),
     'fp_near', 'fp_far' (false-positive pixels, as a fraction of the FOV's
     label-negative pixels), 'fn', 'fp' (pixel counts)}.
  """
  label, fov = np.asarray(label, bool), np.asarray(fov, bool)
  if classes is None:
    classes = width_classes(label)
  pred = (np.asarray(prob) >= threshold) & fov
  out: dict[str, float] = {}
  for k, name in enumerate(WIDTH_CLASSES, start=1):
    member = (classes == k) & fov
    n = int(member.sum())
    out[f'n_{name}'] = n
    out[f'sens_{name}'] = float(pred[member].mean()) if n else float('nan')
  near = ndimage.binary_dilation(label, structure=np.ones((3, 3), bool), iterations=near_px)
  negatives = fov & ~label
  fp = pred & ~label
  out['fp_near'] = float((fp & near).sum() / max(negatives.sum(), 1))
  out['fp_far'] = float((fp & ~near).sum() / max(negatives.sum(), 1))
  out['fp'] = int(fp.sum())
  out['fn'] = int((label & fov & ~pred).sum())
  return out
