"""DRIVE: 20 training / 20 test images, 565x584.

  python -m vesseljax.launch --config=configs/drive.py --workdir=$HOME/runs/drive

Working size 576x560 (H, W): near-native (DRIVE is 584x565) and divisible by 16.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # so configs/ imports from anywhere
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config():
  config = base.get_config()
  config.data.name = 'drive'
  config.data.image_size = (576, 560)
  config.data.num_val = 2
  return config
