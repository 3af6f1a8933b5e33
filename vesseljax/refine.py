"""Photo in, refined vessel map and per-pixel uncertainty out.

`RefinedPredictor` chains the coarse model and the latent-diffusion refiner:

  photo -> coarse model (working size): probability p_c, reverse-attention map
        -> square tiles of diffusion.tile_size (overlap diffusion.tile_overlap),
           each packed as [RGB, p_c, ra] exactly as in training
        -> per tile: E(p_c) and the image tokens condition a DDIM sampler
           (diffusion.sampler: one lax.scan, guidance as one batched forward),
           k trajectories vmapped over PRNG keys in one compiled call; every
           (trajectory, tile) pair draws its own noise from
           fold_in(member key, tile index), so a tile's result does not depend
           on which tiles are sampled beside it (sample.tile_batch)
        -> decode each trajectory's z0 to probabilities; mean and variance over k
        -> tiles blended with a tapered window -> back to native size.

The refiner works on tiles because its cross-attention tokens are a fixed grid
per tile: train and inference then see the same geometry at any image size.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vesseljax import predict
from vesseljax.data import preprocess, refine_data
from vesseljax.diffusion import sampler, schedule as schedule_lib
from vesseljax.train import refiner

log = logging.getLogger('vesseljax')


# How a sampled latent z0 becomes a probability map:
#   'direct'    sigmoid(D(z0)), the paper;
#   'residual'  clip(p_c + sigmoid(D(z0)) - sigmoid(D(E(p_c))), 0, 1): the
#               refiner's change of the decoded probability, added to the coarse
#               map itself. A refiner that returns the coarse latent then
#               returns p_c exactly, instead of its autoencoder round trip (see
#               BUILD_NOTES.md). Probabilities, not logits: a logit residual
#               scored Dice 0.29 on a DRIVE image (coarse 0.82); the
#               autoencoder's logits likely saturate off the vessels.
DECODES = ('direct', 'residual')

# Which noise each tile draws, recorded with every refined evaluation (and in
# the spec of its progress folder, so partial results are never mixed):
#   1  (up to 2026-11-27) one key per ensemble member for a whole tile batch:
#      tiles in the same batch slot of different batches shared their noise,
#      and a tile's result depended on sample.tile_batch;
#   2  one key per (member, tile): fold_in(member key, tile index), and the
#      start noise and DDIM noise from separate halves of a split.
SAMPLING_REVISION = 2


class SamplingError(RuntimeError):
  """Sampling produced non-finite values (the message names the image)."""


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """How to sample; `check()` validates every field against the schedule length."""
  steps: int = 20
  eta: float = 0.0
  guidance: float = 1.0
  start: str = 'noise'
  strength: float = 0.5
  ensemble: int = 5
  seed: int = 0
  tile_batch: int = 4
  decode: str = 'direct'
  # True: the refiner never sees the photo (an inference-time ablation of the image
  # conditioning): the image condition is the learned null at every step (guidance
  # then has nothing to amplify) and the RGB pixels it would read are zeros (black,
  # as outside the FOV), which a pixel-detail refiner's detail input sees.
  drop_image: bool = False
  # True: the coarse condition (coarse latent, RA map, coarse pixels of the detail
  # input) is zeros at every step, as in coarse-condition dropout: what the refiner
  # draws from the photo alone. Needs start='noise' and decode='direct' (the others
  # read the coarse map).
  drop_coarse: bool = False

  @classmethod
  def from_config(cls, sample_config) -> 'SampleOptions':
    return cls(**{f.name: sample_config[f.name] for f in dataclasses.fields(cls)})

  def check(self, timesteps: int) -> None:
    """Raises ValueError naming the `sample.<field>` that is out of range.

    The range checks are the sampler's own (one set of rules for both).
    """
    checks = [('steps', lambda v: schedule_lib.ddim_timesteps(timesteps, v)),
              ('guidance', sampler.check_guidance_scale), ('eta', sampler.check_eta)]
    if self.start == 'coarse':
      checks.append(('strength', sampler.check_strength))
    for field, check in checks:
      value = getattr(self, field)
      try:
        check(value)
      except ValueError as e:
        raise ValueError(f'sample.{field}={value}: {e}') from None
    if self.start not in ('noise', 'coarse'):
      raise ValueError(f"sample.start={self.start!r} must be 'noise' or 'coarse'")
    if self.decode not in DECODES:
      raise ValueError(f'sample.decode={self.decode!r} must be one of {DECODES}')
    if self.drop_coarse and (self.start != 'noise' or self.decode != 'direct'):
      raise ValueError(f"sample.drop_coarse=True needs sample.start='noise' and sample.decode='direct' "
                       f"(given {self.start!r}, {self.decode!r}): both others read the coarse map")
    if self.ensemble < 1 or self.tile_batch < 1:
      raise ValueError(f'sample.ensemble={self.ensemble} and sample.tile_batch={self.tile_batch} must be >= 1')


def check_tile_overlap(tile: int, overlap: int) -> None:
  """Raises ValueError unless 0 <= overlap < tile (the tiles then cover the image)."""
  if not 0 <= overlap < tile:
    raise ValueError(f'diffusion.tile_overlap={overlap} must be >= 0 and smaller than the tile '
                     f'(diffusion.tile_size={tile})')


def tile_groups(count: int, tile_batch: int) -> tuple[int, list[range]]:
  """(batch, groups): `count` tiles in as few groups of at most `tile_batch` as possible, of equal size.

  9 tiles at tile_batch 4 are 3 groups of 3 (9 slots), not 4 + 4 + 1 padded
  to 12: padding slots cost as much as tiles. `batch` is the compiled batch
  size, the largest group.
  """
  num_groups = -(-count // tile_batch)
  batch = -(-count // num_groups)
  return batch, [range(first, min(first + batch, count)) for first in range(0, count, batch)]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of `tile` covering [0, length) with at least `overlap` shared pixels."""
  if length <= tile:
    return [0]
  stride = tile - overlap
  starts = list(range(0, length - tile + 1, stride))
  if starts[-1] != length - tile:
    starts.append(length - tile)
  return starts


def tile_window(tile: int, overlap: int) -> np.ndarray:
  """(tile, tile) blending weights, tapering linearly to 1/(overlap+1) at the borders."""
  ramp = np.minimum(1.0, np.minimum(np.arange(1, tile + 1), np.arange(tile, 0, -1)) / (overlap + 1))
  return np.outer(ramp, ramp).astype(np.float32)


def pack_work(rgb_work: Optional[np.ndarray], coarse_prob: np.ndarray, ra_map: np.ndarray,
              tile: int) -> np.ndarray:
  """The refiner's packed input (see data/refine_data.py) for a working-size image.

  Args:
    rgb_work: (H, W, 3) in [0, 1], or None for zeros (the photo left out).
    coarse_prob, ra_map: (H, W) in [0, 1].
  Returns:
    (max(H, tile), max(W, tile), 5) float32, zero-padded up to one tile.
  """
  h, w = coarse_prob.shape
  packed = np.zeros((max(h, tile), max(w, tile), refine_data.NUM_CHANNELS), np.float32)
  if rgb_work is not None:
    packed[:h, :w, refine_data.RGB] = rgb_work
  packed[:h, :w, refine_data.COARSE] = coarse_prob
  packed[:h, :w, refine_data.RA] = ra_map
  return packed


def tile_corners(shape: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int]]:
  """(y, x) corners of the tiles covering a (padded) image of `shape`, row by row."""
  return [(y, x) for y in tile_starts(shape[0], tile, overlap) for x in tile_starts(shape[1], tile, overlap)]


class TileBlend:
  """The windowed average of overlapping tile maps (`tile_window` weights).

  `add(corner, *maps)` adds each (tile, tile) map at its corner; `result(h, w)`
  returns the averages, cropped to (h, w).
  """

  def __init__(self, shape: tuple[int, int], tile: int, overlap: int, num_maps: int = 1):
    self.tile, self.window = tile, tile_window(tile, overlap)
    self.sums = [np.zeros(shape, np.float32) for _ in range(num_maps)]
    self.weight = np.zeros(shape, np.float32)

  def add(self, corner: tuple[int, int], *maps: np.ndarray) -> None:
    y, x = corner
    cells = np.s_[y:y + self.tile, x:x + self.tile]
    for total, m in zip(self.sums, maps, strict=True):
      total[cells] += self.window * m
    self.weight[cells] += self.window

  def result(self, h: int, w: int) -> list[np.ndarray]:
    return [(total / self.weight)[:h, :w] for total in self.sums]


class RefinedPredictor:
  """Coarse model + refiner: `predictor(rgb) -> dict` of native-size maps."""

  sampling_revision = SAMPLING_REVISION

  def __init__(self, coarse_checkpoint, refiner_checkpoint, autoencoder_checkpoint, data_config,
               options: SampleOptions, tile_overlap: int = 32, impl: str = 'auto'):
    self.coarse = predict.CoarsePredictor(coarse_checkpoint, data_config, impl)
    self.sidecar, ref_vars = refiner.load_checked(refiner_checkpoint, 'refiner')
    ae_sidecar, ae_vars = refiner.load_checked(autoencoder_checkpoint, 'mask_autoencoder')
    self.coarse_path, self.refiner_path = str(coarse_checkpoint), str(refiner_checkpoint)
    self.autoencoder_path, self.autoencoder_sidecar = str(autoencoder_checkpoint), ae_sidecar
    refiner.check_refiner_matches(self.sidecar, ae_sidecar, self.coarse.sidecar, str(refiner_checkpoint))
    spec = self.sidecar['model']
    options.check(spec['timesteps'])
    self.options = options
    self.tile, self.overlap = spec['tile_size'], int(tile_overlap)
    check_tile_overlap(self.tile, self.overlap)
    self.models = {'autoencoder': refiner.create_autoencoder(ae_sidecar['model']),
                   'image_encoder': refiner.create_image_encoder(spec),
                   'denoiser': refiner.create_denoiser(spec)}
    from vesseljax.train import refiner_loops  # pylint: disable=g-import-not-at-top
    self.params = refiner_loops.checked_refiner_params(refiner_checkpoint, ref_vars, self.models, self.tile,
                                                       spec['latent_channels'])
    self.ae_params = jax.tree.map(jnp.asarray, ae_vars['params'])
    self.scale = float(ae_sidecar['latent_scale'])
    self.schedule = schedule_lib.cosine_schedule(spec['timesteps'])
    self.use_image = bool(self.sidecar.get('use_image', True))
    self.use_ra = bool(self.sidecar.get('use_ra', True))
    self._sample = jax.jit(self._sample_tiles)

  def _sample_tiles(self, params, ae_params, tiles, keys):
    """(k, B, T, T) probabilities and (B,) finite flags for B packed tiles (B, T, T, 5).

    keys: (k, B) PRNG keys, one per trajectory and tile. The k trajectories are
    vmapped (one compiled call), and so are the tiles: each tile's start noise
    and DDIM noise come from its own key. A flag is False where any
    trajectory's z0 is not finite (probabilities alone would hide +-inf, which
    the sigmoid maps to 0 or 1).
    """
    o = self.options
    drop_coarse = jnp.ones(tiles.shape[:1], bool) if o.drop_coarse else None
    cond = refiner.conditioning(self.models, params, ae_params, self.scale, tiles, use_ra=self.use_ra,
                                drop_coarse=drop_coarse)
    force_drop = not self.use_image or o.drop_image

    def denoise_fn(z_t, t, c, drop_image):
      return refiner.denoise(self.models, params, z_t, t, c, drop_image | force_drop)

    eps_fn = sampler.guided_eps_fn(denoise_fn, 0.0 if force_drop else float(o.guidance))
    decode = lambda z: refiner.decode_probs(self.models['autoencoder'], ae_params, z, self.scale)

    def one_tile(key, tile_cond):
      """z0 (h, w, C) of one trajectory for one tile (`tile_cond`: one tile's condition)."""
      tile_cond = jax.tree.map(lambda x: x[None], tile_cond)
      start_key, ddim_key = jax.random.split(key)
      if o.start == 'noise':
        z, start = jax.random.normal(start_key, tile_cond['coarse_latent'].shape), None
      else:
        z, start = sampler.strength_start(self.schedule, tile_cond['coarse_latent'], o.steps, o.strength,
                                          start_key)
      z0 = sampler.ddim_sample(eps_fn, self.schedule, tile_cond, z, o.steps, ddim_key, eta=o.eta,
                               start_index=start)
      return z0[0]

    z0 = sampler.sample_ensemble(lambda tile_keys: jax.vmap(one_tile)(tile_keys, cond), keys)  # (k, B, h, w, C)
    probs = jax.vmap(decode)(z0)
    if o.decode == 'residual':
      probs = probs + tiles[..., refine_data.COARSE] - decode(cond['coarse_latent'])
    finite = jnp.all(jnp.isfinite(z0), axis=(0, 2, 3, 4)) & jnp.all(jnp.isfinite(probs), axis=(0, 2, 3))
    return jnp.clip(probs, 0.0, 1.0), finite

  @staticmethod
  def tile_keys(seed: int, ensemble: int, tile_indices) -> jax.Array:
    """(ensemble, len(tile_indices)) keys: fold_in(split(key(seed), ensemble)[m], tile index)."""
    members = jax.random.split(jax.random.key(seed), ensemble)
    indices = jnp.asarray(list(tile_indices), jnp.uint32)
    return jax.vmap(lambda m: jax.vmap(lambda i: jax.random.fold_in(m, i))(indices))(members)

  def refine_work(self, rgb_work: np.ndarray, coarse_prob: np.ndarray, ra_map: np.ndarray,
                  name: str = 'image') -> tuple[np.ndarray, np.ndarray]:
    """(mean probability, variance), (H, W) float32, for working-size inputs.

    Args:
      rgb_work: (H, W, 3) float32 in [0, 1]; coarse_prob, ra_map: (H, W) in [0, 1].
      name: names the image in a SamplingError.
    """
    h, w = coarse_prob.shape
    t, o = self.tile, self.options
    packed = pack_work(None if o.drop_image else rgb_work, coarse_prob, ra_map, t)
    corners = tile_corners(packed.shape[:2], t, self.overlap)
    blend = TileBlend(packed.shape[:2], t, self.overlap, num_maps=2)
    batch, groups = tile_groups(len(corners), o.tile_batch)
    # Keys of every tile, then of padding slots (indices no tile has), built once per image.
    keys = self.tile_keys(o.seed, o.ensemble, range(len(corners) + batch))
    for indices in groups:
      group = [corners[i] for i in indices]
      pad = batch - len(group)  # padding slots: zero tiles
      tiles = np.stack([packed[y:y + t, x:x + t] for y, x in group]
                       + [np.zeros((t, t, refine_data.NUM_CHANNELS), np.float32)] * pad)
      slots = np.r_[np.asarray(indices), len(corners) + np.arange(pad)]
      probs, finite = self._sample(self.params, self.ae_params, jnp.asarray(tiles), keys[:, slots])
      probs, finite = np.asarray(probs), np.asarray(finite)
      if not finite[:len(group)].all():
        raise SamplingError(f'{name}: non-finite values while sampling tiles at {group}')
      mean, var = probs.mean(axis=0), probs.var(axis=0)
      for j, corner in enumerate(group):
        blend.add(corner, mean[j], var[j])
    mean, var = blend.result(h, w)
    return mean, var

  def __call__(self, rgb: np.ndarray, name: str = 'image') -> dict[str, np.ndarray]:
    """Native-size maps for an RGB photo: 'prob' (refined mean), 'variance', 'coarse'."""
    coarse_prob, ra = self.coarse.maps(self.coarse.preprocess(rgb))
    rgb_work = preprocess.preprocess_rgb(rgb, self.coarse.work_size)
    mean, var = self.refine_work(rgb_work, coarse_prob, ra, name)
    native = rgb.shape[:2]
    return {'prob': preprocess.to_native(mean, native),
            'variance': np.maximum(preprocess.resize(var, native), 0.0),
            'coarse': preprocess.to_native(coarse_prob, native)}
