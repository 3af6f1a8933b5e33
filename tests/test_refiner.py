"""Refiner data, train steps, loops, inference and stages, on tiny models."""

import copy
import gc
import hashlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_refiner_config
from vesseljax import refine, stages
from vesseljax.data import degrade, pipeline, preprocess, refine_data, sources
from vesseljax.data.sample import DataError
from vesseljax.diffusion import schedule as schedule_lib
from vesseljax.evaluate import metrics
from vesseljax.train import coarse, loops, refiner, refiner_loops


@pytest.fixture(autouse=True)
def _free_compiled_programs():
  """Drops each test's compiled programs after it.

  This module compiles hundreds of XLA programs in one process. With the sixth
  session's 4 tests added, it aborted twice (SIGABRT inside XLA's compile of a
  small slice) after 31 passing tests, in a fresh-clone CI run and alone. Measured
  here: each compiled program holds ~6 memory maps until its executable is freed
  (200 small jits: 434 -> 1,716 maps; after jax.clear_caches() and gc: 505),
  and a process may hold 65,530 (vm.max_map_count). That limit is our
  suspicion for the abort, not a proven cause.
  """
  yield
  gc.collect()
  jax.clear_caches()
  gc.collect()


def _samples(config, split='train'):
  return sources.load_samples(config.data, split)


# ---------------------------------------------------------------- data

def test_degrade_is_an_imperfect_soft_copy_inside_the_fov():
  config = tiny_refiner_config()
  s = _samples(config)[0]
  rng = np.random.default_rng(0)
  prob, ra = degrade.degrade(s.label, s.fov, rng)
  assert prob.shape == ra.shape == s.label.shape and prob.dtype == np.float32
  assert 0 <= prob.min() and prob.max() <= 1 and 0 <= ra.min() and ra.max() <= 1
  assert np.all(prob[~s.fov] == 0)
  dice = metrics.image_metrics(prob, s.label, s.fov, 0.5)['dice']
  assert 0.3 < dice < 0.99  # related to the label, but not the label
  again, _ = degrade.degrade(s.label, s.fov, np.random.default_rng(0))
  np.testing.assert_array_equal(prob, again)
  other, _ = degrade.degrade(s.label, s.fov, np.random.default_rng(1))
  assert not np.array_equal(prob, other)


def test_refiner_dataset_from_degradation_packs_rgb_coarse_and_ra():
  config = tiny_refiner_config()
  samples = _samples(config)
  data = refine_data.refiner_dataset(config, samples)
  assert data.images.shape == (2 * len(samples), 64, 64, 5)
  assert data.ids[:2] == [f'{samples[0].id}#0', f'{samples[0].id}#1']
  np.testing.assert_allclose(data.images[0, ..., :3], preprocess.preprocess_rgb(samples[0].image, (64, 64)))
  base = sources.to_arrays(samples, config.data)
  np.testing.assert_array_equal(data.labels[::2], base.labels)
  np.testing.assert_array_equal(data.fovs[1::2], base.fovs)


def _write_holdout(path, ids, size, value):
  n = len(ids)
  np.savez_compressed(path, ids=np.array(ids), prob=np.full((n,) + size, value, np.uint8),
                      ra_map=np.full((n,) + size, 255 - value, np.uint8), fov=np.ones((n,) + size, bool))


def test_refiner_dataset_from_out_of_fold_maps(tmp_path):
  config = tiny_refiner_config()
  samples = _samples(config)
  ids = [s.id for s in samples]
  _write_holdout(tmp_path / 'a.npz', ids[:3], (64, 64), 51)
  _write_holdout(tmp_path / 'b.npz', ids[3:], (64, 64), 102)
  config.diffusion.coarse_source = 'oof'
  config.diffusion.coarse_maps = f"{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}"
  data = refine_data.refiner_dataset(config, samples)
  assert data.ids == ids
  np.testing.assert_allclose(data.images[0, ..., refine_data.COARSE], 0.2, atol=1e-6)
  np.testing.assert_allclose(data.images[-1, ..., refine_data.RA], 153 / 255, atol=1e-6)
  config.diffusion.coarse_maps = str(tmp_path / 'a.npz')
  with pytest.raises(DataError, match='miss 2 training image'):
    refine_data.refiner_dataset(config, samples)
  config.diffusion.coarse_maps = f"{tmp_path / 'a.npz'},{tmp_path / 'a.npz'}"
  with pytest.raises(DataError, match='another holdout file'):
    refine_data.refiner_dataset(config, samples)
  config.diffusion.coarse_maps = str(tmp_path / 'missing.npz')
  with pytest.raises(DataError, match='missing.npz: out-of-fold coarse maps not found'):
    refine_data.refiner_dataset(config, samples)
  config.diffusion.coarse_maps = ''
  with pytest.raises(DataError, match='needs diffusion.coarse_maps'):
    refine_data.refiner_dataset(config, samples)
  config.diffusion.coarse_source = 'oof+'
  with pytest.raises(DataError, match="unknown diffusion.coarse_source 'oof\\+'"):
    refine_data.refiner_dataset(config, samples)


def test_mixed_source_is_the_out_of_fold_images_then_the_degraded_ones(tmp_path):
  config = tiny_refiner_config()
  samples = _samples(config)
  _write_holdout(tmp_path / 'a.npz', [s.id for s in samples], (64, 64), 51)
  config.diffusion.coarse_maps = str(tmp_path / 'a.npz')
  parts = {}
  for source in ('oof', 'degrade', 'oof+degrade'):
    config.diffusion.coarse_source = source
    parts[source] = refine_data.refiner_dataset(config, samples)
  mixed, oof, deg = parts['oof+degrade'], parts['oof'], parts['degrade']
  assert mixed.ids == oof.ids + deg.ids
  for field in ('images', 'labels', 'fovs'):
    np.testing.assert_array_equal(getattr(mixed, field), np.concatenate([getattr(oof, field), getattr(deg, field)]))


# ---------------------------------------------------------------- steps

def _tiny_models(config):
  d = config.diffusion
  spec = refiner.refiner_spec(d)
  return {'autoencoder': refiner.create_autoencoder(refiner.autoencoder_spec(d)),
          'image_encoder': refiner.create_image_encoder(spec), 'denoiser': refiner.create_denoiser(spec)}


def _perturb(params, key, scale=0.05):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _step_setup(config, tile, batch_size, perturb_ae=False):
  """(models, autoencoder params, EMA state with perturbed params and SGD 0.1, one batch) of tiny models.

  Plain SGD: the update is proportional to the gradient (Adam's first step is
  ~lr * sign(g), which turns float noise in near-zero gradients into lr-sized
  differences). Zero-initialised output layers would make many gradients
  exactly zero: the params are perturbed.
  """
  models = _tiny_models(config)
  ae_params = models['autoencoder'].init(jax.random.key(1), jnp.zeros((1, tile, tile, 1)))['params']
  if perturb_ae:
    ae_params = _perturb(ae_params, jax.random.key(4))
  params = _perturb(refiner_loops.init_refiner_params(models, jax.random.key(2), tile,
                                                      config.diffusion.latent_channels), jax.random.key(3))
  state = refiner.EMATrainState.create(apply_fn=None, params=params, batch_stats={}, tx=optax.sgd(0.1),
                                       ema_params=params)
  data = refine_data.refiner_dataset(config, _samples(config))
  batch = pipeline.PatchSampler(data, seed=0, batch_size=batch_size, patch_size=tile).batch(0)
  return models, ae_params, state, batch


@pytest.mark.parametrize('mask_losses', [False, True])
def test_refiner_step_on_4_devices_equals_1_device(mask_losses):
  config = tiny_refiner_config()
  d = config.diffusion
  if mask_losses:
    d.disagreement_weight = 1.0
  else:
    d.dice_weight = d.edge_weight = 0.0
  # 64-pixel tiles: with 32 the deepest level is 1x1 and its GroupNorm (2 values
  # per group) amplifies float32 summation noise in the backward pass ~1000x.
  d.tile_size = tile = 64
  models, ae_params, state, batch = _step_setup(config, tile, 4)
  schedule = schedule_lib.cosine_schedule(1000)
  key = jax.random.key(5)
  results = []
  for n in (1, 4):
    step = refiner.make_refiner_step(config, models, schedule, 1.3, loops.make_augment_fn(config),
                                     devices=jax.local_devices()[:n])
    results.append(step(state, pipeline.shard(batch, n), key, ae_params))
  (s1, m1), (s4, m4) = results
  assert np.isfinite(float(m1['loss']))
  # The forward pass (same data, augmentation, t, noise and dropped conditions
  # on every device layout) agrees to float32 rounding:
  for k in ('loss', 'ddpm', 'dice_x0', 'edge'):
    np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=2e-6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)  # SGD lr 0.1: gradients agree to 1e-5
  for a, b in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(s4.ema_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The EMA moved towards the new params by (1 - decay).
  p0, p1, e1 = (jax.tree.leaves(x)[0] for x in (state.params, s1.params, s1.ema_params))
  decay = min(d.ema_decay, 1.0 / 10.0)  # step 0 of the warm-up
  np.testing.assert_allclose(e1, decay * p0 + (1 - decay) * p1, atol=1e-6)


@pytest.mark.parametrize('pixel_detail', [False, True])
def test_coarse_dropout_hides_the_coarse_map_and_ra_from_the_step(pixel_detail):
  """coarse_drop_prob = 1: the step does not depend on the coarse-map and RA channels; 0: it does."""
  config = tiny_refiner_config()
  d = config.diffusion
  d.pixel_detail = pixel_detail
  d.tile_size = tile = 32
  models, ae_params, state, batch = _step_setup(config, tile, 2, perturb_ae=True)
  other = dict(batch, image=batch['image'].copy())
  rng = np.random.default_rng(0)
  other['image'][..., refine_data.COARSE] = rng.random(other['image'].shape[:3])
  other['image'][..., refine_data.RA] = rng.random(other['image'].shape[:3])
  schedule = schedule_lib.cosine_schedule(1000)
  for prob in (1.0, 0.0):
    d.coarse_drop_prob = prob
    step = refiner.make_refiner_step(config, models, schedule, 1.3, None, devices=jax.local_devices()[:1])
    (s_a, m_a), (s_b, m_b) = (step(state, pipeline.shard(x, 1), jax.random.key(5), ae_params)
                              for x in (batch, other))
    same = np.array_equal(np.asarray(m_a['loss']), np.asarray(m_b['loss'])) and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s_a.params), jax.tree.leaves(s_b.params)))
    assert same == (prob == 1.0), prob
  d.coarse_drop_prob = 0.0
  assert refiner_loops._loss_departures(d) == {}  # pylint: disable=protected-access
  d.coarse_drop_prob, d.disagreement_weight = 0.5, 2.0
  assert refiner_loops._loss_departures(d) == {  # pylint: disable=protected-access
      'coarse_drop_prob': 0.5, 'disagreement_weight': 2.0}


def test_coarse_start_pairs_noise_the_coarse_latent_and_aim_x0_at_the_label():
  schedule = schedule_lib.cosine_schedule(1000)
  rng = np.random.default_rng(0)
  z_label, z_coarse, noise = (rng.normal(size=(3, 4, 4, 2)).astype(np.float32) for _ in range(3))
  t = np.array([450, 50, 800], np.int32)
  from_coarse = np.array([True, True, False])
  z_t, target = (np.asarray(x) for x in refiner.coarse_start_pairs(
      schedule, *(jnp.asarray(x) for x in (z_label, z_coarse, t, noise, from_coarse))))
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
  source = np.where(from_coarse[:, None, None, None], z_coarse, z_label)
  np.testing.assert_allclose(z_t, np.sqrt(abar) * source + np.sqrt(1 - abar) * noise, rtol=1e-5, atol=1e-6)
  implied = noise + np.sqrt(abar / (1 - abar)) * (z_coarse - z_label)
  np.testing.assert_allclose(target[:2], implied[:2], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(target[2], noise[2])  # the paper's pair, untouched
  # The x0 estimate from the target is the label latent, from either source.
  x0 = schedule_lib.predict_x0(schedule, jnp.asarray(z_t), jnp.asarray(t), jnp.asarray(target))
  np.testing.assert_allclose(np.asarray(x0), z_label, atol=2e-4)


def test_coarse_start_training_reads_the_coarse_map_through_z_t():
  """With the coarse condition dropped (coarse_drop_prob = 1), the step depends on the coarse
  map only through z_t: not at coarse_start_prob = 0, and at 1."""
  config = tiny_refiner_config()
  d = config.diffusion
  d.tile_size = tile = 32
  d.coarse_drop_prob = 1.0
  models, ae_params, state, batch = _step_setup(config, tile, 2, perturb_ae=True)
  other = dict(batch, image=batch['image'].copy())
  other['image'][..., refine_data.COARSE] = np.random.default_rng(0).random(other['image'].shape[:3])
  schedule = schedule_lib.cosine_schedule(1000)
  for prob in (0.0, 1.0):
    d.coarse_start_prob = prob
    step = refiner.make_refiner_step(config, models, schedule, 1.3, None, devices=jax.local_devices()[:1])
    (_, m_a), (_, m_b) = (step(state, pipeline.shard(x, 1), jax.random.key(5), ae_params) for x in (batch, other))
    assert (float(m_a['ddpm']) == float(m_b['ddpm'])) == (prob == 0.0), prob
  assert refiner_loops._loss_departures(d) == {  # pylint: disable=protected-access
      'coarse_drop_prob': 1.0, 'coarse_start_prob': 1.0, 'coarse_start_timesteps': [400, 500]}
  for bad in ((500, 400), (-1, 10), (900, 1000)):
    d.coarse_start_timesteps = bad
    with pytest.raises(ValueError, match='coarse_start_timesteps'):
      refiner.make_refiner_step(config, models, schedule, 1.3, None, devices=jax.local_devices()[:1])


def test_disagreement_bce_matches_numpy_and_counts_only_the_coarse_maps_errors():
  rng = np.random.default_rng(0)
  prob, coarse = (rng.uniform(0.01, 0.99, (2, 16, 16)) for _ in range(2))
  target = (rng.random((2, 16, 16)) < 0.3).astype(np.float64)
  fov = (rng.random((2, 16, 16)) < 0.8).astype(np.float64)
  w = fov * np.abs(coarse - target)
  bce = -(target * np.log(prob) + (1 - target) * np.log(1 - prob))
  expected = np.sum(bce * w, axis=(1, 2)) / np.sum(w, axis=(1, 2))
  f = lambda p, c: np.asarray(refiner.losses.disagreement_bce(*(jnp.asarray(x, jnp.float32)
                                                                   for x in (p, target, c, fov))))
  np.testing.assert_allclose(f(prob, coarse), expected, rtol=1e-5)
  # Where the coarse map equals the label, the prediction does not count.
  right = rng.random((2, 16, 16)) < 0.5
  coarse_partly_right = np.where(right, target, coarse)
  other_prob = np.where(right, rng.uniform(0.01, 0.99, prob.shape), prob)
  np.testing.assert_allclose(f(other_prob, coarse_partly_right), f(prob, coarse_partly_right), rtol=1e-6)
  np.testing.assert_array_equal(f(prob, target), [0.0, 0.0])  # a perfect coarse map: no term


def test_disagreement_weight_adds_a_linear_term_that_vanishes_where_the_coarse_map_is_right():
  config = tiny_refiner_config()
  d = config.diffusion
  d.tile_size = tile = 32
  models, ae_params, state, batch = _step_setup(config, tile, 2, perturb_ae=True)
  perfect = dict(batch, image=batch['image'].copy())
  perfect['image'][..., refine_data.COARSE] = batch['label']
  assert np.abs(batch['image'][..., refine_data.COARSE] - batch['label']).max() > 0.5
  schedule = schedule_lib.cosine_schedule(1000)
  out = {}
  for weight in (0.0, 1.0, 2.0):
    d.disagreement_weight = weight
    step = refiner.make_refiner_step(config, models, schedule, 1.3, None, devices=jax.local_devices()[:1])
    out[weight] = [step(state, pipeline.shard(x, 1), jax.random.key(5), ae_params) for x in (batch, perfect)]
  loss = {w: float(o[0][1]['loss']) for w, o in out.items()}
  assert 'bce_disagree' not in out[0.0][0][1] and float(out[1.0][0][1]['bce_disagree']) > 0
  assert loss[1.0] > loss[0.0]
  np.testing.assert_allclose(loss[2.0] - loss[0.0], 2 * (loss[1.0] - loss[0.0]), rtol=1e-3)
  # A coarse map equal to the label: the term is zero, so is its gradient.
  (s0, m0), (s1, m1) = out[0.0][1], out[1.0][1]
  assert float(m1['bce_disagree']) == 0.0
  np.testing.assert_allclose(float(m1['loss']), float(m0['loss']), rtol=1e-7)
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)


# ---------------------------------------------------------------- loops, inference, stages

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Coarse model, autoencoder and refiner, each trained a few steps on synthetic images."""
  workdir = tmp_path_factory.mktemp('refiner_run')
  config = tiny_refiner_config()
  loops.train_coarse(config, workdir)
  refiner_loops.train_autoencoder(config, workdir)
  refiner_loops.train_refiner(config, workdir)
  return config, workdir


def test_autoencoder_export_has_a_unit_variance_latent_scale(trained):
  config, workdir = trained
  sidecar, variables = refiner.load_checked(workdir / 'autoencoder.msgpack', 'mask_autoencoder')
  assert sidecar['model'] == refiner.autoencoder_spec(config.diffusion)
  ae = refiner.create_autoencoder(sidecar['model'])
  data = refine_data.refiner_dataset(config, _samples(config))
  labels = pipeline.PatchSampler(data, seed=1, batch_size=8, patch_size=32).batch(0)['label']
  z = ae.apply(variables, jnp.asarray(labels)[..., None], method=ae.encode) * sidecar['latent_scale']
  assert z.shape == (8, 8, 8, 2)
  assert 0.5 < float(jnp.std(z)) < 2.0
  assert json.loads((workdir / 'autoencoder_metrics.jsonl').read_text().splitlines()[-1])['step'] == 4


def test_resume_matches_an_uninterrupted_run(trained, tmp_path):
  config, workdir = trained
  for d in ('a', 'b'):
    (tmp_path / d).mkdir()
    for name in ('autoencoder.msgpack', 'autoencoder.msgpack.json'):
      shutil.copy(workdir / name, tmp_path / d / name)
  refiner_loops.train_refiner(config, tmp_path / 'a')  # 4 steps straight
  # 'b' stops after step 2 (simulated by copying a's step-2 checkpoint), then resumes.
  shutil.copytree(tmp_path / 'a' / 'refiner_ckpt', tmp_path / 'b' / 'refiner_ckpt')
  shutil.rmtree(tmp_path / 'b' / 'refiner_ckpt' / 'checkpoints' / '4')
  refiner_loops.train_refiner(config, tmp_path / 'b')
  _, a = coarse.load_params(tmp_path / 'a' / 'refiner.msgpack')
  _, b = coarse.load_params(tmp_path / 'b' / 'refiner.msgpack')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_warm_start_begins_at_the_given_refiner_and_refuses_another_autoencoder(trained, tmp_path):
  config, workdir = trained
  for name in ('autoencoder.msgpack', 'autoencoder.msgpack.json'):
    shutil.copy(workdir / name, tmp_path / name)
  tuned = copy.deepcopy(config)
  tuned.diffusion.init_checkpoint = str(workdir / 'refiner.msgpack')
  tuned.diffusion.learning_rate = 0.0  # no updates: the EMA of constant params is those params
  tuned.train.weight_decay = 0.0
  (tmp_path / 'run').mkdir()
  for name in ('autoencoder.msgpack', 'autoencoder.msgpack.json'):
    shutil.copy(workdir / name, tmp_path / 'run' / name)
  refiner_loops.train_refiner(tuned, tmp_path / 'run')
  sidecar, got = coarse.load_params(tmp_path / 'run' / 'refiner.msgpack')
  init_sidecar, want = coarse.load_params(workdir / 'refiner.msgpack')
  assert sidecar['init_hash'] == hashlib.sha256((workdir / 'refiner.msgpack').read_bytes()).hexdigest()[:16]
  assert sidecar['init_steps_trained'] == init_sidecar['steps_trained']
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, atol=1e-7)
  # Resuming that run from another starting file (other weights, same architecture) is refused.
  other = tmp_path / 'other.msgpack'
  coarse.write_params(other, jax.tree.map(lambda x: 1.5 * x, want), init_sidecar['model'],
                      {k: v for k, v in init_sidecar.items() if k not in ('model', 'model_hash')})
  tuned.diffusion.init_checkpoint = str(other)
  with pytest.raises(coarse.CheckpointError, match='this run was started with'):
    refiner_loops.train_refiner(tuned, tmp_path / 'run')
  tuned.diffusion.init_checkpoint = str(workdir / 'refiner.msgpack')
  # The same refiner beside an autoencoder with another latent scale is refused.
  side = json.loads((tmp_path / 'autoencoder.msgpack.json').read_text())
  side['latent_scale'] *= 2
  (tmp_path / 'autoencoder.msgpack.json').write_text(json.dumps(side))
  with pytest.raises(coarse.CheckpointError, match='refiner.msgpack: trained with autoencoder'):
    refiner_loops.train_refiner(tuned, tmp_path)


def test_space_to_depth_puts_each_cell_s_pixels_in_channels():
  x = np.random.default_rng(0).random((2, 8, 12, 3)).astype(np.float32)
  got = np.asarray(refiner.space_to_depth(jnp.asarray(x), 4))
  assert got.shape == (2, 2, 3, 48)
  for i, j in ((0, 0), (1, 2)):
    np.testing.assert_array_equal(got[:, i, j], x[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, 48))


def test_pixel_detail_refiner_warm_starts_as_the_plain_one_then_learns(trained, tmp_path):
  config, workdir = trained
  detail = copy.deepcopy(config)
  detail.diffusion.pixel_detail = True
  detail.diffusion.init_checkpoint = str(workdir / 'refiner.msgpack')
  for name in ('autoencoder.msgpack', 'autoencoder.msgpack.json'):
    shutil.copy(workdir / name, tmp_path / name)
  models, ae_params, ae_sidecar = refiner_loops.load_models(detail, tmp_path)
  assert models['denoiser'].detail_channels == refiner.DETAIL_CHANNELS == 64
  params, _ = refiner_loops.warm_start_params(detail, workdir / 'refiner.msgpack', ae_sidecar, models)
  _, plain_vars = coarse.load_params(workdir / 'refiner.msgpack')
  plain_models = dict(models, denoiser=refiner.create_denoiser(refiner.refiner_spec(config.diffusion)))
  # The warm start computes the plain refiner's eps exactly (detail_in starts at zero).
  tiles = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, refine_data.NUM_CHANNELS)), jnp.float32)
  scale = float(ae_sidecar['latent_scale'])
  z = jax.random.normal(jax.random.key(2), (2, 8, 8, config.diffusion.latent_channels))
  t, drop = jnp.array([10, 700]), jnp.array([False, True])
  cond = refiner.conditioning(models, params, ae_params, scale, tiles, use_ra=True)
  assert cond['detail'].shape == (2, 8, 8, 64)
  plain_params = jax.tree.map(jnp.asarray, plain_vars['params'])
  plain_cond = refiner.conditioning(plain_models, plain_params, ae_params, scale, tiles, use_ra=True)
  assert 'detail' not in plain_cond
  np.testing.assert_allclose(refiner.denoise(models, params, z, t, cond, drop),
                             refiner.denoise(plain_models, plain_params, z, t, plain_cond, drop), atol=1e-6)
  # Training moves detail_in off zero; the export records pixel_detail and predicts.
  refiner_loops.train_refiner(detail, tmp_path)
  sidecar, got = coarse.load_params(tmp_path / 'refiner.msgpack')
  assert sidecar['model']['pixel_detail'] is True
  assert np.abs(got['params']['denoiser']['detail_in']['kernel']).max() > 0
  detail.diffusion.coarse_checkpoint = str(workdir / 'params.msgpack')
  maps = _predictor(detail, tmp_path)(_samples(detail, 'test')[0].image)
  assert np.all(np.isfinite(maps['prob'])) and 0 <= maps['prob'].min() <= maps['prob'].max() <= 1
  # drop_image hides the photo from the detail input too; without it the photo matters.
  rng = np.random.default_rng(3)
  coarse_prob, ra = rng.random((2, 40, 48)).astype(np.float32)
  photo, other = rng.random((2, 40, 48, 3)).astype(np.float32)
  for drop in (True, False):
    predictor = _predictor(copy.deepcopy(detail), tmp_path, drop_image=drop, start='coarse', ensemble=1)
    with_photo, with_other = (predictor.refine_work(x, coarse_prob, ra)[0] for x in (photo, other))
    if drop:
      np.testing.assert_array_equal(with_photo, with_other)
    else:
      assert np.abs(with_photo - with_other).max() > 0
  # A plain run cannot start from a pixel-detail refiner.
  plain = copy.deepcopy(config)
  plain.diffusion.init_checkpoint = str(tmp_path / 'refiner.msgpack')
  with pytest.raises(coarse.CheckpointError, match='does not match config.diffusion'):
    refiner_loops.warm_start_params(plain, tmp_path / 'refiner.msgpack', ae_sidecar, plain_models)


def test_a_refiner_of_another_latent_c_starts_one_with_only_its_latent_convs_fresh(trained):
  config, workdir = trained
  path = workdir / 'refiner.msgpack'
  wide = copy.deepcopy(config)
  wide.diffusion.latent_channels = config.diffusion.latent_channels + 4
  wide.diffusion.init_checkpoint = str(path)
  spec = refiner.refiner_spec(wide.diffusion)
  models = {'image_encoder': refiner.create_image_encoder(spec), 'denoiser': refiner.create_denoiser(spec)}
  with pytest.raises(coarse.CheckpointError, match='does not match config.diffusion'):
    refiner_loops.warm_start_params(wide, path, {}, models)  # another C needs the flag
  wide.diffusion.init_new_latent_channels = True
  params, sidecar = refiner_loops.warm_start_params(wide, path, {}, models)
  assert sidecar['model']['latent_channels'] == config.diffusion.latent_channels
  fresh = refiner_loops.initial_refiner_params(wide, models)
  _, old = coarse.load_params(path)
  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, fresh, old = flat(params), flat(fresh), flat(old['params'])
  assert got.keys() == fresh.keys() == old.keys()
  renewed = {k for k in got if old[k].shape != got[k].shape}
  assert renewed == {"['denoiser']['conv_in']['kernel']", "['denoiser']['conv_out']['kernel']",
                     "['denoiser']['conv_out']['bias']"}
  for k, x in got.items():
    np.testing.assert_array_equal(x, fresh[k] if k in renewed else old[k])
  # The same C, or another architecture besides C, is refused.
  same = copy.deepcopy(config)
  same.diffusion.init_new_latent_channels = True
  with pytest.raises(coarse.CheckpointError, match='already C'):
    refiner_loops.warm_start_params(same, path, {}, models)
  wide.diffusion.widths = tuple(2 * w for w in config.diffusion.widths)
  with pytest.raises(coarse.CheckpointError, match='in more than latent_channels'):
    refiner_loops.warm_start_params(wide, path, {}, models)


def test_resuming_after_the_autoencoder_was_retrained_is_refused(trained, tmp_path):
  """Same autoencoder architecture, other weights and latent scale: the run must not go on in another latent space."""
  config, workdir = trained
  for name in ('autoencoder.msgpack', 'autoencoder.msgpack.json'):
    shutil.copy(workdir / name, tmp_path / name)
  limited = copy.deepcopy(config)
  limited.diffusion.max_train_seconds = 1e-9  # stops after step 1 with a checkpoint
  refiner_loops.train_refiner(limited, tmp_path)
  side, variables = coarse.load_params(tmp_path / 'autoencoder.msgpack')
  coarse.write_params(tmp_path / 'autoencoder.msgpack', jax.tree.map(lambda x: 1.1 * x, variables), side['model'],
                      {**{k: v for k, v in side.items() if k not in ('model', 'model_hash')},
                       'latent_scale': 1.1 * side['latent_scale']})
  with pytest.raises(coarse.CheckpointError, match='this run was started with'):
    refiner_loops.train_refiner(config, tmp_path)


def test_time_limit_stops_checkpoints_and_exports_then_resumes(trained, tmp_path):
  config, workdir = trained
  for name in ('autoencoder.msgpack', 'autoencoder.msgpack.json'):
    shutil.copy(workdir / name, tmp_path / name)
  limited = copy.deepcopy(config)
  limited.diffusion.max_train_seconds = 1e-9  # out of time after the first step
  refiner_loops.train_refiner(limited, tmp_path)
  sidecar, _ = coarse.load_params(tmp_path / 'refiner.msgpack')
  assert (sidecar['steps_trained'], sidecar['steps_planned']) == (1, config.diffusion.num_steps)
  assert sorted(int(p.name) for p in (tmp_path / 'refiner_ckpt' / 'checkpoints').iterdir()) == [1]
  # Without the limit, the run resumes at step 1 and finishes the plan, ending
  # where the uninterrupted run ends (same data stream, same EMA warm-up).
  refiner_loops.train_refiner(config, tmp_path)
  sidecar, resumed = coarse.load_params(tmp_path / 'refiner.msgpack')
  _, straight = coarse.load_params(workdir / 'refiner.msgpack')
  assert sidecar['steps_trained'] == config.diffusion.num_steps
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def _predictor(config, workdir, **sample):
  for k, v in sample.items():
    config.sample[k] = v
  return stages.refined_predictor(config, workdir)


def test_refined_predictor_maps_and_ensemble(trained):
  config, workdir = trained
  s = _samples(config, 'test')[0]
  predictor = _predictor(config, workdir)
  maps = predictor(s.image, name=s.id)
  for k in ('prob', 'variance', 'coarse'):
    assert maps[k].shape == s.label.shape
  assert 0 <= maps['prob'].min() and maps['prob'].max() <= 1
  assert maps['variance'].min() >= 0 and maps['variance'].max() > 0  # k=2 trajectories differ
  again = predictor(s.image, name=s.id)
  np.testing.assert_array_equal(maps['prob'], again['prob'])  # seeded
  one = _predictor(config, workdir, ensemble=1)(s.image)
  np.testing.assert_array_equal(one['variance'], 0.0)
  coarse_start = _predictor(config, workdir, ensemble=2, start='coarse', strength=0.5)(s.image)
  assert coarse_start['prob'].shape == s.label.shape


def test_drop_image_makes_the_refined_map_independent_of_the_photo(trained):
  config, workdir = trained
  rng = np.random.default_rng(3)
  coarse_prob, ra = rng.random((2, 40, 48)).astype(np.float32)
  photo, other = rng.random((2, 40, 48, 3)).astype(np.float32)
  dropped = _predictor(copy.deepcopy(config), workdir, drop_image=True)
  np.testing.assert_array_equal(dropped.refine_work(photo, coarse_prob, ra)[0],
                                dropped.refine_work(other, coarse_prob, ra)[0])
  plain = _predictor(copy.deepcopy(config), workdir)
  assert np.abs(plain.refine_work(photo, coarse_prob, ra)[0] - plain.refine_work(other, coarse_prob, ra)[0]).max() > 0
  tagged = copy.deepcopy(config)
  tagged.sample.drop_image = True
  assert stages.sampling_tag(tagged).endswith('_noimage')


def test_drop_coarse_makes_the_refined_map_independent_of_the_coarse_map(trained):
  config, workdir = trained
  rng = np.random.default_rng(4)
  coarse_prob, other_prob, ra, other_ra = rng.random((4, 40, 48)).astype(np.float32)
  photo = rng.random((40, 48, 3)).astype(np.float32)
  dropped = _predictor(copy.deepcopy(config), workdir, drop_coarse=True, start='noise')
  np.testing.assert_array_equal(dropped.refine_work(photo, coarse_prob, ra)[0],
                                dropped.refine_work(photo, other_prob, other_ra)[0])
  plain = _predictor(copy.deepcopy(config), workdir, start='noise')
  assert np.abs(plain.refine_work(photo, coarse_prob, ra)[0] - plain.refine_work(photo, other_prob, other_ra)[0]).max() > 0
  tagged = copy.deepcopy(config)
  tagged.sample.drop_coarse = True
  assert stages.sampling_tag(tagged).endswith('_nocoarse')


def test_residual_decoding_returns_the_coarse_map_when_the_sampler_returns_its_latent(trained, monkeypatch):
  """With z0 = E(p_c) (a refiner that learned the identity), 'residual' gives p_c back; 'direct' gives D(E(p_c))."""
  config, workdir = trained
  config = copy.deepcopy(config)
  monkeypatch.setattr(refine.sampler, 'ddim_sample', lambda eps_fn, schedule, cond, *a, **k: cond['coarse_latent'])
  s = _samples(config, 'test')[0]
  out = {}
  for decode in refine.DECODES:
    predictor = _predictor(config, workdir, decode=decode, ensemble=2, start='coarse', strength=0.5)
    coarse_prob, ra = predictor.coarse.maps(predictor.coarse.preprocess(s.image))
    rgb = preprocess.preprocess_rgb(s.image, predictor.coarse.work_size)
    out[decode] = predictor.refine_work(rgb, coarse_prob, ra, s.id)
  mean, var = out['residual']
  np.testing.assert_allclose(mean, coarse_prob, atol=1e-6)
  np.testing.assert_allclose(var, 0.0, atol=1e-10)
  assert np.abs(out['direct'][0] - coarse_prob).max() > 1e-3  # the round trip is not the identity (tiny models: ~0.01)
  assert stages.sampling_tag(config).endswith('_k2_residual')


def test_tiles_cover_the_image_and_blend_to_the_value_of_equal_tiles():
  assert refine.tile_starts(64, 32, 8) == [0, 24, 32]
  assert refine.tile_starts(20, 32, 8) == [0]
  for length in (32, 57, 100, 256):
    starts = refine.tile_starts(length, 32, 8)
    covered = np.zeros(length, bool)
    for s in starts:
      covered[s:s + 32] = True
    assert covered.all() and starts[-1] + 32 == max(length, 32)
  w = refine.tile_window(32, 8)
  assert w.shape == (32, 32) and w.min() > 0 and w.max() == 1 and np.allclose(w, w.T)


def test_packed_tiles_blend_back_to_the_image_they_were_cut_from():
  rng = np.random.default_rng(0)
  h, w, tile, overlap = 50, 70, 32, 8
  rgb, coarse_prob, ra = rng.random((h, w, 3)), rng.random((h, w)), rng.random((h, w))
  packed = refine.pack_work(rgb, coarse_prob, ra, tile)
  assert packed.shape == (h, w, refine_data.NUM_CHANNELS) and packed.dtype == np.float32
  np.testing.assert_array_equal(packed[..., refine_data.COARSE], coarse_prob.astype(np.float32))
  small = refine.pack_work(None, coarse_prob[:20, :10], ra[:20, :10], tile)  # padded to one tile, no photo
  assert small.shape == (tile, tile, refine_data.NUM_CHANNELS)
  assert not small[..., refine_data.RGB].any() and not small[20:].any() and not small[:, 10:].any()
  corners = refine.tile_corners(packed.shape[:2], tile, overlap)
  assert corners == [(y, x) for y in refine.tile_starts(h, tile, overlap) for x in refine.tile_starts(w, tile, overlap)]
  blend = refine.TileBlend(packed.shape[:2], tile, overlap, num_maps=2)
  for y, x in corners:  # each tile is the image's crop: the windowed average is the image again
    crop = packed[y:y + tile, x:x + tile]
    blend.add((y, x), crop[..., refine_data.COARSE], crop[..., refine_data.RA])
  out_coarse, out_ra = blend.result(h - 5, w - 5)
  np.testing.assert_allclose(out_coarse, coarse_prob[:h - 5, :w - 5], rtol=1e-6)
  np.testing.assert_allclose(out_ra, ra[:h - 5, :w - 5], rtol=1e-6)
  with pytest.raises(ValueError):  # one map per sum, no more, no fewer
    blend.add((0, 0), crop[..., 0])


def test_tile_groups_are_balanced_and_cover_every_tile_once():
  assert refine.tile_groups(9, 4) == (3, [range(0, 3), range(3, 6), range(6, 9)])
  assert refine.tile_groups(8, 4) == (4, [range(0, 4), range(4, 8)])
  assert refine.tile_groups(5, 2) == (2, [range(0, 2), range(2, 4), range(4, 5)])
  assert refine.tile_groups(1, 4) == (1, [range(0, 1)])
  for count in range(1, 30):
    for tile_batch in range(1, 10):
      batch, groups = refine.tile_groups(count, tile_batch)
      assert batch <= tile_batch and [i for g in groups for i in g] == list(range(count))
      assert len(groups) == -(-count // tile_batch) and all(len(g) <= batch for g in groups)


@pytest.mark.parametrize('start', ['noise', 'coarse'])
def test_a_tile_s_refined_map_does_not_depend_on_the_tiles_sampled_beside_it(trained, start):
  """Every (trajectory, tile) draws its own noise: tile_batch 1 and 4 give the same map (4 tiles here)."""
  config, workdir = trained
  rng = np.random.default_rng(5)
  coarse_prob, ra = rng.random((2, 40, 48)).astype(np.float32)
  photo = rng.random((40, 48, 3)).astype(np.float32)
  maps = [_predictor(copy.deepcopy(config), workdir, start=start, tile_batch=b).refine_work(photo, coarse_prob, ra)
          for b in (1, 4)]
  for one, four in zip(*maps):
    np.testing.assert_allclose(one, four, atol=2e-5)
  # ... and tiles do not share noise: equal inputs in every tile still give unequal tiles.
  flat = _predictor(copy.deepcopy(config), workdir, start=start, tile_batch=4)
  mean, _ = flat.refine_work(np.full((64, 64, 3), 0.5, np.float32), np.full((64, 64), 0.3, np.float32),
                             np.full((64, 64), 0.7, np.float32))
  assert np.abs(mean[:32, :32] - mean[32:, 32:]).max() > 1e-4


@pytest.mark.parametrize('overlap', [-1, 32, 40])
def test_a_tile_overlap_out_of_range_is_refused(trained, overlap):
  config, workdir = trained
  config = copy.deepcopy(config)
  config.diffusion.tile_overlap = overlap
  with pytest.raises(ValueError, match='diffusion.tile_overlap'):
    stages.refined_predictor(config, workdir)


def test_an_infinite_latent_during_sampling_names_the_image(trained, monkeypatch):
  """+-inf latents decode to probabilities 0 or 1, which look finite: the latent itself is checked."""
  config, workdir = trained
  monkeypatch.setattr(refine.sampler, 'ddim_sample',
                      lambda eps_fn, schedule, cond, *a, **k: jnp.full_like(cond['coarse_latent'], jnp.inf))
  s = _samples(config, 'test')[0]
  with pytest.raises(refine.SamplingError, match=s.id):
    _predictor(copy.deepcopy(config), workdir)(s.image, name=s.id)


@pytest.mark.parametrize('field, value, match', [
    ('steps', 0, 'sample.steps'), ('steps', 1001, 'sample.steps'), ('guidance', -1.0, 'guidance'),
    ('guidance', float('nan'), 'guidance'), ('eta', 1.5, 'eta'), ('start', 'middle', 'start'),
    ('strength', 0.0, 'strength'), ('ensemble', 0, 'ensemble'), ('decode', 'logit', 'decode'),
    ('drop_coarse', True, 'drop_coarse')])
def test_bad_sampling_options_are_refused(field, value, match):
  options = refine.SampleOptions(**{'start': 'coarse', field: value})
  with pytest.raises(ValueError, match=match):
    options.check(1000)


def test_mismatched_checkpoints_are_refused(trained, tmp_path):
  config, workdir = trained
  for name in ('params.msgpack', 'autoencoder.msgpack', 'refiner.msgpack'):
    shutil.copy(workdir / name, tmp_path / name)
    shutil.copy(workdir / (name + '.json'), tmp_path / (name + '.json'))
  # An autoencoder with another latent scale (e.g. retrained) must not pair with this refiner.
  side = json.loads((tmp_path / 'autoencoder.msgpack.json').read_text())
  side['latent_scale'] *= 2
  (tmp_path / 'autoencoder.msgpack.json').write_text(json.dumps(side))
  with pytest.raises(coarse.CheckpointError, match='refiner.msgpack: trained with autoencoder'):
    stages.refined_predictor(config, tmp_path)
  shutil.copy(workdir / 'autoencoder.msgpack.json', tmp_path / 'autoencoder.msgpack.json')
  # A refiner trained on another coarse model's maps.
  side = json.loads((tmp_path / 'refiner.msgpack.json').read_text())
  side['coarse_hash'] = '0123456789abcdef'
  (tmp_path / 'refiner.msgpack.json').write_text(json.dumps(side))
  with pytest.raises(coarse.CheckpointError, match='coarse maps of model 0123456789abcdef'):
    stages.refined_predictor(config, tmp_path)
  # A coarse checkpoint given where the refiner should be.
  shutil.copy(workdir / 'params.msgpack', tmp_path / 'refiner.msgpack')
  shutil.copy(workdir / 'params.msgpack.json', tmp_path / 'refiner.msgpack.json')
  with pytest.raises(coarse.CheckpointError, match='expected a refiner'):
    stages.refined_predictor(config, tmp_path)


def test_nan_during_sampling_names_the_image(trained):
  config, workdir = trained
  predictor = _predictor(config, workdir)
  predictor.params = jax.tree.map(lambda x: x * jnp.nan, predictor.params)
  s = _samples(config, 'test')[0]
  with pytest.raises(refine.SamplingError, match=s.id):
    predictor(s.image, name=s.id)


def test_evaluate_refined_and_uncertainty_stages(trained, tmp_path):
  config, workdir = trained
  config.eval.max_images = 1
  result = stages.evaluate_refined(config, workdir, command='pytest')
  path = workdir / f'eval_refined_test_{stages.sampling_tag(config)}.json'
  saved = json.loads(path.read_text())
  assert len(saved['rows']) == 1 and 'uncertainty_auroc' in saved['rows'][0]
  assert saved['meta']['coarse_rows'][0]['id'] == saved['rows'][0]['id']
  assert 0 <= saved['rows'][0]['dice'] <= 1
  assert result['meta']['wilcoxon_vs_coarse']['n'] == 1
  assert saved['meta']['autoencoder'] == str(workdir / 'autoencoder.msgpack')  # which decoder drew the maps
  assert saved['meta']['autoencoder_sidecar']['model_hash'] == saved['meta']['refiner_sidecar']['autoencoder_hash']
  # The saved maps (uint8) give back the scored Dice, refined and coarse.
  maps = stages.read_maps(workdir / f'maps_refined_test_{stages.sampling_tag(config)}.npz')
  sample = sources.load_samples(config.data, 'test', sources.tfds_dir(config.data, workdir))[0]
  got = maps[sample.id]
  assert got['prob'].shape == got['coarse'].shape == got['variance'].shape == sample.label.shape
  for key, row in (('prob', saved['rows'][0]), ('coarse', saved['meta']['coarse_rows'][0])):
    dice = metrics.image_metrics_both(got[key], sample.label, sample.fov, config.eval.threshold)['dice']
    assert abs(dice - row['dice']) < 0.02, (key, dice, row['dice'])
  with pytest.raises(FileExistsError):
    stages.evaluate_refined(config, workdir)
  # Uncertainty pictures for a photo folder, with one unreadable file skipped.
  inputs = stages.write_test_inputs(config, tmp_path, limit=1)
  (inputs / 'broken.png').write_bytes(b'not a png')
  errors = stages.uncertainty(config, workdir, str(inputs), str(tmp_path / 'out'))
  assert errors == 1
  stem = sorted(p.stem for p in inputs.glob('*.png') if p.stem != 'broken')[0]
  for suffix in ('prob', 'mask', 'overlay', 'variance', 'uncertain'):
    assert (tmp_path / 'out' / f'{stem}_{suffix}.png').is_file()
  with pytest.raises(FileExistsError, match='_prob.png'):  # a second run does not replace them silently
    stages.uncertainty(config, workdir, str(inputs), str(tmp_path / 'out'))


class _StopsAfter:
  """A RefinedPredictor that raises KeyboardInterrupt when asked for image number `n` + 1, recording names."""

  def __init__(self, inner, n):
    self.inner, self.n, self.names = inner, n, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __call__(self, image, name):
    if len(self.names) == self.n:
      raise KeyboardInterrupt
    self.names.append(name)
    return self.inner(image, name=name)


def test_evaluate_refined_resumes_where_it_stopped(trained, tmp_path, monkeypatch):
  config, workdir = trained
  config = copy.deepcopy(config)
  config.eval.max_images = 0  # both test images
  runs = {}
  for name in ('whole', 'stopped'):
    runs[name] = tmp_path / name
    runs[name].mkdir()
    for f in ('params', 'refiner', 'autoencoder'):
      for ext in ('.msgpack', '.msgpack.json'):
        shutil.copy(workdir / (f + ext), runs[name] / (f + ext))
  whole = stages.evaluate_refined(config, runs['whole'])
  ids = [r['id'] for r in whole['rows']]
  assert len(ids) == 2

  make = stages.refined_predictor
  wrappers = []

  def stopping(n):
    def build(cfg, wd):
      wrappers.append(_StopsAfter(make(cfg, wd), n))
      return wrappers[-1]
    return build

  tag = stages.sampling_tag(config)
  partial = runs['stopped'] / f'eval_refined_test_{tag}.partial'
  monkeypatch.setattr(stages, 'refined_predictor', stopping(1))
  with pytest.raises(KeyboardInterrupt):
    stages.evaluate_refined(config, runs['stopped'])
  assert wrappers[-1].names == ids[:1]
  assert not (runs['stopped'] / f'eval_refined_test_{tag}.json').exists()
  assert len(list(partial.glob('*.npz'))) == 1

  # Other sampling settings (same file tag) refuse the folder, naming it and what differs.
  other = copy.deepcopy(config)
  other.sample.seed = 7
  with pytest.raises(ValueError, match=r'\.partial.*sampling'):
    stages.evaluate_refined(other, runs['stopped'])
  assert len(list(partial.glob('*.npz'))) == 1  # nothing deleted

  # The same settings score only the image not done, and give what one uninterrupted run gives.
  monkeypatch.setattr(stages, 'refined_predictor', stopping(10))
  resumed = stages.evaluate_refined(config, runs['stopped'])
  assert wrappers[-1].names == ids[1:]
  assert resumed['meta']['resumed_images'] == 1
  assert not partial.exists()
  drop = lambda rows: [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]
  assert drop(resumed['rows']) == drop(whole['rows'])
  assert resumed['meta']['coarse_rows'] == whole['meta']['coarse_rows']
  maps = {n: stages.read_maps(runs[n] / f'maps_refined_test_{tag}.npz') for n in runs}
  for image_id in ids:
    for key, value in maps['whole'][image_id].items():
      np.testing.assert_array_equal(maps['stopped'][image_id][key], value)

  # A progress file that cannot be read is named.
  monkeypatch.setattr(stages, 'refined_predictor', stopping(1))
  with pytest.raises(KeyboardInterrupt):
    stages.evaluate_refined(config, runs['stopped'], overwrite=True)
  next(partial.glob('*.npz')).write_bytes(b'cut short')
  with pytest.raises(DataError, match='unreadable saved progress'):
    stages.evaluate_refined(config, runs['stopped'], overwrite=True)


def test_evaluate_autoencoder_scores_reconstructions_at_native_size(trained):
  config, workdir = trained
  result = stages.evaluate_autoencoder(config, workdir, overwrite=True)
  tests = _samples(config, 'test')
  assert [r['id'] for r in result['rows']] == [s.id for s in tests]
  # Recompute the first row by hand.
  sidecar, variables = refiner.load_checked(workdir / 'autoencoder.msgpack', 'mask_autoencoder')
  ae = refiner.create_autoencoder(sidecar['model'])
  label, _ = refine_data.label_fov(tests[0], (64, 64))
  recon = jax.nn.sigmoid(ae.apply(variables, jnp.asarray(label, jnp.float32)[None, ..., None]))[0, ..., 0]
  want = metrics.image_metrics(preprocess.to_native(np.asarray(recon), tests[0].label.shape), tests[0].label,
                               tests[0].fov, 0.5)
  assert result['rows'][0]['dice'] == pytest.approx(want['dice'], abs=1e-6)


def test_evaluate_autoencoder_on_coarse_maps_pairs_them_with_the_coarse_rows(trained):
  config, workdir = trained
  config = copy.deepcopy(config)
  config.diffusion.ae_eval_input = 'coarse'  # the coarse model is the workdir's params.msgpack
  result = stages.evaluate_autoencoder(config, workdir, overwrite=True)
  assert (workdir / 'eval_autoencoder_test_coarse.json').is_file()
  tests = _samples(config, 'test')
  from vesseljax import predict  # pylint: disable=g-import-not-at-top
  coarse_model = predict.CoarsePredictor(workdir / 'params.msgpack', config.data, config.model.impl)
  prob, _ = coarse_model.maps(coarse_model.preprocess(tests[0].image))
  want_coarse = metrics.image_metrics(preprocess.to_native(prob, tests[0].label.shape), tests[0].label,
                                      tests[0].fov, 0.5)
  assert result['meta']['coarse_rows'][0]['dice'] == pytest.approx(want_coarse['dice'], abs=1e-6)
  sidecar, variables = refiner.load_checked(workdir / 'autoencoder.msgpack', 'mask_autoencoder')
  ae = refiner.create_autoencoder(sidecar['model'])
  recon = jax.nn.sigmoid(ae.apply(variables, jnp.asarray(prob)[None, ..., None]))[0, ..., 0]
  want = metrics.image_metrics(preprocess.to_native(np.asarray(recon), tests[0].label.shape), tests[0].label,
                               tests[0].fov, 0.5)
  assert result['rows'][0]['dice'] == pytest.approx(want['dice'], abs=1e-6)
  assert result['meta']['wilcoxon_vs_coarse']['n'] == len(tests)
  maps = stages.read_maps(workdir / 'maps_autoencoder_test_coarse.npz')
  assert set(maps) == {s.id for s in tests} and 'variance' not in maps[tests[0].id]
  np.testing.assert_allclose(maps[tests[0].id]['prob'], preprocess.to_native(np.asarray(recon), tests[0].label.shape),
                             atol=0.5 / 255 + 1e-6)
  config.diffusion.ae_eval_input = 'mask'
  with pytest.raises(ValueError, match='ae_eval_input'):
    stages.evaluate_autoencoder(config, workdir, overwrite=True)
