"""Evaluate and predict stages, checkpoint checks, and the launch entry point end to end."""

import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config
from vesseljax import predict, stages
from vesseljax.data import sources
from vesseljax.evaluate import metrics, report
from vesseljax.train import coarse, loops


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny LU-Net+RA trained for a few steps on synthetic images."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config()
  loops.train_coarse(config, workdir)
  return config, workdir


def test_evaluate_writes_rows_that_match_the_metrics(trained):
  config, workdir = trained
  result = stages.evaluate(config, workdir, command='pytest')
  saved = json.loads((workdir / 'eval_test.json').read_text())
  assert [r['id'] for r in saved['rows']] == [s.id for s in sources.load_samples(config.data, 'test')]
  assert saved['meta']['working_size_hw'] == [64, 64] and saved['meta']['threshold'] == 0.5
  assert set(metrics.METRICS) <= set(saved['summary'])
  # Recompute one row independently: native-size probabilities, inside the FOV.
  sample = sources.load_samples(config.data, 'test')[0]
  predictor = predict.CoarsePredictor(workdir / 'params.msgpack', config.data)
  want = metrics.image_metrics(predictor(sample.image), sample.label, sample.fov, 0.5)
  assert result['rows'][0]['dice'] == pytest.approx(want['dice'], abs=1e-6)
  assert result['rows'][0]['auc'] == pytest.approx(want['auc'], abs=1e-6)
  assert (workdir / 'eval_test.md').read_text().count('|') > 10
  with pytest.raises(FileExistsError, match='eval_test.json'):
    stages.evaluate(config, workdir)


def test_evaluate_scores_maps_resized_back_to_the_native_size(trained, tmp_path):
  """Native size (70x90) differs from the working size (64x64): scores use the resized-back map."""
  _, workdir = trained
  config = tiny_config()
  config.data.synthetic_size = (70, 90)
  config.eval.checkpoint = str(workdir / 'params.msgpack')
  result = stages.evaluate(config, tmp_path)
  predictor = predict.CoarsePredictor(workdir / 'params.msgpack', config.data)
  samples = sources.load_samples(config.data, 'test')
  for sample, row in zip(samples, result['rows'], strict=True):
    assert sample.label.shape == (70, 90)
    work = predictor.probs_at_work_size(predictor.preprocess(sample.image)[None])[0]
    assert work.shape == (64, 64)
    native = np.clip(cv2.resize(work.astype(np.float32), (90, 70), interpolation=cv2.INTER_LINEAR), 0, 1)
    pred, label = native[sample.fov] >= 0.5, sample.label[sample.fov]
    dice = 2 * np.sum(pred & label) / (np.sum(pred) + np.sum(label))
    assert row['dice'] == pytest.approx(dice, abs=1e-6)
    assert row['auc'] == pytest.approx(metrics.image_metrics(native, sample.label, sample.fov)['auc'], abs=1e-6)


def test_evaluate_reads_compare_to_first_and_pairs_the_shared_images(trained, tmp_path, monkeypatch):
  _, workdir = trained
  config = tiny_config()
  config.eval.checkpoint = str(workdir / 'params.msgpack')
  for name in 'abcd':
    (tmp_path / name).mkdir()
  scored = []
  native_probs = predict.native_probs
  monkeypatch.setattr(predict, 'native_probs', lambda *a: scored.append(1) or native_probs(*a))
  config.eval.compare_to = str(tmp_path / 'missing.json')
  with pytest.raises(FileNotFoundError, match='missing.json'):
    stages.evaluate(config, tmp_path / 'a')
  assert not scored  # refused before any image was scored
  config.eval.compare_to, config.eval.max_images = '', 1
  stages.evaluate(config, tmp_path / 'b')
  config.eval.compare_to, config.eval.max_images = str(tmp_path / 'b' / 'eval_test.json'), 0
  both = stages.evaluate(config, tmp_path / 'c')  # 2 images against a file with the first one
  assert len(both['rows']) == 2
  assert both['meta']['wilcoxon_vs']['n'] == 1 and both['meta']['wilcoxon_vs']['only_a'] == 1
  report.write_results(tmp_path / 'other.json', [{'id': 'elsewhere/1', 'dice': 0.5}], {}, {})
  config.eval.compare_to = str(tmp_path / 'other.json')
  with pytest.raises(stages.DataError, match='scores none'):
    stages.evaluate(config, tmp_path / 'd')
  assert not (tmp_path / 'd' / 'eval_test.json').exists()


def test_predict_writes_maps_and_skips_unreadable_inputs(trained, tmp_path):
  config, workdir = trained
  inputs = tmp_path / 'in'
  inputs.mkdir()
  sample = sources.load_samples(config.data, 'test')[0]
  big = cv2.resize(sample.image, (90, 70))  # any size, not the working size
  cv2.imwrite(str(inputs / 'photo.jpg'), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
  (inputs / 'broken.png').write_bytes(b'not a png at all')
  cv2.imwrite(str(inputs / 'dark.png'), np.zeros((40, 50, 3), np.uint8))  # no field of view to find
  predictor = predict.CoarsePredictor(workdir / 'params.msgpack', config.data)
  written, errors = predict.predict_files(predictor, predict.list_inputs(inputs), tmp_path / 'out')
  assert written == 1 and len(errors) == 2
  assert 'broken.png' in errors[0] and 'dark.png' in errors[1] and 'no field of view' in errors[1]
  before = (tmp_path / 'out' / 'photo_prob.png').read_bytes()
  with pytest.raises(FileExistsError, match='photo_prob.png'):  # nothing is replaced silently
    predict.predict_files(predictor, predict.list_inputs(inputs), tmp_path / 'out')
  assert (tmp_path / 'out' / 'photo_prob.png').read_bytes() == before
  assert predict.predict_files(predictor, [inputs / 'photo.jpg'], tmp_path / 'out', overwrite=True) == (1, [])
  cv2.imwrite(str(inputs / 'photo.png'), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
  with pytest.raises(stages.DataError, match='photo.jpg and .*photo.png'):
    predict.list_inputs(inputs)
  prob = cv2.imread(str(tmp_path / 'out' / 'photo_prob.png'), cv2.IMREAD_UNCHANGED)
  mask = cv2.imread(str(tmp_path / 'out' / 'photo_mask.png'), cv2.IMREAD_UNCHANGED)
  over = cv2.imread(str(tmp_path / 'out' / 'photo_overlay.png'), cv2.IMREAD_UNCHANGED)
  assert prob.dtype == np.uint16 and prob.shape == (70, 90)
  assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and mask.shape == (70, 90)
  assert over.shape == (70, 90, 3)
  np.testing.assert_array_equal(mask == 255, (prob / 65535.0) >= 0.5 - 1e-4)


def test_missing_and_incompatible_checkpoints_are_named(trained, tmp_path):
  config, workdir = trained
  with pytest.raises(coarse.CheckpointError, match='nothing.msgpack: checkpoint file not found'):
    predict.CoarsePredictor(tmp_path / 'nothing.msgpack', config.data)
  # A checkpoint whose sidecar claims another architecture.
  bad = tmp_path / 'bad.msgpack'
  bad.write_bytes((workdir / 'params.msgpack').read_bytes())
  sidecar = json.loads(pathlib.Path(str(workdir / 'params.msgpack') + '.json').read_text())
  sidecar['model']['widths'] = [8, 8, 8, 8]
  sidecar['model_hash'] = coarse.spec_hash(sidecar['model'])
  pathlib.Path(str(bad) + '.json').write_text(json.dumps(sidecar))
  with pytest.raises(coarse.CheckpointError, match='bad.msgpack: checkpoint does not fit the model'):
    predict.CoarsePredictor(bad, config.data)
  corrupt = tmp_path / 'corrupt.msgpack'
  corrupt.write_bytes(b'\x00garbage')
  pathlib.Path(str(corrupt) + '.json').write_text(json.dumps(sidecar))
  with pytest.raises(coarse.CheckpointError, match='corrupt.msgpack: not a readable msgpack'):
    predict.CoarsePredictor(corrupt, config.data)


def _launch(*args, cwd=REPO_ROOT):
  env = dict(os.environ, JAX_PLATFORMS='cpu')  # keeps conftest's 4 devices and XLA cache
  return subprocess.run([sys.executable, '-m', 'vesseljax.launch', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


# conftest.tiny_config() as flags: the same programs, so the XLA cache serves them.
TINY_FLAGS = [
    '--config=configs/synthetic.py', '--config.data.image_size=(64,64)',
    '--config.data.synthetic_size=(64,64)', '--config.data.synthetic_num_train=5',
    '--config.data.synthetic_num_test=2', '--config.data.num_val=1',
    '--config.model.widths=(4,8,8,16)', '--config.model.bottleneck=16',
    '--config.train.batch_size=4', '--config.train.patch_size=32', '--config.train.num_steps=6',
    '--config.train.warmup_steps=2', '--config.train.log_every=2', '--config.train.eval_every=3',
    '--config.train.checkpoint_every=2', '--config.eval.batch_size=2',
]


def test_launch_runs_the_whole_job_and_then_skips_it(tmp_path):
  proc = _launch(*TINY_FLAGS, f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ('stats.json', 'params.msgpack', 'eval_test.json', 'eval_test.md', 'config_all.json'):
    assert (tmp_path / name).exists(), name
  for kind in ('prob', 'mask', 'overlay'):
    assert len(list((tmp_path / 'predictions').glob(f'*_{kind}.png'))) == 2, kind
  assert 'Outputs in' in proc.stderr
  again = _launch(*TINY_FLAGS, f'--workdir={tmp_path}')
  assert again.returncode == 0 and 'training done already' in again.stderr


def test_launch_reports_bad_input_without_a_traceback(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  proc = _launch('--config=configs/drive.py', f'--config.data.root={empty}', '--mode=stats',
                 f'--workdir={tmp_path / "w"}')
  assert proc.returncode == 2
  assert 'DataError' in proc.stderr and str(empty) in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = _launch(*TINY_FLAGS, '--mode=predict', f'--workdir={tmp_path / "w"}')
  assert proc.returncode != 0 and '--input' in proc.stderr


def test_fold_split_partitions_the_training_images():
  data = sources.to_arrays(sources.load_samples(tiny_config().data, 'train'), tiny_config().data)
  held = [sources.fold_split(data, 3, k)[1].ids for k in range(3)]
  assert sorted(sum(held, [])) == sorted(data.ids)  # every image held out exactly once
  assert [len(h) for h in held] == [2, 2, 1]
  rest, out = sources.fold_split(data, 3, 1)
  assert not set(rest.ids) & set(out.ids) and len(rest) + len(out) == len(data)
  np.testing.assert_array_equal(out.images, data.images[2:4])
  with pytest.raises(sources.DataError, match='data.fold=3'):
    sources.fold_split(data, 3, 3)
  with pytest.raises(sources.DataError, match='num_folds=9'):
    sources.fold_split(data, 9, 0)


def test_holdout_maps_come_from_a_model_that_never_saw_them(tmp_path):
  config = tiny_config()
  config.data.num_folds, config.data.fold = 2, 1
  config.train.num_steps = 2
  data = sources.to_arrays(sources.load_samples(config.data, 'train'), config.data)
  train, val = loops.training_images(config, data)
  _, held = sources.fold_split(data, 2, 1)
  assert not set(held.ids) & (set(train.ids) | set(val.ids))
  loops.train_coarse(config, tmp_path)
  path = stages.holdout(config, tmp_path)
  maps = np.load(path)
  assert list(maps['ids']) == held.ids
  assert maps['prob'].shape == maps['ra_map'].shape == (len(held), 64, 64)
  assert maps['prob'].dtype == np.uint8
  # Same numbers as the predictor's working-size probabilities.
  predictor = predict.CoarsePredictor(tmp_path / 'params.msgpack', config.data)
  want = predictor.probs_at_work_size(held.images)
  np.testing.assert_allclose(maps['prob'] / 255, want, atol=0.5 / 255 + 1e-6)
  with pytest.raises(FileExistsError):
    stages.holdout(config, tmp_path)
  config.data.fold = 0  # the checkpoint was trained without fold 1, not fold 0
  with pytest.raises(coarse.CheckpointError, match='not be out-of-fold'):
    stages.holdout(config, tmp_path, overwrite=True)


def test_resuming_a_run_with_another_model_is_refused(tmp_path):
  config = tiny_config()
  config.train.num_steps = 2
  loops.train_coarse(config, tmp_path)
  config.model.name = 'lunet'
  with pytest.raises(coarse.CheckpointError, match='run_model.json: this run was started with'):
    loops.train_coarse(config, tmp_path)
  config.model.name = 'lunet_ra'
  config.train.num_steps = 4  # another cosine schedule: not a resume of this run either
  with pytest.raises(coarse.CheckpointError, match="'num_steps': 2"):
    loops.train_coarse(config, tmp_path)


def test_test_time_flips_average_the_mirrored_predictions(trained):
  config, workdir = trained
  images = sources.to_arrays(sources.load_samples(config.data, 'test'), config.data).images
  plain = predict.CoarsePredictor(workdir / 'params.msgpack', config.data)
  four = predict.CoarsePredictor(workdir / 'params.msgpack', config.data, flips=4)
  views = [plain.probs_at_work_size(np.ascontiguousarray(np.flip(images, axis=a) if a else images))
           for a in ((), (2,), (1,), (1, 2))]
  unflipped = [views[0], np.flip(views[1], 2), np.flip(views[2], 1), np.flip(views[3], (1, 2))]
  np.testing.assert_allclose(four.probs_at_work_size(images), np.mean(unflipped, axis=0), atol=1e-6)
  with pytest.raises(ValueError, match='eval.flips'):
    predict.CoarsePredictor(workdir / 'params.msgpack', config.data, flips=3)
