"""TFDS builders for DRIVE, CHASE-DB1 and HRF that need no TensorFlow.

The builders (`Drive`, `ChaseDb1`, `Hrf`, registered with TFDS as 'drive',
'chase_db1', 'hrf') read the publisher's folder given as `manual_dir` through
`datasets.list_split` / `datasets.load_sample`, so they yield exactly what
`datasets.load_split` yields.

TensorFlow-free recipe (TFDS 4.9): every image-like feature is a
`tfds.features.Image(encoding_format='png')` fed *already PNG-encoded bytes*
(encoded here with OpenCV): TFDS stores bytes as given and only calls
TensorFlow to encode numpy arrays. Files are written as `array_record`
(tfrecord writing needs TF) and read back with `builder.as_data_source()`,
whose numpy decoding uses OpenCV. Masks are stored as 1-channel PNGs with
values {0, 255}. `observer2` is stored for every image (all zeros where
absent) with a `has_observer2` flag, since TFDS features cannot be missing.

Typical use:

  samples = load_split_tfds('chase_db1', '/data/datasets', '/tmp/tfds', 'test')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Union

import cv2
import numpy as np
import tensorflow_datasets as tfds

from vesseljax.data import datasets
from vesseljax.data.sample import DataError, Sample

PathLike = Union[str, os.PathLike]

_FILE_FORMAT = 'array_record'


def _png(arr: np.ndarray) -> bytes:
  """PNG-encodes (H, W, 3) uint8 RGB or (H, W) bool (stored as {0, 255})."""
  if arr.dtype == np.bool_:
    arr = arr.astype(np.uint8) * 255
  else:
    arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
  ok, buf = cv2.imencode('.png', arr)
  if not ok:
    raise DataError(f'PNG encoding failed for array {arr.shape} {arr.dtype}')
  return buf.tobytes()


_INSTRUCTIONS = """\
Download {title} from its publisher ({homepage}) and unpack it. Point
`manual_dir` at the folder `{dir_name}/` (the layout as distributed, see
datasets/README.md), or at the folder that holds it.
"""


class _VesselBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: subclasses set _DATASET and the descriptive strings."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Publisher layout, native resolution, PNG-encoded.'}
  _DATASET = ''
  _TITLE = ''
  _HOMEPAGE = ''
  _CITATION = ''

  def _info(self) -> tfds.core.DatasetInfo:
    mask = tfds.features.Image(
        shape=(None, None, 1), dtype=np.uint8, encoding_format='png'
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f'{self._TITLE} retinal vessel segmentation at native resolution. '
            'image: RGB; label, fov, observer2: {0, 255} masks (fov derived '
            'from the photo where none ships; observer2 all zeros where '
            'has_observer2 is False).'
        ),
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image': tfds.features.Image(
                shape=(None, None, 3), dtype=np.uint8, encoding_format='png'
            ),
            'label': mask,
            'fov': mask,
            'observer2': mask,
            'has_observer2': tfds.features.Scalar(dtype=np.bool_),
        }),
        homepage=self._HOMEPAGE,
        citation=self._CITATION,
    )

  def _split_generators(self, dl_manager):
    folder = datasets.resolve_dataset_dir(self._DATASET, dl_manager.manual_dir)
    return {
        split: self._generate_examples(folder, split)
        for split in datasets.SPLITS
    }

  def _generate_examples(
      self, folder: Path, split: str
  ) -> Iterator[tuple[str, dict]]:
    for files in datasets.list_split(self._DATASET, folder, split):
      sample = datasets.load_sample(files)
      has_obs2 = sample.observer2 is not None
      obs2 = sample.observer2 if has_obs2 else np.zeros_like(sample.label)
      yield sample.id, {
          'id': sample.id,
          'image': _png(sample.image),
          'label': _png(sample.label),
          'fov': _png(sample.fov),
          'observer2': _png(obs2),
          'has_observer2': has_obs2,
      }


class Drive(_VesselBuilder):
  """DRIVE: 40 images 565x584, train 21..40 / test 01..20."""

  _DATASET = 'drive'
  _TITLE = 'DRIVE'
  _HOMEPAGE = 'https://drive.grand-challenge.org/'
  _CITATION = (
      'Staal et al., Ridge-based vessel segmentation in color images of the '
      'retina, IEEE TMI 23(4):501-509, 2004.'
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
      title=_TITLE, homepage=_HOMEPAGE, dir_name='DRIVE'
  )


class ChaseDb1(_VesselBuilder):
  """CHASE-DB1: 28 images 999x960, train 01L..10R / test 11L..14R, no FOV."""

  _DATASET = 'chase_db1'
  _TITLE = 'CHASE-DB1'
  _HOMEPAGE = 'https://blogs.kingston.ac.uk/retinal/chasedb1/'
  _CITATION = (
      'Fraz et al., An ensemble classification-based approach applied to '
      'retinal blood vessel segmentation, IEEE TBME 59(9):2538-2548, 2012.'
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
      title=_TITLE, homepage=_HOMEPAGE, dir_name='CHASEDB1'
  )


class Hrf(_VesselBuilder):
  """HRF: 45 images 3504x2336, train 01..05 / test 06..15 of each category."""

  _DATASET = 'hrf'
  _TITLE = 'HRF'
  _HOMEPAGE = 'https://www5.cs.fau.de/research/data/fundus-images/'
  _CITATION = (
      'Budai et al., Robust vessel segmentation in fundus images, '
      'International Journal of Biomedical Imaging 2013:154860, 2013.'
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
      title=_TITLE, homepage=_HOMEPAGE, dir_name='HRF'
  )


BUILDERS = {'drive': Drive, 'chase_db1': ChaseDb1, 'hrf': Hrf}


def build(
    name: str, manual_dir: PathLike, data_dir: PathLike
) -> tfds.core.DatasetBuilder:
  """Prepares a dataset as array_record files, or reuses a complete build.

  TFDS writes into a temporary folder and renames it on success, so an
  existing `data_dir/<name>/<version>/` is complete and is reused as is
  (`manual_dir` is then not read).

  Args:
    name: one of `datasets.DATASETS`.
    manual_dir: the publisher's folder, or the folder holding it.
    data_dir: where TFDS writes `<name>/<version>/`.

  Returns:
    The prepared builder.

  Raises:
    ValueError: unknown `name`, or an existing build in another file format.
    DataError: problems with the source files (from `datasets`).
  """
  if name not in BUILDERS:
    raise ValueError(
        f'unknown dataset {name!r}; expected one of {tuple(BUILDERS)}'
    )
  builder = BUILDERS[name](
      data_dir=os.fspath(data_dir), file_format=_FILE_FORMAT
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(manual_dir)
      ),
      file_format=_FILE_FORMAT,
  )
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f'{builder.data_dir}: existing build is {builder.info.file_format}, not'
        ' array_record; delete it to rebuild'
    )
  return builder


def _decode(ex: dict) -> Sample:
  """Turns one `as_data_source` record into a Sample."""
  sample_id = ex['id']
  if isinstance(sample_id, bytes):
    sample_id = sample_id.decode('utf-8')
  observer2 = None
  if bool(ex['has_observer2']):
    observer2 = ex['observer2'][:, :, 0] > 127
  return Sample(
      id=sample_id,
      image=np.ascontiguousarray(ex['image']),
      label=ex['label'][:, :, 0] > 127,
      fov=ex['fov'][:, :, 0] > 127,
      observer2=observer2,
  )


def load_split_tfds(
    name: str, manual_dir: PathLike, data_dir: PathLike, split: str
) -> list[Sample]:
  """Builds (or reuses) a dataset and reads one split back without TensorFlow.

  Args:
    name: one of `datasets.DATASETS`.
    manual_dir: see `build`.
    data_dir: see `build`.
    split: 'train' or 'test'.

  Returns:
    Samples sorted by id, equal to `datasets.load_split(name, manual_dir,
    split)`: image (H, W, 3) uint8 RGB; label, fov (H, W) bool; observer2
    (H, W) bool or None.
  """
  if split not in datasets.SPLITS:
    raise ValueError(
        f'unknown split {split!r}; expected one of {datasets.SPLITS}'
    )
  source = build(name, manual_dir, data_dir).as_data_source(split=split)
  return sorted(
      (_decode(source[i]) for i in range(len(source))), key=lambda s: s.id
  )
