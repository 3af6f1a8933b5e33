"""DDIM sampling with classifier-free guidance, as one `lax.scan`; ensembles.

The sampler never sees a model (STYLE.md 5, after big_vision's
`_temperature_sampling` and vdm's sampling loop): it takes the denoiser as a
function,

  denoise_fn(z_t, t, cond, drop_image) -> eps
    z_t         (B, h, w, C) float32 noised latents,
    t           (B,) int32 timesteps in [0, T),
    cond        any pytree of arrays with leading dim B (coarse latent,
                reverse-attention map, image tokens, ...),
    drop_image  (B,) bool: True replaces the image condition by the learned
                null (classifier-free guidance),
    eps         (B, h, w, C) predicted noise,

which `train/` and `predict.py` build by closing over the denoiser's
parameters. `guided_eps_fn` turns it into `eps_fn(z_t, t, cond) -> eps` with
guidance (SPEC.md, paper 3.3.7):

  eps = eps_c + s * (eps_c - eps_u),

so s = 0 is the conditional model alone; for s > 0 the conditional and
unconditional halves run as one batched call on 2B inputs.

DDIM (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021) over the
timesteps t_i = floor(T i / N), i = 0 .. N-1, walked from i = start_index
down to 0. With abar_t = alphas_cumprod[t_i] and
abar_prev = alphas_cumprod[t_{i-1}] (1 at i = 0, so the last step returns the
predicted x0):

  eps     = eps_fn(z, t_i, cond)
  x0_hat  = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t)
  sigma   = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1 - abar_t/abar_prev)
  z      <- sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps
            + sigma * noise_i,          noise_i ~ N(0, I) from fold_in(key, i)

eta = 0 is deterministic DDIM; eta = 1 has DDPM's posterior variance.
`ddim_sample` is one `lax.scan` (jittable with eps_fn, num_sample_steps, eta
and start_index static); `ddim_sample_loop` is the same algorithm as a plain
Python loop, the reference tests compare it with.

Sampling may start from pure noise (the paper) or, with `strength_start`, from
the coarse latent noised to an intermediate step (SPEC.md). `sample_ensemble`
vmaps a sampler over K keys in one compiled call; `ensemble_stats` gives the
per-pixel mean and variance of the K decoded maps (paper 5.4).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vesseljax.diffusion import schedule as schedule_lib

Array = jax.Array
# (z_t (B, h, w, C), t (B,) int32, cond pytree, drop_image (B,) bool) -> eps.
DenoiseFn = Callable[[Array, Array, Any, Array], Array]
# (z_t (B, h, w, C), t (B,) int32, cond pytree) -> eps (B, h, w, C).
EpsFn = Callable[[Array, Array, Any], Array]


def check_guidance_scale(guidance_scale: float) -> float:
  """Returns the scale as a float; ValueError unless finite and >= 0."""
  scale = float(guidance_scale)
  if not (math.isfinite(scale) and scale >= 0):
    raise ValueError(
        f'guidance_scale must be a finite number >= 0 (0 = conditional model '
        f'alone); got {guidance_scale}')
  return scale


def check_eta(eta: float) -> float:
  """Returns eta as a float; ValueError unless in [0, 1]."""
  eta = float(eta)
  if not 0.0 <= eta <= 1.0:  # also rejects NaN
    raise ValueError(
        f'eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM variance); '
        f'got {eta}')
  return eta


def check_strength(strength: float) -> float:
  """Returns the strength as a float; ValueError unless in (0, 1]."""
  strength = float(strength)
  if not 0.0 < strength <= 1.0:  # also rejects NaN
    raise ValueError(
        f'strength must be in (0, 1] (1 = start at the noisiest sampling '
        f'step); got {strength}')
  return strength


def _resolve_start_index(start_index: Optional[int],
                         num_sample_steps: int) -> int:
  if start_index is None:
    return num_sample_steps - 1
  start_index = operator.index(start_index)
  if not 0 <= start_index < num_sample_steps:
    raise ValueError(
        f'start_index must be in [0, num_sample_steps={num_sample_steps}); '
        f'got {start_index}')
  return start_index


def guided_eps_fn(denoise_fn: DenoiseFn, guidance_scale: float) -> EpsFn:
  """Classifier-free guidance: eps = eps_c + s * (eps_c - eps_u).

  Args:
    denoise_fn: `(z_t, t, cond, drop_image) -> eps`, see the module docstring.
    guidance_scale: s, a finite Python number >= 0. Exactly 0 gives the
      conditional model alone and skips the unconditional half.

  Returns:
    `eps_fn(z_t (B, h, w, C), t (B,) int32, cond) -> eps (B, h, w, C)`. For
    s > 0 it calls denoise_fn once on 2B inputs (z_t, t and every cond leaf
    repeated along axis 0, drop_image = [False] * B + [True] * B) and splits
    the result; for s = 0 once on B inputs with drop_image all False.

  Raises:
    ValueError: if guidance_scale is negative or not finite.
  """
  scale = check_guidance_scale(guidance_scale)

  def eps_fn(z_t: Array, t: Array, cond: Any) -> Array:
    batch = z_t.shape[0]
    chex.assert_shape(t, (batch,))
    chex.assert_tree_shape_prefix(cond, (batch,))
    if scale == 0.0:
      eps = denoise_fn(z_t, t, cond, jnp.zeros((batch,), jnp.bool_))
      chex.assert_equal_shape([eps, z_t])
      return eps
    twice = lambda x: jnp.concatenate([x, x], axis=0)
    drop_image = jnp.arange(2 * batch) >= batch  # [False]*B + [True]*B
    eps_both = denoise_fn(twice(z_t), twice(t), jax.tree.map(twice, cond),
                          drop_image)
    chex.assert_shape(eps_both, (2 * batch,) + z_t.shape[1:])
    eps_cond, eps_uncond = eps_both[:batch], eps_both[batch:]
    return eps_cond + scale * (eps_cond - eps_uncond)

  return eps_fn


def _step_tables(schedule: schedule_lib.Schedule, timesteps: np.ndarray,
                 start_index: int) -> tuple[Array, Array, Array, Array]:
  """Per-step scan inputs, in sampling order (i = start_index .. 0).

  Args:
    schedule: the noise schedule.
    timesteps: (N,) int32 from `schedule_lib.ddim_timesteps`.
    start_index: first step index in [0, N).

  Returns:
    t (n,) int32 timesteps t_i; abar_t (n,) float32; abar_prev (n,) float32
    (1 at i = 0); index (n,) int32 i; n = start_index + 1.
  """
  index = np.arange(start_index, -1, -1, dtype=np.int32)
  t = timesteps[index]
  t_prev = timesteps[np.maximum(index - 1, 0)]
  abar_t = schedule.alphas_cumprod[t]
  abar_prev = jnp.where(index > 0, schedule.alphas_cumprod[t_prev], 1.0)
  return (jnp.asarray(t), abar_t, abar_prev.astype(abar_t.dtype),
          jnp.asarray(index))


def ddim_sample(eps_fn: EpsFn, schedule: schedule_lib.Schedule, cond: Any,
                z_start: Array, num_sample_steps: int,
                key: Optional[Array], eta: float = 0.0,
                start_index: Optional[int] = None) -> Array:
  """DDIM from z_start at t_{start_index} down to x0, as one `lax.scan`.

  Jittable with eps_fn, num_sample_steps, eta and start_index static, e.g.
  `jax.jit(ddim_sample, static_argnames=('eps_fn', 'num_sample_steps',
  'eta', 'start_index'))`; the schedule's tables may be traced.

  Args:
    eps_fn: `(z_t (B, h, w, C), t (B,) int32, cond) -> eps (B, h, w, C)`,
      e.g. from `guided_eps_fn`.
    schedule: the noise schedule (T = schedule.num_steps).
    cond: pytree of arrays with leading dim B, passed to eps_fn unchanged.
    z_start: (B, h, w, C) float32 latent at timestep t_{start_index}: standard
      normal noise for the default start, or from `strength_start`.
    num_sample_steps: N in [1, T]; timesteps t_i = floor(T i / N).
    key: PRNG key; step i draws its noise from fold_in(key, i). Unused (may
      be None) when eta = 0.
    eta: Python float in [0, 1]; 0 = deterministic DDIM.
    start_index: first step index in [0, N); default N - 1 (pure noise).

  Returns:
    (B, h, w, C) z0 in z_start's dtype: the last step's predicted x0.

  Raises:
    ValueError: for N outside [1, T], eta outside [0, 1], start_index outside
      [0, N), or eta > 0 without a key.
  """
  eta = check_eta(eta)
  timesteps = schedule_lib.ddim_timesteps(schedule.num_steps,
                                          num_sample_steps)
  start_index = _resolve_start_index(start_index, num_sample_steps)
  if eta > 0 and key is None:
    raise ValueError('ddim_sample needs a key when eta > 0')
  tables = _step_tables(schedule, timesteps, start_index)
  batch = z_start.shape[0]

  def step(z, inputs):
    t, abar_t, abar_prev, index = inputs
    eps = eps_fn(z, jnp.full((batch,), t, jnp.int32), cond)
    chex.assert_equal_shape([eps, z])
    eps = eps.astype(jnp.float32)
    x0_hat = (z - jnp.sqrt(1.0 - abar_t) * eps) / jnp.sqrt(abar_t)
    sigma = (eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t))
             * jnp.sqrt(1.0 - abar_t / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    z_prev = jnp.sqrt(abar_prev) * x0_hat + direction
    if eta > 0:  # Python branch on a static setting
      noise = jax.random.normal(jax.random.fold_in(key, index), z.shape,
                                jnp.float32)
      z_prev = z_prev + sigma * noise
    return z_prev.astype(z.dtype), None

  z0, _ = jax.lax.scan(step, z_start, tables)
  return z0


def ddim_sample_loop(eps_fn: EpsFn, schedule: schedule_lib.Schedule,
                     cond: Any, z_start: Array, num_sample_steps: int,
                     key: Optional[Array], eta: float = 0.0,
                     start_index: Optional[int] = None) -> Array:
  """`ddim_sample` as a plain Python loop (the reference; same arguments).

  Not for production: unrolled under jit, slow eagerly. Written from the
  formulas with the schedule's gathers rather than `ddim_sample`'s tables, so
  the two check each other.
  """
  eta = check_eta(eta)
  timesteps = schedule_lib.ddim_timesteps(schedule.num_steps,
                                          num_sample_steps)
  start_index = _resolve_start_index(start_index, num_sample_steps)
  if eta > 0 and key is None:
    raise ValueError('ddim_sample_loop needs a key when eta > 0')
  batch = z_start.shape[0]
  z = z_start
  for i in range(start_index, -1, -1):
    t = jnp.full((batch,), int(timesteps[i]), jnp.int32)
    abar_t = schedule.alphas_cumprod[int(timesteps[i])]
    abar_prev = (schedule.alphas_cumprod[int(timesteps[i - 1])] if i > 0
                 else jnp.float32(1.0))
    eps = eps_fn(z, t, cond).astype(jnp.float32)
    x0_hat = schedule_lib.predict_x0(schedule, z, t, eps)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t) *
                           (1.0 - abar_t / abar_prev))
    z_next = (jnp.sqrt(abar_prev) * x0_hat +
              jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps)
    if eta > 0:
      z_next = z_next + sigma * jax.random.normal(
          jax.random.fold_in(key, i), z.shape, jnp.float32)
    z = z_next.astype(z_start.dtype)
  return z


def strength_start(schedule: schedule_lib.Schedule, z_coarse: Array,
                   num_sample_steps: int, strength: float,
                   key: Array) -> tuple[Array, int]:
  """Start point for sampling from the coarse latent noised part-way.

  start_index = max(round(strength * N) - 1, 0) (halves round up), and
  z_start = q_sample(z_coarse, t_{start_index}, noise): the sampler then runs
  start_index + 1 of the N steps. strength = 1 starts at t_{N-1}, the
  noisiest sampling step (almost pure noise); small strengths keep most of
  the coarse latent.

  Args:
    schedule: the noise schedule.
    z_coarse: (B, h, w, C) float32 latent of the coarse mask.
    num_sample_steps: N in [1, T].
    strength: Python float in (0, 1].
    key: PRNG key for the noise.

  Returns:
    z_start (B, h, w, C) float32 and start_index, a Python int in [0, N), to
    pass to `ddim_sample` (static under jit).

  Raises:
    ValueError: for strength outside (0, 1] or N outside [1, T].
  """
  strength = check_strength(strength)
  timesteps = schedule_lib.ddim_timesteps(schedule.num_steps,
                                          num_sample_steps)
  start_index = max(math.floor(strength * num_sample_steps + 0.5) - 1, 0)
  t = jnp.full((z_coarse.shape[0],), int(timesteps[start_index]), jnp.int32)
  noise = jax.random.normal(key, z_coarse.shape, z_coarse.dtype)
  return schedule_lib.q_sample(schedule, z_coarse, t, noise), start_index


@functools.partial(jax.jit, static_argnums=0)
def sample_ensemble(sample_fn: Callable[[Array], Array], keys: Array) -> Array:
  """K samples in one compiled call: `jax.vmap(sample_fn)(keys)`.

  Compiled once per sample_fn object (it is a static argument: pass the same
  function, e.g. one `functools.partial`, to reuse the compilation); works
  under an outer jit too.

  Args:
    sample_fn: `key -> sample (B, ...)`, e.g. a `functools.partial` of
      `ddim_sample` that draws z_start from its key (split it: one part for
      the start noise, one for the sampler).
    keys: (K,) PRNG keys, e.g. `jax.random.split(key, K)`.

  Returns:
    (K, B, ...) samples; member k equals sample_fn(keys[k]).
  """
  return jax.vmap(sample_fn)(keys)


def ensemble_stats(probs: Array) -> tuple[Array, Array]:
  """Per-pixel mean and population variance over ensemble members.

  Args:
    probs: (K, B, H, W) float32 vessel probabilities in [0, 1] of K members
      (any trailing shape works).

  Returns:
    mean and variance, each (B, H, W) float32; variance divides by K (ddof 0)
    and lies in [0, 0.25] for maps in [0, 1].
  """
  probs = jnp.asarray(probs, jnp.float32)
  if probs.ndim < 1 or probs.shape[0] < 1:
    raise ValueError(
        f'probs must be (K, B, H, W) with K >= 1; got shape {probs.shape}')
  mean = jnp.mean(probs, axis=0)
  variance = jnp.mean(jnp.square(probs - mean), axis=0)
  return mean, variance
