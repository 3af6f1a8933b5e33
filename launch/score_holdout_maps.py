r"""Dice of out-of-fold coarse maps (holdout_maps.npz) against the training labels.

  python launch/score_holdout_maps.py --config=configs/drive.py \
      --config.data.root=../shared/datasets $HOME/runs/drive_oof/fold*/holdout_maps.npz

Scored at the working size inside the FOV, threshold 0.5 (the maps are stored
at the working size): how good the refiner's out-of-fold training inputs are.
"""

import os
import pathlib
import sys

import numpy as np
from absl import app
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Dataset config file.', lock_config=False)


def main(argv):
  from vesseljax.data import refine_data, sources  # pylint: disable=g-import-not-at-top
  from vesseljax.evaluate import metrics  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  sources.resolve_data_root(config, os.environ.get('VESSELJAX_DATA_DIR'))
  paths = argv[1:]
  if not paths:
    raise app.UsageError('name one or more holdout_maps.npz files')
  samples = {s.id: s for s in sources.load_samples(config.data, 'train', None)}
  size = sources.work_size(config.data)
  maps = refine_data.read_holdout_maps(paths)
  dice = {}
  for image_id, (prob, _) in maps.items():
    if image_id not in samples:
      raise ValueError(f'{image_id}: not a training image of {config.data.name}')
    label, fov = refine_data.label_fov(samples[image_id], size)
    dice[image_id] = metrics.image_metrics(prob, label, fov, 0.5)['dice']
    print(f'{image_id}  Dice {dice[image_id]:.3f}')
  values = np.array(list(dice.values()))
  print(f'{len(values)} images: Dice {values.mean():.3f} +- {values.std():.3f} (min {values.min():.3f})')


if __name__ == '__main__':
  app.run(main)
