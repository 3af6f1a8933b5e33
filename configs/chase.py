"""CHASE-DB1: 20 training (01L..10R) / 8 test (11L..14R) images, 999x960.

  python -m vesseljax.launch --config=configs/chase.py --workdir=$HOME/runs/chase

Working size 960x992 (H, W): near-native and divisible by 16.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # so configs/ imports from anywhere
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = base.get_config()
  config.data.name = 'chase_db1'
  config.data.image_size = (960, 992)
  config.data.num_val = 2
  return config
