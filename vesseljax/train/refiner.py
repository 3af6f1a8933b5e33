"""Where the refiner's models meet configs, checkpoints and the train steps.

Three networks (`models/`): the mask autoencoder (trained first, then frozen),
the image encoder and the denoiser (trained together; their params live in one
tree {'image_encoder': ..., 'denoiser': ...}). This module builds them from
`config.diffusion`, writes and checks their params-only checkpoints, and holds
the two pure train steps, pmapped over `steps.AXIS` like the coarse model's:

  autoencoder_step  masks (labels and coarse maps) -> L2 + Dice reconstruction
                    (or L2 + KL on the coarse maps, diffusion.ae_coarse_loss;
                    optionally the decoder alone, `decoder_only`)
  refiner_step      z0 = s * E(label), z_t = q_sample(z0, t, eps);
                    L = ||eps - eps_hat||^2 + abar_t * (dice_weight * Dice(D(x0_hat / s), label)
                        + edge_weight * Edge(D(x0_hat / s), label)
                        [+ disagreement_weight * BCE where coarse and label disagree]),
                    x0_hat clipped to +-5
                    with E, D the frozen autoencoder, s its latent scale, the
                    image condition dropped to the learned null with
                    probability cfg_drop_prob, the coarse condition (coarse
                    latent, RA map, coarse pixels of the detail input) set
                    to zeros with probability coarse_drop_prob, z_t taken
                    from the noised coarse latent with probability
                    coarse_start_prob (`coarse_start_pairs`), and an EMA
                    of the params.

Checkpoint compatibility: the autoencoder's sidecar holds its spec hash and the
latent scale; the refiner's sidecar holds its own spec hash and the hashes of
the autoencoder and the coarse model it was trained with, so that loading a
refiner beside another autoencoder or coarse model fails with a clear error.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vesseljax.data import refine_data
from vesseljax.diffusion import schedule as schedule_lib
from vesseljax.models import autoencoder, denoiser, image_encoder
from vesseljax.train import coarse, losses, steps
from vesseljax.train.state import TrainState

AXIS = steps.AXIS
LATENT_DOWNSAMPLE = 4  # the autoencoder's factor per side
X0_CLIP = 5.0  # |x0 estimate| bound, in units of the unit-variance latents
# Pixel detail (diffusion.pixel_detail): RGB and coarse-map channels of the packed
# tile, each 4x4 cell's 16 pixels as channels of the latent grid.
DETAIL_SOURCE = slice(refine_data.RGB.start, refine_data.COARSE + 1)
DETAIL_CHANNELS = (DETAIL_SOURCE.stop - DETAIL_SOURCE.start) * LATENT_DOWNSAMPLE ** 2


class EMATrainState(TrainState):
  """TrainState plus an exponential moving average of the params (used for sampling)."""
  ema_params: Any = None


# ---------------------------------------------------------------- models, specs

def autoencoder_spec(dcfg) -> dict:
  return {'kind': 'mask_autoencoder', 'latent_channels': int(dcfg.latent_channels),
          'widths': [int(w) for w in dcfg.ae_widths]}


def refiner_spec(dcfg) -> dict:
  return {'kind': 'refiner', 'latent_channels': int(dcfg.latent_channels),
          'image_widths': [int(w) for w in dcfg.image_widths], 'token_grid': int(dcfg.token_grid),
          'widths': [int(w) for w in dcfg.widths], 'num_res_blocks': int(dcfg.num_res_blocks),
          'num_heads': int(dcfg.num_heads), 'attention_levels': [int(x) for x in dcfg.attention_levels],
          'timesteps': int(dcfg.timesteps),
          'tile_size': int(dcfg.tile_size),
          # Only when on, so the specs (and hashes) of refiners without it are unchanged.
          **({'pixel_detail': True} if dcfg.pixel_detail else {})}


def create_autoencoder(spec: dict) -> autoencoder.MaskAutoencoder:
  return autoencoder.MaskAutoencoder(latent_channels=spec['latent_channels'], widths=tuple(spec['widths']))


def create_image_encoder(spec: dict) -> image_encoder.ImageEncoder:
  return image_encoder.ImageEncoder(widths=tuple(spec['image_widths']), token_grid=spec['token_grid'])


def create_denoiser(spec: dict) -> denoiser.Denoiser:
  return denoiser.Denoiser(widths=tuple(spec['widths']), num_res_blocks=spec['num_res_blocks'],
                           num_heads=spec['num_heads'], attention_levels=tuple(spec['attention_levels']),
                           detail_channels=DETAIL_CHANNELS if spec.get('pixel_detail') else 0)


def load_checked(path: str | pathlib.Path, kind: str) -> tuple[dict, dict]:
  """(sidecar, variables) of an exported autoencoder/refiner, with its kind checked."""
  sidecar, variables = coarse.load_params(path)
  if sidecar['model'].get('kind') != kind:
    raise coarse.CheckpointError(f'{path}: a {sidecar["model"].get("kind") or "coarse model"} '
                                 f'checkpoint, expected a {kind}')
  return sidecar, variables


def check_refiner_matches(refiner_sidecar: dict, ae_sidecar: dict, coarse_sidecar: Optional[dict],
                          source: str, new_autoencoder_weights: bool = False) -> None:
  """Raises CheckpointError (naming `source`) when the refiner was trained with other models.

  new_autoencoder_weights: accept new weights (another latent scale) of the
  autoencoder architecture the refiner was trained with (diffusion.init_new_autoencoder).
  """
  same_scale = abs(refiner_sidecar.get('latent_scale', 0.0) - ae_sidecar.get('latent_scale', 1.0)) <= 1e-6
  if refiner_sidecar.get('autoencoder_hash') != ae_sidecar.get('model_hash') or not (
      same_scale or new_autoencoder_weights):
    raise coarse.CheckpointError(
        f'{source}: trained with autoencoder {refiner_sidecar.get("autoencoder_hash")} '
        f'(latent scale {refiner_sidecar.get("latent_scale")}), given {ae_sidecar.get("model_hash")} '
        f'(latent scale {ae_sidecar.get("latent_scale")})'
        + ('; init_new_autoencoder allows only new weights of the same architecture'
           if new_autoencoder_weights else ''))
  want = refiner_sidecar.get('coarse_hash')
  if coarse_sidecar is not None and want is not None and want != coarse_sidecar.get('model_hash'):
    raise coarse.CheckpointError(f'{source}: trained on the coarse maps of model {want}, '
                                 f'given coarse model {coarse_sidecar.get("model_hash")}')


# ---------------------------------------------------------------- conditioning

def _traced(value) -> bool:
  """True for a per-variant array of a vmapped sweep (train/refiner_sweep.py), False for a Python value."""
  return isinstance(value, jax.Array)


def select(flag, on: jax.Array, off) -> jax.Array:
  """`on` where `flag`, else `off` (a scalar broadcast to on's shape and dtype).

  A Python bool picks at trace time, so a single run's step has no select in
  it; a traced flag (one per variant of `train/refiner_sweep.py`, vmapped)
  picks at run time.
  """
  if not _traced(flag):
    return on if flag else jnp.full_like(on, off)
  return jnp.where(flag, on, jnp.asarray(off, on.dtype))


def latent_grid(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H/4, W/4, C) by 4x4 average pooling (maps onto the latent grid)."""
  return nn.avg_pool(x, (LATENT_DOWNSAMPLE, LATENT_DOWNSAMPLE), strides=(LATENT_DOWNSAMPLE, LATENT_DOWNSAMPLE))


def space_to_depth(x: jax.Array, block: int = LATENT_DOWNSAMPLE) -> jax.Array:
  """(B, H, W, C) -> (B, H/block, W/block, block * block * C): each block's pixels as channels."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // block, w // block, block * block * c)


def encode_masks(ae: nn.Module, ae_params: dict, masks: jax.Array, latent_scale: float) -> jax.Array:
  """(B, H, W) masks in [0, 1] -> scaled latents (B, H/4, W/4, C)."""
  return ae.apply({'params': ae_params}, masks[..., None], method=ae.encode) * latent_scale


def decode_probs(ae: nn.Module, ae_params: dict, z: jax.Array, latent_scale: float) -> jax.Array:
  """Scaled latents (B, h, w, C) -> vessel probabilities (B, 4h, 4w)."""
  return jax.nn.sigmoid(ae.apply({'params': ae_params}, z / latent_scale, method=ae.decode)[..., 0])


def conditioning(models: dict, params: dict, ae_params: dict, latent_scale: float,
                 image: jax.Array, *, use_ra: bool, drop_coarse: Optional[jax.Array] = None) -> dict:
  """The denoiser's condition for packed tiles (B, T, T, 5) (see data/refine_data.py).

  `drop_coarse` (B,) bool, where True, sets that example's coarse condition
  (coarse latent, RA map and the coarse-map pixels of the detail input) to
  zeros: the denoiser then has only the photo (coarse-condition dropout,
  `diffusion.coarse_drop_prob`; `sample.drop_coarse`). A zero latent is not
  the latent of an empty mask (E(empty mask) has rms ~0.8 for the released
  C = 4 autoencoder; BUILD_NOTES.md), so "no coarse map" is not confused with
  "a coarse map without vessels".

  Returns:
    {'coarse_latent' (B, T/4, T/4, C), 'ra_map' (B, T/4, T/4, 1) (zeros when
    not use_ra), 'tokens' (B, N, D), 'pooled' (B, D)}, and 'detail'
    (B, T/4, T/4, 64), the RGB and coarse-map pixels of each 4x4 cell, when the
    denoiser takes pixel detail (`diffusion.pixel_detail`).
  """
  coarse_latent = encode_masks(models['autoencoder'], ae_params, image[..., refine_data.COARSE], latent_scale)
  ra = select(use_ra, latent_grid(image[..., refine_data.RA:refine_data.RA + 1]), 0.0)
  if drop_coarse is not None:
    keep = jnp.where(drop_coarse, 0.0, 1.0).astype(image.dtype)[:, None, None]  # (B, 1, 1)
    coarse_latent = coarse_latent * keep[..., None]
    ra = ra * keep[..., None]
    image = image.at[..., refine_data.COARSE].multiply(keep)
  tokens, pooled = models['image_encoder'].apply({'params': params['image_encoder']},
                                                 image[..., refine_data.RGB])
  cond = {'coarse_latent': jax.lax.stop_gradient(coarse_latent), 'ra_map': ra, 'tokens': tokens,
          'pooled': pooled}
  if models['denoiser'].detail_channels:
    cond['detail'] = space_to_depth(image[..., DETAIL_SOURCE])
  return cond


def denoise(models: dict, params: dict, z_t: jax.Array, t: jax.Array, cond: dict,
            drop_image: jax.Array) -> jax.Array:
  """eps_hat (B, h, w, C): the sampler's `denoise_fn` once params are bound."""
  return models['denoiser'].apply({'params': params['denoiser']}, z_t, t, cond['coarse_latent'],
                                  cond['ra_map'], cond['tokens'], cond['pooled'], drop_image,
                                  cond.get('detail'))


# ---------------------------------------------------------------- steps

def _augment(batch: dict, key: jax.Array, step: jax.Array, augment_fn: Optional[Callable]):
  image, label, fov = batch['image'], batch['label'], batch['fov']
  if augment_fn is not None:
    keys = steps._per_example_keys(key, step, image.shape[0])  # pylint: disable=protected-access
    image, label, fov = jax.vmap(augment_fn)(keys, image, label, fov)
  return image, label, fov


# How the autoencoder scores its reconstruction of the coarse-map tiles (labels
# always get L2 + Dice). 'l2+dice' is the paper's; 'l2+kl' replaces the Dice
# term by the Bernoulli KL divergence KL(q || p) per pixel, which is zero only at
# p = q, so a soft coarse map comes back soft (Dice on a soft target rewards a
# sharpened map; see BUILD_NOTES.md).
AE_COARSE_LOSSES = ('l2+dice', 'l2+kl')


def autoencoder_loss(ae: nn.Module, params: dict, masks: jax.Array,
                     kind: str = 'l2+dice') -> tuple[jax.Array, dict]:
  """Per-example reconstruction loss of (B, H, W) masks in [0, 1]: L2 + (1 - soft Dice) or L2 + KL.

  Returns:
    (loss (B,), parts): parts 'l2', 'dice_soft' (always, for the logs) and, for
    'l2+kl', 'kl' (mean per-pixel KL(mask || reconstruction), nats).
  """
  if kind not in AE_COARSE_LOSSES:
    raise ValueError(f'autoencoder loss must be one of {AE_COARSE_LOSSES}, got {kind!r}')
  logits = ae.apply({'params': params}, masks[..., None])[..., 0]
  prob = jax.nn.sigmoid(logits)
  ones = jnp.ones_like(masks)
  l2 = jnp.mean((prob - masks) ** 2, axis=(1, 2))
  dice = losses.soft_dice_loss(prob, masks, ones)
  parts = {'l2': l2, 'dice_soft': 1.0 - dice}
  if kind == 'l2+dice':
    return l2 + dice, parts
  # KL(q || p) = BCE(logits, q) - H(q): the cross-entropy less its minimum.
  q = jnp.clip(masks, 1e-6, 1.0 - 1e-6)
  entropy = -(q * jnp.log(q) + (1.0 - q) * jnp.log1p(-q))
  kl = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, masks) - entropy, axis=(1, 2))
  return l2 + kl, {**parts, 'kl': kl}


def autoencoder_step(state: TrainState, batch: dict, key: jax.Array, *, ae: nn.Module,
                     augment_fn: Optional[Callable], coarse_loss: str = 'l2+dice') -> tuple[TrainState, dict]:
  """One step on labels and coarse maps of packed tiles (call under pmap over AXIS).

  Labels are scored with L2 + Dice, the coarse maps with `coarse_loss`.
  """
  image, label, _ = _augment(batch, key, state.step, augment_fn)
  masks = jnp.concatenate([label, image[..., refine_data.COARSE]], axis=0)
  n = label.shape[0]

  def loss_fn(params):
    per_example, parts = autoencoder_loss(ae, params, masks, coarse_loss)
    if coarse_loss != 'l2+dice':  # the same forward; the labels' half scored with Dice instead
      dice, kl = 1.0 - parts['dice_soft'], parts['kl']
      per_example = parts['l2'] + jnp.concatenate([dice[:n], kl[n:]])
      parts = {'l2': parts['l2'], 'dice_soft': parts['dice_soft'][:n], 'kl_coarse': kl[n:]}
    return jnp.mean(per_example), parts

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  metrics = {'loss': loss, **{k: jnp.mean(v) for k, v in parts.items()}, 'grad_norm': optax.tree.norm(grads)}
  return state.apply_gradients(grads=grads), jax.lax.pmean(metrics, AXIS)


def decoder_only(tx: optax.GradientTransformation, params: dict) -> optax.GradientTransformation:
  """`tx` on the decoder's params, the encoder's ('enc_*') frozen: its updates are zero.

  A decoder trained this way keeps the latent space, so refiners trained with
  the original autoencoder stay valid beside it.
  """
  labels = {name: 'frozen' if name.startswith('enc_') else 'train' for name in params}
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def coarse_start_pairs(schedule: schedule_lib.Schedule, z_label: jax.Array, z_coarse: jax.Array, t: jax.Array,
                       noise: jax.Array, from_coarse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(z_t, eps target) of training examples, from the label's or the coarse map's latent.

  Where `from_coarse` is False: z_t = q_sample(z_label, t, noise) and the
  target is `noise` (the paper). Where True: z_t = q_sample(z_coarse, t, noise),
  what sampling from the coarse start sees, and the target is the eps that
  the label latent implies, (z_t - sqrt(abar_t) z_label) / sqrt(1 - abar_t)
  = noise + sqrt(abar_t / (1 - abar_t)) (z_coarse - z_label), so that
  `predict_x0(z_t, t, target)` is z_label. A denoiser trained on the paper's
  pairs alone only ever saw a z_t that holds the label, and learned to keep
  it (BUILD_NOTES.md, "What the denoiser knows"); from the coarse start it
  keeps the coarse map instead.

  Args:
    z_label, z_coarse, noise: (B, h, w, C) float32 scaled latents and noise.
    t: (B,) int32 timesteps; from_coarse: (B,) bool.
  """
  where = from_coarse[:, None, None, None]
  z_t = schedule_lib.q_sample(schedule, jnp.where(where, z_coarse, z_label), t, noise)
  implied = schedule_lib.predict_eps(schedule, z_t, t, z_label)
  return z_t, jnp.where(where, implied, noise)


def refiner_step(state: EMATrainState, batch: dict, key: jax.Array, ae_params: dict, *,
                 models: dict, schedule: schedule_lib.Schedule, latent_scale: float,
                 augment_fn: Optional[Callable], use_image: bool, use_ra: bool, cfg_drop_prob: float,
                 dice_weight: float, edge_weight: float, ema_decay: float,
                 coarse_drop_prob: float = 0.0,
                 disagreement_weight: float = 0.0,
                 coarse_start_prob: float = 0.0,
                 coarse_start_timesteps: tuple[int, int] = (400, 500)) -> tuple[EMATrainState, dict]:
  """One denoiser + image-encoder step (call under pmap over AXIS); see the module docstring.

  Args:
    state: unreplicated; params {'image_encoder', 'denoiser'}.
    batch: 'image' (b, T, T, 5) packed tiles, 'label', 'fov' (b, T, T) float32.
    key: the run's key, folded with step and global example index.
    ae_params: the frozen autoencoder's params.
    use_image, use_ra, dice_weight, edge_weight, coarse_drop_prob,
      disagreement_weight: Python values, or per-variant arrays under the
      vmap of `train/refiner_sweep.py` (then computed for every variant;
      a zero weight or probability gives exactly what the Python zero does).
    disagreement_weight: > 0 adds this times `losses.disagreement_bce` of the
      decoded x0 estimate (BCE on the pixels where the coarse map in the
      batch and the label disagree, weighted by |coarse - label|) to the
      abar-weighted mask losses: the errors of the coarse map, a small part
      of each tile, get a loss of their own (0: off, the paper).
    coarse_start_prob: > 0 trains, with this probability per example, the
      step sampling with start='coarse' begins with: z_t is the noised
      *coarse* latent at a t drawn from `coarse_start_timesteps` (inclusive),
      and the target is the noise that makes the x0 estimate the *label*
      latent (`coarse_start_pairs`); 0: off, the paper (z_t from the label).
  """
  image, label, fov = _augment(batch, key, state.step, augment_fn)
  b = image.shape[0]
  keys = steps._per_example_keys(jax.random.fold_in(key, 1), state.step, b)  # pylint: disable=protected-access
  t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, schedule.num_steps))(keys)
  drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2), cfg_drop_prob))(keys)
  drop = select(use_image, drop, True)  # without the image: always the learned null
  drop_coarse = None  # None (not all False): runs without it compute exactly what they did before it
  if _traced(coarse_drop_prob) or coarse_drop_prob > 0:  # traced: a sweep variant's (0 drops nothing)
    drop_coarse = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 3), coarse_drop_prob))(keys)
  z0 = jax.lax.stop_gradient(encode_masks(models['autoencoder'], ae_params, label, latent_scale))
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), z0.shape[1:]))(keys)
  if _traced(coarse_start_prob) or coarse_start_prob > 0:  # off: the same computation as before it
    from_coarse = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 4), coarse_start_prob))(keys)
    lo, hi = coarse_start_timesteps
    t = jnp.where(from_coarse, jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 5), (), lo, hi + 1))(keys),
                  t)
    z_coarse = jax.lax.stop_gradient(
        encode_masks(models['autoencoder'], ae_params, image[..., refine_data.COARSE], latent_scale))
    z_t, target = coarse_start_pairs(schedule, z0, z_coarse, t, noise, from_coarse)
  else:
    z_t, target = schedule_lib.q_sample(schedule, z0, t, noise), noise

  def loss_fn(params):
    cond = conditioning(models, params, ae_params, latent_scale, image, use_ra=use_ra, drop_coarse=drop_coarse)
    eps = denoise(models, params, z_t, t, cond, drop)
    ddpm = jnp.mean((eps - target) ** 2, axis=(1, 2, 3))
    # x0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies eps errors by up to
    # 1 / sqrt(abar_999) ~ 2e4: clip it to the latents' range and weight the
    # mask losses on it by abar_t (its signal fraction), so the noisiest steps
    # do not dominate them (see BUILD_NOTES.md).
    x0 = jnp.clip(schedule_lib.predict_x0(schedule, z_t, t, eps), -X0_CLIP, X0_CLIP)
    prob = decode_probs(models['autoencoder'], ae_params, x0, latent_scale)
    abar = schedule.alphas_cumprod[t]
    dice = losses.soft_dice_loss(prob, label, fov)
    edge = losses.edge_loss(prob, label, fov)
    mask_loss = dice_weight * dice + edge_weight * edge
    parts = {'ddpm': ddpm, 'dice_x0': 1.0 - dice, 'edge': edge}
    if _traced(disagreement_weight) or disagreement_weight > 0:  # off: the same computation as before it
      parts['bce_disagree'] = losses.disagreement_bce(prob, label, image[..., refine_data.COARSE], fov)
      mask_loss = mask_loss + disagreement_weight * parts['bce_disagree']
    return jnp.mean(ddpm + abar * mask_loss), parts

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  new_state = state.apply_gradients(grads=grads)
  decay = ema_decay_at(state.step, ema_decay)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_state.params)
  metrics = {'loss': loss, **{k: jnp.mean(v) for k, v in parts.items()},
             'grad_norm': optax.tree.norm(grads)}
  return new_state.replace(ema_params=ema), jax.lax.pmean(metrics, AXIS)


def ema_decay_at(step, ema_decay: float):
  """The EMA decay used after `step` steps: min(ema_decay, (1 + step) / (10 + step)).

  The warm-up keeps the initial parameters from lingering in a short run: with
  a constant 0.999 they would still weigh 0.999^2000 = 13% after 2,000 steps.
  """
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def pmap_step(step_fn: Callable, devices=None, num_unmapped_extra: int = 0) -> Callable:
  """pmaps `(state, sharded_batch, key, *extra)` with the state, key and extras unreplicated."""
  in_axes = (None, 0, None) + (None,) * num_unmapped_extra
  return jax.pmap(step_fn, axis_name=AXIS, in_axes=in_axes, out_axes=(None, None), devices=devices)


def make_refiner_step(config, models: dict, schedule: schedule_lib.Schedule, latent_scale: float,
                      augment_fn: Optional[Callable], devices=None) -> Callable:
  """Pmapped `(state, sharded_batch, key, ae_params) -> (state, metrics)` from config.diffusion."""
  d = config.diffusion
  fn = functools.partial(
      refiner_step, models=models, schedule=schedule, latent_scale=float(latent_scale),
      augment_fn=augment_fn, use_image=bool(d.use_image), use_ra=bool(d.use_ra),
      cfg_drop_prob=float(d.cfg_drop_prob), dice_weight=float(d.dice_weight),
      edge_weight=float(d.edge_weight), ema_decay=float(d.ema_decay),
      coarse_drop_prob=float(d.coarse_drop_prob), disagreement_weight=float(d.disagreement_weight),
      coarse_start_prob=float(d.coarse_start_prob), coarse_start_timesteps=coarse_start_timesteps(config))
  return pmap_step(fn, devices, num_unmapped_extra=1)


def coarse_start_timesteps(config) -> tuple[int, int]:
  """diffusion.coarse_start_timesteps as (lo, hi), checked: 0 <= lo <= hi < T."""
  d = config.diffusion
  lo, hi = (int(x) for x in d.coarse_start_timesteps)
  if not 0 <= lo <= hi < int(d.timesteps):
    raise ValueError(f'diffusion.coarse_start_timesteps must be (lo, hi) with 0 <= lo <= hi < '
                     f'{int(d.timesteps)}, got {tuple(d.coarse_start_timesteps)}')
  return lo, hi


def make_autoencoder_step(ae: nn.Module, augment_fn: Optional[Callable], devices=None,
                          coarse_loss: str = 'l2+dice') -> Callable:
  if coarse_loss not in AE_COARSE_LOSSES:
    raise ValueError(f'diffusion.ae_coarse_loss must be one of {AE_COARSE_LOSSES}, got {coarse_loss!r}')
  return pmap_step(functools.partial(autoencoder_step, ae=ae, augment_fn=augment_fn, coarse_loss=coarse_loss),
                   devices)
