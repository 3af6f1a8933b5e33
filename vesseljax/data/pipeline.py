"""Host-side batches: FOV-aware training patches and padded evaluation batches.

Training batches are a pure function of (seed, step): `PatchSampler.batch`
seeds `np.random.default_rng([seed, step])` afresh for every step, so a run
resumed at step k gets exactly the batch it would have had. Evaluation covers
every image exactly once, the last batch padded with zero images marked
`valid=False` so one batch shape compiles once.

To give each process its own batches in a multi-host run, fold the process
index into `seed` (e.g. `seed * 1000 + jax.process_index()`); this module
reads no process state itself.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, TypeVar

import jax
import numpy as np

from vesseljax.data.sample import DataError

Batch = dict[str, np.ndarray]
_T = TypeVar('_T')


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class ArrayDataset:
  """Preprocessed images at one working resolution.

  Attributes:
    images: (N, H, W, C) float32 in [0, 1].
    labels: (N, H, W) bool, True on vessel pixels.
    fovs: (N, H, W) bool, True inside the field of view.
    ids: N stable identifiers, e.g. 'drive/21_training'.
  """
  images: np.ndarray
  labels: np.ndarray
  fovs: np.ndarray
  ids: list[str]

  def __post_init__(self):
    images, labels, fovs = self.images, self.labels, self.fovs
    if images.ndim != 4 or images.dtype != np.float32:
      raise DataError(
          f'ArrayDataset: images must be (N, H, W, C) float32, got '
          f'{images.shape} {images.dtype}')
    n, h, w = images.shape[:3]
    for name, arr in (('labels', labels), ('fovs', fovs)):
      if arr.shape != (n, h, w) or arr.dtype != np.bool_:
        raise DataError(f'ArrayDataset: {name} must be ({n}, {h}, {w}) bool, '
                        f'got {arr.shape} {arr.dtype}')
    if len(self.ids) != n:
      raise DataError(f'ArrayDataset: {len(self.ids)} ids for {n} images')

  def __len__(self) -> int:
    return self.images.shape[0]

  def subset(self, index) -> 'ArrayDataset':
    """The images at `index` (a slice or an integer array), in that order."""
    ids = self.ids[index] if isinstance(index, slice) else [self.ids[i] for i in index]
    return ArrayDataset(images=self.images[index], labels=self.labels[index],
                        fovs=self.fovs[index], ids=ids)


def _whole_images(patch_size: int, h: int, w: int) -> bool:
  """Whether `patch_size` means whole images; raises if it fits one side."""
  if patch_size < 0:
    raise ValueError(f'patch_size must be >= 0, got {patch_size}')
  if patch_size == 0 or (patch_size >= h and patch_size >= w):
    return True
  if patch_size > h or patch_size > w:
    raise ValueError(
        f'patch_size {patch_size} fits only one side of ({h}, {w}) images: '
        f'use 0 for whole images or at most {min(h, w)}')
  return False


class PatchSampler:
  """FOV-aware random patches, a pure function of (seed, step).

  A patch is drawn by choosing an image uniformly, then a centre uniformly
  among that image's FOV pixels whose patch meets the FOV requirement; the
  patch is centred there (top-left = centre - patch_size // 2) and clipped to
  the image bounds. The requirement is checked after clipping, on the patch
  actually returned, so every patch holds at least `fov_min_fraction` FOV
  pixels. Centres are precomputed once per image with a summed-area table.

  With `patch_size` 0, or not smaller than both H and W, batches are whole
  images chosen uniformly (with replacement).
  """

  def __init__(self, data: ArrayDataset, seed: int, batch_size: int,
               patch_size: int, fov_min_fraction: float = 0.25):
    """Precomputes the admissible patch centres.

    Args:
      data: the training images.
      seed: int; batches depend on (seed, step) only.
      batch_size: patches per batch, >= 1.
      patch_size: patch side p, pixels; 0 for whole images.
      fov_min_fraction: minimum fraction of FOV pixels in a patch, in [0, 1].

    Raises:
      ValueError: bad sizes or fractions.
      DataError: an image (named) has no admissible patch.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if not 0.0 <= fov_min_fraction <= 1.0:
      raise ValueError(
          f'fov_min_fraction must be in [0, 1], got {fov_min_fraction}')
    if len(data) == 0:
      raise DataError('PatchSampler: the dataset has no images')
    self.data = data
    self.seed = int(seed)
    self.batch_size = int(batch_size)
    n, h, w = data.fovs.shape
    self.whole_images = _whole_images(patch_size, h, w)
    self.patch_size = 0 if self.whole_images else int(patch_size)
    self.fov_min_fraction = float(fov_min_fraction)
    if self.whole_images:
      return
    p = self.patch_size
    need = int(np.ceil(self.fov_min_fraction * p * p))
    starts, counts = [], []
    for i in range(n):
      centres = self._admissible_centres(data.fovs[i], p, need)
      if centres.size == 0:
        raise DataError(
            f'{data.ids[i]}: no {p}x{p} patch holds {self.fov_min_fraction:.0%}'
            ' FOV pixels')
      starts.append(centres)
      counts.append(centres.size)
    # Flat (y * W + x) top-left corners of all images, with offsets.
    self._corners = np.concatenate(starts)
    self._counts = np.asarray(counts, np.int64)
    self._offsets = np.concatenate([[0], np.cumsum(self._counts)[:-1]])

  @staticmethod
  def _admissible_centres(fov: np.ndarray, p: int, need: int) -> np.ndarray:
    """Top-left corners (flat y * W + x, int32), one per admissible centre.

    Args:
      fov: (H, W) bool.
      p: patch side, pixels, <= min(H, W).
      need: minimum FOV pixel count in a patch.
    """
    h, w = fov.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(fov, axis=0, dtype=np.int64), axis=1)
    cy, cx = np.nonzero(fov)
    y0 = np.clip(cy - p // 2, 0, h - p)
    x0 = np.clip(cx - p // 2, 0, w - p)
    count = (sat[y0 + p, x0 + p] - sat[y0, x0 + p] - sat[y0 + p, x0]
             + sat[y0, x0])
    ok = count >= need
    return (y0[ok] * w + x0[ok]).astype(np.int32)

  def batch(self, step: int) -> Batch:
    """The batch for `step`: the same (seed, step) always gives the same one.

    Args:
      step: non-negative int.

    Returns:
      dict with image (B, p, p, C) float32 in [0, 1], label (B, p, p) float32
      in {0, 1} and fov (B, p, p) float32 in {0, 1}; (p, p) is (H, W) for
      whole images.
    """
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    rng = np.random.default_rng([self.seed, int(step)])
    data = self.data
    b = self.batch_size
    index = rng.integers(0, len(data), b)
    if self.whole_images:
      return dict(image=data.images[index],
                  label=data.labels[index].astype(np.float32),
                  fov=data.fovs[index].astype(np.float32))
    p = self.patch_size
    w = data.fovs.shape[2]
    pick = self._offsets[index] + np.floor(
        rng.random(b) * self._counts[index]).astype(np.int64)
    corner = self._corners[pick]
    y0, x0 = corner // w, corner % w
    c = data.images.shape[3]
    image = np.empty((b, p, p, c), np.float32)
    label = np.empty((b, p, p), np.float32)
    fov = np.empty((b, p, p), np.float32)
    for k in range(b):
      i, y, x = index[k], y0[k], x0[k]
      image[k] = data.images[i, y:y + p, x:x + p]
      label[k] = data.labels[i, y:y + p, x:x + p]
      fov[k] = data.fovs[i, y:y + p, x:x + p]
    return dict(image=image, label=label, fov=fov)


def patch_batch(data: ArrayDataset, seed: int, step: int, batch_size: int,
                patch_size: int, fov_min_fraction: float = 0.25) -> Batch:
  """One training batch as a function; see `PatchSampler`.

  Builds the sampler's tables on every call (O(N H W)); loops should hold a
  `PatchSampler` and call `batch(step)`, which returns the same batches.

  Returns:
    dict with image (B, p, p, C) float32 in [0, 1], label and fov (B, p, p)
    float32 in {0, 1}.
  """
  return PatchSampler(data, seed, batch_size, patch_size,
                      fov_min_fraction).batch(step)


def image_batches(data: ArrayDataset, batch_size: int) -> Iterator[Batch]:
  """Every image exactly once, in order, in batches of one fixed shape.

  Args:
    data: the images.
    batch_size: images per batch, >= 1.

  Yields:
    ceil(N / B) dicts with image (B, H, W, C) float32 in [0, 1], label and fov
    (B, H, W) float32 in {0, 1}, index (B,) int32 dataset index (-1 on
    padding), valid (B,) bool. The last batch is padded with all-zero
    entries marked valid=False.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  n = len(data)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    index = np.arange(start, stop, dtype=np.int32)
    batch = dict(
        image=data.images[start:stop],
        label=data.labels[start:stop].astype(np.float32),
        fov=data.fovs[start:stop].astype(np.float32),
        index=index,
        valid=np.ones(stop - start, np.bool_))
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
      batch['index'][stop - start:] = -1
    yield batch


def shard(batch: _T, num_devices: int) -> _T:
  """Reshapes every leaf's leading axis B to (num_devices, B / num_devices).

  Args:
    batch: a pytree (e.g. a dict) of arrays sharing the leading size B.
    num_devices: number of local devices, >= 1.

  Returns:
    The same structure with leaves (num_devices, B // num_devices, ...).

  Raises:
    ValueError: B is not divisible by num_devices, or leaves disagree on B.
  """
  if num_devices < 1:
    raise ValueError(f'num_devices must be >= 1, got {num_devices}')
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) > 1:
    raise ValueError(
        f'batch leaves have different leading sizes {sorted(sizes)}')
  for size in sizes:
    if size % num_devices:
      raise ValueError(
          f'batch size {size} is not divisible by the device count '
          f'{num_devices}')
  return jax.tree.map(
      lambda x: x.reshape((num_devices, x.shape[0] // num_devices)
                          + x.shape[1:]), batch)


def process_slice(batch: _T, process_index: int, process_count: int) -> _T:
  """This host's contiguous slice of a global batch (multi-host training).

  Every host draws the same global batch (a function of (seed, step)) and
  keeps rows [i * B / P, (i + 1) * B / P); pmap over all hosts' devices then
  sees the global batch in order, so a multi-host step equals a one-host step
  with the same global batch.

  Raises:
    ValueError: B not divisible by process_count, or a bad index.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} outside [0, {process_count})')
  if process_count == 1:
    return batch
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  (size,) = sizes
  if size % process_count:
    raise ValueError(f'global batch {size} is not divisible by the {process_count} hosts')
  per = size // process_count
  return jax.tree.map(lambda x: x[process_index * per:(process_index + 1) * per], batch)


def host_shard(batch: _T) -> _T:
  """`shard(process_slice(batch, this host), local devices)`: a global batch ready for pmap."""
  local = process_slice(batch, jax.process_index(), jax.process_count())
  return shard(local, jax.local_device_count())
