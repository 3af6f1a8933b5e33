"""Test set-up: 4 forced CPU devices (before JAX starts) and shared fixtures."""

import os
import pathlib

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

# No persistent XLA compilation cache in tests (also not in the launch
# subprocesses they start, which inherit this): with one, the full suite aborted
# (SIGABRT) twice while reading back an entry written earlier in the same run
# (jax 0.10.2, compilation_cache.get_executable_and_time), though each module
# alone passed. Compiling everything costs minutes; a crash costs the run.
os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / 'shared' / 'datasets'


@pytest.fixture(scope='session')
def shared_datasets() -> pathlib.Path:
  """The real datasets beside the repo; tests needing them skip without them."""
  if not SHARED_DATASETS.is_dir():
    pytest.skip(f'real datasets not found at {SHARED_DATASETS}')
  return SHARED_DATASETS


def tiny_config():
  """configs/synthetic.py cut down to seconds: 64x64 images, a 4/8/8/16-wide LU-Net+RA."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO_ROOT))
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config()
  config.data.image_size = (64, 64)
  config.data.synthetic_size = (64, 64)
  config.data.synthetic_num_train = 5
  config.data.synthetic_num_test = 2
  config.data.num_val = 1
  config.model.widths = (4, 8, 8, 16)
  config.model.bottleneck = 16
  config.train.batch_size = 4
  config.train.patch_size = 32
  config.train.num_steps = 6
  config.train.warmup_steps = 2
  config.train.log_every = 2
  config.train.eval_every = 3
  config.train.checkpoint_every = 2
  config.eval.batch_size = 2
  return config



def tiny_refiner_config():
  """tiny_config() plus a refiner cut down to seconds: 32x32 tiles, 8x8x2 latents."""
  config = tiny_config()
  d = config.diffusion
  d.latent_channels = 2
  d.ae_widths = (4, 4, 4)
  d.image_widths = (4, 4, 8)
  d.token_grid = 2
  d.widths = (8, 8, 16, 16)
  d.num_res_blocks = 1
  d.num_heads = 2
  d.tile_size = 32
  d.tile_overlap = 8
  d.degrade_variants = 2
  d.ae_steps = 4
  d.ae_batch_size = 4
  d.num_steps = 4
  d.batch_size = 4
  d.warmup_steps = 1
  d.log_every = 2
  d.checkpoint_every = 2
  s = config.sample
  s.steps = 3
  s.ensemble = 2
  s.tile_batch = 2
  return config


@pytest.fixture(scope='module')
def fast_compiles():
  """Most XLA optimisations off (STYLE.md 7) for a module's compiles: `pytestmark = pytest.mark.usefixtures('fast_compiles')`."""
  import jax  # pylint: disable=g-import-not-at-top
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def assert_close(actual, expected, rtol=1e-5):
  """Max abs error within rtol of the expected array's max magnitude."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = max(float(np.max(np.abs(expected))), 1e-12)
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rtol * scale, f'max error {err:.3g} > {rtol} * {scale:.3g}'
