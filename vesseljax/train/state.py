"""Train state and Orbax checkpoints for the coarse model.

A `TrainState` holds step, params, BatchNorm statistics and the optimiser
state; `Checkpoints` keeps the latest K states of a run (for resuming) and the
best one by validation Dice, all under the run's workdir.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm running statistics."""
  batch_stats: Any = None


def make_optimizer(learning_rate: float, num_steps: int, warmup_steps: int,
                   weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
  """AdamW with linear warm-up (from learning_rate / warmup_steps) then cosine decay to 1%."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=learning_rate / max(1, warmup_steps), peak_value=learning_rate, warmup_steps=max(1, warmup_steps),
      decay_steps=max(num_steps, warmup_steps + 1), end_value=learning_rate * 0.01)
  parts = [optax.adamw(schedule, weight_decay=weight_decay)]
  if grad_clip:
    parts.insert(0, optax.clip_by_global_norm(grad_clip))
  return optax.chain(*parts)


def create_train_state(model: flax.linen.Module, key: jax.Array, input_shape: tuple[int, ...],
                       tx: optax.GradientTransformation) -> TrainState:
  """Initialises the model on a batch-1 dummy of `input_shape` (H, W, C) under jit."""
  dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, dummy, train=False))(key)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def step_of(state) -> int:
  """The state's step as an int; a stack of states trained in lockstep (train/refiner_sweep.py) has one step per member."""
  return int(np.ravel(np.asarray(state.step))[0])


class Checkpoints:
  """Orbax checkpoints of one run: `<workdir>/checkpoints` (latest K) and `<workdir>/best`."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
    workdir = pathlib.Path(workdir).absolute()
    self.latest = ocp.CheckpointManager(
        workdir / 'checkpoints', options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        workdir / 'best', options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    self._best_file = workdir / 'best' / 'best.json'

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def save(self, state: TrainState) -> None:
    self.latest.save(step_of(state), args=ocp.args.StandardSave(state))

  def restore(self, abstract_state: TrainState, step: Optional[int] = None) -> TrainState:
    step = self.latest.latest_step() if step is None else step
    return self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))

  @property
  def best_score(self) -> float:
    if self._best_file.exists():
      return float(json.loads(self._best_file.read_text())['score'])
    return -np.inf

  def save_best(self, state: TrainState, score: float) -> bool:
    """Saves params + batch_stats when `score` beats the best so far; returns whether it did."""
    if not score > self.best_score:
      return False
    self.best.save(int(state.step), args=ocp.args.StandardSave(
        {'params': state.params, 'batch_stats': state.batch_stats}), force=True)
    self.best.wait_until_finished()
    self._best_file.write_text(json.dumps({'step': int(state.step), 'score': float(score)}))
    return True

  def restore_best(self, abstract_variables: dict) -> dict:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f'no best checkpoint under {self.best.directory}')
    return self.best.restore(step, args=ocp.args.StandardRestore(abstract_variables))

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def check_run_spec(run_dir: str | pathlib.Path, name: str, spec: dict) -> None:
  """Records `spec` in `<run_dir>/<name>.json` on a run's first start; on a resume, refuses another spec.

  Resuming a run with another network (e.g. --config.model.name=lunet against
  a lunet_ra run) would restore mismatched checkpoints or silently mix runs.

  Raises:
    ValueError: naming the file and both specs.
  """
  path = pathlib.Path(run_dir) / f'{name}.json'
  if path.exists():
    saved = json.loads(path.read_text())
    if saved != json.loads(json.dumps(spec)):
      raise ValueError(f'{path}: this run was started with {saved}, not {spec}; '
                       f'use another workdir (or delete the run to start over)')
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(spec, indent=2, sort_keys=True))
