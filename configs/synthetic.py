"""Synthetic fundus images (embedded, no download): the quick end-to-end job.

  python -m vesseljax.launch --config=configs/synthetic.py --workdir=$HOME/runs/synthetic

Small images and a short schedule so the whole pipeline runs in minutes on a
2-core CPU; the numbers it produces say the code works, not how good it is.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # so configs/ imports from anywhere
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = base.get_config()
  config.data.name = 'synthetic'
  config.data.image_size = (256, 256)
  config.data.synthetic_size = (256, 256)
  config.data.synthetic_num_train = 12
  config.data.synthetic_num_test = 4
  config.data.num_val = 2
  config.model.widths = (16, 32, 64, 128)
  config.model.bottleneck = 256
  config.train.batch_size = 8
  config.train.patch_size = 96
  config.train.num_steps = 400
  config.train.warmup_steps = 20
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  return config
