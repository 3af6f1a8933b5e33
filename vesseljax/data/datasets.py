"""Readers for DRIVE, CHASE-DB1 and HRF in their publishers' folder layouts.

Layouts and splits are those of `datasets/README.md` (the shared data folder):

* DRIVE (`DRIVE/`): `training/` (images 21..40) is the train split and
  `test/` (01..20) the test split; each has `images/NN_<split>.tif`,
  `1st_manual/NN_manual1.gif` (label) and `mask/NN_<split>_mask.gif` (FOV);
  `test/2nd_manual/NN_manual2.gif` (second observer) exists for 15 test images.
* CHASE-DB1 (`CHASEDB1/`): flat folder of `Image_NNX.jpg`,
  `Image_NNX_1stHO.png` (label), `Image_NNX_2ndHO.png` (second observer);
  NN <= 10 is train (20 images), NN >= 11 test (8). No FOV masks ship: the FOV
  is derived from the photo with `derive_fov`.
* HRF (`HRF/`): `images/NN_{h,g,dr}.{jpg,JPG}`, `manual1/NN_x.tif` (label),
  `mask/NN_x_mask.tif` (FOV, RGB); NN <= 5 is train (15), NN >= 6 test (30).
  No second observer.

Every problem with the data (missing or empty folder, missing label or mask,
unreadable or corrupt file, unsupported pixel format, size mismatch) raises
`DataError` with a message naming the offending file or folder.

Typical use:

  samples = load_split('drive', '/path/to/datasets', 'test')
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from vesseljax.data.sample import DataError, Sample

PathLike = Union[str, Path]

DATASETS = ('drive', 'chase_db1', 'hrf')
SPLITS = ('train', 'test')

# Folder name each publisher's archive unpacks to.
DATASET_DIR_NAMES = {'drive': 'DRIVE', 'chase_db1': 'CHASEDB1', 'hrf': 'HRF'}

# Highest image number in the train split (CHASE-DB1 and HRF split by number;
# DRIVE splits by folder).
_CHASE_LAST_TRAIN = 10
_HRF_LAST_TRAIN = 5

_CHASE_IMAGE_RE = re.compile(r'^Image_(\d{2})([LR])\.jpe?g$', re.IGNORECASE)
_HRF_IMAGE_RE = re.compile(r'^(\d{2})_(h|g|dr)\.jpe?g$', re.IGNORECASE)

# derive_fov parameters (see its docstring).
_FOV_MEDIAN_KSIZE = 5
_FOV_REL_THRESHOLD = 0.10
_FOV_MIN_THRESHOLD = 10


@dataclasses.dataclass(frozen=True)
class SampleFiles:
  """The files of one sample, before reading.

  Attributes:
    id: stable identifier, '<dataset>/<image stem>', e.g. 'drive/21_training',
      'chase_db1/Image_11L', 'hrf/06_dr'.
    image: the photograph.
    label: the first observer's vessel label (the reference).
    fov: the shipped field-of-view mask, or None where the dataset ships none
      (CHASE-DB1): the FOV is then derived from the photo by `derive_fov`.
    observer2: the second observer's label, or None where there is none.
  """

  id: str
  image: Path
  label: Path
  fov: Optional[Path]
  observer2: Optional[Path]


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; expected one of {DATASETS}')


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')


def _layout_problem(name: str, folder: Path) -> Optional[str]:
  """Returns why `folder` is not `name`'s layout, or None if it looks right."""
  if name == 'drive':
    if not ((folder / 'training').is_dir() or (folder / 'test').is_dir()):
      return 'expected sub-folders training/ and test/'
  elif name == 'hrf':
    missing = [
        d for d in ('images', 'manual1', 'mask') if not (folder / d).is_dir()
    ]
    if missing:
      return (
          'expected sub-folders images/, manual1/, mask/ (missing:'
          f' {", ".join(missing)})'
      )
  else:  # chase_db1
    if not any(_CHASE_IMAGE_RE.match(p.name) for p in folder.iterdir()):
      return 'expected files Image_NNX.jpg (NN = 01..14, X = L or R)'
  return None


def resolve_dataset_dir(name: str, root: PathLike) -> Path:
  """Finds a dataset's folder.

  Args:
    name: one of `DATASETS`.
    root: either the folder holding the publishers' folders (`DRIVE/`,
      `CHASEDB1/`, `HRF/`) or the dataset's own folder.

  Returns:
    The dataset's folder (`root/DRIVE` etc. if it exists, else `root`).

  Raises:
    ValueError: unknown `name`.
    DataError: neither `root/<DIR>` nor `root` is the dataset's folder, or its
      layout is wrong; the message names the path.
  """
  _check_name(name)
  root = Path(root)
  if not root.is_dir():
    raise DataError(f'{root}: dataset root folder not found')
  candidate = root / DATASET_DIR_NAMES[name]
  if candidate.is_dir():
    problem = _layout_problem(name, candidate)
    if problem:
      raise DataError(f'{candidate}: not a {name} folder: {problem}')
    return candidate
  problem = _layout_problem(name, root)
  if problem:
    raise DataError(
        f'{root}: neither holds {DATASET_DIR_NAMES[name]}/ nor is a {name}'
        f' folder: {problem}'
    )
  return root


def _require_file(path: Path, what: str) -> Path:
  if not path.is_file():
    raise DataError(f'{path}: {what} not found')
  return path


def _listdir(folder: Path) -> list[Path]:
  if not folder.is_dir():
    raise DataError(f'{folder}: folder not found')
  return sorted(folder.iterdir())


def _list_drive(folder: Path, split: str) -> list[SampleFiles]:
  split_dir = folder / ('training' if split == 'train' else 'test')
  suffix = 'training' if split == 'train' else 'test'
  pattern = re.compile(rf'^(\d{{2}})_{suffix}\.tiff?$', re.IGNORECASE)
  images_dir = split_dir / 'images'
  out = []
  for path in _listdir(images_dir):
    m = pattern.match(path.name)
    if not m:
      continue
    nn = m.group(1)
    label = _require_file(
        split_dir / '1st_manual' / f'{nn}_manual1.gif', f'label of {path.name}'
    )
    fov = _require_file(
        split_dir / 'mask' / f'{nn}_{suffix}_mask.gif',
        f'FOV mask of {path.name}',
    )
    obs2 = split_dir / '2nd_manual' / f'{nn}_manual2.gif'
    out.append(
        SampleFiles(
            id=f'drive/{nn}_{suffix}',
            image=path,
            label=label,
            fov=fov,
            observer2=obs2 if split == 'test' and obs2.is_file() else None,
        )
    )
  if not out:
    raise DataError(
        f'{images_dir}: no images NN_{suffix}.tif found (empty folder?)'
    )
  return out


def _list_chase(folder: Path, split: str) -> list[SampleFiles]:
  out = []
  for path in _listdir(folder):
    m = _CHASE_IMAGE_RE.match(path.name)
    if not m:
      continue
    in_train = int(m.group(1)) <= _CHASE_LAST_TRAIN
    if in_train != (split == 'train'):
      continue
    stem = path.stem
    label = _require_file(folder / f'{stem}_1stHO.png', f'label of {path.name}')
    obs2 = folder / f'{stem}_2ndHO.png'
    out.append(
        SampleFiles(
            id=f'chase_db1/{stem}',
            image=path,
            label=label,
            fov=None,
            observer2=obs2 if obs2.is_file() else None,
        )
    )
  if not out:
    raise DataError(
        f'{folder}: no {split} images Image_NNX.jpg found (empty folder?)'
    )
  return out


def _list_hrf(folder: Path, split: str) -> list[SampleFiles]:
  images_dir = folder / 'images'
  out = []
  for path in _listdir(images_dir):
    m = _HRF_IMAGE_RE.match(path.name)
    if not m:
      continue
    in_train = int(m.group(1)) <= _HRF_LAST_TRAIN
    if in_train != (split == 'train'):
      continue
    stem = f'{m.group(1)}_{m.group(2).lower()}'
    label = _require_file(
        folder / 'manual1' / f'{stem}.tif', f'label of {path.name}'
    )
    fov = _require_file(
        folder / 'mask' / f'{stem}_mask.tif', f'FOV mask of {path.name}'
    )
    out.append(
        SampleFiles(
            id=f'hrf/{stem}', image=path, label=label, fov=fov, observer2=None
        )
    )
  if not out:
    raise DataError(
        f'{images_dir}: no {split} images NN_{{h,g,dr}}.jpg found (empty'
        ' folder?)'
    )
  return out


_LISTERS = {'drive': _list_drive, 'chase_db1': _list_chase, 'hrf': _list_hrf}


def list_split(name: str, root: PathLike, split: str) -> list[SampleFiles]:
  """Lists one split's files, without reading them.

  Args:
    name: one of `DATASETS`.
    root: see `resolve_dataset_dir`.
    split: 'train' or 'test' (splits of `datasets/README.md`: DRIVE 20/20,
      CHASE-DB1 20/8, HRF 15/30).

  Returns:
    The split's samples, sorted by id. Images whose names do not follow the
    publisher's pattern (and other files) are ignored.

  Raises:
    ValueError: unknown `name` or `split`.
    DataError: missing or empty folder, or an image without its label (or
      without its FOV mask where the dataset ships them); the message names
      the folder or the missing file.
  """
  _check_name(name)
  _check_split(split)
  folder = resolve_dataset_dir(name, root)
  return sorted(_LISTERS[name](folder, split), key=lambda f: f.id)


def _decode(path: PathLike) -> np.ndarray:
  """Reads and decodes an image file as stored (OpenCV, IMREAD_UNCHANGED)."""
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f'{path}: cannot read file: {e.strerror or e}') from e
  if not data:
    raise DataError(f'{path}: file is empty')
  try:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  except cv2.error as e:
    raise DataError(
        f'{path}: cannot decode image: {str(e).strip().splitlines()[-1]}'
    ) from e
  if arr is None or arr.size == 0:
    raise DataError(
        f'{path}: cannot decode image (corrupt, truncated or unsupported'
        ' format)'
    )
  return arr


def _as_rgb(arr: np.ndarray, path: PathLike) -> np.ndarray:
  """Converts a decoded OpenCV array (BGR order) to (H, W, 3) uint8 RGB.

  Args:
    arr: (H, W), (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA; uint8 or uint16.
    path: the source file, named in error messages.

  Returns:
    (H, W, 3) uint8 RGB, C-contiguous.

  Raises:
    DataError: other dtypes or channel counts.
  """
  if arr.dtype == np.uint16:
    # Scale 0..65535 to 0..255 (x / 257, rounded): 65535 -> 255 exactly.
    arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
  elif arr.dtype != np.uint8:
    raise DataError(
        f'{Path(path)}: unsupported pixel type {arr.dtype} (expected 8- or'
        ' 16-bit)'
    )
  if arr.ndim == 3 and arr.shape[2] == 1:
    arr = arr[:, :, 0]
  if arr.ndim == 2:
    return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
  if arr.ndim == 3 and arr.shape[2] == 3:
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
  if arr.ndim == 3 and arr.shape[2] == 4:
    return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
  raise DataError(
      f'{Path(path)}: unsupported image shape {arr.shape} (expected grayscale,'
      ' RGB or RGBA)'
  )


def read_rgb(path: PathLike) -> np.ndarray:
  """Reads a photograph as RGB.

  Any format OpenCV decodes (JPEG, PNG, TIFF, BMP, ...) at any size. Pixels
  are taken as stored: EXIF orientation is not applied (labels are drawn on
  the stored pixels). Conversions, all explicit:
  * grayscale (H, W) or (H, W, 1): replicated to 3 equal channels;
  * RGBA: alpha dropped (no compositing);
  * 16-bit: scaled to 8-bit as round(x / 257), so 65535 -> 255.

  Args:
    path: the file.

  Returns:
    (H, W, 3) uint8 RGB.

  Raises:
    DataError: missing, empty, unreadable, corrupt or truncated file, or an
      unsupported pixel type (float, signed) or channel count; the message
      names the file.
  """
  return _as_rgb(_decode(path), path)


def _as_binary(arr: np.ndarray, path: PathLike) -> np.ndarray:
  """Binarises a decoded mask array; see `read_binary_mask`."""
  if arr.dtype != np.uint8:
    raise DataError(
        f'{Path(path)}: unsupported mask pixel type {arr.dtype} (expected 8-bit'
        ' or 1-bit)'
    )
  if arr.ndim == 3:
    if arr.shape[2] == 1:
      arr = arr[:, :, 0]
    elif arr.shape[2] in (3, 4):
      # np.maximum on channel views: ~15x faster than arr.max(axis=2).
      arr = np.maximum(np.maximum(arr[:, :, 0], arr[:, :, 1]), arr[:, :, 2])
    else:
      raise DataError(f'{Path(path)}: unsupported mask shape {arr.shape}')
  elif arr.ndim != 2:
    raise DataError(f'{Path(path)}: unsupported mask shape {arr.shape}')
  if arr.max() <= 1:
    return arr > 0  # A {0, 1} mask.
  return arr > 127


def read_binary_mask(path: PathLike) -> np.ndarray:
  """Reads a binary mask (vessel label or field of view).

  Accepted: 8-bit grayscale {0, 255} (a few grey values allowed, as in DRIVE's
  251 and HRF's anti-aliased pixels), 1-bit PNG (OpenCV expands it to
  {0, 255}), 8-bit masks holding {0, 1}, RGB(A) masks (e.g. HRF's FOV masks:
  the maximum over the colour channels is used, alpha ignored), GIF (DRIVE).
  A pixel is True where its value is > 127, or > 0 if the whole mask's
  maximum is 1 (a {0, 1} mask).

  Args:
    path: the file.

  Returns:
    (H, W) bool.

  Raises:
    DataError: missing, unreadable, corrupt or truncated file; 16-bit, float or
      signed masks (rejected rather than guessed); the message names the file.
  """
  return _as_binary(_decode(path), path)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
  """Fills the holes of a uint8 {0, 1} mask (0s not reachable from outside)."""
  padded = np.pad(mask, 1)
  flood = padded.copy()
  cv2.floodFill(
      flood,
      np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8),
      (0, 0),
      1,
  )
  return (padded | (flood == 0))[1:-1, 1:-1]


def derive_fov(rgb: np.ndarray) -> np.ndarray:
  """Derives the field of view (the camera's aperture) from a fundus photo.

  Method:
  1. r = the red channel (the brightest channel of fundus photos, so dark
     peripheral retina stays above the black surround), median-filtered with a
     5x5 kernel to remove JPEG noise;
  2. threshold t = max(0.10 * P99(r), 10), where P99 is r's 99th percentile
     (a level relative to the image's brightness, but above the noise of the
     black surround, which reaches ~16 in DRIVE); foreground = r > t;
  3. keep the largest 8-connected component;
  4. fill its holes (dark lesions, vessels, the rim of dark optic discs).
  No erosion. Measured against shipped masks (IoU): DRIVE (40 images) mean
  0.9969, min 0.9850; HRF (45 images) mean 0.9993, min 0.9990.

  Args:
    rgb: (H, W, 3) uint8 RGB photo.

  Returns:
    (H, W) bool, True inside the field of view.

  Raises:
    ValueError: `rgb` not (H, W, 3) uint8.
    DataError: no field of view found (an all-dark image).
  """
  if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
    raise ValueError(
        f'expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}'
    )
  red = cv2.medianBlur(np.ascontiguousarray(rgb[:, :, 0]), _FOV_MEDIAN_KSIZE)
  cdf = np.cumsum(cv2.calcHist([red], [0], None, [256], [0, 256]).ravel())
  p99 = int(np.searchsorted(cdf, 0.99 * cdf[-1]))
  threshold = max(_FOV_REL_THRESHOLD * p99, _FOV_MIN_THRESHOLD)
  fg = (red > threshold).astype(np.uint8)
  n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
  if n <= 1:
    raise DataError(
        'derive_fov: no field of view found (image is dark everywhere)'
    )
  largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
  return _fill_holes((labels == largest).astype(np.uint8)).astype(bool)


def _size(arr: np.ndarray) -> str:
  return f'{arr.shape[1]}x{arr.shape[0]}'


def load_sample(files: SampleFiles) -> Sample:
  """Reads one sample's files.

  Args:
    files: from `list_split` (or built by hand for other data).

  Returns:
    A `Sample` at native resolution: image (H, W, 3) uint8 RGB; label, fov,
    observer2 (H, W) bool (observer2 None where absent). Where `files.fov` is
    None the FOV is `derive_fov(image)`.

  Raises:
    DataError: any file unreadable, a mask's size differs from the image's
      (the message names both files and both sizes, W x H), or an empty FOV.
  """
  image = read_rgb(files.image)
  masks = {'label': files.label, 'fov': files.fov, 'observer2': files.observer2}
  arrays = {}
  for key, path in masks.items():
    if path is None:
      continue
    arr = read_binary_mask(path)
    if arr.shape != image.shape[:2]:
      raise DataError(
          f'{path}: {key} size {_size(arr)} (W x H) differs from image'
          f' {files.image} size {_size(image)}'
      )
    arrays[key] = arr
  if 'fov' in arrays:
    if not arrays['fov'].any():
      raise DataError(f'{files.fov}: FOV mask is empty')
  else:
    try:
      arrays['fov'] = derive_fov(image)
    except DataError as e:
      raise DataError(f'{files.image}: {e}') from e
  return Sample(
      id=files.id,
      image=image,
      label=arrays['label'],
      fov=arrays['fov'],
      observer2=arrays.get('observer2'),
  )


def load_split(name: str, root: PathLike, split: str) -> list[Sample]:
  """Reads one split: `load_sample` over `list_split(name, root, split)`.

  Returns:
    Samples sorted by id (DRIVE 20/20, CHASE-DB1 20/8, HRF 15/30 images).
  """
  return [load_sample(f) for f in list_split(name, root, split)]
