"""Coarse training: multi-device step = single-device step, resume, NaN stop, bad data."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from vesseljax.data import pipeline, sources
from vesseljax.data.sample import DataError
from vesseljax.train import coarse, loops, state as state_lib, steps


def _tiny_setup(config):
  train = sources.to_arrays(sources.load_samples(config.data, 'train'), config.data)
  model = coarse.create_model(config.model, norm_axis_name=steps.AXIS)
  state = loops.build_train_state(config, model, 1)
  sampler = pipeline.PatchSampler(train, batch_size=config.train.batch_size,
                                  patch_size=config.train.patch_size,
                                  fov_min_fraction=config.train.fov_patch_min, seed=config.seed)
  return state, sampler


def test_four_device_step_equals_one_device_step():
  assert jax.local_device_count() == 4, 'conftest forces 4 CPU devices'
  config = tiny_config()  # augmentation on: its keys follow the global example index
  state, sampler = _tiny_setup(config)
  batch = sampler.batch(0)
  key = jax.random.key(3)
  aug = loops.make_augment_fn(config)
  kw = loops.loss_kwargs(config)
  step4 = steps.make_pmapped_train_step(aug, kw, devices=jax.local_devices())
  step1 = steps.make_pmapped_train_step(aug, kw, devices=jax.local_devices()[:1])
  s4, m4 = step4(state, pipeline.shard(batch, 4), key)
  s1, m1 = step1(state, pipeline.shard(batch, 1), key)
  for a, b in zip(jax.tree.leaves((s4.params, s4.batch_stats)), jax.tree.leaves((s1.params, s1.batch_stats))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(m4['loss']), float(m1['loss']), rtol=1e-5)
  assert int(s4.step) == 1
  # The step did something.
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(state.params)))
  assert moved > 0


def _params(workdir):
  _, variables = coarse.load_params(workdir / 'params.msgpack')
  return variables


def test_interrupted_run_resumes_on_the_same_stream(tmp_path, monkeypatch):
  config = tiny_config()
  config.data.num_val = 0  # export the last state, not the best one
  loops.train_coarse(config, tmp_path / 'straight')

  real_batch = pipeline.PatchSampler.batch
  def interrupting(self, step):
    if step == 4:
      raise KeyboardInterrupt('simulated kill at step 4')
    return real_batch(self, step)
  monkeypatch.setattr(pipeline.PatchSampler, 'batch', interrupting)
  with pytest.raises(KeyboardInterrupt):
    loops.train_coarse(config, tmp_path / 'resumed')
  ckpt = state_lib.Checkpoints(tmp_path / 'resumed')
  assert ckpt.latest_step() == 4
  ckpt.close()
  monkeypatch.setattr(pipeline.PatchSampler, 'batch', real_batch)
  final = loops.train_coarse(config, tmp_path / 'resumed')
  assert int(final.step) == config.train.num_steps
  a, b = _params(tmp_path / 'straight'), _params(tmp_path / 'resumed')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config()
  real_batch = pipeline.PatchSampler.batch
  def poisoned(self, step):
    batch = real_batch(self, step)
    if step == 3:
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return batch
  monkeypatch.setattr(pipeline.PatchSampler, 'batch', poisoned)
  with pytest.raises(loops.TrainingError, match='non-finite training loss.*step 3.*last good checkpoint is step 2'):
    loops.train_coarse(config, tmp_path)
  ckpt = state_lib.Checkpoints(tmp_path)
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert not (tmp_path / 'params.msgpack').exists()
  # A stopped run can still be exported: validation at step 3 saved the best weights.
  sidecar, _ = coarse.load_params(loops.export_run(config, tmp_path))
  assert sidecar['steps_trained'] == 3
  assert sidecar['exported_from'] == 'best validation checkpoint, step 3'


def test_export_without_a_checkpoint_says_so(tmp_path):
  with pytest.raises(coarse.CheckpointError, match='no checkpoint to export'):
    loops.export_run(tiny_config(), tmp_path)


def test_training_on_an_empty_data_folder_names_it(tmp_path):
  config = tiny_config()
  config.data.name = 'drive'
  config.data.root = str(tmp_path)
  with pytest.raises(DataError, match=str(tmp_path)):
    loops.train_coarse(config, tmp_path / 'run')


def test_batch_size_must_divide_devices(tmp_path):
  config = tiny_config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match='not divisible by the 4'):
    loops.train_coarse(config, tmp_path)


def test_a_non_finite_gradient_stops_before_its_update_is_kept(tmp_path, monkeypatch):
  """A finite loss with a NaN gradient would save NaN parameters as a 'good' checkpoint."""
  config = tiny_config()
  real_make = steps.make_pmapped_train_step

  def make(*args, **kwargs):
    step_fn = real_make(*args, **kwargs)

    def poisoned(state, batch, key):
      new_state, metrics = step_fn(state, batch, key)
      if int(np.asarray(state.step).reshape(-1)[0]) == 3:
        new_state = new_state.replace(params=jax.tree.map(lambda x: x * np.nan, new_state.params))
        metrics = dict(metrics, grad_norm=metrics['grad_norm'] * np.nan)
      return new_state, metrics
    return poisoned

  monkeypatch.setattr(steps, 'make_pmapped_train_step', make)
  with pytest.raises(loops.TrainingError, match=r'non-finite training grad_norm \(nan\) at step 3.*last good checkpoint is step 2'):
    loops.train_coarse(config, tmp_path)
  ckpt = state_lib.Checkpoints(tmp_path)
  assert ckpt.latest_step() == 2
  ckpt.close()
