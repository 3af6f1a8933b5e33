"""How many of an autoencoder's C latent channels the data uses.

  python launch/latent_spectrum.py --config=configs/drive.py \
      --autoencoders=weights/drive_autoencoder_c4.msgpack,OTHER.msgpack [--split=train]

Encodes the split's labels at the config's working size, binarised as in the
refiner's training tiles (`refine_data.label_fov`), with each autoencoder, and
prints the eigenvalue spectrum of the covariance of the latent vectors (one
per latent pixel): the number of directions holding 90, 99 and 99.9% of their
variance, and the leading fractions. A denoiser whose last feature map has
fewer channels than the data's directions cannot return them all
(BUILD_NOTES.md, "A C = 64 refiner").
"""

import os

from absl import app, flags
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vesseljax.data import refine_data, sources
from vesseljax.train import coarse, refiner

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Dataset config file.', lock_config=False)
AUTOENCODERS = flags.DEFINE_list('autoencoders', ['weights/drive_autoencoder_c4.msgpack'],
                                 'Exported autoencoders (.msgpack with their .json).')
SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'test'], 'Split whose labels are encoded.')


def spectrum(latents: np.ndarray) -> np.ndarray:
  """(..., C) latent vectors -> the C eigenvalues of their covariance as fractions, largest first."""
  z = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
  eig = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
  return eig / eig.sum()


def main(argv):
  del argv
  config = _CONFIG.value
  sources.resolve_data_root(config, os.environ.get('VESSELJAX_DATA_DIR'))
  size = sources.work_size(config.data)
  labels = np.stack([refine_data.label_fov(s, size)[0]
                     for s in sources.load_samples(config.data, SPLIT.value)]).astype(np.float32)
  for path in AUTOENCODERS.value:
    sidecar, variables = coarse.load_params(path)
    ae = refiner.create_autoencoder(sidecar['model'])
    frac = spectrum(np.asarray(refiner.encode_masks(ae, variables['params'], jnp.asarray(labels),
                                                    sidecar['latent_scale'])))
    needed = [int(np.searchsorted(np.cumsum(frac), q) + 1) for q in (0.9, 0.99, 0.999)]
    print(f'{path}: C = {frac.size}; directions for 90 / 99 / 99.9% of the variance: {needed}; '
          f'leading fractions {np.round(frac[:8], 4).tolist()}')


if __name__ == '__main__':
  app.run(main)
