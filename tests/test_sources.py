"""The data front door: dataset choice, working size, preprocessing to arrays."""

import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from vesseljax.data import sources
from vesseljax.data.sample import DataError


@pytest.mark.parametrize('size, want', [((256,), (256, 256)), (256, (256, 256)), ((128, 96), (128, 96))])
def test_work_size_accepts_one_number_or_two(size, want):
  cfg = ml_collections.ConfigDict({'image_size': size})
  assert sources.work_size(cfg) == want


def test_work_size_must_be_divisible_by_16():
  with pytest.raises(ValueError, match='divisible by 16'):
    sources.work_size(ml_collections.ConfigDict({'image_size': (100, 96)}))


def test_synthetic_samples_become_working_size_arrays():
  config = tiny_config()
  samples = sources.load_samples(config.data, 'train')
  assert len(samples) == config.data.synthetic_num_train
  data = sources.to_arrays(samples, config.data)
  assert data.images.shape == (len(samples), 64, 64, 1) and data.images.dtype == np.float32
  assert data.labels.dtype == np.bool_ and data.fovs.dtype == np.bool_
  assert 0.0 <= data.images.min() and data.images.max() <= 1.0
  assert data.ids == [s.id for s in samples]


def test_unknown_names_and_missing_roots_are_errors():
  config = tiny_config()
  with config.unlocked():
    config.data.name = 'stare'
  with pytest.raises(DataError, match='unknown dataset'):
    sources.load_samples(config.data, 'train')
  config.data.name = 'drive'
  with pytest.raises(DataError, match='no data root'):
    sources.load_samples(config.data, 'train')
  with pytest.raises(DataError, match='unknown split'):
    sources.load_samples(config.data, 'validation')


def test_real_drive_split_through_files(shared_datasets):
  config = tiny_config()
  config.data.name = 'drive'
  config.data.root = str(shared_datasets)
  samples = sources.load_samples(config.data, 'test')
  assert len(samples) == 20 and samples[0].image.shape == (584, 565, 3)


def test_tfds_source_needs_a_build_folder_and_defaults_to_the_workdir(tmp_path):
  config = tiny_config()
  config.data.name = 'drive'
  config.data.root = str(tmp_path)
  config.data.source = 'tfds'
  with pytest.raises(DataError, match='tfds_dir'):
    sources.load_samples(config.data, 'train')
  assert sources.tfds_dir(config.data, tmp_path / 'run') == tmp_path / 'run' / 'tfds'
  config.data.tfds_dir = str(tmp_path / 'builds')
  assert sources.tfds_dir(config.data, tmp_path / 'run') == tmp_path / 'builds'


@pytest.mark.parametrize('which', ['coarse', 'refiner'])
def test_training_reads_tfds_builds_from_the_workdir_by_default(tmp_path, monkeypatch, which):
  """Training used to pass the unset data.tfds_dir (None) on to the TFDS reader."""
  from vesseljax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  from vesseljax.train import loops, refiner_loops  # pylint: disable=g-import-not-at-top
  seen = []

  class Stop(Exception):
    pass

  def fake_load(name, manual_dir, data_dir, split):
    seen.append((name, split, data_dir))
    raise Stop

  monkeypatch.setattr(tfds_builders, 'load_split_tfds', fake_load)
  monkeypatch.setattr(sources.datasets, 'resolve_dataset_dir', lambda name, root: root)
  config = tiny_config()
  config.data.name = 'drive'
  config.data.root = str(tmp_path)
  config.data.source = 'tfds'
  with pytest.raises(Stop):
    if which == 'coarse':
      loops.train_coarse(config, tmp_path / 'run')
    else:
      refiner_loops.training_tiles(config, tmp_path / 'run')
  assert seen == [('drive', 'train', tmp_path / 'run' / 'tfds')]


def test_data_root_comes_from_the_config_then_the_caller_then_the_default():
  config = tiny_config()
  config.data.name = 'drive'
  sources.resolve_data_root(config, '/from/env')
  assert config.data.root == '/from/env'
  sources.resolve_data_root(config, '/other')  # a root already set is kept
  assert config.data.root == '/from/env'
  config.data.root = None
  sources.resolve_data_root(config)
  assert config.data.root == str(sources.DEFAULT_DATA_ROOT)
