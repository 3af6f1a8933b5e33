"""Training loops: `train_coarse(config, workdir) -> TrainState`.

Resuming is the normal path: the loop restores the workdir's latest Orbax
checkpoint and continues from its step; batches are a function of (seed, step)
and augmentation keys of (step, example), so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import time
from typing import Optional

import jax
import numpy as np

from vesseljax.data import augment, pipeline, sources
from vesseljax.data.sample import DataError
from vesseljax.evaluate import metrics
from vesseljax.train import coarse, state as state_lib, steps

log = logging.getLogger('vesseljax')


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class Progress:
  """Periodic log lines with rate and ETA, and a JSONL metrics file in the workdir."""

  def __init__(self, workdir: pathlib.Path, total: int, start: int, what: str):
    self.path = workdir / f'{what}_metrics.jsonl'
    self.total, self.start, self.what = total, start, what
    self.t0 = time.time()

  def write(self, step: int, metrics: dict, prefix: str = 'train') -> None:
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    record = {'step': step, **{f'{prefix}_{k}': float(v) for k, v in metrics.items()}}
    if prefix == 'train':
      record['steps_per_second'] = rate
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    shown = ' '.join(f'{k}={float(v):.4f}' for k, v in metrics.items())
    log.info('%s %s step %d/%d %s | %.2f steps/s, ETA %.0f s',
             self.what, prefix, step, self.total, shown, rate, eta)


def make_augment_fn(config) -> Optional[callable]:
  """Per-example augmentation `(key, image, label, fov) -> (image, label, fov)` from config.augment."""
  a = config.augment
  if not a.enabled:
    return None
  return functools.partial(
      augment.augment_example, max_rotation_deg=a.max_rotation_deg, flip=a.flip,
      elastic_alpha_px=a.elastic_alpha_px, elastic_sigma_px=a.elastic_sigma_px,
      elastic_prob=a.elastic_prob)


def loss_kwargs(config) -> dict:
  t = config.train
  return dict(dice_weight=t.dice_weight, edge_weight=t.edge_weight, bce_weight=t.bce_weight,
              side_weight=t.side_weight)


def split_train_val(data: pipeline.ArrayDataset, num_val: int) -> tuple[pipeline.ArrayDataset, Optional[pipeline.ArrayDataset]]:
  """The last `num_val` training images become the validation set (never the test split)."""
  n = len(data.ids)
  if num_val <= 0:
    return data, None
  if num_val >= n:
    raise DataError(f'data.num_val={num_val} leaves no training images out of {n}')
  return data.subset(slice(0, n - num_val)), data.subset(slice(n - num_val, n))


def training_images(config, data: pipeline.ArrayDataset) -> tuple[pipeline.ArrayDataset, Optional[pipeline.ArrayDataset]]:
  """(train, validation) from the training split: the held-out fold removed first, if any."""
  if config.data.num_folds:
    data, _ = sources.fold_split(data, config.data.num_folds, config.data.fold)
  return split_train_val(data, config.data.num_val)


def check_step(metrics: dict, step: int, what: str, ckpt: state_lib.Checkpoints) -> None:
  """TrainingError when a step's loss or gradient norm is not finite.

  A finite loss with a non-finite gradient still poisons the updated
  parameters, so both are checked before the new state is kept.
  """
  bad = [f'{k} ({float(metrics[k])})' for k in ('loss', 'grad_norm')
         if k in metrics and not np.isfinite(float(metrics[k]))]
  if bad:
    raise TrainingError(
        f'non-finite {what} {" and ".join(bad)} at step {step}; stopped without saving it. '
        f'The last good checkpoint is step {ckpt.latest_step()} in {ckpt.latest.directory}.')


def validation_dice(predict_fn, variables, val: pipeline.ArrayDataset, batch_size: int) -> float:
  """Mean per-image Dice at the working resolution inside the FOV, threshold 0.5."""
  probs = coarse.infer_probs(predict_fn, variables, val.images, batch_size)
  return float(np.mean([metrics.image_metrics(prob, label, fov, 0.5)['dice']
                        for prob, label, fov in zip(probs, val.labels, val.fovs)]))


def build_train_state(config, model, input_channels: int) -> state_lib.TrainState:
  t = config.train
  tx = state_lib.make_optimizer(t.learning_rate, t.num_steps, t.warmup_steps, t.weight_decay, t.grad_clip)
  init_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  size = sources.work_size(config.data)
  shape = (t.patch_size, t.patch_size, input_channels) if t.patch_size else size + (input_channels,)
  return state_lib.create_train_state(model, init_key, shape, tx)


def train_coarse(config, workdir: str | pathlib.Path, train_data: Optional[pipeline.ArrayDataset] = None) -> state_lib.TrainState:
  """Trains (or resumes training of) the coarse model in `workdir`.

  Args:
    config: the full config (data, augment, model, train sections).
    workdir: run folder; checkpoints/, best/, metrics and params.msgpack go here.
    train_data: preprocessed training images; loaded from config.data if None.

  Returns:
    The final TrainState.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t = config.train
  devices = jax.device_count()  # all hosts' devices; each host feeds its own
  if t.batch_size % devices:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible by the {devices} devices')

  if train_data is None:
    samples = sources.load_samples(config.data, 'train', sources.tfds_dir(config.data, workdir))
    train_data = sources.to_arrays(samples, config.data)
  train_data, val_data = training_images(config, train_data)
  fold = (f', fold {config.data.fold} of {config.data.num_folds} held out'
          if config.data.num_folds else '')
  log.info('coarse training on %d images (%d validation%s), working size %s, %d device(s)',
           len(train_data.ids), 0 if val_data is None else len(val_data.ids), fold,
           train_data.images.shape[1:3], devices)

  model = coarse.create_model(config.model, norm_axis_name=steps.AXIS)
  eval_model = coarse.create_model(config.model)
  state = build_train_state(config, model, train_data.images.shape[-1])
  try:
    # What a resume must share with the first start: the network, the data and the schedule.
    state_lib.check_run_spec(workdir, 'run_model', {
        **coarse.model_spec(config.model), 'num_folds': config.data.num_folds, 'fold': config.data.fold,
        'dataset': config.data.name, 'working_size_hw': list(train_data.images.shape[1:3]),
        'patch_size': t.patch_size, 'batch_size': t.batch_size, 'num_steps': t.num_steps, 'seed': config.seed})
  except ValueError as e:
    raise coarse.CheckpointError(str(e)) from e
  ckpt = state_lib.Checkpoints(workdir, keep=t.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(jax.tree.map(np.asarray, state))
    log.info('resumed from %s at step %d', workdir / 'checkpoints', int(state.step))
  start = int(state.step)

  sampler = pipeline.PatchSampler(train_data, batch_size=t.batch_size, patch_size=t.patch_size,
                                  fov_min_fraction=t.fov_patch_min, seed=config.seed)
  train_step = steps.make_pmapped_train_step(make_augment_fn(config), loss_kwargs(config))
  predict_fn = steps.make_predict_fn(eval_model.apply)
  train_key = jax.random.fold_in(jax.random.key(config.seed), 2)
  progress = Progress(workdir, t.num_steps, start, 'coarse')
  history = []
  try:
    for step in range(start, t.num_steps):
      batch = pipeline.host_shard(sampler.batch(step))
      new_state, metrics = train_step(state, batch, train_key)
      check_step(metrics, step, 'training', ckpt)
      state = new_state
      history.append(metrics)
      done = step + 1
      if done % t.log_every == 0 or done == t.num_steps:
        progress.write(done, jax.tree.map(lambda *x: np.mean(x), *history))
        history = []
      if val_data is not None and (done % t.eval_every == 0 or done == t.num_steps):
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        dice = validation_dice(predict_fn, variables, val_data, config.eval.batch_size)
        improved = ckpt.save_best(state, dice)
        progress.write(done, {'dice': dice, 'best': ckpt.best_score}, prefix='val')
        if improved:
          log.info('new best validation Dice %.4f at step %d', dice, done)
      if done % t.checkpoint_every == 0 or done == t.num_steps:
        ckpt.save(state)
  finally:
    ckpt.wait()
    ckpt.close()
  export_run(config, workdir, state)
  return state


def export_run(config, workdir: str | pathlib.Path,
               state: Optional[state_lib.TrainState] = None) -> pathlib.Path:
  """Writes `<workdir>/params.msgpack` (params-only release format) from a run.

  Takes the best-validation checkpoint when there is one, else `state`, else
  the latest checkpoint; so a run stopped early can still be evaluated.
  """
  workdir = pathlib.Path(workdir)
  ckpt = state_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  try:
    if state is None:
      if ckpt.latest_step() is None:
        raise coarse.CheckpointError(f'{workdir / "checkpoints"}: no checkpoint to export')
      model = coarse.create_model(config.model, norm_axis_name=steps.AXIS)
      abstract = build_train_state(config, model, 1)
      state = ckpt.restore(jax.tree.map(np.asarray, abstract))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    step, source = int(state.step), f'step {int(state.step)}'
    if ckpt.best.latest_step() is not None:
      variables = ckpt.restore_best(jax.tree.map(np.asarray, variables))
      step = ckpt.best.latest_step()
      source = f'best validation checkpoint, step {step}'
    path = coarse.export_params(
        workdir / 'params.msgpack', variables, config.model,
        {'dataset': config.data.name, 'steps_trained': step, 'exported_from': source,
         'num_folds': config.data.num_folds, 'fold': config.data.fold,
         'image_size': list(sources.work_size(config.data)),
         'best_val_dice': None if ckpt.best.latest_step() is None else ckpt.best_score})
  finally:
    ckpt.close()
  log.info('exported %s (%s)', path, source)
  return path
