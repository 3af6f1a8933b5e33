"""Pure train and eval steps for the coarse model, mapped over one named axis.

`train_step(state, batch, key) -> (state, metrics)` is written with named-axis
collectives only (`lax.pmean` over `AXIS`), so it runs under `jax.pmap` (as
`make_pmapped_train_step` builds it) and would run unchanged under
`jax.shard_map`. The state stays unreplicated: it goes in with `in_axes=None`
and comes out with `out_axes=None` because every device computes the same
update from pmean'd gradients and BatchNorm statistics.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from vesseljax.train import losses
from vesseljax.train.state import TrainState

AXIS = 'batch'  # the one named axis of every mapped step


def _per_example_keys(key: jax.Array, step: jax.Array, per_device: int) -> jax.Array:
  """(per_device,) keys indexed by the *global* example index.

  fold_in(fold_in(key, step), global_index): the same example gets the same
  augmentation whatever the number of devices.
  """
  step_key = jax.random.fold_in(key, step)
  first = jax.lax.axis_index(AXIS) * per_device
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(per_device))


def coarse_loss(outputs: dict, label: jax.Array, fov: jax.Array, *, dice_weight: float,
                edge_weight: float, bce_weight: float, side_weight: float) -> tuple[jax.Array, dict]:
  """Deeply supervised loss: final output + side_weight * each side output.

  Args:
    outputs: the model's dict: 'logits' (B, H, W, 1), 'side_logits' tuple of (B, H, W, 1).
    label, fov: (B, H, W) float32 in {0, 1}.

  Returns:
    (B,) loss per example, and a dict of (B,) parts for logging.
  """
  kw = dict(dice_weight=dice_weight, edge_weight=edge_weight, bce_weight=bce_weight)
  main = losses.segmentation_loss(outputs['logits'][..., 0], label, fov, **kw)
  side = jnp.zeros_like(main)
  for side_logits in outputs.get('side_logits', ()):
    side = side + losses.segmentation_loss(side_logits[..., 0], label, fov, **kw)
  prob = jax.nn.sigmoid(outputs['logits'][..., 0])
  parts = {'loss_main': main, 'loss_side': side,
           'dice_soft': 1.0 - losses.soft_dice_loss(prob, label, fov)}
  return main + side_weight * side, parts


def train_step(state: TrainState, batch: dict, key: jax.Array, *,
               augment_fn: Optional[Callable], loss_kwargs: dict) -> tuple[TrainState, dict]:
  """One AdamW step on one device's shard of the global batch (call under pmap).

  Args:
    state: unreplicated TrainState.
    batch: 'image' (b, H, W, C) float32 in [0, 1], 'label' and 'fov' (b, H, W)
      float32 in {0, 1}; b = global batch / devices.
    key: the run's train key; folded with step and global example index.
    augment_fn: per-example `(key, image, label, fov) -> (image, label, fov)` or None.
    loss_kwargs: dice/edge/bce/side weights for `coarse_loss`.

  Returns:
    The new state (same on every device) and pmean'd scalar metrics.
  """
  image, label, fov = batch['image'], batch['label'], batch['fov']
  if augment_fn is not None:
    keys = _per_example_keys(key, state.step, image.shape[0])
    image, label, fov = jax.vmap(augment_fn)(keys, image, label, fov)

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, image, train=True,
        mutable=['batch_stats'])
    per_example, parts = coarse_loss(outputs, label, fov, **loss_kwargs)
    return jnp.mean(per_example), (updates['batch_stats'], parts)

  (loss, (batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {'loss': loss, **{k: jnp.mean(v) for k, v in parts.items()},
             'grad_norm': jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))}
  return new_state, jax.lax.pmean(metrics, AXIS)


def make_pmapped_train_step(augment_fn: Optional[Callable], loss_kwargs: dict,
                            devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """`(state, sharded_batch, key) -> (state, metrics)` pmapped over `devices` (default: all local).

  sharded_batch leaves are (devices, b, ...); state and key are unreplicated.
  """
  step = functools.partial(train_step, augment_fn=augment_fn, loss_kwargs=loss_kwargs)
  return jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, None), out_axes=(None, None),
                  devices=devices)


def make_predict_fn(apply_fn: Callable) -> Callable:
  """Jitted `(variables, image (B, H, W, C)) -> outputs` in eval mode (running BatchNorm stats)."""
  return jax.jit(lambda variables, image: apply_fn(variables, image, train=False))
