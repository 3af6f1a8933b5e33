"""A smaller, pixel-identical copy of a dataset, in its publisher's layout.

A lent GPU machine receives the working tree plus at most 64 MiB in all
(BUILD_NOTES.md, "GPU, third session"), and the tracked tree is ~40 MB of it.
The datasets' bulk is uncompressed TIFF: DRIVE's photos (30 MB) and HRF's
labels (35 MB). `copy_compact` copies the files of the chosen splits, each
under its own relative path and name, re-encoding every TIFF as lossless PNG
(OpenCV reads an image by its content, not its extension, so the readers of
`datasets.py` load the copy unchanged) and copying every other file (JPEG
photos, GIF and PNG labels) byte for byte. Every re-encoded file is checked
to decode to the same array; the copy's samples equal the source's
(tests/test_datasets.py). The second observer's labels are not copied.

Measured (`launch/make_gpu_bundle.py`, all files of the splits): DRIVE,
both splits, 30.2 -> 16.7 MB; HRF's training split 35.4 -> 32.1 MB (its JPEG
photos are most of it); CHASE-DB1 2.3 MB, unchanged (nothing in it is TIFF).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from typing import Optional, Sequence

import cv2
import numpy as np

from vesseljax.data import datasets

_TIFF = ('.tif', '.tiff')


@dataclasses.dataclass
class CopyReport:
  """Bytes read from the source and written to the copy, and the files written."""
  files: int = 0
  source_bytes: int = 0
  copy_bytes: int = 0


def _copy_file(src: pathlib.Path, dst: pathlib.Path, report: CopyReport) -> None:
  """Copies one file to `dst` (same name): a TIFF as lossless PNG bytes, anything else as it is."""
  if dst.exists():
    return  # shared by several samples (none in the three datasets) or copied already
  dst.parent.mkdir(parents=True, exist_ok=True)
  if src.suffix.lower() in _TIFF:
    array = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    if array is None:
      raise datasets.DataError(f'{src}: unreadable')
    ok, png = cv2.imencode('.png', array, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok or not np.array_equal(cv2.imdecode(png, cv2.IMREAD_UNCHANGED), array):
      raise datasets.DataError(f'{src}: the PNG does not decode to the same pixels')
    dst.write_bytes(png.tobytes())
  else:
    shutil.copyfile(src, dst)
  report.files += 1
  report.source_bytes += src.stat().st_size
  report.copy_bytes += dst.stat().st_size


def copy_compact(name: str, source: str | pathlib.Path, out: str | pathlib.Path,
                 splits: Sequence[str] = ('train', 'test'), max_images: Optional[int] = None) -> CopyReport:
  """Copies dataset `name` from `source` into `out/<publisher's folder>`, smaller.

  Args:
    name: one of `datasets.DATASETS`.
    source: the folder holding the publishers' folders, or the dataset's own.
    out: where the copy's publisher folder (e.g. `out/HRF`) is made; it must
      not exist yet (nothing is overwritten).
    splits: 'train' and/or 'test'.
    max_images: the first this many samples of each split (tests); None: all.

  Returns:
    What was copied.

  Raises:
    DataError: the source is not the dataset, a file is unreadable or does
      not re-encode losslessly; FileExistsError: the copy's folder exists.
  """
  folder = datasets.resolve_dataset_dir(name, source)
  target = pathlib.Path(out) / datasets.DATASET_DIR_NAMES[name]
  if target.exists():
    raise FileExistsError(f'{target} exists; remove it first')
  report = CopyReport()
  for split in splits:
    for files in datasets.list_split(name, folder, split)[:max_images]:
      for path in (files.image, files.label, files.fov):
        if path is not None:
          _copy_file(path, target / path.relative_to(folder), report)
  return report
