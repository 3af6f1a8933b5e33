r"""vesseljax command line.

  python -m vesseljax.launch --config=configs/chase.py [--workdir=DIR] [--mode=MODE]

Without --mode the whole job for the config runs (stats, train, evaluate,
predict), skipping finished stages and resuming a partial training run.
Modes: all, prepare, stats, train, export (params-only weights from the
best or latest checkpoint), evaluate, predict, holdout (out-of-fold coarse
maps of a k-fold run, for the refiner), train_autoencoder, evaluate_autoencoder, train_refiner,
evaluate_refined (coarse vs refined, paired, with uncertainty AUROC) and
uncertainty (refined maps + variance pictures for --input photos). Override config fields
with e.g. --config.train.num_steps=500 or --config.data.root=/data/retina.
"""

import logging
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (default ~/vesseljax_runs/<dataset>).')
_MODE = flags.DEFINE_enum('mode', 'all', ['all', 'prepare', 'stats', 'train', 'export', 'evaluate', 'predict',
                                           'holdout', 'train_autoencoder', 'train_refiner', 'train_refiner_ablations',
                                           'evaluate_autoencoder', 'evaluate_refined', 'uncertainty'],
                          'What to run.')
_INPUT = flags.DEFINE_string('input', None, 'predict, uncertainty: a photo or a folder of photos.')
_OUTPUT = flags.DEFINE_string('output', None, 'predict: output folder (default <workdir>/predictions).')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Call jax.distributed.initialize() first (one process per host; the coordinator '
    'address, process count and id come from the cluster environment or JAX_COORDINATOR_ADDRESS, '
    'JAX_NUM_PROCESSES, JAX_PROCESS_ID).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'evaluate, holdout, predict, uncertainty: replace existing result files.')

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.parse_flags_with_absl()
  if _MULTIHOST.value:
    # jax reads JAX_COORDINATOR_ADDRESS itself; the process count and id from here.
    env = {'num_processes': 'JAX_NUM_PROCESSES', 'process_id': 'JAX_PROCESS_ID'}
    jax.distributed.initialize(**{k: int(os.environ[v]) for k, v in env.items() if v in os.environ})
  if not jax.config.jax_compilation_cache_dir:
    # Re-runs and resumed runs skip XLA compilation (tens of seconds per program on a CPU).
    jax.config.update('jax_compilation_cache_dir', str(pathlib.Path.home() / '.cache' / 'vesseljax' / 'xla'))
  logging.getLogger('vesseljax').setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.WARNING)  # Orbax logs every save at INFO
  config = _CONFIG.value
  from vesseljax.data import sources  # pylint: disable=g-import-not-at-top
  sources.resolve_data_root(config, os.environ.get('VESSELJAX_DATA_DIR'))
  workdir = pathlib.Path(_WORKDIR.value or pathlib.Path.home() / 'vesseljax_runs' / config.data.name)
  workdir.mkdir(parents=True, exist_ok=True)
  # One record per mode: a later evaluate or predict call does not replace the training run's.
  (workdir / f'config_{_MODE.value}.json').write_text(config.to_json_best_effort(indent=2))
  logging.getLogger('vesseljax').info('jax %s on %s (%d device(s)); workdir %s', jax.__version__, jax.default_backend(),
               jax.local_device_count(), workdir)
  command = 'python -m vesseljax.launch ' + ' '.join(sys.argv[1:])
  from vesseljax.data.sample import DataError  # pylint: disable=g-import-not-at-top
  from vesseljax.train.coarse import CheckpointError  # pylint: disable=g-import-not-at-top
  from vesseljax.train.loops import TrainingError  # pylint: disable=g-import-not-at-top
  from vesseljax.refine import SamplingError  # pylint: disable=g-import-not-at-top
  try:
    _dispatch(config, workdir, command)
  except (DataError, CheckpointError, TrainingError, SamplingError, FileExistsError, FileNotFoundError) as e:
    # These carry messages naming the file and the problem: show them, not a traceback.
    logging.getLogger('vesseljax').error('%s: %s', type(e).__name__, e)
    sys.exit(2)


def _dispatch(config, workdir: pathlib.Path, command: str) -> None:
  from vesseljax import stages  # pylint: disable=g-import-not-at-top
  mode = _MODE.value
  if mode == 'all':
    stages.run_all(config, workdir, command)
  elif mode == 'prepare':
    stages.prepare(config, workdir)
  elif mode == 'stats':
    stages.stats(config, workdir)
  elif mode == 'train':
    stages.train(config, workdir)
  elif mode == 'export':
    stages.export(config, workdir)
  elif mode == 'evaluate':
    stages.evaluate(config, workdir, command, overwrite=_OVERWRITE.value)
  elif mode == 'holdout':
    stages.holdout(config, workdir, overwrite=_OVERWRITE.value)
  elif mode == 'train_autoencoder':
    stages.train_autoencoder(config, workdir)
  elif mode == 'train_refiner':
    stages.train_refiner(config, workdir)
  elif mode == 'train_refiner_ablations':
    stages.train_refiner_ablations(config, workdir)
  elif mode == 'evaluate_autoencoder':
    stages.evaluate_autoencoder(config, workdir, command, overwrite=_OVERWRITE.value)
  elif mode == 'evaluate_refined':
    stages.evaluate_refined(config, workdir, command, overwrite=_OVERWRITE.value)
  elif mode == 'uncertainty':
    if not _INPUT.value:
      raise app.UsageError('--mode=uncertainty needs --input=FILE_OR_DIR')
    if stages.uncertainty(config, workdir, _INPUT.value, _OUTPUT.value, _OVERWRITE.value):
      sys.exit(1)
  elif mode == 'predict':
    if not _INPUT.value:
      raise app.UsageError('--mode=predict needs --input=FILE_OR_DIR')
    if stages.predict_images(config, workdir, _INPUT.value, _OUTPUT.value, _OVERWRITE.value):
      sys.exit(1)


def run():
  flags.mark_flags_as_required(['config'])
  app.run(main)


if __name__ == '__main__':
  run()
