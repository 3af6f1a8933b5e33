"""Training data for the refiner: photo, coarse map, reverse-attention map, label.

The refiner's training example is a tile of one training image holding, at the
working resolution,

  image channels 0-2   the RGB photo in [0, 1] (the image encoder's input),
  image channel 3      a coarse vessel probability for it,
  image channel 4      the reverse-attention map 1 - sigmoid(A) that goes with it,
  label, fov           the ground truth and the field of view,

packed as one 5-channel `ArrayDataset` so that the patch sampler and the
device-side augmentation (which warp every channel alike) serve it unchanged.
The coarse maps come from out-of-fold coarse runs (`source='oof'`: the
`holdout_maps.npz` files of `--mode=holdout`, which must cover every training
image exactly once) or from the degradation model (`source='degrade'`,
`variants` random degradations per image), or both (`source='oof+degrade'`).
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from vesseljax.data import degrade, preprocess, sources
from vesseljax.data.pipeline import ArrayDataset
from vesseljax.data.sample import DataError, Sample

RGB, COARSE, RA = slice(0, 3), 3, 4  # channel layout of the packed images
NUM_CHANNELS = 5


def read_holdout_maps(paths: Sequence[str | pathlib.Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{image id: (prob, ra_map)} (float32 in [0, 1], working size) from holdout_maps.npz files.

  Raises:
    DataError: a missing or unreadable file (named), or an id in two files.
  """
  maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  for path in paths:
    path = pathlib.Path(path)
    if not path.is_file():
      raise DataError(f'{path}: out-of-fold coarse maps not found (write them with --mode=holdout)')
    try:
      with np.load(path) as f:
        ids, prob, ra = list(f['ids']), f['prob'], f['ra_map']
    except (OSError, KeyError, ValueError) as e:
      raise DataError(f'{path}: not a holdout_maps.npz file ({e})') from e
    scale = float(np.iinfo(prob.dtype).max) if np.issubdtype(prob.dtype, np.integer) else 1.0
    for i, image_id in enumerate(ids):
      if image_id in maps:
        raise DataError(f'{path}: {image_id} is also in another holdout file (overlapping folds)')
      maps[str(image_id)] = (prob[i] / scale, ra[i] / scale)
  return maps


def label_fov(sample: Sample, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """The sample's label and FOV at the working size, (H, W) bool (as `sources.to_arrays`)."""
  return (preprocess.resize_mask(sample.label, size) > 0.5,
          preprocess.resize_mask(sample.fov, size) > 0.5)


def pack(samples: Sequence[Sample], data_config, coarse: Sequence[tuple[np.ndarray, np.ndarray]],
         ids: Sequence[str] | None = None) -> ArrayDataset:
  """Packs samples with their (prob, ra_map) maps (working size) into a 5-channel dataset.

  Returns:
    ArrayDataset: images (N, H, W, 5) float32 (RGB, coarse, ra), labels and fovs (N, H, W) bool.
  """
  size = sources.work_size(data_config)
  n = len(samples)
  images = np.zeros((n,) + size + (NUM_CHANNELS,), np.float32)
  labels = np.zeros((n,) + size, bool)
  fovs = np.zeros((n,) + size, bool)
  for i, (s, (prob, ra)) in enumerate(zip(samples, coarse)):
    if prob.shape != size or ra.shape != size:
      raise DataError(f'{s.id}: coarse map {prob.shape} / ra map {ra.shape} is not at the working size {size}')
    images[i, ..., RGB] = preprocess.preprocess_rgb(s.image, size)
    images[i, ..., COARSE] = prob
    images[i, ..., RA] = ra
    labels[i], fovs[i] = label_fov(s, size)
  return ArrayDataset(images=images, labels=labels, fovs=fovs, ids=list(ids or [s.id for s in samples]))


def coarse_map_paths(diffusion_config) -> list[str]:
  """The holdout_maps.npz files listed in diffusion.coarse_maps (comma-separated)."""
  return [x.strip() for x in diffusion_config.coarse_maps.split(',') if x.strip()]


def _oof_dataset(config, samples: Sequence[Sample]) -> ArrayDataset:
  d = config.diffusion
  paths = coarse_map_paths(d)
  if not paths:
    raise DataError(f"diffusion.coarse_source={d.coarse_source!r} needs diffusion.coarse_maps "
                    '(comma-separated holdout_maps.npz paths)')
  maps = read_holdout_maps(paths)
  missing = [s.id for s in samples if s.id not in maps]
  if missing:
    raise DataError(f'out-of-fold coarse maps miss {len(missing)} training image(s): {missing[:5]}; '
                    f'files: {paths}')
  return pack(samples, config.data, [maps[s.id] for s in samples])


def _degrade_dataset(config, samples: Sequence[Sample]) -> ArrayDataset:
  d = config.diffusion
  rng = np.random.default_rng(config.seed)
  size = sources.work_size(config.data)
  reps = [s for s in samples for _ in range(d.degrade_variants)]
  coarse = [degrade.degrade(*label_fov(s, size), rng) for s in reps]
  ids = [f'{s.id}#{k}' for s in samples for k in range(d.degrade_variants)]
  return pack(reps, config.data, coarse, ids)


SOURCES = {'oof': (_oof_dataset,), 'degrade': (_degrade_dataset,),
           'oof+degrade': (_oof_dataset, _degrade_dataset)}


def refiner_dataset(config, samples: Sequence[Sample]) -> ArrayDataset:
  """The refiner's training set from `config.diffusion.coarse_source`.

  'oof' packs each training image once with its out-of-fold maps, 'degrade'
  `degrade_variants` times with degraded labels, 'oof+degrade' both (the
  out-of-fold images first).

  Raises:
    DataError: 'oof' maps that miss some training images (named), or an unknown source.
  """
  source = config.diffusion.coarse_source
  if source not in SOURCES:
    raise DataError(f'unknown diffusion.coarse_source {source!r}; expected one of {sorted(SOURCES)}')
  parts = [build(config, samples) for build in SOURCES[source]]
  if len(parts) == 1:
    return parts[0]
  return ArrayDataset(images=np.concatenate([p.images for p in parts]),
                      labels=np.concatenate([p.labels for p in parts]),
                      fovs=np.concatenate([p.fovs for p in parts]), ids=[i for p in parts for i in p.ids])
