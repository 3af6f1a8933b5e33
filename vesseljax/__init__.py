"""vesseljax: retinal vessel segmentation in JAX/Flax.

Stages (one sub-package each): `data` (readers, preprocessing, batches,
augmentation), `models` (LU-Net+RA, autoencoder, denoiser), `diffusion`
(schedule, sampler), `train` (states, steps, loops), `evaluate` (metrics,
reports). `vesseljax.launch` is the command line.
"""

__version__ = "0.1.0"
