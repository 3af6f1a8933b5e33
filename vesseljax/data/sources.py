"""One door to every data source: files, TFDS (array_record, no TF) or synthetic.

`load_samples` returns native-resolution `Sample`s; `to_arrays` preprocesses
them to the working resolution as an `ArrayDataset` for the pipeline.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np

from vesseljax.data import datasets, preprocess, synthetic
from vesseljax.data.pipeline import ArrayDataset
from vesseljax.data.sample import DataError, Sample

# The datasets beside the repository (the brief's layout: <repo>/../shared/datasets).
DEFAULT_DATA_ROOT = pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'datasets'


def resolve_data_root(config, env_root: Optional[str] = None) -> None:
  """Sets config.data.root, if unset: `env_root` (the entry points pass $VESSELJAX_DATA_DIR), else
  ../shared/datasets beside the repo."""
  if config.data.root is None and config.data.name != 'synthetic':
    with config.unlocked():
      config.data.root = env_root or str(DEFAULT_DATA_ROOT)

NAMES = datasets.DATASETS + ('synthetic',)


def tfds_dir(data_config, workdir: str | pathlib.Path) -> pathlib.Path:
  """Where TFDS builds live: `data_config.tfds_dir`, else <workdir>/tfds."""
  return pathlib.Path(data_config.tfds_dir) if data_config.tfds_dir else pathlib.Path(workdir) / 'tfds'


def load_samples(data_config, split: str, tfds_dir: Optional[str | pathlib.Path] = None) -> list[Sample]:
  """Samples of `split` ('train' | 'test') for `data_config.name`.

  Args:
    data_config: the config's `data` section (name, root, source, synthetic_*).
    split: 'train' or 'test'.
    tfds_dir: where TFDS builds live (only for source='tfds').
  """
  name = data_config.name
  if name not in NAMES:
    raise DataError(f'unknown dataset {name!r}; expected one of {NAMES}')
  if split not in ('train', 'test'):
    raise DataError(f'unknown split {split!r}; expected train or test')
  if name == 'synthetic':
    num = data_config.synthetic_num_train if split == 'train' else data_config.synthetic_num_test
    return synthetic.make_split(split, num, tuple(data_config.synthetic_size), seed=0)
  if data_config.root is None:
    raise DataError(f'no data root set for {name}: pass --config.data.root=DIR or set VESSELJAX_DATA_DIR')
  if data_config.source == 'tfds':
    if tfds_dir is None:
      raise DataError(f'{name}: data.source=tfds needs a folder for the TFDS build: '
                      'pass --config.data.tfds_dir=DIR (or run a stage with a --workdir)')
    from vesseljax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    manual_dir = datasets.resolve_dataset_dir(name, data_config.root)
    return tfds_builders.load_split_tfds(name, manual_dir, tfds_dir, split)
  if data_config.source != 'files':
    raise DataError(f'unknown data source {data_config.source!r}; expected files or tfds')
  return datasets.load_split(name, data_config.root, split)


def work_size(data_config) -> tuple[int, int]:
  """The working resolution (H, W) of `data_config`, checked divisible by 16.

  `image_size` is (H, W), or one number for a square (`--config.data.image_size=512`
  reaches the config as the tuple (512,)).
  """
  size = data_config.image_size
  size = (size,) if isinstance(size, int) else tuple(size)
  if len(size) not in (1, 2):
    raise ValueError(f'data.image_size must be N or (H, W), got {size}')
  h, w = int(size[0]), int(size[-1])
  if h % 16 or w % 16:
    raise ValueError(f'data.image_size must be divisible by 16 (4 poolings), got {(h, w)}')
  return h, w


def to_arrays(samples: Sequence[Sample], data_config) -> ArrayDataset:
  """Preprocesses samples to the working resolution.

  Returns:
    ArrayDataset with images (N, H, W, 1) float32 in [0, 1] (green/CLAHE/gamma),
    labels and fovs (N, H, W) bool (bilinear resize, then > 0.5).
  """
  if not samples:
    raise DataError(f'no images for dataset {data_config.name!r}')
  size = work_size(data_config)
  images = np.stack([preprocess.preprocess_green(
      s.image, size, data_config.clahe_clip, data_config.clahe_tile_px, data_config.gamma)
                     for s in samples])
  labels = np.stack([preprocess.resize_mask(s.label, size) > 0.5 for s in samples])
  fovs = np.stack([preprocess.resize_mask(s.fov, size) > 0.5 for s in samples])
  return ArrayDataset(images=images, labels=labels, fovs=fovs, ids=[s.id for s in samples])


def fold_split(data: ArrayDataset, num_folds: int, fold: int) -> tuple[ArrayDataset, ArrayDataset]:
  """Splits `data` into (the other folds, block `fold`) of `num_folds` contiguous blocks.

  Blocks follow the dataset's sorted order (np.array_split sizes), so for HRF
  (ids 01_dr, 01_g, 01_h, 02_dr, ...) every block mixes the three categories.

  Raises:
    DataError: fewer images than folds, or `fold` outside [0, num_folds).
  """
  n = len(data.ids)
  if not 0 <= fold < num_folds:
    raise DataError(f'data.fold={fold} is outside [0, data.num_folds={num_folds})')
  if num_folds > n:
    raise DataError(f'data.num_folds={num_folds} is more than the {n} training images')
  held = np.array_split(np.arange(n), num_folds)[fold]
  rest = np.setdiff1d(np.arange(n), held)
  return data.subset(rest), data.subset(held)
