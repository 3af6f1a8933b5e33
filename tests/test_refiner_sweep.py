"""The refiner ablations trained together (train/refiner_sweep.py) equal the runs trained one by one."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_refiner_config
from vesseljax import stages
from vesseljax.data import pipeline, refine_data, sources
from vesseljax.diffusion import schedule as schedule_lib
from vesseljax.train import coarse, loops, refiner, refiner_loops, refiner_sweep

pytestmark = pytest.mark.usefixtures('fast_compiles')  # conftest: XLA optimisations off

NAMES = ['control', 'noimage', 'nora', 'noedge', 'nodice']


def _perturbed_state(models, config, tile):
  """An EMA state with SGD 0.1 and params off their (partly zero) init, so every gradient is alive."""
  params = refiner_loops.init_refiner_params(models, jax.random.key(2), tile, config.diffusion.latent_channels)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return refiner.EMATrainState.create(apply_fn=None, params=params, batch_stats={}, tx=optax.sgd(0.1),
                                      ema_params=params)


@pytest.mark.parametrize('names', [NAMES, ['control', 'cdrop', 'disagree1', 'cstart']])
def test_one_vmapped_step_equals_each_variant_s_own_step(names):
  config = tiny_refiner_config()
  d = config.diffusion
  d.tile_size = tile = 64  # see test_refiner.py: 32-px tiles make the deepest GroupNorm noisy
  d.cfg_drop_prob = 0.5  # some examples keep the image: 'noimage' must then differ from 'control'
  spec = refiner.refiner_spec(d)
  models = {'autoencoder': refiner.create_autoencoder(refiner.autoencoder_spec(d)),
            'image_encoder': refiner.create_image_encoder(spec), 'denoiser': refiner.create_denoiser(spec)}
  ae_params = models['autoencoder'].init(jax.random.key(1), jnp.zeros((1, tile, tile, 1)))['params']
  state = _perturbed_state(models, config, tile)
  data = refine_data.refiner_dataset(config, sources.load_samples(config.data, 'train'))
  batch = pipeline.shard(pipeline.PatchSampler(data, seed=0, batch_size=4, patch_size=tile).batch(0), 1)
  schedule = schedule_lib.cosine_schedule(1000)
  key = jax.random.key(5)
  augment_fn = loops.make_augment_fn(config)
  configs = [refiner_sweep.variant_config(config, n) for n in names]
  sweep = refiner_sweep.make_sweep_step(config, models, schedule, 1.3, augment_fn, names,
                                        devices=jax.local_devices()[:1])
  stacked, metrics = sweep(refiner_sweep.stack(state, len(names)), batch, key, ae_params,
                           refiner_sweep.variant_flags(configs))
  losses = []
  for i, (name, cfg) in enumerate(zip(names, configs)):
    alone = refiner.make_refiner_step(cfg, models, schedule, 1.3, augment_fn, devices=jax.local_devices()[:1])
    s, m = alone(state, batch, key, ae_params)
    for k in ('loss', 'ddpm', 'dice_x0', 'edge', 'grad_norm'):
      np.testing.assert_allclose(float(metrics[f'{k}/{name}']), float(m[k]), rtol=1e-5, err_msg=f'{name} {k}')
    for a, b in zip(jax.tree.leaves(refiner_sweep.member(stacked, i)), jax.tree.leaves(s)):
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
    losses.append(float(m['loss']))
  np.testing.assert_allclose(float(metrics['loss']), sum(losses), rtol=1e-5)
  # The variants are not the same run: each ablation changes the loss or the gradient.
  base = jax.tree.leaves(refiner_sweep.member(stacked, 0).params)
  for i, name in enumerate(names[1:], 1):
    other = jax.tree.leaves(refiner_sweep.member(stacked, i).params)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(base, other)) > 1e-6, name


@pytest.fixture(scope='module')
def autoencoder(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('sweep_ae')
  config = tiny_refiner_config()
  refiner_loops.train_autoencoder(config, workdir)
  return workdir / 'autoencoder.msgpack'


def test_exports_equal_train_refiner_runs_and_resume(autoencoder, tmp_path):
  config = tiny_refiner_config()
  config.diffusion.autoencoder_checkpoint = str(autoencoder)
  names = ['control', 'nodice']
  paths = refiner_sweep.train_refiner_sweep(config, tmp_path / 'sweep', names)
  assert sorted(paths) == names
  for name in names:
    alone = tmp_path / f'alone_{name}'
    refiner_loops.train_refiner(refiner_sweep.variant_config(config, name), alone)
    side_a, a = coarse.load_params(alone / 'refiner.msgpack')
    side_s, s = coarse.load_params(paths[name])
    assert side_s.pop('sweep') == {'variant': name, 'variants': names}
    assert side_s == side_a  # the sidecar train_refiner writes: the same model, steps, parts and weights
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(s)):
      np.testing.assert_allclose(x, y, atol=2e-6)
  assert side_s['dice_weight'] == 0.0 and 'edge_weight' not in side_s  # only what differs from the paper
  # Stopped after step 2 (its step-4 checkpoint removed), the sweep resumes to the same exports.
  shutil.copytree(tmp_path / 'sweep' / 'refiner_sweep_ckpt', tmp_path / 'again' / 'refiner_sweep_ckpt')
  shutil.rmtree(tmp_path / 'again' / 'refiner_sweep_ckpt' / 'checkpoints' / '4')
  again = refiner_sweep.train_refiner_sweep(config, tmp_path / 'again', names)
  for name in names:
    for x, y in zip(jax.tree.leaves(coarse.load_params(paths[name])[1]),
                    jax.tree.leaves(coarse.load_params(again[name])[1])):
      np.testing.assert_allclose(x, y, atol=1e-6)
  # Another variant list in the same run folder is refused, naming the difference.
  with pytest.raises(coarse.CheckpointError, match='sweep_variants'):
    refiner_sweep.train_refiner_sweep(config, tmp_path / 'again', ['control', 'noedge'])
  lines = (tmp_path / 'sweep' / 'refiner_sweep_metrics.jsonl').read_text().splitlines()
  assert {'train_loss/control', 'train_dice_x0/nodice'} <= set(json.loads(lines[-1]))


def test_an_exported_ablation_samples_without_its_part(autoencoder, tmp_path):
  config = tiny_refiner_config()
  config.diffusion.autoencoder_checkpoint = str(autoencoder)
  config.diffusion.num_steps = 2
  config.diffusion.ablations = 'noimage,nora'
  loops.train_coarse(config, tmp_path)  # the coarse model the refined predictor runs first
  paths = stages.train_refiner_ablations(config, tmp_path)
  config.diffusion.coarse_checkpoint = str(tmp_path / 'params.msgpack')
  for name, flag in (('noimage', 'use_image'), ('nora', 'use_ra')):
    predictor = stages.refined_predictor(config, paths[name].parent)
    assert getattr(predictor, flag) is False
    assert getattr(predictor, {'use_image': 'use_ra', 'use_ra': 'use_image'}[flag]) is True


@pytest.mark.parametrize('names, change, match', [
    (['control', 'bogus'], {}, 'unknown refiner ablation'),
    (['control', 'control'], {}, 'distinct'),
    (['control'], {'init_checkpoint': 'x.msgpack'}, 'from scratch'),
    (['control'], {'use_ra': False}, 'full refiner'),
    (['control'], {'disagreement_weight': 0.1}, 'full refiner'),
])
def test_bad_sweeps_are_refused(names, change, match, tmp_path):
  config = tiny_refiner_config()
  config.diffusion.update(change)
  with pytest.raises(ValueError, match=match):
    refiner_sweep.train_refiner_sweep(config, tmp_path, names)
