"""Training loops of the refiner: the mask autoencoder, then the denoiser.

  train_autoencoder(config, workdir) -> <workdir>/autoencoder.msgpack (+ latent scale)
  train_refiner(config, workdir)     -> <workdir>/refiner.msgpack (EMA params)

Both resume from their Orbax checkpoints (`<workdir>/autoencoder_ckpt`,
`<workdir>/refiner_ckpt`) with the same data stream (batches are a function of
(seed, step)), stop on a non-finite loss keeping the last good checkpoint, and
train on tiles of `diffusion.tile_size` from `data.refine_data.refiner_dataset`.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vesseljax.data import pipeline, refine_data, sources
from vesseljax.diffusion import schedule as schedule_lib
from vesseljax.train import coarse, loops, refiner, state as state_lib

log = logging.getLogger('vesseljax')


def training_tiles(config, workdir: pathlib.Path,
                   data: Optional[pipeline.ArrayDataset] = None) -> pipeline.ArrayDataset:
  """The refiner's packed training images (see refine_data), loaded from config if not given."""
  if data is not None:
    return data
  samples = sources.load_samples(config.data, 'train', sources.tfds_dir(config.data, workdir))
  if config.data.num_folds:
    raise ValueError('the refiner trains on the whole training split: unset data.num_folds')
  return refine_data.refiner_dataset(config, samples)


def _sampler(config, data, batch_size: int) -> pipeline.PatchSampler:
  return pipeline.PatchSampler(data, seed=config.seed + 7, batch_size=batch_size,
                               patch_size=config.diffusion.tile_size,
                               fov_min_fraction=config.train.fov_patch_min)


def _run(step_fn: Callable, state, sampler, ckpt: state_lib.Checkpoints, progress: loops.Progress,
         num_steps: int, log_every: int, checkpoint_every: int, key: jax.Array, *extra,
         max_seconds: float = 0.0):
  """The shared loop: step, NaN check, log, checkpoint; returns the final state (`ckpt` closed).

  max_seconds > 0 stops the run after that many seconds of this process's
  training (checked after each step; the state is checkpointed), so a run with
  a wall-clock budget (a lent GPU) still ends with an exportable state.
  """
  history = []
  t0 = time.time()
  try:
    for step in range(state_lib.step_of(state), num_steps):
      batch = pipeline.host_shard(sampler.batch(step))
      new_state, metrics = step_fn(state, batch, key, *extra)
      loops.check_step(metrics, step, progress.what, ckpt)
      state = new_state
      history.append(metrics)
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        progress.write(done, jax.tree.map(lambda *x: np.mean(x), *history))
        history = []
      out_of_time = max_seconds > 0 and time.time() - t0 > max_seconds
      if out_of_time and history:
        progress.write(done, jax.tree.map(lambda *x: np.mean(x), *history))
      if done % checkpoint_every == 0 or done == num_steps or out_of_time:
        ckpt.save(state)
      if out_of_time:
        log.warning('%s: stopped at step %d of %d after %.0f s (diffusion.max_train_seconds)',
                    progress.what, done, num_steps, time.time() - t0)
        break
  finally:
    ckpt.wait()
    ckpt.close()
  return state


def _open_run(run_dir: pathlib.Path, spec: dict, state, keep: int):
  """(state, Checkpoints) of a run: its spec checked against the first start's, its latest checkpoint restored."""
  try:
    state_lib.check_run_spec(run_dir, 'run_model', spec)
  except ValueError as e:
    raise coarse.CheckpointError(str(e)) from e
  ckpt = state_lib.Checkpoints(run_dir, keep=keep)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(jax.tree.map(np.asarray, state))
    log.info('%s: resumed at step %d', run_dir, state_lib.step_of(state))
  return state, ckpt


def _check_batch(batch_size: int) -> None:
  if batch_size % jax.device_count():
    raise ValueError(f'batch size {batch_size} is not divisible by the {jax.device_count()} devices')


def autoencoder_path(config, workdir: pathlib.Path) -> pathlib.Path:
  d = config.diffusion
  return pathlib.Path(d.autoencoder_checkpoint) if d.autoencoder_checkpoint else workdir / 'autoencoder.msgpack'


def latent_scale_of(ae, params: dict, labels: np.ndarray) -> float:
  """1 / std of the latents of (N, T, T) label tiles: scaled latents have unit variance."""
  z = jax.jit(lambda p, m: ae.apply({'params': p}, m[..., None], method=ae.encode))(params, jnp.asarray(labels))
  return float(1.0 / max(float(jnp.std(z)), 1e-6))


def file_hash(path: str | pathlib.Path) -> str:
  """The first 16 hex digits of a file's SHA-256 (how runs record the checkpoint they started from)."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def _load_autoencoder(path: str | pathlib.Path, spec: dict) -> tuple[dict, dict]:
  """(sidecar, variables) of an exported autoencoder; CheckpointError (naming it) if not of `spec`."""
  sidecar, variables = refiner.load_checked(path, 'mask_autoencoder')
  if sidecar['model'] != spec:
    raise coarse.CheckpointError(f'{path}: autoencoder {sidecar["model"]} does not match config.diffusion {spec}')
  return sidecar, variables


def _autoencoder_start(config, workdir: pathlib.Path, spec: dict, params: dict) -> tuple[dict, dict, dict]:
  """(params, init sidecar, run-spec extras) of the autoencoder run: fresh, or `diffusion.ae_init_checkpoint`.

  Raises:
    CheckpointError (naming the file): an init checkpoint of another architecture.
    ValueError: a frozen encoder without an init checkpoint (it would stay random).
  """
  d = config.diffusion
  extras = {}
  if d.ae_coarse_loss != 'l2+dice':  # only when off the default, so older run specs are unchanged
    extras['coarse_loss'] = str(d.ae_coarse_loss)
  if not d.ae_train_encoder:
    if not d.ae_init_checkpoint:
      raise ValueError('diffusion.ae_train_encoder=False needs diffusion.ae_init_checkpoint '
                       '(an exported autoencoder whose encoder to keep)')
    extras['train_encoder'] = False
  if not d.ae_init_checkpoint:
    return params, {}, extras
  out = autoencoder_path(config, workdir)
  if out.resolve() == pathlib.Path(d.ae_init_checkpoint).resolve():
    raise ValueError(f'{out}: the autoencoder to start from is the file this run exports to; '
                     'use another workdir (or diffusion.autoencoder_checkpoint) so it is not overwritten')
  init_sidecar, variables = _load_autoencoder(d.ae_init_checkpoint, spec)
  coarse.check_variables({'params': variables['params']}, None, 0, str(d.ae_init_checkpoint),
                         expected={'params': jax.eval_shape(lambda: params)})
  extras['init_hash'] = file_hash(d.ae_init_checkpoint)
  return jax.tree.map(jnp.asarray, variables['params']), init_sidecar, extras


def train_autoencoder(config, workdir: str | pathlib.Path,
                      data: Optional[pipeline.ArrayDataset] = None) -> pathlib.Path:
  """Trains (or resumes) the mask autoencoder; exports it with its latent scale.

  With `diffusion.ae_init_checkpoint` it starts from an exported autoencoder;
  with `diffusion.ae_train_encoder=False` too, only the decoder trains and the
  export keeps that autoencoder's latent scale, so the refiners trained with
  it accept the new one (the latent space is the same).
  """
  workdir = pathlib.Path(workdir)
  d = config.diffusion
  _check_batch(d.ae_batch_size)
  data = training_tiles(config, workdir, data)
  spec = refiner.autoencoder_spec(d)
  ae = refiner.create_autoencoder(spec)
  tile = d.tile_size
  params = jax.jit(ae.init)(jax.random.key(config.seed + 3), jnp.zeros((1, tile, tile, 1)))['params']
  params, init_sidecar, extras = _autoencoder_start(config, workdir, spec, params)
  tx = state_lib.make_optimizer(d.ae_learning_rate, d.ae_steps, min(d.warmup_steps, d.ae_steps // 4),
                                0.0, config.train.grad_clip)
  if not d.ae_train_encoder:
    tx = refiner.decoder_only(tx, params)
  state = state_lib.TrainState.create(apply_fn=ae.apply, params=params, batch_stats={}, tx=tx)
  state, ckpt = _open_run(workdir / 'autoencoder_ckpt', {**spec, **extras}, state, config.train.keep_checkpoints)
  log.info('autoencoder (C=%d, %d params) on %d images, %dx%d tiles%s', d.latent_channels,
           sum(x.size for x in jax.tree.leaves(state.params)), len(data), tile, tile,
           f'; from {d.ae_init_checkpoint}' if init_sidecar else '')
  sampler = _sampler(config, data, d.ae_batch_size)
  step_fn = refiner.make_autoencoder_step(ae, loops.make_augment_fn(config), coarse_loss=d.ae_coarse_loss)
  progress = loops.Progress(workdir, d.ae_steps, int(state.step), 'autoencoder')
  state = _run(step_fn, state, sampler, ckpt, progress, d.ae_steps, d.log_every, d.checkpoint_every,
               jax.random.fold_in(jax.random.key(config.seed), 11), max_seconds=d.max_train_seconds)
  probe = sampler.batch(10**6)  # a fixed set of tiles, not a training batch
  if d.ae_train_encoder:
    scale = latent_scale_of(ae, state.params, probe['label'])
  else:  # the same encoder: the same latents, the same scale
    scale = float(init_sidecar['latent_scale'])
  recon = jax.jit(lambda p, m: refiner.autoencoder_loss(ae, p, m)[1])(state.params, jnp.asarray(probe['label']))
  init = {}
  if init_sidecar:
    init = {'init_checkpoint': str(d.ae_init_checkpoint), 'init_hash': extras['init_hash'],
            'init_steps_trained': init_sidecar.get('steps_trained'), 'train_encoder': bool(d.ae_train_encoder)}
  path = coarse.write_params(autoencoder_path(config, workdir), {'params': state.params}, spec, {
      'latent_scale': scale, 'steps_trained': int(state.step), 'steps_planned': int(d.ae_steps),
      'dataset': config.data.name, 'train_tile_recon_dice': float(jnp.mean(recon['dice_soft'])),
      'coarse_loss': str(d.ae_coarse_loss), 'coarse_source': str(d.coarse_source), **init})
  log.info('exported %s (latent scale %.4f, train-tile soft Dice %.4f)', path, scale,
           float(jnp.mean(recon['dice_soft'])))
  return path


def init_refiner_params(models: dict, key: jax.Array, tile: int, latent_channels: int) -> dict:
  """{'image_encoder', 'denoiser'} params for tiles of `tile` pixels."""
  k1, k2 = jax.random.split(key)
  enc_params = jax.jit(models['image_encoder'].init)(k1, jnp.zeros((1, tile, tile, 3)))['params']
  tokens, pooled = models['image_encoder'].apply({'params': enc_params}, jnp.zeros((1, tile, tile, 3)))
  h = tile // refiner.LATENT_DOWNSAMPLE
  z = jnp.zeros((1, h, h, latent_channels))
  p = models['denoiser'].detail_channels
  den_params = jax.jit(models['denoiser'].init)(
      k2, z, jnp.zeros((1,), jnp.int32), z, jnp.zeros((1, h, h, 1)), tokens, pooled,
      jnp.zeros((1,), bool), jnp.zeros((1, h, h, p)) if p else None)['params']
  return {'image_encoder': enc_params, 'denoiser': den_params}


def load_models(config, workdir: pathlib.Path) -> tuple[dict, dict, dict]:
  """(models, autoencoder params, autoencoder sidecar) for config.diffusion, checked against the config."""
  d = config.diffusion
  ae_sidecar, ae_vars = _load_autoencoder(autoencoder_path(config, workdir), refiner.autoencoder_spec(d))
  spec = refiner.refiner_spec(d)
  models = {'autoencoder': refiner.create_autoencoder(ae_sidecar['model']),
            'image_encoder': refiner.create_image_encoder(spec), 'denoiser': refiner.create_denoiser(spec)}
  return models, jax.tree.map(jnp.asarray, ae_vars['params']), ae_sidecar


def checked_refiner_params(path: str | pathlib.Path, variables: dict, models: dict, tile: int,
                           latent_channels: int) -> dict:
  """An exported refiner's params as arrays, their tree and shapes checked against `models` (CheckpointError)."""
  expected = jax.eval_shape(lambda: init_refiner_params(models, jax.random.key(0), tile, latent_channels))
  coarse.check_variables({'params': variables['params']}, None, 0, str(path), expected={'params': expected})
  return jax.tree.map(jnp.asarray, variables['params'])


def warm_start_params(config, path: str | pathlib.Path, ae_sidecar: dict, models: dict) -> tuple[dict, dict]:
  """(params, sidecar) of an exported refiner to start training from (`diffusion.init_checkpoint`).

  With diffusion.init_new_latent_channels the refiner may have been trained
  with another latent C (so another autoencoder): the leaves whose shapes
  depend on C (the denoiser's latent input and output convs) start fresh,
  as in a run from scratch, and every other leaf from the file.

  Raises:
    CheckpointError (naming the file): another refiner architecture, another
      autoencoder (or latent scale; with diffusion.init_new_autoencoder, only
      another architecture), or parameters of other shapes; with
      init_new_latent_channels, a refiner of the same C or one that differs
      in more than C.
  """
  d = config.diffusion
  sidecar, variables = refiner.load_checked(path, 'refiner')
  want = refiner.refiner_spec(d)
  if d.init_new_latent_channels:
    return _params_for_new_latent_channels(config, path, sidecar, variables, models), sidecar
  # A refiner without pixel detail may start one with it: 'detail_in' starts at zero.
  adds_detail = want.get('pixel_detail') and sidecar['model'] == {k: v for k, v in want.items()
                                                                   if k != 'pixel_detail'}
  if sidecar['model'] != want and not adds_detail:
    raise coarse.CheckpointError(f'{path}: refiner {sidecar["model"]} does not match config.diffusion {want}')
  refiner.check_refiner_matches(sidecar, ae_sidecar, None, str(path),
                                new_autoencoder_weights=bool(d.init_new_autoencoder))
  if not adds_detail:
    return checked_refiner_params(path, variables, models, d.tile_size, d.latent_channels), sidecar
  params = _params_as_trained(path, sidecar, variables, models, d.tile_size)
  shapes = jax.eval_shape(lambda: init_refiner_params(models, jax.random.key(0), d.tile_size, d.latent_channels))
  detail_in = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes['denoiser']['detail_in'])
  params['denoiser'] = {**params['denoiser'], 'detail_in': detail_in}  # its init: zero kernel, zero bias
  return params, sidecar


def _params_as_trained(path, sidecar: dict, variables: dict, models: dict, tile: int) -> dict:
  """The file's params, checked against its own denoiser architecture (sidecar['model']), not the config's."""
  own = dict(models, denoiser=refiner.create_denoiser(sidecar['model']))
  return checked_refiner_params(path, variables, own, tile, sidecar['model']['latent_channels'])


def _params_for_new_latent_channels(config, path, sidecar: dict, variables: dict, models: dict) -> dict:
  """A refiner of another latent C as the start of this one: C-shaped leaves fresh, the rest its own."""
  d = config.diffusion
  want = refiner.refiner_spec(d)
  other = {k: v for k, v in sidecar['model'].items() if k != 'latent_channels'}
  if other != {k: v for k, v in want.items() if k != 'latent_channels'}:
    raise coarse.CheckpointError(f'{path}: refiner {sidecar["model"]} differs from config.diffusion {want} '
                                 'in more than latent_channels')
  if sidecar['model']['latent_channels'] == d.latent_channels:
    raise coarse.CheckpointError(f'{path}: already C = {d.latent_channels}; init_new_latent_channels is for '
                                 'another C (for new weights of the same autoencoder: init_new_autoencoder)')
  old = _params_as_trained(path, sidecar, variables, models, d.tile_size)
  return jax.tree.map(lambda o, f: o if o.shape == f.shape else f, old, initial_refiner_params(config, models))


def initial_refiner_params(config, models: dict) -> dict:
  """The fresh params of a refiner run (a function of config.seed)."""
  d = config.diffusion
  return init_refiner_params(models, jax.random.key(config.seed + 5), d.tile_size, d.latent_channels)


def new_refiner_state(config, params: dict) -> refiner.EMATrainState:
  """Step 0 of a refiner run from `params`: AdamW as config.diffusion says, the EMA at `params`."""
  d = config.diffusion
  tx = state_lib.make_optimizer(d.learning_rate, d.num_steps, d.warmup_steps, config.train.weight_decay,
                                config.train.grad_clip)
  return refiner.EMATrainState.create(apply_fn=None, params=params, batch_stats={}, tx=tx, ema_params=params)


def refiner_training_key(config) -> jax.Array:
  """The key of a refiner run's steps (folded with step and example inside)."""
  return jax.random.fold_in(jax.random.key(config.seed), 13)


def train_refiner(config, workdir: str | pathlib.Path,
                  data: Optional[pipeline.ArrayDataset] = None) -> pathlib.Path:
  """Trains (or resumes) the image encoder + denoiser; exports the EMA params."""
  workdir = pathlib.Path(workdir)
  d = config.diffusion
  _check_batch(d.batch_size)
  models, ae_params, ae_sidecar = load_models(config, workdir)
  scale = float(ae_sidecar['latent_scale'])
  data = training_tiles(config, workdir, data)
  init = {}
  if not d.init_checkpoint:
    params = initial_refiner_params(config, models)
  else:  # fine-tuning: the EMA starts at these params too
    params, init_sidecar = warm_start_params(config, d.init_checkpoint, ae_sidecar, models)
    init = {'init_checkpoint': str(d.init_checkpoint),
            'init_hash': file_hash(d.init_checkpoint),
            'init_steps_trained': init_sidecar.get('steps_trained'),
            'init_coarse_source': init_sidecar.get('coarse_source')}
    if d.init_new_autoencoder:  # what it was trained with, beside the autoencoder it moves to
      init.update(init_latent_scale=init_sidecar.get('latent_scale'), init_new_autoencoder=True)
    if d.init_new_latent_channels:  # the C and autoencoder it was trained with
      init.update(init_latent_channels=init_sidecar['model']['latent_channels'],
                  init_autoencoder_hash=init_sidecar.get('autoencoder_hash'), init_new_latent_channels=True)
  if d.widths[0] < d.latent_channels:  # BUILD_NOTES.md, "A C = 64 refiner"
    log.warning('denoiser widths[0] = %d < latent_channels = %d: eps_hat is a 3x3 conv of a %d-channel map, '
                'a subspace of at most %d of every %d noise dimensions, so the DDPM loss (per element) '
                'cannot fall below %.2f', d.widths[0], d.latent_channels, d.widths[0], d.widths[0],
                d.latent_channels, 1 - d.widths[0] / d.latent_channels)
  state = new_refiner_state(config, params)
  run_spec = refiner_run_spec(config, workdir, ae_sidecar, scale, init)
  state, ckpt = _open_run(workdir / 'refiner_ckpt', run_spec, state, config.train.keep_checkpoints)
  log.info('refiner: image encoder %d + denoiser %d params; %d images (%s coarse maps), %dx%d tiles%s',
           sum(x.size for x in jax.tree.leaves(params['image_encoder'])),
           sum(x.size for x in jax.tree.leaves(params['denoiser'])), len(data), d.coarse_source,
           d.tile_size, d.tile_size, f'; starting from {d.init_checkpoint}' if init else '')
  schedule = schedule_lib.cosine_schedule(d.timesteps)
  step_fn = refiner.make_refiner_step(config, models, schedule, scale, loops.make_augment_fn(config))
  progress = loops.Progress(workdir, d.num_steps, int(state.step), 'refiner')
  state = _run(step_fn, state, _sampler(config, data, d.batch_size), ckpt, progress, d.num_steps,
               d.log_every, d.checkpoint_every, refiner_training_key(config), ae_params,
               max_seconds=d.max_train_seconds)
  path = coarse.write_params(workdir / 'refiner.msgpack', {'params': state.ema_params}, refiner.refiner_spec(d),
                             refiner_sidecar(config, ae_sidecar, scale, int(state.step), init))
  log.info('exported %s (EMA params, step %d)', path, int(state.step))
  return path


def refiner_run_spec(config, workdir: pathlib.Path, ae_sidecar: dict, scale: float, init: dict) -> dict:
  """What a resumed refiner run must share with its first start.

  The autoencoder's file and latent scale and the coarse-map files, besides the
  architectures: resuming after any of them was retrained would go on training
  in another latent space, or on other pairs, without a word.
  """
  d = config.diffusion
  return {**refiner.refiner_spec(d), 'autoencoder_hash': ae_sidecar['model_hash'],
          'autoencoder_sha256': file_hash(autoencoder_path(config, workdir)), 'latent_scale': scale,
          **({'coarse_maps_sha256': [file_hash(x) for x in refine_data.coarse_map_paths(d)]}
             if d.coarse_source != 'degrade' else {}),
          'coarse_source': d.coarse_source, 'use_image': bool(d.use_image), 'use_ra': bool(d.use_ra),
          **({'init_hash': init['init_hash']} if init else {}), **_loss_departures(d),
          **({'init_new_autoencoder': True} if init.get('init_new_autoencoder') else {}),
          **({'init_new_latent_channels': True} if init.get('init_new_latent_channels') else {})}


def refiner_sidecar(config, ae_sidecar: dict, scale: float, steps_trained: int, init: dict) -> dict:
  """The exported refiner's sidecar: the models it goes with, how it was trained, the parts it uses."""
  d = config.diffusion
  return {'autoencoder_hash': ae_sidecar['model_hash'], 'latent_scale': scale,
          'coarse_hash': coarse.spec_hash(coarse.model_spec(config.model)), 'coarse_source': d.coarse_source,
          'steps_trained': steps_trained, 'steps_planned': int(d.num_steps), 'dataset': config.data.name,
          'ema_decay': d.ema_decay, **init,
          'use_image': bool(d.use_image), 'use_ra': bool(d.use_ra), **_loss_departures(d)}


# The paper's weights of the x0 mask losses (L_DDPM + 0.5 Dice + 0.3 Edge).
PAPER_LOSS_WEIGHTS = {'dice_weight': 0.5, 'edge_weight': 0.3}


def _loss_departures(d) -> dict:
  """The training departures that are on: coarse_drop_prob, disagreement_weight, coarse_start_prob
  (with its timesteps), mask-loss weights.

  Only those that are on (and the mask-loss weights only where they differ from
  the paper's), so the run specs (and checkpoints) of runs without them are unchanged.
  """
  on = {name: float(d[name]) for name in ('coarse_drop_prob', 'disagreement_weight', 'coarse_start_prob')
        if d[name]}
  if d.coarse_start_prob:
    on['coarse_start_timesteps'] = [int(x) for x in d.coarse_start_timesteps]
  return {**on, **{name: float(d[name]) for name, paper in PAPER_LOSS_WEIGHTS.items() if float(d[name]) != paper}}
