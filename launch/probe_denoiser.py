r"""How good is the refiner's one-step estimate of x0? Dice of D(x0_hat) by timestep.

  python launch/probe_denoiser.py --config=configs/drive.py --workdir=$W \
      --config.diffusion.coarse_checkpoint=weights/drive_lunet_ra.msgpack \
      --timesteps=50,100,250,500,750 --out=results/drive/denoiser_probe.json

A diagnostic, not a pipeline option. For each test image (the refiner and
autoencoder in `$W`, conditioned as at sampling on the coarse model's map, its
RA map and the photo; guidance config.sample.guidance) and each timestep t,
the tiles' latents are noised to t in one step,
z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, and the denoiser is called once:
x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), decoded and blended
over the tiles as `refine.py` does. Two latents z are noised:
  'label'   the autoencoder latent of the ground truth: the training target,
            so this is the denoiser's own task on unseen images;
  'coarse'  the coarse map's latent: what sampling from the coarse latent
            (sample.start=coarse) starts from.
Scored at the WORKING size inside the working-size FOV (threshold
eval.threshold), against the label resized there, beside the coarse map and
the label's autoencoder round trip at the same size. The noise is drawn from
PRNG key fold_in(fold_in(key(seed), image index), t), the same for both latents.
"""

import datetime
import json
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import refiner_diagnostic  # pylint: disable=g-import-not-at-top,wrong-import-position

_TIMESTEPS = flags.DEFINE_list('timesteps', ['50', '100', '250', '500', '750'], 'Timesteps t in [0, T).')


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vesseljax import refine  # pylint: disable=g-import-not-at-top
  from vesseljax.data import preprocess, refine_data  # pylint: disable=g-import-not-at-top
  from vesseljax.diffusion import sampler  # pylint: disable=g-import-not-at-top
  from vesseljax.evaluate import metrics  # pylint: disable=g-import-not-at-top
  from vesseljax.train import refiner  # pylint: disable=g-import-not-at-top
  config, p, samples, out = refiner_diagnostic.setup()
  timesteps = [int(t) for t in _TIMESTEPS.value]
  if not all(0 <= t < p.schedule.num_steps for t in timesteps):
    raise ValueError(f'--timesteps must lie in [0, {p.schedule.num_steps}), got {timesteps}')
  ae = p.models['autoencoder']
  force_drop = not p.use_image

  @jax.jit
  def x0_probs(tiles, z, t, key):
    """Decoded one-step x0 estimates (B, T, T) from latents z (B, h, w, C) noised to timestep t."""
    cond = refiner.conditioning(p.models, p.params, p.ae_params, p.scale, tiles, use_ra=p.use_ra)
    denoise_fn = lambda z_t, tt, c, drop: refiner.denoise(p.models, p.params, z_t, tt, c, drop | force_drop)
    eps_fn = sampler.guided_eps_fn(denoise_fn, 0.0 if force_drop else float(config.sample.guidance))
    abar = p.schedule.alphas_cumprod[t]
    eps = jax.random.normal(key, z.shape)
    z_t = jnp.sqrt(abar) * z + jnp.sqrt(1.0 - abar) * eps
    eps_hat = eps_fn(z_t, jnp.full((z.shape[0],), t, jnp.int32), cond)
    x0 = (z_t - jnp.sqrt(1.0 - abar) * eps_hat) / jnp.sqrt(abar)
    return refiner.decode_probs(ae, p.ae_params, x0, p.scale)

  encode = jax.jit(lambda m: refiner.encode_masks(ae, p.ae_params, m, p.scale))
  decode = jax.jit(lambda z: refiner.decode_probs(ae, p.ae_params, z, p.scale))
  size = p.coarse.work_size
  thr, tile = config.eval.threshold, p.tile
  names = ['coarse', 'label_roundtrip'] + [f'{src}_t{t}' for src in ('label', 'coarse') for t in timesteps]
  rows = {n: [] for n in names}
  for i, s in enumerate(samples):
    label, fov = refine_data.label_fov(s, size)
    coarse_prob, ra = p.coarse.maps(p.coarse.preprocess(s.image))
    h, w = size
    packed = refine.pack_work(preprocess.preprocess_rgb(s.image, size), coarse_prob, ra, tile)
    label_packed = np.zeros(packed.shape[:2], np.float32)
    label_packed[:h, :w] = label
    corners = refine.tile_corners(packed.shape[:2], tile, p.overlap)
    tiles = jnp.asarray(np.stack([packed[y:y + tile, x:x + tile] for y, x in corners]))
    z = {'label': encode(jnp.asarray(np.stack([label_packed[y:y + tile, x:x + tile] for y, x in corners]))),
         'coarse': encode(tiles[..., refine_data.COARSE])}

    def blend(tile_probs):
      out = refine.TileBlend(packed.shape[:2], tile, p.overlap)
      for corner, prob in zip(corners, np.asarray(tile_probs)):
        out.add(corner, prob)
      return out.result(h, w)[0]

    maps = {'coarse': coarse_prob, 'label_roundtrip': blend(decode(z['label']))}
    image_key = jax.random.fold_in(jax.random.key(config.seed), i)
    for t in timesteps:
      key = jax.random.fold_in(image_key, t)
      for src in ('label', 'coarse'):
        maps[f'{src}_t{t}'] = blend(x0_probs(tiles, z[src], t, key))
    for name in names:
      rows[name].append({'id': s.id, **metrics.image_metrics(maps[name], label, fov, thr)})
    print(f'{i + 1}/{len(samples)} {s.id}: ' + ', '.join(f'{n} {rows[n][-1]["dice"]:.3f}' for n in names),
          flush=True)
  summary = {n: {k: float(np.mean([r[k] for r in rows[n]])) for k in ('dice', 'auc', 'sensitivity', 'specificity')}
             for n in names}
  for n in names:
    print(f'{n:16s} ' + ' '.join(f'{k} {v:.4f}' for k, v in summary[n].items()))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      'meta': {'dataset': config.data.name, 'split': config.eval.split, 'threshold': thr,
               'scored_at': 'working size, inside the working-size FOV', 'timesteps': timesteps,
               'guidance': float(config.sample.guidance), 'refiner': p.refiner_path,
               'autoencoder': p.autoencoder_path, 'seed': config.seed,
               'command': 'python ' + ' '.join(sys.argv), 'date': datetime.date.today().isoformat()},
      'summary': summary, 'rows': rows}, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
