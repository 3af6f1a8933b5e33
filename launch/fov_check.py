r"""Derived field-of-view masks against the ones DRIVE and HRF ship (IoU per image).

  python launch/fov_check.py --root=../shared/datasets
"""

import pathlib
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_ROOT = flags.DEFINE_string('root', '../shared/datasets', 'Folder holding DRIVE/ and HRF/.')


def main(argv):
  del argv
  from vesseljax.data import datasets  # pylint: disable=g-import-not-at-top
  for name in ('drive', 'hrf'):
    ious = {}
    for split in datasets.SPLITS:
      for files in datasets.list_split(name, _ROOT.value, split):
        rgb = datasets.read_rgb(files.image)
        shipped = datasets.read_binary_mask(files.fov)
        derived = datasets.derive_fov(rgb)
        ious[files.id] = (derived & shipped).sum() / (derived | shipped).sum()
    worst = min(ious, key=ious.get)
    values = np.array(list(ious.values()))
    print(f'{name}: {len(values)} images, IoU mean {values.mean():.4f}, median {np.median(values):.4f}, '
          f'min {values.min():.4f} ({worst})')


if __name__ == '__main__':
  app.run(main)
