r"""Speed of the latent-diffusion refiner's sampler: prints a table and writes JSON.

  python launch/benchmark_refiner.py --out=results/benchmark_refiner_cpu.json

Figures, for one 512x512 image (a 128x128xC latent; the default config's
denoiser with random weights, which time exactly like trained ones), guidance
on (one batched forward of 2 inputs per step):
  ddim_N            DDIM with N steps (--steps), one trajectory: s/image
  ensemble_vmap_k   k trajectories vmapped in one compiled call (N = 20)
  ensemble_seq_k    the same k trajectories one after another (N = 20)
  loop_N            the Python-loop reference sampler (jitted eps, N = 20)
  forward_b2        one denoiser forward at batch 2 (the unit of a guided step)
Each with its compile time. Timings are medians over --repeats after a warm-up.
"""

import json
import pathlib
import platform
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_OUT = flags.DEFINE_string('out', None, 'JSON file to write (refuses to overwrite unless --overwrite).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists.')
_STEPS = flags.DEFINE_list('steps', ['10', '20', '50'], 'DDIM step counts for the ddim_N figures.')
_K = flags.DEFINE_integer('k', 5, 'Ensemble size.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repetitions per figure.')
_SIZE = flags.DEFINE_integer('size', 512, 'Image side (the latent is size / 4).')
_FIGURES = flags.DEFINE_list('figures', ['forward_b2', 'ddim', 'loop', 'ensemble_vmap', 'ensemble_seq'],
                             'Which figures.')


def _timed(fn, repeats):
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0  # compile + one run
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return {'seconds': med, 'compile_s': max(first - med, 0.0)}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from vesseljax.diffusion import sampler, schedule as schedule_lib  # pylint: disable=g-import-not-at-top
  from vesseljax.train import refiner, refiner_loops  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(_OUT.value) if _OUT.value else None
  if out and out.exists() and not _OVERWRITE.value:
    raise app.UsageError(f'{out} exists; pass --overwrite to replace it')
  config = base.get_config()
  d = config.diffusion
  spec = refiner.refiner_spec(d)
  models = {'image_encoder': refiner.create_image_encoder(spec), 'denoiser': refiner.create_denoiser(spec)}
  params = refiner_loops.init_refiner_params(models, jax.random.key(0), d.tile_size, d.latent_channels)
  # Zero-initialised output layers make eps = 0; perturb so the sampler does real work.
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(jax.random.key(i), x.shape)
                                     for i, x in enumerate(leaves)])
  h = _SIZE.value // refiner.LATENT_DOWNSAMPLE
  c = d.latent_channels
  rgb = jnp.zeros((1, _SIZE.value, _SIZE.value, 3))
  tokens, pooled = models['image_encoder'].apply({'params': params['image_encoder']}, rgb)
  cond = {'coarse_latent': jnp.zeros((1, h, h, c)), 'ra_map': jnp.zeros((1, h, h, 1)),
          'tokens': tokens, 'pooled': pooled}
  schedule = schedule_lib.cosine_schedule(d.timesteps)

  def denoise_fn(z, t, cond, drop):
    return refiner.denoise(models, params, z, t, cond, drop)

  eps_fn = sampler.guided_eps_fn(denoise_fn, 1.0)

  def sample(n):
    return jax.jit(lambda key: sampler.ddim_sample(eps_fn, schedule, cond, jax.random.normal(key, (1, h, h, c)),
                                                   n, None))

  results = {'jax': jax.__version__, 'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
             'machine': platform.machine(), 'image_size': _SIZE.value, 'latent': [h, h, c],
             'denoiser_params': int(sum(x.size for x in jax.tree.leaves(params['denoiser']))),
             'command': 'python launch/benchmark_refiner.py ' + ' '.join(sys.argv[1:]), 'figures': {}}
  key = jax.random.key(1)
  keys = jax.random.split(key, _K.value)
  figures = {}
  if 'forward_b2' in _FIGURES.value:
    fwd = jax.jit(lambda z: denoise_fn(z, jnp.zeros((2,), jnp.int32),
                                       jax.tree.map(lambda x: jnp.concatenate([x, x]), cond), jnp.array([False, True])))
    z2 = jnp.zeros((2, h, h, c))
    figures['forward_b2'] = lambda: fwd(z2).block_until_ready()
  for n in map(int, _STEPS.value):
    if 'ddim' in _FIGURES.value:
      fn = sample(n)
      figures[f'ddim_{n}'] = lambda fn=fn: fn(key).block_until_ready()
  if 'loop' in _FIGURES.value:
    jit_eps = jax.jit(eps_fn)
    figures['loop_20'] = lambda: sampler.ddim_sample_loop(
        jit_eps, schedule, cond, jax.random.normal(key, (1, h, h, c)), 20, None).block_until_ready()
  one = sample(20)
  if 'ensemble_vmap' in _FIGURES.value:
    vmapped = jax.jit(jax.vmap(lambda k: sampler.ddim_sample(
        eps_fn, schedule, cond, jax.random.normal(k, (1, h, h, c)), 20, None)))
    figures[f'ensemble_vmap_{_K.value}'] = lambda: vmapped(keys).block_until_ready()
  if 'ensemble_seq' in _FIGURES.value:
    figures[f'ensemble_seq_{_K.value}'] = lambda: [one(k).block_until_ready() for k in keys]
  print(f"{'figure':<18} {'s/image':>9} {'compile':>9}")
  for name, fn in figures.items():
    r = _timed(fn, _REPEATS.value)
    results['figures'][name] = r
    print(f"{name:<18} {r['seconds']:>9.3f} {r['compile_s']:>8.1f}s", flush=True)
    if out:
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(results, indent=2))
  if out:
    print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
