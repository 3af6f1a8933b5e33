"""How many of an autoencoder's C latent channels the data uses.

  python launch/latent_spectrum.py --autoencoders=weights/drive_autoencoder_c4.msgpack,OTHER.msgpack \
      [--dataset=drive] [--root=../shared/datasets] [--split=train] [--size=576,560]

Encodes the split's labels (resized to the working size --size, H,W, by area
averaging, as the refiner's tiles are) with each autoencoder, and prints the
eigenvalue spectrum of the covariance of the latent vectors (one per latent
pixel): the number of directions holding 90, 99 and 99.9% of their variance,
and the leading fractions. A denoiser whose last feature map has fewer
channels than the data's directions cannot return them all (BUILD_NOTES.md,
"A C = 64 refiner").
"""

from absl import app, flags
import cv2
import jax.numpy as jnp
import numpy as np

from vesseljax.data import datasets
from vesseljax.train import coarse, refiner

AUTOENCODERS = flags.DEFINE_list('autoencoders', ['weights/drive_autoencoder_c4.msgpack'],
                                 'Exported autoencoders (.msgpack with their .json).')
DATASET = flags.DEFINE_enum('dataset', 'drive', list(datasets.DATASETS), 'Dataset.')
ROOT = flags.DEFINE_string('root', '../shared/datasets', 'Folder holding the datasets.')
SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'test'], 'Split whose labels are encoded.')
SIZE = flags.DEFINE_list('size', ['576', '560'], 'Working size H,W (divisible by 4).')


def spectrum(latents: np.ndarray) -> np.ndarray:
  """(..., C) latent vectors -> the C eigenvalues of their covariance as fractions, largest first."""
  z = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
  eig = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
  return eig / eig.sum()


def main(argv):
  del argv
  h, w = (int(x) for x in SIZE.value)
  labels = np.stack([cv2.resize(s.label.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
                     for s in datasets.load_split(DATASET.value, ROOT.value, SPLIT.value)])
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
