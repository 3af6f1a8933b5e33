"""The pipeline's stages, one library function per `--mode` of `vesseljax.launch`.

Each stage is `stage(config, workdir, **options)`, writes only under `workdir`
(or the output folder it is given), and is safe to re-run: `run_all` skips a
stage whose outputs are complete and resumes a partial training run from its
Orbax checkpoint.
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
import re
import shutil
import time
from typing import Optional

import numpy as np

from vesseljax.data import datasets, preprocess, sources
from vesseljax.data.sample import DataError
from vesseljax.evaluate import metrics, report

log = logging.getLogger('vesseljax')


def prepare(config, workdir: pathlib.Path) -> dict:
  """Builds (or verifies) the TFDS array_record copy of the dataset; counts per split."""
  name = config.data.name
  counts = {}
  if name == 'synthetic':
    for split in ('train', 'test'):
      counts[split] = len(sources.load_samples(config.data, split))
    log.info('synthetic data is generated on the fly: %s', counts)
    return counts
  from vesseljax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  manual_dir = datasets.resolve_dataset_dir(name, config.data.root)
  builder = tfds_builders.build(name, manual_dir, sources.tfds_dir(config.data, workdir))
  for split in ('train', 'test'):
    counts[split] = builder.info.splits[split].num_examples
    expected = len(datasets.list_split(name, config.data.root, split))
    if counts[split] != expected:
      raise DataError(f'{builder.data_dir}: TFDS {split} split has {counts[split]} examples, '
                      f'the folder {manual_dir} has {expected}; delete the build to redo it')
  log.info('TFDS %s ready in %s: %s', name, builder.data_dir, counts)
  return counts


def observer_rows(samples) -> list[dict]:
  """Second observer scored against the first, per image, inside the FOV."""
  rows = []
  for s in samples:
    if s.observer2 is None:
      continue
    row = metrics.image_metrics_both(s.observer2.astype(np.float32), s.label, s.fov, 0.5)
    rows.append({'id': s.id, **row})
  return rows


def stats(config, workdir: pathlib.Path) -> dict:
  """Per-split counts, image sizes, vessel fraction inside the FOV, and the observer baseline."""
  out = {'dataset': config.data.name}
  for split in ('train', 'test'):
    samples = sources.load_samples(config.data, split, sources.tfds_dir(config.data, workdir))
    frac = [float(s.label[s.fov].mean()) for s in samples]
    sizes = sorted({f'{s.image.shape[1]}x{s.image.shape[0]}' for s in samples})
    split_stats = {'count': len(samples), 'sizes_wxh': sizes,
                   'vessel_fraction_in_fov_mean': float(np.mean(frac)),
                   'vessel_fraction_in_fov_std': float(np.std(frac)),
                   'fov_fraction_mean': float(np.mean([s.fov.mean() for s in samples])),
                   'with_observer2': sum(s.observer2 is not None for s in samples)}
    rows = observer_rows(samples)
    if rows:
      split_stats['observer2'] = metrics.summarize(rows)
      split_stats['observer2_rows'] = rows
    out[split] = split_stats
    log.info('%s %s: %d images, sizes %s, vessel fraction in FOV %.3f +- %.3f, %d with observer 2',
             config.data.name, split, len(samples), sizes, np.mean(frac), np.std(frac),
             split_stats['with_observer2'])
    if rows:
      s = split_stats['observer2']
      log.info('  second observer vs first (n=%d): Dice %.4f +- %.4f, AUC %.4f, Acc %.4f, Se %.4f, Sp %.4f',
               s['dice']['n'], s['dice']['mean'], s['dice']['std'], s['auc']['mean'],
               s['accuracy']['mean'], s['sensitivity']['mean'], s['specificity']['mean'])
  path = workdir / 'stats.json'
  workdir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2, default=float))
  log.info('wrote %s', path)
  return out


def train(config, workdir: pathlib.Path):
  from vesseljax.train import loops  # pylint: disable=g-import-not-at-top
  return loops.train_coarse(config, workdir)


def export(config, workdir: pathlib.Path) -> pathlib.Path:
  from vesseljax.train import loops  # pylint: disable=g-import-not-at-top
  return loops.export_run(config, workdir)


def checkpoint_path(config, workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(config.eval.checkpoint) if config.eval.checkpoint else workdir / 'params.msgpack'


def evaluate(config, workdir: pathlib.Path, command: str = '', overwrite: bool = False) -> dict:
  """Scores the coarse checkpoint on `config.eval.split` at native resolution inside the FOV.

  Writes `<workdir>/eval_<split>.json` (per-image rows + summary + meta) and
  `<workdir>/eval_<split>.md`; adds a Wilcoxon test against `config.eval.compare_to`.
  """
  from vesseljax import predict  # pylint: disable=g-import-not-at-top
  split = config.eval.split
  out_json = workdir / f'eval_{split}.json'
  if out_json.exists() and not overwrite:
    raise FileExistsError(f'{out_json} exists; remove it or pass --overwrite to replace it')
  ckpt = checkpoint_path(config, workdir)
  predictor = predict.CoarsePredictor(ckpt, config.data, config.model.impl, config.eval.flips)
  samples = sources.load_samples(config.data, split, sources.tfds_dir(config.data, workdir))
  if config.eval.max_images:
    samples = samples[:config.eval.max_images]
  other = None
  if config.eval.compare_to:  # read and checked before the images are scored, not after
    other = report.read_results(config.eval.compare_to)
    if not {s.id for s in samples} & {r['id'] for r in other['rows']}:
      raise DataError(f'{config.eval.compare_to}: eval.compare_to scores none of the {len(samples)} '
                      f'{split} images scored here')
  rows, t0 = [], time.time()
  for i, s in enumerate(samples):
    prob = predict.native_probs(predictor, [s.image])[0]
    rows.append({'id': s.id, **metrics.image_metrics_both(prob, s.label, s.fov, config.eval.threshold)})
    log.info('evaluate %d/%d %s Dice %.4f AUC %.4f (%.1f s/image)', i + 1, len(samples), s.id,
             rows[-1]['dice'], rows[-1]['auc'], (time.time() - t0) / (i + 1))
  summary = metrics.summarize(rows)
  meta = {'dataset': config.data.name, 'split': split, 'method': predictor.sidecar['model']['name'],
          'checkpoint': str(ckpt), 'working_size_hw': list(predictor.work_size),
          'threshold': config.eval.threshold, 'protocol': 'inside FOV, native resolution',
          'test_time_flips': config.eval.flips, 'command': command, 'date': datetime.date.today().isoformat()}
  pvalues = None
  if other is not None:  # paired on the images both files score
    test = report.compare_rows(rows, other['rows'], 'dice')
    meta['wilcoxon_vs'] = {'file': config.eval.compare_to, 'method': other['meta'].get('method'), **test}
    pvalues = {meta['method']: test['p_value']}
  report.write_results(out_json, rows, summary, meta, overwrite=overwrite)
  table = report.markdown_table({meta['method']: summary}, pvalues=pvalues)
  (workdir / f'eval_{split}.md').write_text(
      f'# {config.data.name} {split}, inside FOV, native resolution, threshold {config.eval.threshold}\n\n'
      f'{table}\n\n{report.per_image_markdown(rows, metrics.METRICS)}\n')
  log.info('%s\nwrote %s', table, out_json)
  return {'rows': rows, 'summary': summary, 'meta': meta}


def to_u8(prob: np.ndarray) -> np.ndarray:
  """Probabilities in [0, 1] -> uint8 (x 255, rounded), as the saved maps store them."""
  return np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)


def write_coarse_maps(out: pathlib.Path, predictor, data, **extra) -> None:
  """The coarse maps of `data`'s images (an ArrayDataset) as a holdout_maps.npz file (format: `holdout`).

  Written to a temporary file first, then moved onto `out`; `extra` arrays are stored beside them.
  """
  probs, ras = zip(*(predictor.maps(image) for image in data.images))
  tmp = out.with_suffix('.tmp.npz')
  np.savez_compressed(tmp, ids=np.array(data.ids), prob=to_u8(np.stack(probs)), ra_map=to_u8(np.stack(ras)),
                      fov=data.fovs, **extra)
  tmp.replace(out)


def holdout(config, workdir: pathlib.Path, overwrite: bool = False) -> pathlib.Path:
  """Out-of-fold coarse maps: the run's model on the training images it never saw.

  Needs a run trained with `data.num_folds` > 0; writes
  `<workdir>/holdout_maps.npz` with `ids` (N,), `prob` and `ra_map` (N, H, W)
  uint8 (value x 255, at the working resolution: 8 bits are plenty for a
  conditioning map, and 16 bits made the DRIVE folds 4.5x larger, 4.1 MB per
  5 images, too large to ship back from a GPU machine), `fov` (N, H, W) bool.

  Raises:
    CheckpointError: the checkpoint was trained on another fold (its maps would
      be in-fold, i.e. of images it was trained on).
  """
  from vesseljax import predict  # pylint: disable=g-import-not-at-top
  from vesseljax.train import coarse  # pylint: disable=g-import-not-at-top
  d = config.data
  if not d.num_folds:
    raise ValueError('--mode=holdout needs a k-fold run: set --config.data.num_folds and --config.data.fold')
  out = workdir / 'holdout_maps.npz'
  if out.exists() and not overwrite:
    raise FileExistsError(f'{out} exists; remove it or pass --overwrite to replace it')
  ckpt = checkpoint_path(config, workdir)
  predictor = predict.CoarsePredictor(ckpt, d, config.model.impl)
  trained_on = (predictor.sidecar.get('num_folds'), predictor.sidecar.get('fold'))
  if trained_on != (d.num_folds, d.fold):
    raise coarse.CheckpointError(
        f'{ckpt}: trained with num_folds, fold = {trained_on}, asked for held-out fold '
        f'{d.fold} of {d.num_folds}; its maps would not be out-of-fold')
  data = sources.to_arrays(sources.load_samples(d, 'train', sources.tfds_dir(config.data, workdir)), d)
  _, held = sources.fold_split(data, d.num_folds, d.fold)
  write_coarse_maps(out, predictor, held)
  log.info('wrote out-of-fold maps of %d images (%s) to %s', len(held), ', '.join(held.ids), out)
  return out


def predict_images(config, workdir: pathlib.Path, inputs: str, output: Optional[str],
                   overwrite: bool = False) -> int:
  """Segments photos; returns the number of unreadable inputs (the launch exits non-zero on any)."""
  from vesseljax import predict  # pylint: disable=g-import-not-at-top
  predictor = predict.CoarsePredictor(checkpoint_path(config, workdir), config.data, config.model.impl,
                                       config.eval.flips)
  out_dir = pathlib.Path(output) if output else workdir / 'predictions'
  written, errors = predict.predict_files(predictor, predict.list_inputs(inputs), out_dir,
                                          config.eval.threshold, overwrite)
  log.info('wrote maps for %d image(s) to %s; %d error(s)', written, out_dir, len(errors))
  for e in errors:
    log.error('  %s', e)
  return len(errors)


def train_autoencoder(config, workdir: pathlib.Path) -> pathlib.Path:
  from vesseljax.train import refiner_loops  # pylint: disable=g-import-not-at-top
  return refiner_loops.train_autoencoder(config, workdir)


def train_refiner(config, workdir: pathlib.Path) -> pathlib.Path:
  from vesseljax.train import refiner_loops  # pylint: disable=g-import-not-at-top
  return refiner_loops.train_refiner(config, workdir)


def train_refiner_ablations(config, workdir: pathlib.Path) -> dict:
  """The `diffusion.ablations` refiners, from scratch in one vmapped step (train/refiner_sweep.py).

  Each is exported to `<workdir>/<variant>/refiner.msgpack`; evaluate one with
  `--mode=evaluate_refined --workdir=<workdir>/<variant>`.
  """
  from vesseljax.train import refiner_sweep  # pylint: disable=g-import-not-at-top
  names = [n.strip() for n in str(config.diffusion.ablations).split(',') if n.strip()]
  return refiner_sweep.train_refiner_sweep(config, workdir, names)


def evaluate_autoencoder(config, workdir: pathlib.Path, command: str = '', overwrite: bool = False) -> dict:
  """Reconstruction of the `config.eval.split` labels by the mask autoencoder.

  Each label, at the working size, goes through encode and decode (sigmoid);
  the reconstruction is resized back to native size and scored against the
  native label inside the FOV (threshold eval.threshold), as any prediction.
  Writes `<workdir>/eval_autoencoder_<split>.json`.

  With `diffusion.ae_eval_input='coarse'` the input is instead the coarse
  model's probability map (diffusion.coarse_checkpoint, else the workdir's
  params.msgpack): what a refiner that learned the identity would output. The
  rows are then paired with the coarse map's own (Wilcoxon) and the file is
  `eval_autoencoder_<split>_coarse.json`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vesseljax.data import refine_data  # pylint: disable=g-import-not-at-top
  from vesseljax.train import refiner, refiner_loops  # pylint: disable=g-import-not-at-top
  split, source = config.eval.split, config.diffusion.ae_eval_input
  if source not in ('label', 'coarse'):
    raise ValueError(f"diffusion.ae_eval_input must be 'label' or 'coarse', got {source!r}")
  out_json = workdir / f'eval_autoencoder_{split}{"_coarse" if source == "coarse" else ""}.json'
  if out_json.exists() and not overwrite:
    raise FileExistsError(f'{out_json} exists; remove it or pass --overwrite to replace it')
  coarse_model = None
  if source == 'coarse':
    from vesseljax import predict  # pylint: disable=g-import-not-at-top
    coarse_ckpt = config.diffusion.coarse_checkpoint or checkpoint_path(config, workdir)
    coarse_model = predict.CoarsePredictor(coarse_ckpt, config.data, config.model.impl)
  path = refiner_loops.autoencoder_path(config, workdir)
  sidecar, variables = refiner.load_checked(path, 'mask_autoencoder')
  ae = refiner.create_autoencoder(sidecar['model'])
  reconstruct = jax.jit(lambda v, m: jax.nn.sigmoid(ae.apply(v, m)))
  size = sources.work_size(config.data)
  rows, coarse_rows, saved = [], [], {'prob': [], 'coarse': []}
  thr = config.eval.threshold
  samples = sources.load_samples(config.data, split, sources.tfds_dir(config.data, workdir))
  for s in samples:
    if coarse_model is None:
      mask, _ = refine_data.label_fov(s, size)
    else:
      mask, _ = coarse_model.maps(coarse_model.preprocess(s.image))
      saved['coarse'].append(preprocess.to_native(mask, s.label.shape))
      coarse_rows.append({'id': s.id, **metrics.image_metrics_both(saved['coarse'][-1], s.label, s.fov, thr)})
    recon = np.asarray(reconstruct(variables, jnp.asarray(mask, jnp.float32)[None, ..., None]))[0, ..., 0]
    saved['prob'].append(preprocess.to_native(recon, s.label.shape))
    rows.append({'id': s.id, **metrics.image_metrics_both(saved['prob'][-1], s.label, s.fov, thr)})
  summary = metrics.summarize(rows)
  meta = {'dataset': config.data.name, 'split': split, 'method': f'autoencoder C={sidecar["model"]["latent_channels"]}',
          'checkpoint': str(path), 'autoencoder': sidecar, 'working_size_hw': list(size),
          'protocol': f'{source} -> encode -> decode at the working size, native resolution, inside FOV',
          'command': command, 'date': datetime.date.today().isoformat()}
  if coarse_model is not None:
    meta.update(coarse_checkpoint=str(coarse_ckpt), coarse_rows=coarse_rows,
                coarse_summary=metrics.summarize(coarse_rows),
                wilcoxon_vs_coarse=metrics.wilcoxon(rows, coarse_rows, 'dice'))
  report.write_results(out_json, rows, summary, meta, overwrite=overwrite)
  if coarse_model is not None:  # the maps of 'a refiner that learned the identity', for analysis
    write_maps(workdir / f'maps_autoencoder_{split}_coarse.npz', [s.id for s in samples], saved)
  log.info('autoencoder reconstruction of %d %s %s maps: Dice %.4f +- %.4f; wrote %s', len(rows), split,
           source, summary['dice']['mean'], summary['dice']['std'], out_json)
  return {'rows': rows, 'summary': summary, 'meta': meta}


def refined_predictor(config, workdir: pathlib.Path):
  """The coarse model (diffusion.coarse_checkpoint, else eval.checkpoint, else <workdir>/params.msgpack)
  with the workdir's refiner and autoencoder, sampling as config.sample says."""
  from vesseljax import refine  # pylint: disable=g-import-not-at-top
  from vesseljax.train import refiner_loops  # pylint: disable=g-import-not-at-top
  coarse_ckpt = config.diffusion.coarse_checkpoint or checkpoint_path(config, workdir)
  return refine.RefinedPredictor(
      coarse_ckpt, workdir / 'refiner.msgpack', refiner_loops.autoencoder_path(config, workdir), config.data,
      refine.SampleOptions.from_config(config.sample), config.diffusion.tile_overlap, config.model.impl)


def sampling_tag(config) -> str:
  """A file-name tag for the sampling settings, e.g. 'ddim20_g1.0_noise_k5'."""
  s = config.sample
  start = 'noise' if s.start == 'noise' else f'coarse{s.strength:g}'
  decode = '' if s.decode == 'direct' else f'_{s.decode}'
  image = '_noimage' if s.drop_image else ''
  coarse_map = '_nocoarse' if s.drop_coarse else ''
  return f'ddim{s.steps}_g{s.guidance:g}_{start}_k{s.ensemble}{decode}{image}{coarse_map}'


def evaluate_refined(config, workdir: pathlib.Path, command: str = '', overwrite: bool = False) -> dict:
  """Scores coarse and refined maps of the same run on `config.eval.split`, paired.

  Writes `<workdir>/eval_refined_<split>_<tag>.json` (refined rows with
  'uncertainty_auroc' (AUROC of the per-pixel variance for the misclassified
  pixels inside the FOV) and 'seconds', the coarse rows, Wilcoxon of refined
  vs coarse) and the markdown table beside it.

  Resumable: each scored image is kept in `<workdir>/eval_refined_<split>_<tag>.partial/`
  (its maps and rows), so a stopped run (HRF: ~2 min an image on a 2-core CPU)
  picks up at the next image when started again with the same refiner,
  autoencoder, coarse model, data and sampling settings (`refined_progress`).
  The folder is removed once the results are written.
  """
  split, tag = config.eval.split, sampling_tag(config)
  out_json = workdir / f'eval_refined_{split}_{tag}.json'
  if out_json.exists() and not overwrite:
    raise FileExistsError(f'{out_json} exists; remove it or pass --overwrite to replace it')
  predictor = refined_predictor(config, workdir)
  samples = sources.load_samples(config.data, split, sources.tfds_dir(config.data, workdir))
  if config.eval.max_images:
    samples = samples[:config.eval.max_images]
  progress = refined_progress(config, workdir, predictor, overwrite)
  done = progress.load()
  resumed = sum(s.id in done for s in samples)
  if done:
    log.info('resuming %s: %d of %d images already scored in %s', out_json.name, resumed, len(samples),
             progress.folder)
  rows, coarse_rows, saved = [], [], {'prob': [], 'coarse': [], 'variance': []}
  thr = config.eval.threshold
  for i, s in enumerate(samples):
    if s.id in done:
      row, coarse_row, maps = done[s.id]
    else:
      t0 = time.time()
      maps = predictor(s.image, name=s.id)
      seconds = time.time() - t0
      row = {'id': s.id, **metrics.image_metrics_both(maps['prob'], s.label, s.fov, thr), 'seconds': seconds}
      errors = (maps['prob'] >= thr) != s.label
      inside = s.fov
      row['uncertainty_auroc'] = (metrics.auc_roc(maps['variance'][inside], errors[inside])
                                  if 0 < errors[inside].sum() < inside.sum() else float('nan'))
      coarse_row = {'id': s.id, **metrics.image_metrics_both(maps['coarse'], s.label, s.fov, thr)}
      progress.save(i, row, coarse_row, maps)
    for k in saved:
      saved[k].append(maps[k])
    rows.append(row)
    coarse_rows.append(coarse_row)
    log.info('refine %d/%d %s Dice %.4f (coarse %.4f) AUC %.4f, variance AUROC for errors %.3f, %.1f s%s',
             i + 1, len(samples), s.id, row['dice'], coarse_row['dice'], row['auc'],
             row['uncertainty_auroc'], row['seconds'], ' (scored before, resumed)' if s.id in done else '')
  summary = metrics.summarize(rows, metrics.METRICS + ('uncertainty_auroc', 'seconds'))
  coarse_summary = metrics.summarize(coarse_rows)
  test = metrics.wilcoxon(rows, coarse_rows, 'dice')
  coarse_name = predictor.coarse.sidecar['model']['name']
  method = f'{coarse_name}+diff({config.sample.steps})'
  meta = {'dataset': config.data.name, 'split': split, 'method': method, 'sampling': config.sample.to_dict(),
          'sampling_revision': predictor.sampling_revision,
          'refiner': predictor.refiner_path, 'refiner_sidecar': predictor.sidecar,
          'autoencoder': predictor.autoencoder_path, 'autoencoder_sidecar': predictor.autoencoder_sidecar,
          'working_size_hw': list(predictor.coarse.work_size), 'threshold': thr,
          'protocol': 'inside FOV, native resolution', 'command': command,
          'date': datetime.date.today().isoformat(), 'wilcoxon_vs_coarse': test,
          'resumed_images': resumed,
          'coarse_rows': coarse_rows, 'coarse_summary': coarse_summary}
  report.write_results(out_json, rows, summary, meta, overwrite=overwrite)
  write_maps(workdir / f'maps_refined_{split}_{tag}.npz', [s.id for s in samples], saved)
  table = report.markdown_table({coarse_name: coarse_summary, method: summary},
                                pvalues={method: test['p_value']})
  (workdir / f'eval_refined_{split}_{tag}.md').write_text(
      f'# {config.data.name} {split}, inside FOV, native resolution, threshold {thr}, {tag}\n\n{table}\n\n'
      f'Variance AUROC for errors: {summary["uncertainty_auroc"]["mean"]:.3f}; '
      f'{summary["seconds"]["mean"]:.1f} s per image.\n\n{report.per_image_markdown(rows, metrics.METRICS)}\n')
  progress.remove()
  log.info('%s\nwrote %s', table, out_json)
  return {'rows': rows, 'summary': summary, 'meta': meta}


class RefinedProgress:
  """The images an `evaluate_refined` run has scored so far, one file each, in `folder`.

  `folder/spec.json` holds what the scores depend on (`refined_progress`);
  `folder/<index>_<id>.npz` (the id's characters outside [A-Za-z0-9_.-] as '_')
  holds an image's 'prob', 'coarse' and 'variance' maps at native size, stored
  as the final maps file stores them (`encode_map`), and its refined and coarse
  rows (JSON text). Each file is written to a temporary name and then renamed,
  so a stop mid-write leaves no partial file.
  """

  def __init__(self, folder: pathlib.Path, spec: dict):
    self.folder, self.spec = folder, spec

  def load(self) -> dict[str, tuple[dict, dict, dict[str, np.ndarray]]]:
    """{image id: (row, coarse_row, maps)} of the images scored before; {} for a new run."""
    done = {}
    for path in sorted(self.folder.glob('*.npz')) if self.folder.is_dir() else []:
      if path.name.endswith('.tmp.npz'):
        continue
      try:
        with np.load(path) as f:
          row, coarse_row = json.loads(str(f['row'])), json.loads(str(f['coarse_row']))
          maps = {k: decode_map(k, f[k]) for k in ('prob', 'coarse', 'variance')}
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f'{path}: unreadable saved progress ({e}); delete it to score that image again') from e
      done[row['id']] = (row, coarse_row, maps)
    return done

  def save(self, index: int, row: dict, coarse_row: dict, maps: dict[str, np.ndarray]) -> None:
    self.folder.mkdir(parents=True, exist_ok=True)
    spec_path = self.folder / 'spec.json'
    if not spec_path.exists():  # before any image, so no image file is without its spec
      tmp = spec_path.with_name('spec.json.tmp')
      tmp.write_text(json.dumps(self.spec, indent=1, sort_keys=True) + '\n')
      tmp.replace(spec_path)
    safe_id = re.sub(r'[^A-Za-z0-9_.-]', '_', row['id'])  # ids may hold '/' (synthetic/10000)
    path = self.folder / f'{index:04d}_{safe_id}.npz'
    tmp = path.with_name(path.name[:-len('.npz')] + '.tmp.npz')
    np.savez_compressed(tmp, row=json.dumps(row), coarse_row=json.dumps(coarse_row),
                        **{k: encode_map(k, maps[k]) for k in ('prob', 'coarse', 'variance')})
    tmp.replace(path)

  def remove(self) -> None:
    if self.folder.is_dir():
      shutil.rmtree(self.folder)


def refined_progress(config, workdir: pathlib.Path, predictor, overwrite: bool = False) -> RefinedProgress:
  """The progress folder of `evaluate_refined` for these settings, checked against what it was started with.

  Its spec is the SHA-256 of the refiner, autoencoder and coarse checkpoints `predictor` loaded,
  the data (name, root, split), the threshold, `config.sample` and the tile
  overlap. A folder started with another spec raises ValueError naming it and
  what differs (nothing is deleted), unless `overwrite`, which starts afresh.
  """
  from vesseljax.train import refiner_loops  # pylint: disable=g-import-not-at-top
  split, tag = config.eval.split, sampling_tag(config)
  folder = workdir / f'eval_refined_{split}_{tag}.partial'
  spec = {'refiner_sha256': refiner_loops.file_hash(predictor.refiner_path),
          'autoencoder_sha256': refiner_loops.file_hash(predictor.autoencoder_path),
          'coarse_sha256': refiner_loops.file_hash(predictor.coarse_path),
          'dataset': config.data.name, 'data_root': str(config.data.root), 'split': split,
          'threshold': float(config.eval.threshold), 'sampling': config.sample.to_dict(),
          'tile_overlap': int(config.diffusion.tile_overlap), 'impl': config.model.impl,
          'sampling_revision': predictor.sampling_revision}
  spec = json.loads(json.dumps(spec, sort_keys=True))  # tuples -> lists, as read back
  spec_path = folder / 'spec.json'
  if spec_path.exists():
    before = json.loads(spec_path.read_text())
    if before != spec:
      differ = sorted(k for k in set(before) | set(spec) if before.get(k) != spec.get(k))
      if not overwrite:
        raise ValueError(f'{folder}: partial results of a run with other settings ({", ".join(differ)} differ); '
                         'delete the folder or pass --overwrite to start again')
      log.warning('--overwrite: discarding %s (started with other %s)', folder, ', '.join(differ))
      shutil.rmtree(folder)
  return RefinedProgress(folder, spec)


def write_maps(path: pathlib.Path, ids: list[str], maps: dict[str, list[np.ndarray]]) -> pathlib.Path:
  """Saves native-size maps per image for later analysis (launch/analyze_refined.py).

  `maps` holds lists (one array per id) of 'prob' and 'coarse' probabilities in
  [0, 1], stored as uint8 (x 255, rounded), and optionally 'variance', stored as float16.
  Images differ in size, so each map is its own entry: '<key>/<id>'. Written
  to a temporary file, then renamed, so an interrupted write leaves no partial file.
  """
  arrays = {'ids': np.array(ids)}
  for key, values in maps.items():
    for image_id, value in zip(ids, values):
      arrays[f'{key}/{image_id}'] = encode_map(key, value)
  tmp = path.with_name(path.name + '.tmp.npz')
  np.savez_compressed(tmp, **arrays)
  tmp.replace(path)
  return path


def encode_map(key: str, value: np.ndarray) -> np.ndarray:
  """How a saved map is stored: 'variance' as float16, probabilities as uint8 (`to_u8`)."""
  return np.asarray(value).astype(np.float16) if key == 'variance' else to_u8(np.asarray(value))


def decode_map(key: str, stored: np.ndarray) -> np.ndarray:
  """float32 map from `encode_map`'s form (probabilities / 255)."""
  return stored.astype(np.float32) if key == 'variance' else stored.astype(np.float32) / 255.0


def read_maps(path: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
  """{id: {'prob', 'coarse' (float32 in [0, 1]), 'variance' (float32, if saved)}} from `write_maps`."""
  with np.load(path) as f:
    out = {}
    for image_id in f['ids']:
      out[str(image_id)] = {k: decode_map(k, f[f'{k}/{image_id}'])
                            for k in ('prob', 'coarse', 'variance') if f'{k}/{image_id}' in f.files}
  return out


def uncertainty(config, workdir: pathlib.Path, inputs: str, output: Optional[str],
                overwrite: bool = False) -> int:
  """Refined maps with uncertainty for photos; returns the number of unreadable inputs.

  Per photo: `<stem>_prob.png`, `<stem>_mask.png`, `<stem>_overlay.png` (as
  predict, from the refined mean), `<stem>_variance.png` (per-pixel variance
  over the ensemble, colour-mapped, 0 to 0.25 = the largest possible) and
  `<stem>_uncertain.png` (the overlay with pixels whose variance is at least
  sample.uncertain_variance in magenta).
  """
  import cv2  # pylint: disable=g-import-not-at-top
  from vesseljax import predict  # pylint: disable=g-import-not-at-top
  predictor = refined_predictor(config, workdir)
  out_dir = pathlib.Path(output) if output else workdir / 'uncertainty'
  paths = predict.list_inputs(inputs)
  predict.refuse_existing_outputs(paths, out_dir, predict.MAP_KINDS + ('variance', 'uncertain'), overwrite)
  errors = 0
  for path in paths:
    try:
      rgb, fov = predict.read_photo(path)
    except DataError as e:
      log.error('skipping %s', e)
      errors += 1
      continue
    maps = predictor(rgb, name=str(path))
    prob = np.where(fov, maps['prob'], 0.0)
    var = np.where(fov, maps['variance'], 0.0)
    predict.write_maps(out_dir, path.stem, rgb, prob, config.eval.threshold, fov)
    heat = cv2.applyColorMap(np.round(np.clip(var / 0.25, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    cv2.imwrite(str(out_dir / f'{path.stem}_variance.png'), heat)
    uncertain = var >= config.sample.uncertain_variance
    marked = predict.overlay(rgb, prob >= config.eval.threshold, highlight=uncertain)
    cv2.imwrite(str(out_dir / f'{path.stem}_uncertain.png'), cv2.cvtColor(marked, cv2.COLOR_RGB2BGR))
    log.info('%s: refined maps, variance (mean %.4f in FOV, %.2f%% of FOV pixels >= %g) in %s', path.name,
             float(var[fov].mean()), 100 * float(uncertain[fov].mean()), config.sample.uncertain_variance, out_dir)
  return errors


def write_test_inputs(config, workdir: pathlib.Path, limit: int = 2) -> pathlib.Path:
  """Writes a few test photos as PNGs (used by the synthetic demo's predict stage)."""
  import cv2  # pylint: disable=g-import-not-at-top
  folder = workdir / 'demo_inputs'
  folder.mkdir(parents=True, exist_ok=True)
  for s in sources.load_samples(config.data, 'test', sources.tfds_dir(config.data, workdir))[:limit]:
    cv2.imwrite(str(folder / f'{s.id.split("/")[-1]}.png'), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
  return folder


def run_all(config, workdir: pathlib.Path, command: str = '') -> None:
  """The whole job for one config: stats, train (resuming), evaluate, predict a few test photos."""
  t0 = time.time()
  if not (workdir / 'stats.json').exists():
    stats(config, workdir)
  if not (workdir / 'params.msgpack').exists():
    train(config, workdir)
  else:
    log.info('training done already: %s', workdir / 'params.msgpack')
  if not (workdir / f'eval_{config.eval.split}.json').exists():
    evaluate(config, workdir, command)
  if not (workdir / 'predictions').exists():
    if config.data.name == 'synthetic':
      inputs = write_test_inputs(config, workdir)
    else:
      inputs = datasets.list_split(config.data.name, config.data.root, 'test')[0].image
    predict_images(config, workdir, str(inputs), None)
  log.info('done in %.0f s. Outputs in %s: stats.json, params.msgpack, eval_%s.json/.md, predictions/',
           time.time() - t0, workdir, config.eval.split)
