r"""Where the refiner gains or loses against the coarse model: errors by vessel width.

  python launch/analyze_refined.py --config=configs/drive.py \
      --maps=$W/maps_refined_test_ddim20_g1_coarse0.5_k5.npz --out=results/drive/width_errors.json

Reads the native-size maps that `--mode=evaluate_refined` saves beside its
results (refined mean probability and coarse probability per image), scores
both against the labels inside the FOV at the config's threshold with
`vesseljax.evaluate.width.error_breakdown` (sensitivity on thin < 3 px,
medium 3-4 px and thick >= 5 px vessels; false positives near / far from
vessels), and prints per-class means with paired Wilcoxon p-values; also the
Dice of the plain mean of the two maps (a diagnostic, not a pipeline option).
"""

import json
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Dataset config file.', lock_config=False)
_MAPS = flags.DEFINE_string('maps', None, 'maps_refined_*.npz written by --mode=evaluate_refined.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Write the per-image rows and summary here (JSON); refuses to overwrite.')

KEYS = ('dice', 'sens_thin', 'sens_medium', 'sens_thick', 'fp_near', 'fp_far')


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vesseljax import stages  # pylint: disable=g-import-not-at-top
  from vesseljax.data import sources  # pylint: disable=g-import-not-at-top
  from vesseljax.evaluate import metrics, width  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  sources.resolve_data_root(config, os.environ.get('VESSELJAX_DATA_DIR'))
  out = pathlib.Path(_OUT.value) if _OUT.value else None
  if out is not None and out.exists():
    raise FileExistsError(f'{out} exists; remove it first')
  maps = stages.read_maps(pathlib.Path(_MAPS.value))
  samples = {s.id: s for s in sources.load_samples(config.data, config.eval.split, None)}
  thr = config.eval.threshold
  rows = {'refined': [], 'coarse': [], 'mean': []}
  for image_id, m in maps.items():
    if image_id not in samples:
      raise ValueError(f'{_MAPS.value}: {image_id} is not a {config.eval.split} image of {config.data.name}')
    s = samples[image_id]
    if m['prob'].shape != s.label.shape:
      raise ValueError(f'{_MAPS.value}: {image_id} maps are {m["prob"].shape}, its label {s.label.shape}')
    classes = width.width_classes(s.label)
    fused = (m['prob'] + m['coarse']) / 2
    for name, prob in (('refined', m['prob']), ('coarse', m['coarse']), ('mean', fused)):
      rows[name].append({'id': image_id, 'dice': metrics.image_metrics(prob, s.label, s.fov, thr)['dice'],
                         **width.error_breakdown(prob, s.label, s.fov, thr, classes=classes)})
  summary = {}
  print(f'{len(rows["refined"])} images; label pixels per image: '
        + ', '.join(f'{c} {np.mean([r["n_" + c] for r in rows["coarse"]]):.0f}' for c in width.WIDTH_CLASSES))
  print(f'{"":12s} {"coarse":>8s} {"refined":>8s} {"diff":>8s}  Wilcoxon p')
  for key in KEYS:
    a = np.array([r[key] for r in rows['refined']])
    b = np.array([r[key] for r in rows['coarse']])
    test = metrics.wilcoxon(rows['refined'], rows['coarse'], key)
    summary[key] = {'coarse': float(b.mean()), 'refined': float(a.mean()), 'p_value': test['p_value'],
                    'refined_higher': int((a > b).sum()), 'n': len(a)}
    print(f'{key:12s} {b.mean():8.4f} {a.mean():8.4f} {a.mean() - b.mean():+8.4f}  {test["p_value"]:.2g}'
          f' (refined higher on {(a > b).sum()} of {len(a)})')
  test = metrics.wilcoxon(rows['mean'], rows['coarse'], 'dice')
  summary['mean_of_coarse_and_refined_dice'] = {'dice': float(np.mean([r['dice'] for r in rows['mean']])), **test}
  print(f'the mean of the coarse and refined maps: Dice {summary["mean_of_coarse_and_refined_dice"]["dice"]:.4f}, '
        f'vs coarse {test["mean_diff"]:+.4f}, p = {test["p_value"]:.2g}')
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'maps': _MAPS.value, 'threshold': config.eval.threshold, 'summary': summary,
                               'rows': rows, 'command': ' '.join(sys.argv)}, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
