"""Cosine schedule, DDIM sampler, guidance, ensembles (vesseljax.diffusion)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close

from vesseljax.diffusion import sampler as sampler_lib
from vesseljax.diffusion import schedule as schedule_lib

T = 1000
LATENT_SHAPE = (2, 8, 8, 4)  # (B, h, w, C)
NUM_TOKENS, TOKEN_DIM = 5, 3  # image tokens in the fake condition


pytestmark = pytest.mark.usefixtures('fast_compiles')  # conftest: XLA optimisations off


@pytest.fixture(scope='module')
def schedule():
  return schedule_lib.cosine_schedule(T)


def _normal(seed, shape):
  # numpy, not jax.random: threefry compiles anew per shape (~1 s on CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _cond(seed=1):
  """A condition pytree with leaves of different shapes, leading dim B."""
  batch, h, w, channels = LATENT_SHAPE
  return {'coarse': _normal(seed, (batch, h, w, channels)),
          'image_tokens': _normal(seed + 1, (batch, NUM_TOKENS, TOKEN_DIM))}


def _fake_denoiser(seed=0):
  """A random nonlinear denoise_fn depending on z_t, t, cond and drop_image."""
  rng = np.random.default_rng(seed)
  channels = LATENT_SHAPE[-1]
  w_z = jnp.asarray(rng.standard_normal((channels, channels)) / 2, jnp.float32)
  w_coarse = jnp.asarray(rng.standard_normal((channels, channels)) / 2,
                         jnp.float32)
  w_image = jnp.asarray(rng.standard_normal((TOKEN_DIM, channels)),
                        jnp.float32)
  null_image = jnp.asarray(rng.standard_normal(channels), jnp.float32)
  phase = jnp.asarray(rng.uniform(0, 3, channels), jnp.float32)

  def denoise_fn(z_t, t, cond, drop_image):
    image = jnp.tanh(cond['image_tokens'].mean(axis=1) @ w_image)  # (B, C)
    image = jnp.where(drop_image[:, None], null_image, image)
    time = jnp.sin(t.astype(jnp.float32)[:, None] / 97.0 + phase)  # (B, C)
    hidden = z_t @ w_z + cond['coarse'] @ w_coarse + image[:, None, None, :]
    return jnp.tanh(hidden) + 0.3 * time[:, None, None, :] * z_t

  return denoise_fn


# ------------------------------------------------------------------ schedule


def test_cosine_schedule_matches_formula(schedule):
  s, max_beta = 0.008, 0.999

  def f(u):
    return math.cos(((u / T + s) / (1 + s)) * math.pi / 2) ** 2

  betas, abar, running = [], [], 1.0
  for t in range(T):
    beta = min(1 - (f(t + 1) / f(0)) / (f(t) / f(0)), max_beta)
    running *= 1 - beta
    betas.append(beta)
    abar.append(running)

  assert schedule.num_steps == T
  assert schedule.betas.shape == schedule.alphas_cumprod.shape == (T,)
  assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == jnp.float32
  np.testing.assert_allclose(schedule.betas, betas, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(schedule.alphas_cumprod, abar, rtol=1e-5,
                             atol=1e-9)
  # Unclipped steps telescope: alphas_cumprod[t] = f(t + 1) / f(0).
  np.testing.assert_allclose(schedule.alphas_cumprod[:-1],
                             [f(t + 1) / f(0) for t in range(T - 1)],
                             rtol=1e-5, atol=1e-9)
  # A few values by hand: abar is just below 1 at t = 0, ~0.5 mid-way.
  assert 0.9999 < float(schedule.alphas_cumprod[0]) < 1.0
  assert 0.45 < float(schedule.alphas_cumprod[T // 2 - 1]) < 0.55


def test_cosine_schedule_is_monotone_and_clipped(schedule):
  abar = np.asarray(schedule.alphas_cumprod)
  betas = np.asarray(schedule.betas)
  assert np.all(np.diff(abar) < 0), 'alphas_cumprod must strictly decrease'
  assert np.all((abar > 0) & (abar < 1))
  assert np.all((betas > 0) & (betas <= np.float32(0.999)))
  assert betas[-1] == np.float32(0.999)  # f(T) = 0: the last beta is clipped
  assert np.all(betas[:-1] < 0.999)


def test_cosine_schedule_rejects_bad_arguments():
  with pytest.raises(ValueError, match='num_steps'):
    schedule_lib.cosine_schedule(0)
  with pytest.raises(ValueError, match='max_beta'):
    schedule_lib.cosine_schedule(10, max_beta=1.0)
  with pytest.raises(ValueError, match='s must be'):
    schedule_lib.cosine_schedule(10, s=-0.1)


def test_schedule_is_a_pytree_with_static_num_steps(schedule):
  leaves = jax.tree.leaves(schedule)
  assert len(leaves) == 2  # betas, alphas_cumprod; num_steps is static

  @jax.jit
  def last_timestep(sched):
    # Needs num_steps as a Python int at trace time.
    return jnp.asarray(schedule_lib.ddim_timesteps(sched.num_steps, 4)[-1])

  assert int(last_timestep(schedule)) == 750


def test_q_sample_matches_formula_and_inverts(schedule):
  z0, noise = _normal(0, LATENT_SHAPE), _normal(1, LATENT_SHAPE)
  t = jnp.array([3, 700], jnp.int32)
  z_t = schedule_lib.q_sample(schedule, z0, t, noise)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
  abar = abar[:, None, None, None]
  expected = np.sqrt(abar) * np.asarray(z0) + np.sqrt(1 - abar) * np.asarray(
      noise)
  assert_close(z_t, expected, rtol=1e-6)
  assert_close(schedule_lib.predict_x0(schedule, z_t, t, noise), z0,
               rtol=1e-5)
  assert_close(schedule_lib.predict_eps(schedule, z_t, t, z0), noise,
               rtol=1e-4)


def test_predict_x0_and_eps_are_inverse(schedule):
  z_t, eps = _normal(2, LATENT_SHAPE), _normal(3, LATENT_SHAPE)
  t = jnp.array([100, 900], jnp.int32)
  x0 = schedule_lib.predict_x0(schedule, z_t, t, eps)
  assert_close(schedule_lib.predict_eps(schedule, z_t, t, x0), eps,
               rtol=1e-4)
  assert_close(schedule_lib.q_sample(schedule, x0, t, eps), z_t, rtol=1e-5)


def test_ddim_timesteps():
  np.testing.assert_array_equal(schedule_lib.ddim_timesteps(1000, 20),
                                np.arange(0, 1000, 50))
  assert schedule_lib.ddim_timesteps(1000, 20).dtype == np.int32
  np.testing.assert_array_equal(schedule_lib.ddim_timesteps(10, 3), [0, 3, 6])
  np.testing.assert_array_equal(schedule_lib.ddim_timesteps(7, 7),
                                np.arange(7))
  np.testing.assert_array_equal(schedule_lib.ddim_timesteps(1000, 1), [0])
  for bad in (0, -3, 1001):
    with pytest.raises(ValueError, match='num_sample_steps'):
      schedule_lib.ddim_timesteps(1000, bad)


# ------------------------------------------------------------------- sampler


@pytest.mark.parametrize('eta,start_index', [(0.0, None), (0.5, None),
                                             (0.0, 3), (1.0, 3)])
def test_scan_sampler_equals_loop(schedule, eta, start_index):
  eps_fn = sampler_lib.guided_eps_fn(_fake_denoiser(), 1.5)
  cond, z_start = _cond(), _normal(5, LATENT_SHAPE)
  key = jax.random.key(7)
  args = (eps_fn, schedule, cond, z_start, 10, key)
  scan = sampler_lib.ddim_sample(*args, eta=eta, start_index=start_index)
  loop = sampler_lib.ddim_sample_loop(*args, eta=eta,
                                      start_index=start_index)
  assert scan.shape == LATENT_SHAPE and scan.dtype == jnp.float32
  assert_close(scan, loop, rtol=1e-5)
  assert np.all(np.isfinite(scan))
  if eta == 0.0:  # deterministic: the key does not matter
    other = sampler_lib.ddim_sample(eps_fn, schedule, cond, z_start, 10,
                                    jax.random.key(8), start_index=start_index)
    np.testing.assert_array_equal(scan, other)
  else:  # stochastic: it does
    other = sampler_lib.ddim_sample(eps_fn, schedule, cond, z_start, 10,
                                    jax.random.key(8), eta=eta,
                                    start_index=start_index)
    assert float(jnp.max(jnp.abs(scan - other))) > 1e-3


def test_scan_sampler_jits_with_static_settings(schedule):
  eps_fn = sampler_lib.guided_eps_fn(_fake_denoiser(), 0.0)
  cond, z_start = _cond(), _normal(5, LATENT_SHAPE)
  sample = jax.jit(sampler_lib.ddim_sample,
                   static_argnames=('eps_fn', 'num_sample_steps', 'eta',
                                    'start_index'))
  jitted = sample(eps_fn, schedule, cond, z_start, num_sample_steps=6,
                  key=jax.random.key(0), eta=0.3, start_index=4)
  loop = sampler_lib.ddim_sample_loop(eps_fn, schedule, cond, z_start, 6,
                                      jax.random.key(0), eta=0.3,
                                      start_index=4)
  assert_close(jitted, loop, rtol=1e-5)


@pytest.mark.parametrize('sample', [sampler_lib.ddim_sample,
                                    sampler_lib.ddim_sample_loop])
def test_eta_noise_follows_the_ddim_sigma(schedule, sample):
  """Two steps with eps = 0 isolate sigma and the fold_in(key, i) noise.

  From i = 1 (t_1) with eps = 0: z' = sqrt(abar_0 / abar_1) z + sigma_1 n,
  n = normal(fold_in(key, 1)); the last step returns z' / sqrt(abar_0), with
  abar_i = alphas_cumprod[t_i] and sigma_1 from Song et al. eq. 16.
  """
  eta, num_sample_steps = 0.7, 10
  z_start, key = _normal(5, LATENT_SHAPE), jax.random.key(4)
  out = sample(lambda z_t, t, cond: jnp.zeros_like(z_t), schedule, None,
               z_start, num_sample_steps, key, eta=eta, start_index=1)
  t0, t1 = schedule_lib.ddim_timesteps(T, num_sample_steps)[:2]
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  abar_0, abar_1 = abar[t0], abar[t1]
  sigma = eta * math.sqrt((1 - abar_0) / (1 - abar_1) * (1 - abar_1 / abar_0))
  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 1),
                                       LATENT_SHAPE), np.float64)
  expected = (np.asarray(z_start, np.float64) / math.sqrt(abar_1)
              + sigma * noise / math.sqrt(abar_0))
  assert_close(out, expected, rtol=1e-5)


def test_start_index_zero_returns_one_step_x0(schedule):
  """From t_0 the sampler takes one step: the predicted x0 at t_0 = 0."""
  eps_fn = sampler_lib.guided_eps_fn(_fake_denoiser(), 0.0)
  cond, z_start = _cond(), _normal(5, LATENT_SHAPE)
  out = sampler_lib.ddim_sample(eps_fn, schedule, cond, z_start, 10, None,
                                start_index=0)
  t = jnp.zeros(LATENT_SHAPE[0], jnp.int32)
  expected = schedule_lib.predict_x0(schedule, z_start, t,
                                     eps_fn(z_start, t, cond))
  assert_close(out, expected, rtol=1e-6)


def test_guidance_scale_zero_is_the_conditional_model():
  denoise_fn = _fake_denoiser()
  cond, z_t = _cond(), _normal(5, LATENT_SHAPE)
  t = jnp.array([10, 600], jnp.int32)
  guided = sampler_lib.guided_eps_fn(denoise_fn, 0.0)(z_t, t, cond)
  conditional = denoise_fn(z_t, t, cond, jnp.zeros(2, bool))
  np.testing.assert_array_equal(guided, conditional)


@pytest.mark.parametrize('scale', [0.5, 3.0])
def test_guidance_formula(scale):
  denoise_fn = _fake_denoiser()
  cond, z_t = _cond(), _normal(5, LATENT_SHAPE)
  t = jnp.array([10, 600], jnp.int32)
  guided = sampler_lib.guided_eps_fn(denoise_fn, scale)(z_t, t, cond)
  eps_c = denoise_fn(z_t, t, cond, jnp.zeros(2, bool))
  eps_u = denoise_fn(z_t, t, cond, jnp.ones(2, bool))
  assert float(jnp.max(jnp.abs(eps_c - eps_u))) > 1e-2  # drop_image matters
  assert_close(guided, eps_c + scale * (eps_c - eps_u), rtol=1e-5)


@pytest.mark.parametrize('scale', [0.0, 2.0])
def test_guidance_makes_one_batched_call_per_step(schedule, scale):
  """The scan's denoiser runs once per step, on 2B inputs when guided."""
  denoise_fn = _fake_denoiser()
  calls = []

  def record(t, drop_image, coarse, tokens):
    calls.append((np.asarray(t), np.asarray(drop_image), coarse.shape,
                  tokens.shape))

  def counting_fn(z_t, t, cond, drop_image):
    jax.debug.callback(record, t, drop_image, cond['coarse'],
                       cond['image_tokens'])
    return denoise_fn(z_t, t, cond, drop_image)

  batch = LATENT_SHAPE[0]
  eps_fn = sampler_lib.guided_eps_fn(counting_fn, scale)
  num_sample_steps = 5
  out = sampler_lib.ddim_sample(eps_fn, schedule, _cond(),
                                _normal(5, LATENT_SHAPE), num_sample_steps,
                                None)
  out.block_until_ready()
  jax.effects_barrier()
  assert len(calls) == num_sample_steps
  timesteps = schedule_lib.ddim_timesteps(T, num_sample_steps)[::-1]
  copies = 1 if scale == 0.0 else 2
  for (t, drop_image, coarse_shape, tokens_shape), t_i in zip(
      sorted(calls, key=lambda c: -int(c[0][0])), timesteps):
    np.testing.assert_array_equal(t, np.full(copies * batch, t_i))
    np.testing.assert_array_equal(
        drop_image, [False] * batch + [True] * batch if copies == 2
        else [False] * batch)
    assert coarse_shape == (copies * batch,) + LATENT_SHAPE[1:]
    assert tokens_shape == (copies * batch, NUM_TOKENS, TOKEN_DIM)


@pytest.mark.parametrize('num_sample_steps', [10, 50])
def test_oracle_denoiser_recovers_z0(schedule, num_sample_steps):
  """With the true eps for a known z0, deterministic DDIM lands on z0."""
  z0 = _normal(11, LATENT_SHAPE)

  def oracle_eps_fn(z_t, t, cond):
    return schedule_lib.predict_eps(schedule, z_t, t, cond)

  out = sampler_lib.ddim_sample(oracle_eps_fn, schedule, z0,
                                _normal(12, LATENT_SHAPE), num_sample_steps,
                                None)
  np.testing.assert_allclose(out, z0, atol=1e-4)


def test_strength_start(schedule):
  z_coarse, key = _normal(13, LATENT_SHAPE), jax.random.key(3)
  num_sample_steps = 20
  timesteps = schedule_lib.ddim_timesteps(T, num_sample_steps)
  for strength, expected_index in [(1.0, 19), (0.5, 9), (0.3, 5),
                                   (0.025, 0), (0.01, 0), (0.075, 1),
                                   (0.125, 2)]:  # 2.5 rounds half up
    z_start, start_index = sampler_lib.strength_start(
        schedule, z_coarse, num_sample_steps, strength, key)
    assert start_index == expected_index, strength
    assert isinstance(start_index, int)
    t = jnp.full(LATENT_SHAPE[0], timesteps[expected_index], jnp.int32)
    noise = jax.random.normal(key, LATENT_SHAPE)
    assert_close(z_start, schedule_lib.q_sample(schedule, z_coarse, t, noise),
                 rtol=1e-6)
  # Low strength keeps the coarse latent nearly intact.
  z_start, _ = sampler_lib.strength_start(schedule, z_coarse,
                                          num_sample_steps, 0.01, key)
  assert_close(z_start, z_coarse, rtol=1e-2)


def test_oracle_from_strength_start_recovers_z0(schedule):
  z0 = _normal(14, LATENT_SHAPE)
  z_coarse = z0 + 0.5 * _normal(15, LATENT_SHAPE)
  z_start, start_index = sampler_lib.strength_start(
      schedule, z_coarse, 20, 0.4, jax.random.key(0))
  assert start_index == 7
  out = sampler_lib.ddim_sample(
      lambda z_t, t, cond: schedule_lib.predict_eps(schedule, z_t, t, cond),
      schedule, z0, z_start, 20, None, start_index=start_index)
  np.testing.assert_allclose(out, z0, atol=1e-4)


def test_sample_ensemble_equals_sequential_samples(schedule):
  eps_fn = sampler_lib.guided_eps_fn(_fake_denoiser(), 1.0)
  cond = _cond()

  def sample_fn(key):
    start_key, sample_key = jax.random.split(key)
    z_start = jax.random.normal(start_key, LATENT_SHAPE)
    return sampler_lib.ddim_sample(eps_fn, schedule, cond, z_start, 4,
                                   sample_key, eta=0.5)

  keys = jax.random.split(jax.random.key(21), 3)
  ensemble = sampler_lib.sample_ensemble(sample_fn, keys)
  assert ensemble.shape == (3,) + LATENT_SHAPE
  single = jax.jit(sample_fn)
  sequential = jnp.stack([single(keys[k]) for k in range(3)])
  assert_close(ensemble, sequential, rtol=1e-5)
  assert float(jnp.max(jnp.abs(ensemble[0] - ensemble[1]))) > 1e-2


def test_ensemble_stats():
  probs = np.random.default_rng(0).random((5, 2, 6, 7)).astype(np.float32)
  mean, variance = sampler_lib.ensemble_stats(jnp.asarray(probs))
  assert mean.shape == variance.shape == (2, 6, 7)
  np.testing.assert_allclose(mean, probs.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(variance, probs.var(axis=0, ddof=0), rtol=1e-5,
                             atol=1e-7)
  _, one = sampler_lib.ensemble_stats(jnp.asarray(probs[:1]))
  np.testing.assert_array_equal(one, 0.0)


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize('scale', [-0.1, float('inf'), float('nan')])
def test_guidance_rejects_bad_scales(scale):
  with pytest.raises(ValueError, match='guidance_scale'):
    sampler_lib.guided_eps_fn(_fake_denoiser(), scale)


@pytest.mark.parametrize('sample', [sampler_lib.ddim_sample,
                                    sampler_lib.ddim_sample_loop])
def test_samplers_reject_bad_settings(schedule, sample):
  eps_fn = sampler_lib.guided_eps_fn(_fake_denoiser(), 0.0)
  args = (eps_fn, schedule, _cond(), _normal(5, LATENT_SHAPE))
  key = jax.random.key(0)
  for steps in (0, T + 1):
    with pytest.raises(ValueError, match='num_sample_steps'):
      sample(*args, steps, key)
  for eta in (-0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match='eta'):
      sample(*args, 10, key, eta=eta)
  for start_index in (-1, 10):
    with pytest.raises(ValueError, match='start_index'):
      sample(*args, 10, key, start_index=start_index)
  with pytest.raises(ValueError, match='key'):
    sample(*args, 10, None, eta=0.5)


def test_strength_start_rejects_bad_values(schedule):
  z_coarse, key = _normal(13, LATENT_SHAPE), jax.random.key(0)
  for strength in (0.0, -0.5, 1.01, float('nan')):
    with pytest.raises(ValueError, match='strength'):
      sampler_lib.strength_start(schedule, z_coarse, 20, strength, key)
  for steps in (0, T + 1):
    with pytest.raises(ValueError, match='num_sample_steps'):
      sampler_lib.strength_start(schedule, z_coarse, steps, 0.5, key)
