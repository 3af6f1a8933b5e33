"""Copies a dataset for a lent GPU machine, smaller and pixel-identical.

  python launch/make_gpu_bundle.py [--dataset=drive] [--out=gpu_bundle/datasets] \
      [--source=../shared/datasets] [--splits=train,test]

The device tool carries at most 64 MiB (working tree included, ~40 MB of it
tracked files). `vesseljax.data.bundle.copy_compact` re-encodes every TIFF as
lossless PNG under its own name (the readers load it unchanged; each file is
checked) and copies everything else byte for byte. Measured (the script's
printout): DRIVE, both splits, 30.2 -> 16.7 MB (its TIFF photos); CHASE-DB1,
both, 2.3 MB as it is (JPEG, PNG); HRF's training split 35.4 -> 32.1 MB (its
15 JPEG photos, ~2 MB each, stay as they are; the labels shrink). HRF's does
not fit beside the whole tree: a device call for it leaves the weights it does
not use out of the working tree it carries (e.g. move weights/drive_refiner.msgpack
and the DRIVE and CHASE-DB1 coarse models aside for the call: 28 MB), e.g.

  python launch/make_gpu_bundle.py --dataset=hrf --splits=train
"""

from absl import app, flags

from vesseljax.data import bundle, datasets

DATASET = flags.DEFINE_enum('dataset', 'drive', list(datasets.DATASETS), 'Which dataset.')
SOURCE = flags.DEFINE_string('source', '../shared/datasets', 'Folder holding the dataset in its publisher\'s layout.')
OUT = flags.DEFINE_string('out', 'gpu_bundle/datasets', 'Output folder (the dataset goes in OUT/<publisher folder>).')
SPLITS = flags.DEFINE_list('splits', ['train', 'test'], 'Splits to copy (train, test).')


def main(argv):
  del argv
  report = bundle.copy_compact(DATASET.value, SOURCE.value, OUT.value, SPLITS.value)
  print(f'{OUT.value}/{datasets.DATASET_DIR_NAMES[DATASET.value]}: {report.files} files, '
        f'{report.source_bytes / 1e6:.1f} MB -> {report.copy_bytes / 1e6:.1f} MB')


if __name__ == '__main__':
  app.run(main)
