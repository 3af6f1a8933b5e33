"""The refiner's training-time ablations, trained together as one compiled step.

The issue's ablations (no image conditioning, no RA map, no edge loss, no Dice
loss) differ from the full refiner only in values, not in shapes: whether the
image condition is always the learned null, whether the RA input is zeros,
and the two mask-loss weights. So do two of our departures (coarse-condition
dropout, the disagreement loss; `ABLATIONS`). The variants' train states are
therefore stacked on a leading axis and one step, `jax.vmap`-ped over that axis (inside the usual
`jax.pmap` over devices), trains them all in lockstep on the same batches,
timesteps and noise:

  state (V, ...)  x  flags {FLAGS} (V,)
    -> refiner.refiner_step per variant -> state (V, ...)

Why: on a lent GPU, compilation is the cost (XLA's autotuning, BUILD_NOTES.md)
and grows with the processes compiling at once; a small denoiser at batch 16
leaves the GPU mostly idle. One process compiles one step and trains V
variants for about the price of one. Each variant computes what a run of
`train_refiner` with its config would (tested: the same states after two
steps), since the variants share the seed and so the data stream and keys.

Each variant is exported as an ordinary refiner, `<workdir>/<variant>/refiner.msgpack`,
with the sidecar `train_refiner` would write for it (`use_image`, `use_ra`, the
loss weights that differ from the paper's): `--mode=evaluate_refined
--workdir=<workdir>/<variant>` evaluates it like any other.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vesseljax.diffusion import schedule as schedule_lib
from vesseljax.train import coarse, loops, refiner, refiner_loops, state as state_lib

log = logging.getLogger('vesseljax')

# Each variant's config.diffusion overrides: 'control' is the full refiner, then the
# issue's ablations, then our departures (coarse-condition dropout and the
# disagreement loss, BUILD_NOTES.md), which change values only too.
ABLATIONS = {
    'control': {},
    'noimage': {'use_image': False},
    'nora': {'use_ra': False},
    'noedge': {'edge_weight': 0.0},
    'nodice': {'dice_weight': 0.0},
    'cdrop': {'coarse_drop_prob': 0.5},
    'disagree01': {'disagreement_weight': 0.1},
    'disagree1': {'disagreement_weight': 1.0},
    'cstart': {'coarse_start_prob': 0.5},
}
# What may differ between variants (each a per-variant array in the vmapped step).
FLAGS = ('use_image', 'use_ra', 'dice_weight', 'edge_weight', 'coarse_drop_prob', 'disagreement_weight',
         'coarse_start_prob')


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config` with the ablation's overrides of config.diffusion."""
  if name not in ABLATIONS:
    raise ValueError(f'unknown refiner ablation {name!r}; known: {", ".join(ABLATIONS)}')
  out = ml_collections.ConfigDict(config.to_dict())
  out.diffusion.update(ABLATIONS[name])
  return out


def variant_flags(configs: Sequence[ml_collections.ConfigDict]) -> dict:
  """{flag: (V,) array} of the variants' FLAGS, the vmapped step's per-variant inputs."""
  def values(name, dtype):
    return jnp.asarray([c.diffusion[name] for c in configs], dtype)

  return {name: values(name, bool if name in ('use_image', 'use_ra') else jnp.float32) for name in FLAGS}


def stack(tree, n: int):
  """n copies of a pytree's leaves on a new leading axis (static fields, e.g. an optimizer, kept)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def member(tree, i: int):
  """The i-th variant of a stacked pytree."""
  return jax.tree.map(lambda x: x[i], tree)


def _check_sweepable(config) -> None:
  d = config.diffusion
  if d.init_checkpoint:
    raise ValueError('the ablation sweep trains from scratch: unset diffusion.init_checkpoint')
  # 'control' is the config itself: the paper's full refiner, which the variants change.
  if (d.use_image is not True or d.use_ra is not True or d.coarse_drop_prob or d.disagreement_weight
      or d.coarse_start_prob):
    raise ValueError('the ablation sweep takes the full refiner (diffusion.use_image and use_ra True, '
                     'coarse_drop_prob, disagreement_weight and coarse_start_prob 0); the variants change them')


def make_sweep_step(config, models: dict, schedule: schedule_lib.Schedule, latent_scale: float,
                    augment_fn, names: Sequence[str], devices=None):
  """Pmapped `(stacked state, sharded batch, key, ae_params, flags) -> (stacked state, metrics)`.

  metrics: '<metric>/<variant>' for each variant, plus 'loss' and 'grad_norm',
  the sums over the variants, which are finite only when every variant's are
  (the loop's NaN check).
  """
  d = config.diffusion
  one = functools.partial(
      refiner.refiner_step, models=models, schedule=schedule, latent_scale=float(latent_scale),
      augment_fn=augment_fn, cfg_drop_prob=float(d.cfg_drop_prob), ema_decay=float(d.ema_decay),
      coarse_start_timesteps=refiner.coarse_start_timesteps(config))

  def step(state, batch, key, ae_params, flags):
    per_variant = lambda s, f: one(s, batch, key, ae_params, **f)  # noqa: E731
    new_state, metrics = jax.vmap(per_variant)(state, flags)
    out = {f'{k}/{name}': v[i] for k, v in metrics.items() for i, name in enumerate(names)}
    out.update(loss=jnp.sum(metrics['loss']), grad_norm=jnp.sum(metrics['grad_norm']))
    return new_state, out

  return refiner.pmap_step(step, devices, num_unmapped_extra=2)


def train_refiner_sweep(config, workdir: str | pathlib.Path, names: Sequence[str],
                        data=None) -> dict[str, pathlib.Path]:
  """Trains (or resumes) the named ablations from scratch in lockstep; exports each.

  Returns:
    {variant: <workdir>/<variant>/refiner.msgpack}.
  Raises:
    ValueError: an unknown or repeated variant, a fine-tune start, or a config
      that is not the full refiner.
  """
  workdir = pathlib.Path(workdir)
  names = list(names)
  if not names or len(set(names)) != len(names):
    raise ValueError(f'the sweep needs distinct variants, got {names}')
  configs = [variant_config(config, n) for n in names]
  _check_sweepable(config)
  d = config.diffusion
  refiner_loops._check_batch(d.batch_size)  # pylint: disable=protected-access
  models, ae_params, ae_sidecar = refiner_loops.load_models(config, workdir)
  scale = float(ae_sidecar['latent_scale'])
  data = refiner_loops.training_tiles(config, workdir, data)
  # Each variant starts where its own train_refiner run would: the same params, optimizer and key.
  params = refiner_loops.initial_refiner_params(config, models)
  state = stack(refiner_loops.new_refiner_state(config, params), len(names))
  run_spec = {**refiner_loops.refiner_run_spec(config, workdir, ae_sidecar, scale, {}),
              'sweep_variants': {n: ABLATIONS[n] for n in names}}
  state, ckpt = refiner_loops._open_run(  # pylint: disable=protected-access
      workdir / 'refiner_sweep_ckpt', run_spec, state, config.train.keep_checkpoints)
  log.info('refiner sweep (%s): %d params each; %d images (%s coarse maps), %dx%d tiles',
           ', '.join(names), sum(x.size for x in jax.tree.leaves(params)), len(data), d.coarse_source,
           d.tile_size, d.tile_size)
  schedule = schedule_lib.cosine_schedule(d.timesteps)
  step_fn = make_sweep_step(config, models, schedule, scale, loops.make_augment_fn(config), names)
  progress = loops.Progress(workdir, d.num_steps, state_lib.step_of(state), 'refiner_sweep')
  state = refiner_loops._run(  # pylint: disable=protected-access
      step_fn, state, refiner_loops._sampler(config, data, d.batch_size), ckpt,  # pylint: disable=protected-access
      progress, d.num_steps, d.log_every, d.checkpoint_every,
      refiner_loops.refiner_training_key(config), ae_params, variant_flags(configs),
      max_seconds=d.max_train_seconds)
  steps = state_lib.step_of(state)
  paths = {}
  for i, (name, cfg) in enumerate(zip(names, configs)):
    sidecar = {**refiner_loops.refiner_sidecar(cfg, ae_sidecar, scale, steps, {}),
               'sweep': {'variant': name, 'variants': names}}
    paths[name] = coarse.write_params(workdir / name / 'refiner.msgpack',
                                      {'params': member(state.ema_params, i)},
                                      refiner.refiner_spec(cfg.diffusion), sidecar)
    log.info('exported %s (EMA params, step %d)', paths[name], steps)
  return paths
