"""The one record every data source yields."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


class DataError(ValueError):
  """Bad input data. The message names the file (or folder) and the problem."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One fundus photograph with its annotations, at native resolution.

  Attributes:
    id: stable identifier, e.g. 'drive/21_training' or 'chase_db1/Image_11L'.
    image: (H, W, 3) uint8 RGB.
    label: (H, W) bool, True on vessel pixels (first observer).
    fov: (H, W) bool, True inside the field of view.
    observer2: (H, W) bool second observer's label, or None where the dataset
      has none for this image. Only ever used as the human baseline.
  """
  id: str
  image: np.ndarray
  label: np.ndarray
  fov: np.ndarray
  observer2: Optional[np.ndarray] = None

  def __post_init__(self):
    h, w = self.image.shape[:2]
    if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
      raise DataError(f'{self.id}: image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}')
    for name in ('label', 'fov', 'observer2'):
      arr = getattr(self, name)
      if arr is None:
        continue
      if arr.shape != (h, w) or arr.dtype != np.bool_:
        raise DataError(f'{self.id}: {name} must be ({h}, {w}) bool, got {arr.shape} {arr.dtype}')
