r"""In-fold coarse maps: a coarse model's maps of the training images it was trained on.

  python launch/infold_maps.py --config=configs/drive.py \
      --checkpoint=weights/drive_lunet_ra.msgpack --out=$HOME/runs/drive_infold/holdout_maps.npz

Written in the format of `--mode=holdout` (ids, prob, ra_map as uint8 x 255 at
the working size, fov), so `--config.diffusion.coarse_source=oof` with
`--config.diffusion.coarse_maps=<out>` trains a refiner on them. These are
*not* out-of-fold maps: the model saw these images, so their errors are
smaller than on the test split (SPEC.md asks for out-of-fold pairs; this is the
comparison a CPU can afford, where full-length folds cannot be; BUILD_NOTES.md).
The file's `source` entry says 'in-fold' and names the checkpoint.
"""

import os
import pathlib
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Dataset config file.', lock_config=False)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Params-only coarse checkpoint (.msgpack).', required=True)
_OUT = flags.DEFINE_string('out', None, 'The .npz to write (not replaced if it exists).', required=True)


def main(argv):
  del argv
  from vesseljax import predict, stages  # pylint: disable=g-import-not-at-top
  from vesseljax.data import sources  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  sources.resolve_data_root(config, os.environ.get('VESSELJAX_DATA_DIR'))
  out = pathlib.Path(_OUT.value)
  if out.exists():
    raise FileExistsError(f'{out} exists; remove it first')
  predictor = predict.CoarsePredictor(_CHECKPOINT.value, config.data, config.model.impl)
  data = sources.to_arrays(sources.load_samples(config.data, 'train', None), config.data)
  out.parent.mkdir(parents=True, exist_ok=True)
  stages.write_coarse_maps(out, predictor, data, source=np.array(f'in-fold: {_CHECKPOINT.value}'))
  print(f'wrote in-fold maps of {len(data.ids)} training images to {out}')


if __name__ == '__main__':
  app.run(main)
