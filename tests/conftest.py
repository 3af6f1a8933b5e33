"""Test set-up: 4 forced CPU devices (before JAX starts) and shared fixtures."""

import os
import pathlib

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / 'shared' / 'datasets'


@pytest.fixture(scope='session')
def shared_datasets() -> pathlib.Path:
  """The real datasets beside the repo; tests needing them skip without them."""
  if not SHARED_DATASETS.is_dir():
    pytest.skip(f'real datasets not found at {SHARED_DATASETS}')
  return SHARED_DATASETS
