r"""Does the refiner fix the errors it was trained on? Refine degraded test labels.

  python launch/refine_degraded.py --config=configs/drive.py --workdir=$W \
      --config.diffusion.coarse_checkpoint=weights/drive_lunet_ra.msgpack --config.sample.start=coarse \
      --out=results/drive/refined_on_degraded_labels_ddim20_coarse0.5_k5.json

A diagnostic, not a pipeline option. The refiner in `$W` (refiner.msgpack
and autoencoder.msgpack, as for --mode=evaluate_refined) is given, in place
of the coarse model's map, a degraded copy of each test image's own label:
`vesseljax.data.degrade.degrade` at the working size, the degradation model
its training pairs came from (`diffusion.coarse_source='degrade'`), seeded
per image (numpy default_rng([config.seed, image index])). The images are
ones the refiner never saw; the kind of error is the one it learned to fix.
Each image is scored three ways inside the FOV at native resolution
(threshold eval.threshold): the degraded map itself, its autoencoder round
trip (encode -> decode: where a refiner that returned its input would land)
and the refined mean of config.sample.ensemble trajectories; the refined map
is paired with the other two (Wilcoxon). The coarse model is loaded (the
refiner checks that it matches) but not used.
"""

import datetime
import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import refiner_diagnostic  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vesseljax.data import degrade, preprocess, refine_data  # pylint: disable=g-import-not-at-top
  from vesseljax.evaluate import metrics, report  # pylint: disable=g-import-not-at-top
  config, predictor, samples, out = refiner_diagnostic.setup()
  ae = predictor.models['autoencoder']
  round_trip = jax.jit(lambda p, m: jax.nn.sigmoid(ae.apply({'params': p}, m)))
  size = predictor.coarse.work_size
  thr = config.eval.threshold
  rows = {'degraded': [], 'roundtrip': [], 'refined': []}
  for i, s in enumerate(samples):
    t0 = time.time()
    label, fov = refine_data.label_fov(s, size)
    prob, ra = degrade.degrade(label, fov, np.random.default_rng([config.seed, i]))
    rgb_work = preprocess.preprocess_rgb(s.image, size)
    mean, var = predictor.refine_work(rgb_work, prob, ra, s.id)
    recon = np.asarray(round_trip(predictor.ae_params, jnp.asarray(prob)[None, ..., None]))[0, ..., 0]
    native = s.label.shape
    maps = {'degraded': preprocess.to_native(prob, native), 'roundtrip': preprocess.to_native(recon, native),
            'refined': preprocess.to_native(mean, native)}
    for name, m in maps.items():
      rows[name].append({'id': s.id, **metrics.image_metrics_both(m, s.label, s.fov, thr)})
    errors = (maps['refined'] >= thr) != s.label
    variance = np.maximum(preprocess.resize(var, native), 0.0)
    rows['refined'][-1]['uncertainty_auroc'] = (metrics.auc_roc(variance[s.fov], errors[s.fov])
                                                if 0 < errors[s.fov].sum() < s.fov.sum() else float('nan'))
    print(f'{i + 1}/{len(samples)} {s.id}: Dice degraded {rows["degraded"][-1]["dice"]:.4f}, '
          f'round trip {rows["roundtrip"][-1]["dice"]:.4f}, refined {rows["refined"][-1]["dice"]:.4f} '
          f'({time.time() - t0:.1f} s)', flush=True)
  summary = {name: metrics.summarize(r, metrics.METRICS + (('uncertainty_auroc',) if name == 'refined' else ()))
             for name, r in rows.items()}
  tests = {f'refined_vs_{b}_{m}': report.compare_rows(rows['refined'], rows[b], m)
           for b in ('degraded', 'roundtrip') for m in ('dice', 'auc')}
  for name in rows:
    print(f'{name:10s} Dice {summary[name]["dice"]["mean"]:.4f} +- {summary[name]["dice"]["std"]:.4f}, '
          f'AUC {summary[name]["auc"]["mean"]:.4f}, sensitivity {summary[name]["sensitivity"]["mean"]:.3f}, '
          f'specificity {summary[name]["specificity"]["mean"]:.3f}')
  for key, t in tests.items():
    print(f'{key}: {t["mean_diff"]:+.4f}, higher on {t["higher"]} of {t["n"]}, p = {t["p_value"]:.2g}')
  print(f'variance AUROC for the refined errors: {summary["refined"]["uncertainty_auroc"]["mean"]:.3f}')
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      'meta': {'dataset': config.data.name, 'split': config.eval.split, 'threshold': thr,
               'sampling': config.sample.to_dict(), 'sampling_revision': predictor.sampling_revision,
               'refiner': predictor.refiner_path, 'autoencoder': predictor.autoencoder_path,
               'input': 'degrade.degrade(test label at the working size), rng default_rng([seed, index])',
               'seed': config.seed, 'command': 'python ' + ' '.join(sys.argv),
               'date': datetime.date.today().isoformat()},
      'summary': summary, 'tests': tests, 'rows': rows}, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
