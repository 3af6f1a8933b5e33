"""The mask autoencoder's soft-map loss and its decoder-only re-fit, on tiny models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_refiner_config
from vesseljax.data import pipeline, refine_data, sources
from vesseljax.train import coarse, loops, refiner, refiner_loops


def _tiny_ae(config):
  ae = refiner.create_autoencoder(refiner.autoencoder_spec(config.diffusion))
  tile = config.diffusion.tile_size
  return ae, ae.init(jax.random.key(1), jnp.zeros((1, tile, tile, 1)))['params']


def _batch(config, n=4):
  data = refine_data.refiner_dataset(config, sources.load_samples(config.data, 'train'))
  return pipeline.PatchSampler(data, seed=0, batch_size=n, patch_size=config.diffusion.tile_size).batch(0)


def test_kl_loss_matches_numpy_and_is_zero_only_at_the_target():
  config = tiny_refiner_config()
  ae, params = _tiny_ae(config)
  masks = jnp.asarray(np.random.default_rng(0).uniform(0.05, 0.95, (2, 32, 32)), jnp.float32)
  loss, parts = refiner.autoencoder_loss(ae, params, masks, 'l2+kl')
  logits = np.asarray(ae.apply({'params': params}, masks[..., None])[..., 0], np.float64)
  p, q = 1 / (1 + np.exp(-logits)), np.asarray(masks, np.float64)
  kl = np.mean(q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p)), axis=(1, 2))
  l2 = np.mean((p - q) ** 2, axis=(1, 2))
  np.testing.assert_allclose(parts['kl'], kl, rtol=1e-4)
  np.testing.assert_allclose(loss, l2 + kl, rtol=1e-4)
  # KL(q || p) >= 0 with equality at p = q, where the Dice term is not minimal:
  # soft Dice rewards a sharpened reconstruction of a soft map.
  q1 = jnp.full((1, 8, 8), 0.3)
  kl_at = lambda p: float(jnp.mean(optax.sigmoid_binary_cross_entropy(jnp.log(p / (1 - p)), q1)
                                   - (-(0.3 * np.log(0.3) + 0.7 * np.log(0.7)))))
  assert abs(kl_at(jnp.full((1, 8, 8), 0.3))) < 1e-6 and kl_at(jnp.full((1, 8, 8), 0.1)) > 0.05
  dice = lambda p: 1 - float(refiner.losses.soft_dice_loss(p, q1, jnp.ones_like(q1))[0])
  assert dice(jnp.full((1, 8, 8), 0.99)) > dice(jnp.full((1, 8, 8), 0.3))
  with pytest.raises(ValueError, match='l2\\+kl'):
    refiner.autoencoder_loss(ae, params, masks, 'kl')


def test_kl_autoencoder_step_on_4_devices_equals_1_device():
  config = tiny_refiner_config()
  ae, params = _tiny_ae(config)
  state = refiner.TrainState.create(apply_fn=ae.apply, params=params, batch_stats={}, tx=optax.sgd(0.1))
  batch, key = _batch(config), jax.random.key(5)
  results = []
  for n in (1, 4):
    step = refiner.make_autoencoder_step(ae, loops.make_augment_fn(config), devices=jax.local_devices()[:n],
                                         coarse_loss='l2+kl')
    results.append(step(state, pipeline.shard(batch, n), key))
  (s1, m1), (s4, m4) = results
  for k in ('loss', 'l2', 'dice_soft', 'kl_coarse'):
    np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=2e-6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The loss is the mean over labels (L2 + Dice) and coarse maps (L2 + KL).
  def reference(b, k):
    image, label, _ = refiner._augment(b, k, state.step, loops.make_augment_fn(config))  # pylint: disable=protected-access
    on_labels, _ = refiner.autoencoder_loss(ae, params, label)
    on_coarse, _ = refiner.autoencoder_loss(ae, params, image[..., refine_data.COARSE], 'l2+kl')
    return jnp.mean(jnp.concatenate([on_labels, on_coarse]))
  expected = jax.pmap(reference, axis_name=refiner.AXIS, in_axes=(0, None),
                      devices=jax.local_devices()[:1])(pipeline.shard(batch, 1), key)
  np.testing.assert_allclose(float(m1['loss']), float(expected[0]), rtol=1e-5)
  with pytest.raises(ValueError, match='ae_coarse_loss'):
    refiner.make_autoencoder_step(ae, None, coarse_loss='dice')


@pytest.fixture(scope='module')
def refit(tmp_path_factory):
  """An autoencoder and a refiner trained with it, then the decoder re-fit with the KL loss."""
  workdir = tmp_path_factory.mktemp('refit')
  config = tiny_refiner_config()
  refiner_loops.train_autoencoder(config, workdir / 'base')
  refiner_loops.train_refiner(config, workdir / 'base')
  config.diffusion.ae_init_checkpoint = str(workdir / 'base' / 'autoencoder.msgpack')
  config.diffusion.ae_train_encoder = False
  config.diffusion.ae_coarse_loss = 'l2+kl'
  refiner_loops.train_autoencoder(config, workdir / 'refit')
  return config, workdir


def test_decoder_refit_keeps_the_encoder_and_latent_scale_and_the_refiner_accepts_it(refit):
  config, workdir = refit
  base_sidecar, base = refiner.load_checked(workdir / 'base' / 'autoencoder.msgpack', 'mask_autoencoder')
  new_sidecar, new = refiner.load_checked(workdir / 'refit' / 'autoencoder.msgpack', 'mask_autoencoder')
  for name in base['params']:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base['params'][name]),
                                                    jax.tree.leaves(new['params'][name])))
    assert same == name.startswith('enc_'), name  # encoder frozen, every decoder layer moved
  assert new_sidecar['latent_scale'] == base_sidecar['latent_scale']
  assert new_sidecar['model_hash'] == base_sidecar['model_hash']
  assert new_sidecar['train_encoder'] is False and new_sidecar['coarse_loss'] == 'l2+kl'
  assert new_sidecar['init_checkpoint'] == config.diffusion.ae_init_checkpoint
  rows = [json.loads(x) for x in (workdir / 'refit' / 'autoencoder_metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['step'] == config.diffusion.ae_steps and 'train_kl_coarse' in rows[-1]
  refiner_sidecar, _ = coarse.load_params(workdir / 'base' / 'refiner.msgpack')
  refiner.check_refiner_matches(refiner_sidecar, new_sidecar, None, 'refiner')  # no error


def test_refit_resumes_and_refuses_a_changed_run(refit):
  config, workdir = refit
  before = (workdir / 'refit' / 'autoencoder.msgpack').read_bytes()
  refiner_loops.train_autoencoder(config, workdir / 'refit')  # finished: resumes at its last step
  assert (workdir / 'refit' / 'autoencoder.msgpack').read_bytes() == before
  changed = config.copy_and_resolve_references()
  changed.diffusion.ae_coarse_loss = 'l2+dice'
  with pytest.raises(coarse.CheckpointError, match='autoencoder_ckpt'):
    refiner_loops.train_autoencoder(changed, workdir / 'refit')


def test_bad_refit_settings_are_refused(refit, tmp_path):
  config, workdir = refit
  no_init = config.copy_and_resolve_references()
  no_init.diffusion.ae_init_checkpoint = ''
  with pytest.raises(ValueError, match='ae_init_checkpoint'):
    refiner_loops.train_autoencoder(no_init, tmp_path / 'a')
  onto_itself = config.copy_and_resolve_references()
  onto_itself.diffusion.autoencoder_checkpoint = config.diffusion.ae_init_checkpoint
  with pytest.raises(ValueError, match='overwritten'):
    refiner_loops.train_autoencoder(onto_itself, tmp_path / 'b')
  other = config.copy_and_resolve_references()
  other.diffusion.latent_channels = 3
  with pytest.raises(coarse.CheckpointError, match='autoencoder.msgpack'):
    refiner_loops.train_autoencoder(other, tmp_path / 'c')
  assert not (tmp_path / 'b').exists() or not any((tmp_path / 'b').iterdir())


def test_a_refiner_moves_to_a_retrained_autoencoder_only_when_asked(refit, tmp_path):
  """init_new_autoencoder: warm-start across a re-trained encoder (other latent scale), recorded."""
  config, workdir = refit
  moved = config.copy_and_resolve_references()
  moved.diffusion.ae_train_encoder = True  # the whole autoencoder trains: other latents, other scale
  refiner_loops.train_autoencoder(moved, tmp_path)
  base_sidecar, _ = coarse.load_params(workdir / 'base' / 'autoencoder.msgpack')
  new_sidecar, _ = coarse.load_params(tmp_path / 'autoencoder.msgpack')
  assert new_sidecar['latent_scale'] != base_sidecar['latent_scale']
  moved.diffusion.init_checkpoint = str(workdir / 'base' / 'refiner.msgpack')
  with pytest.raises(coarse.CheckpointError, match='trained with autoencoder'):
    refiner_loops.train_refiner(moved, tmp_path)
  moved.diffusion.init_new_autoencoder = True
  refiner_loops.train_refiner(moved, tmp_path)
  sidecar, _ = coarse.load_params(tmp_path / 'refiner.msgpack')
  assert sidecar['init_new_autoencoder'] is True
  assert sidecar['init_latent_scale'] == base_sidecar['latent_scale']
  assert sidecar['latent_scale'] == new_sidecar['latent_scale']
  other = moved.copy_and_resolve_references()  # another autoencoder architecture is still refused
  other.diffusion.ae_widths = (4, 4, 8)
  other.diffusion.ae_init_checkpoint = ''
  refiner_loops.train_autoencoder(other, tmp_path / 'x')
  with pytest.raises(coarse.CheckpointError, match='allows only new weights'):
    refiner_loops.train_refiner(other, tmp_path / 'x')
