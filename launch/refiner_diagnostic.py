"""The set-up the refiner diagnostics share (refine_degraded.py, probe_denoiser.py).

Importing this module defines their common flags: --config, --workdir (holds
refiner.msgpack and autoencoder.msgpack, as for --mode=evaluate_refined),
--out and --max_images.
"""

import os
import pathlib

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file('config', None, 'Dataset config file.', lock_config=False)
WORKDIR = flags.DEFINE_string('workdir', None, 'Holds refiner.msgpack and autoencoder.msgpack.', required=True)
OUT = flags.DEFINE_string('out', None, 'Results JSON (per-image rows, summary); refuses to overwrite.',
                          required=True)
MAX_IMAGES = flags.DEFINE_integer('max_images', 0, 'Score the first N images of the split (0: all).')


def setup():
  """(config, refined predictor, samples of config.eval.split, out path) from the flags.

  Raises:
    FileExistsError: --out exists (results are never replaced).
  """
  from vesseljax import stages  # pylint: disable=g-import-not-at-top
  from vesseljax.data import sources  # pylint: disable=g-import-not-at-top
  config = CONFIG.value
  sources.resolve_data_root(config, os.environ.get('VESSELJAX_DATA_DIR'))
  out = pathlib.Path(OUT.value)
  if out.exists():
    raise FileExistsError(f'{out} exists; remove it first')
  workdir = pathlib.Path(WORKDIR.value)
  predictor = stages.refined_predictor(config, workdir)
  samples = sources.load_samples(config.data, config.eval.split, sources.tfds_dir(config.data, workdir))
  return config, predictor, samples[:MAX_IMAGES.value or None], out
