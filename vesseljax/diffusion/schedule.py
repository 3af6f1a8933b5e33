"""Cosine noise schedule and the closed-form relations between z0, z_t, eps.

The refiner's forward process (SPEC.md, "The schedule is not learned") is
Nichol & Dhariwal's cosine schedule ("Improved Denoising Diffusion
Probabilistic Models", ICML 2021) over T discrete steps:

  f(u)     = cos(((u / T + s) / (1 + s)) * pi / 2) ** 2,     u in [0, T]
  abar(u)  = f(u) / f(0)
  beta_t   = min(1 - abar(t + 1) / abar(t), max_beta),       t = 0 .. T-1
  alphas_cumprod[t] = prod_{j <= t} (1 - beta_j)

so that `alphas_cumprod[t]` is the abar reached after step t + 1 (the indexing
of the improved-diffusion code): integer timesteps t live in [0, T) and
alphas_cumprod[0] is just below 1. Clipping beta at 0.999 only touches the
last step(s), where f -> 0, and keeps abar > 0 there.

Given a clean latent z0 and standard normal noise eps,

  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps                 (q_sample)

and either of x0 / eps follows from z_t and the other (predict_x0,
predict_eps). Everything here is a pure function of arrays; no model is
imported. Tables are computed in float64 NumPy and stored as float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['betas', 'alphas_cumprod'],
                   meta_fields=['num_steps'])
@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete noise schedule; a pytree whose `num_steps` is static.

  Passing a Schedule through `jax.jit` traces the two tables and keeps
  `num_steps` a Python int, so samplers can build their timestep lists from
  it at trace time.

  Attributes:
    num_steps: T, the number of diffusion steps; timesteps are ints in [0, T).
    betas: (T,) float32 in (0, max_beta], the per-step noise variances.
    alphas_cumprod: (T,) float32 in (0, 1), strictly decreasing: abar_t,
      the signal variance kept after step t + 1.
  """
  num_steps: int
  betas: Array
  alphas_cumprod: Array


def cosine_schedule(num_steps: int = 1000, s: float = 0.008,
                    max_beta: float = 0.999) -> Schedule:
  """Nichol & Dhariwal's cosine schedule (see the module docstring).

  Args:
    num_steps: T >= 1, the number of diffusion steps.
    s: the small offset that keeps beta_0 away from 0 (0.008 in the paper).
    max_beta: upper clip of every beta, in (0, 1).

  Returns:
    The Schedule, tables computed in float64 and cast to float32.

  Raises:
    ValueError: if num_steps < 1, s < 0 or max_beta outside (0, 1).
  """
  num_steps = operator.index(num_steps)
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1; got {num_steps}')
  if not (math.isfinite(s) and s >= 0):
    raise ValueError(f's must be finite and >= 0; got {s}')
  if not 0 < max_beta < 1:
    raise ValueError(f'max_beta must be in (0, 1); got {max_beta}')
  u = np.arange(num_steps + 1, dtype=np.float64)
  f = np.cos(((u / num_steps + s) / (1 + s)) * (np.pi / 2)) ** 2
  abar = f / f[0]
  betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(num_steps=num_steps,
                  betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def _per_example(values: Array, ndim: int) -> Array:
  """(B,) -> (B, 1, ..., 1) with `ndim` dims, to broadcast over (B, ...)."""
  return jnp.reshape(values, values.shape + (1,) * (ndim - values.ndim))


def _abar(schedule: Schedule, t: Array, ndim: int) -> Array:
  """alphas_cumprod[t] for t (B,) int, shaped (B, 1, ..., 1), float32."""
  t = jnp.asarray(t)
  if t.ndim != 1:
    raise ValueError(f't must be (B,) integer timesteps; got shape {t.shape}')
  return _per_example(schedule.alphas_cumprod[t], ndim)


def q_sample(schedule: Schedule, z0: Array, t: Array, noise: Array) -> Array:
  """Noises clean latents to step t: sqrt(abar_t) z0 + sqrt(1 - abar_t) noise.

  Args:
    schedule: the noise schedule.
    z0: (B, ...) float32 clean latents.
    t: (B,) int32 timesteps in [0, T) (out-of-range values are clamped by
      the gather, not checked).
    noise: (B, ...) float32 standard normal noise, z0's shape.

  Returns:
    (B, ...) float32 z_t.
  """
  abar = _abar(schedule, t, z0.ndim)
  return jnp.sqrt(abar) * z0 + jnp.sqrt(1.0 - abar) * noise


def predict_x0(schedule: Schedule, z_t: Array, t: Array, eps: Array) -> Array:
  """Clean latent implied by z_t and its noise.

  x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

  Args:
    schedule: the noise schedule.
    z_t: (B, ...) float32 noised latents.
    t: (B,) int32 timesteps in [0, T).
    eps: (B, ...) float32 noise (e.g. the denoiser's prediction).

  Returns:
    (B, ...) float32 x0 estimate; errors in eps are amplified by
    sqrt((1 - abar_t) / abar_t), large near t = T - 1.
  """
  abar = _abar(schedule, t, z_t.ndim)
  return (z_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def predict_eps(schedule: Schedule, z_t: Array, t: Array, x0: Array) -> Array:
  """Noise implied by z_t and its clean latent.

  eps = (z_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).

  Args:
    schedule: the noise schedule.
    z_t: (B, ...) float32 noised latents.
    t: (B,) int32 timesteps in [0, T).
    x0: (B, ...) float32 clean latents.

  Returns:
    (B, ...) float32 eps.
  """
  abar = _abar(schedule, t, z_t.ndim)
  return (z_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def ddim_timesteps(num_steps: int, num_sample_steps: int) -> np.ndarray:
  """The N timesteps a DDIM sampler visits: t_i = floor(T * i / N), i < N.

  Args:
    num_steps: T, the schedule's number of steps.
    num_sample_steps: N in [1, T], the number of sampling steps.

  Returns:
    (N,) int32, ascending, t_0 = 0; a sampler walks it from t_{N-1} down.

  Raises:
    ValueError: if N < 1 or N > T.
  """
  num_steps = operator.index(num_steps)
  num_sample_steps = operator.index(num_sample_steps)
  if not 1 <= num_sample_steps <= num_steps:
    raise ValueError(
        f'num_sample_steps must be in [1, num_steps={num_steps}]; '
        f'got {num_sample_steps}')
  i = np.arange(num_sample_steps, dtype=np.int64)
  return ((num_steps * i) // num_sample_steps).astype(np.int32)
