r"""Speed and memory of the coarse model: prints a table and writes JSON.

  python launch/benchmark.py --out=results/benchmark_cpu.json
  python launch/benchmark.py --impls=fast --repeats=3 --figures=infer_b1,train_b16_p128

Figures per implementation ('fast': shifted depthwise + matmul 1x1 + exact 2x
upsample; 'reference': grouped conv + 1x1 conv + jax.image.resize):
  flops                  XLA's flop count for one 512x512 forward, and the parameter count
  infer_b1, infer_b8     LU-Net+RA forward, eval mode, 512x512, seconds per image
  train_b4_512           one pmapped train step (augmentation, loss, AdamW), 4x512x512
  train_b16_p128         the same at 16x128x128 patches (the CPU training setting)
Each with its compile time and XLA's memory estimate (arguments + temporaries,
from `compiled.memory_analysis()`), plus the process's peak RSS at the end.
Timings are medians over --repeats runs after one warm-up.
"""

import json
import pathlib
import platform
import resource
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_OUT = flags.DEFINE_string('out', None, 'JSON file to write (refuses to overwrite unless --overwrite).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists.')
_IMPLS = flags.DEFINE_list('impls', ['fast', 'reference'], 'Implementations to measure.')
_FIGURES = flags.DEFINE_list('figures', ['infer_b1', 'infer_b8', 'train_b4_512', 'train_b16_p128'],
                             'Figures to measure.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repetitions per figure.')
_MODEL = flags.DEFINE_enum('model', 'lunet_ra', ['lunet', 'lunet_ra'], 'Which coarse model.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (config.model.dtype).')


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _memory_mb(compiled):
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
  except Exception:  # backend without memory analysis
    return None


def measure(impl, figure, repeats, model_name, dtype='float32'):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from vesseljax.train import coarse, loops, steps  # pylint: disable=g-import-not-at-top

  config = base.get_config()
  config.model.name = model_name
  config.model.impl = impl
  config.model.dtype = dtype
  rng = np.random.default_rng(0)
  if figure == 'flops':
    model = coarse.create_model(config.model)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 512, 512, 1)), train=False))
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
    cost = fn.lower(variables, jax.ShapeDtypeStruct((1, 512, 512, 1), jnp.float32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {'xla_gflop_per_image': float(cost['flops']) / 1e9,
            'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params'])))}
  if figure.startswith('infer'):
    batch = int(figure.split('_b')[1])
    model = coarse.create_model(config.model)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 512, 512, 1)), train=False))(jax.random.key(0))
    x = jnp.asarray(rng.random((batch, 512, 512, 1), np.float32))
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
    t0 = time.perf_counter()
    compiled = fn.lower(variables, x).compile()
    compile_s = time.perf_counter() - t0
    compiled(variables, x).block_until_ready()
    sec = _median_time(lambda: compiled(variables, x).block_until_ready(), repeats)
    return {'seconds_per_call': sec, 'seconds_per_image': sec / batch, 'images_per_second': batch / sec,
            'compile_s': compile_s, 'xla_memory_mb': _memory_mb(compiled)}
  batch, size = (4, 512) if figure == 'train_b4_512' else (16, 128)
  config.train.batch_size, config.train.patch_size = batch, size
  model = coarse.create_model(config.model, norm_axis_name=steps.AXIS)
  state = loops.build_train_state(config, model, 1)
  step = steps.make_pmapped_train_step(loops.make_augment_fn(config), loops.loss_kwargs(config),
                                       devices=jax.local_devices()[:1])
  data = {'image': rng.random((1, batch, size, size, 1), np.float32),
          'label': (rng.random((1, batch, size, size)) > 0.9).astype(np.float32),
          'fov': np.ones((1, batch, size, size), np.float32)}
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step.lower(state, data, key).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}
  def run():
    holder['state'], metrics = compiled(holder['state'], data, key)
    jax.block_until_ready(metrics)
  run()
  sec = _median_time(run, repeats)
  return {'seconds_per_step': sec, 'images_per_second': batch / sec, 'compile_s': compile_s,
          'xla_memory_mb': _memory_mb(compiled)}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  results = {'jax': jax.__version__, 'backend': jax.default_backend(),
             'device': str(jax.devices()[0].device_kind), 'cpu_count': __import__('os').cpu_count(),
             'machine': platform.machine(), 'model': _MODEL.value, 'dtype': _DTYPE.value, 'repeats': _REPEATS.value,
             'command': 'python launch/benchmark.py ' + ' '.join(sys.argv[1:]), 'figures': {}}
  out = pathlib.Path(_OUT.value) if _OUT.value else None
  if out and out.exists() and not _OVERWRITE.value:
    raise app.UsageError(f'{out} exists; pass --overwrite to replace it')
  print(f"{'impl':<10} {'figure':<16} {'time':>10} {'img/s':>8} {'compile':>9} {'XLA MB':>8}")
  for impl in _IMPLS.value:
    for figure in _FIGURES.value:
      r = measure(impl, figure, _REPEATS.value, _MODEL.value, _DTYPE.value)
      results['figures'][f'{impl}/{figure}'] = r
      if figure == 'flops':
        print(f"{impl:<10} {figure:<16} {r['xla_gflop_per_image']:>7.1f} GFLOP/image (XLA count), "
              f"{r['params']:,} params", flush=True)
        continue
      t = r.get('seconds_per_image', r.get('seconds_per_step'))
      unit = 's/img' if 'seconds_per_image' in r else 's/step'
      mem = r['xla_memory_mb']
      print(f"{impl:<10} {figure:<16} {t:>7.3f} {unit:<6} {r['images_per_second']:>6.1f} "
            f"{r['compile_s']:>8.1f}s {mem if mem is None else round(mem):>8}", flush=True)
      _write(out, results)  # after every figure: a run cut short keeps what it measured
  results['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  stats = _device_memory_stats()
  if stats:
    results['device_peak_mb'] = stats.get('peak_bytes_in_use', 0) / 2**20
  print(f"peak RSS {results['peak_rss_mb']:.0f} MB" +
        (f", device peak {results['device_peak_mb']:.0f} MB" if stats else ''))
  _write(out, results)
  if out:
    print(f'wrote {out}')


def _device_memory_stats() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return jax.devices()[0].memory_stats() or {}
  except Exception:  # CPU backends have none
    return {}


def _write(out, results) -> None:
  if out:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
  app.run(main)
