"""Images in, vessel maps out: the coarse predictor and the PNG writers.

`CoarsePredictor` loads a params-only checkpoint (see `train.coarse.export_params`)
and maps an RGB photo at any size to a native-size probability map: preprocess
to the checkpoint's working size, run LU-Net(+RA), resize the probabilities back,
threshold last. `predict_files` writes, per photo, `<stem>_prob.png` (16-bit,
probability x 65535), `<stem>_mask.png` (0/255) and `<stem>_overlay.png`.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Iterable, Optional, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from vesseljax.data import datasets, preprocess, sources
from vesseljax.data.sample import DataError
from vesseljax.train import coarse, steps

log = logging.getLogger('vesseljax')

# Test-time flips: number of views -> the (H, W) axes each view mirrors.
FLIPS = {1: ((),), 2: ((), (1,)), 4: ((), (1,), (0,), (0, 1))}

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.tif', '.tiff', '.bmp', '.gif', '.ppm')


class CoarsePredictor:
  """A loaded coarse model: `predictor(rgb) -> (H, W) float32 probabilities`."""

  def __init__(self, checkpoint: str | pathlib.Path, data_config, impl: str = 'auto', flips: int = 1):
    self.sidecar, variables = coarse.load_params(checkpoint)
    spec = self.sidecar['model']
    self.model = coarse.create_model(dict(spec, impl=impl))
    coarse.check_variables(variables, self.model, 1, str(checkpoint))
    self.variables = jax.tree.map(jnp.asarray, variables)
    self.work_size = tuple(self.sidecar.get('image_size') or sources.work_size(data_config))
    self.data_config = data_config
    self._apply = steps.make_predict_fn(self.model.apply)
    if flips not in FLIPS:
      raise ValueError(f'eval.flips must be one of {sorted(FLIPS)}, got {flips}')
    self.flips = flips

  def preprocess(self, rgb: np.ndarray) -> np.ndarray:
    d = self.data_config
    return preprocess.preprocess_green(rgb, self.work_size, d.clahe_clip, d.clahe_tile_px, d.gamma)

  def outputs(self, images: np.ndarray) -> dict:
    """Model outputs for preprocessed (B, H_work, W_work, 1) images."""
    return self._apply(self.variables, jnp.asarray(images))

  def maps(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The refiner's conditions for one preprocessed (H_work, W_work, 1) image.

    Returns:
      (probability, reverse-attention map), each (H_work, W_work) float32 in
      [0, 1]: sigmoid of the main logits, and 1 - sigmoid(A) of the coarse model.
    """
    outputs = self.outputs(image[None])
    prob = jax.nn.sigmoid(outputs['logits'][0, ..., 0])
    return np.asarray(prob, np.float32), np.asarray(outputs['ra_map'][0, ..., 0], np.float32)

  def probs_at_work_size(self, images: np.ndarray, batch_size: int = 1) -> np.ndarray:
    """(N, H_work, W_work) probabilities for preprocessed images (N, H, W, C).

    With `flips` 2 or 4 (test-time augmentation), the mean of the
    probabilities of the image and its mirror images (left-right; and
    top-bottom and both), each mapped back.
    """
    total = np.zeros(images.shape[:3], np.float32)
    for axes in FLIPS[self.flips]:
      flipped = np.flip(images, axis=tuple(a + 1 for a in axes)) if axes else images
      prob = coarse.infer_probs(self._apply, self.variables, np.ascontiguousarray(flipped), batch_size)
      total += np.flip(prob, axis=tuple(a + 1 for a in axes)) if axes else prob
    return total / len(FLIPS[self.flips])

  def __call__(self, rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 vessel probability at the photo's native size."""
    prob = self.probs_at_work_size(self.preprocess(rgb)[None])[0]
    return preprocess.to_native(prob, rgb.shape[:2])


def overlay(rgb: np.ndarray, mask: np.ndarray, color=(0, 255, 0), alpha: float = 0.6,
            highlight: Optional[np.ndarray] = None) -> np.ndarray:
  """RGB photo with `mask` pixels blended towards `color`; `highlight` pixels in magenta."""
  out = rgb.astype(np.float32).copy()
  out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
  if highlight is not None:
    out[highlight] = (1 - alpha) * out[highlight] + alpha * np.array([255, 0, 255], np.float32)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
  if array.ndim == 3:
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
  if not cv2.imwrite(str(path), array):
    raise OSError(f'{path}: could not write PNG')


def write_maps(out_dir: pathlib.Path, stem: str, rgb: np.ndarray, prob: np.ndarray,
               threshold: float, fov: Optional[np.ndarray] = None) -> dict:
  """Writes `<stem>_prob.png` (uint16, p x 65535), `<stem>_mask.png` (0/255), `<stem>_overlay.png`."""
  out_dir.mkdir(parents=True, exist_ok=True)
  if fov is not None:
    prob = np.where(fov, prob, 0.0)
  mask = prob >= threshold
  paths = {k: out_dir / f'{stem}_{k}.png' for k in ('prob', 'mask', 'overlay')}
  _write_png(paths['prob'], np.round(np.clip(prob, 0, 1) * 65535).astype(np.uint16))
  _write_png(paths['mask'], mask.astype(np.uint8) * 255)
  _write_png(paths['overlay'], overlay(rgb, mask))
  return paths


def list_inputs(path: str | pathlib.Path) -> list[pathlib.Path]:
  """A photo file, or the photos in a folder (sorted); DataError when there are none."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise DataError(f'{path}: input not found')
  files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  if not files:
    raise DataError(f'{path}: no images ({", ".join(IMAGE_SUFFIXES)}) in this folder')
  by_stem = {}
  for f in files:  # outputs are named by stem: photo.jpg and photo.png would write the same files
    if f.stem in by_stem:
      raise DataError(f'{by_stem[f.stem]} and {f}: two photos named {f.stem!r} would write the same '
                      'output files; rename one')
    by_stem[f.stem] = f
  return files


MAP_KINDS = ('prob', 'mask', 'overlay')


def refuse_existing_outputs(inputs: Iterable[pathlib.Path], out_dir: pathlib.Path,
                            kinds: Sequence[str] = MAP_KINDS, overwrite: bool = False) -> None:
  """FileExistsError naming the output files of `inputs` already in `out_dir`, unless `overwrite`."""
  if overwrite:
    return
  existing = [out_dir / f'{p.stem}_{k}.png' for p in inputs for k in kinds
              if (out_dir / f'{p.stem}_{k}.png').exists()]
  if existing:
    raise FileExistsError(f'{existing[0]} and {len(existing) - 1} other output file(s) exist; '
                          'pass --overwrite to replace them or choose another --output')


def read_photo(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(RGB uint8 (H, W, 3), field of view (H, W) bool) of a photo; DataError naming the file."""
  rgb = datasets.read_rgb(path)
  try:
    return rgb, datasets.derive_fov(rgb)
  except DataError as e:
    raise DataError(f'{path}: {e}') from e


def predict_files(predictor: CoarsePredictor, inputs: Sequence[pathlib.Path], out_dir: str | pathlib.Path,
                  threshold: float = 0.5, overwrite: bool = False) -> tuple[int, list[str]]:
  """Segments each photo; an unreadable one (or one without a field of view) is logged and skipped.

  Raises:
    FileExistsError: outputs of these photos are in `out_dir` already and not `overwrite`.

  Returns:
    (number written, list of error lines). The caller exits non-zero if any.
  """
  out_dir = pathlib.Path(out_dir)
  refuse_existing_outputs(inputs, out_dir, MAP_KINDS, overwrite)
  errors, written = [], 0
  for path in inputs:
    try:
      rgb, fov = read_photo(path)
    except DataError as e:
      log.error('skipping %s', e)
      errors.append(str(e))
      continue
    prob = predictor(rgb)
    write_maps(out_dir, path.stem, rgb, prob, threshold, fov)
    written += 1
    log.info('wrote %s_{prob,mask,overlay}.png to %s', path.stem, out_dir)
  return written, errors


def native_probs(predictor: CoarsePredictor, images: Sequence[np.ndarray], batch_size: int = 1) -> list[np.ndarray]:
  """Native-size probability maps for RGB photos, batched at the working size."""
  work = np.stack([predictor.preprocess(rgb) for rgb in images])
  probs = predictor.probs_at_work_size(work, batch_size)
  return [preprocess.to_native(p, rgb.shape[:2]) for p, rgb in zip(probs, images)]
