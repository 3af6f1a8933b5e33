"""Copies a dataset for a lent GPU machine, smaller: photos re-encoded as lossless PNG.

  python launch/make_gpu_bundle.py --dataset=DRIVE --out=gpu_bundle/datasets \
      [--source=../shared/datasets] [--splits=training,test]

The device tool carries at most 64 MiB (working tree included, ~40 MB of it
tracked files). DRIVE's TIFF photos are 30 MB; as PNG (OpenCV, compression 9)
they are 16 MB. Each PNG keeps its original file name (`NN_training.tif`):
OpenCV reads an image by its content, not its extension, so the readers of
`vesseljax/data/datasets.py` load it unchanged. The script checks every
re-encoded photo decodes to the same pixels, and refuses an existing output
folder. Labels and masks are copied as they are. Only DRIVE's layout is known
here (its photos are the bulk of it; the second observer's labels are left out).
"""

import pathlib
import shutil

from absl import app, flags
import cv2
import numpy as np

DATASET = flags.DEFINE_enum('dataset', 'DRIVE', ['DRIVE'], 'Which dataset.')
SOURCE = flags.DEFINE_string('source', '../shared/datasets', 'Folder holding the dataset in its publisher\'s layout.')
OUT = flags.DEFINE_string('out', 'gpu_bundle/datasets', 'Output folder (the dataset goes in OUT/<dataset>).')
SPLITS = flags.DEFINE_list('splits', ['training', 'test'], 'DRIVE splits to copy.')


def main(argv):
  del argv
  src = pathlib.Path(SOURCE.value) / DATASET.value
  dst = pathlib.Path(OUT.value) / DATASET.value
  if not src.is_dir():
    raise SystemExit(f'{src}: not found')
  if dst.exists():
    raise SystemExit(f'{dst} exists; remove it first')
  before = after = 0
  for split in SPLITS.value:
    for sub in ('1st_manual', 'mask'):
      shutil.copytree(src / split / sub, dst / split / sub)
    (dst / split / 'images').mkdir(parents=True)
    for f in sorted((src / split / 'images').glob('*.tif')):
      image = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
      if image is None:
        raise SystemExit(f'{f}: unreadable')
      ok, png = cv2.imencode('.png', image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
      if not ok or not np.array_equal(cv2.imdecode(png, cv2.IMREAD_UNCHANGED), image):
        raise SystemExit(f'{f}: the PNG does not decode to the same pixels')
      (dst / split / 'images' / f.name).write_bytes(png.tobytes())
      before, after = before + f.stat().st_size, after + png.size
  print(f'{dst}: photos {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB (lossless PNG under the original names)')


if __name__ == '__main__':
  app.run(main)
