"""LU-Net / LU-Net+RA: shapes, parameter counts, fast form == reference form."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close

from vesseljax.models import lunet as lunet_lib

# Tiny widths keep compile and run times small on a busy 2-core CPU.
TINY = dict(widths=(4, 8, 8, 8), bottleneck=16)
# For gradient checks: every kind of part (stem, encoder, bottleneck, decoder,
# RA ladder, side outputs) at two levels, one conv per stage (compiles fast).
TINY_GRAD = dict(widths=(4, 8), bottleneck=8, convs_per_level=1, ra_convs=1)
PAPER_PARAMS = 1.94e6


def _image(seed, shape):
  # numpy, not jax.random: threefry compiles anew per shape (~1 s on CPU).
  return jnp.asarray(np.random.default_rng(seed).random(shape, np.float32))


pytestmark = pytest.mark.usefixtures('fast_compiles')  # conftest: XLA optimisations off


def _random_variables(model, x_shape, seed=0):
  """Random params and batch_stats, without compiling an init.

  Every leaf is random (zero-initialised layers matter too): kernels
  N(0, 1/fan_in), BatchNorm scales and variances 1 + 0.1 |N|, the rest
  0.1 N.
  """
  abstract = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct(x_shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == 'kernel':
      return noise / np.sqrt(math.prod(leaf.shape[:-1]))
    if name in ('scale', 'var'):
      return 1.0 + 0.1 * np.abs(noise)
    return 0.1 * noise

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _everything(model, variables, x, target):
  """Eval outputs, train outputs with new batch_stats, and loss gradients."""
  eval_out = model.apply(variables, x, train=False)

  def loss_fn(params):
    out, updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x,
        train=True, mutable=['batch_stats'])
    logits = [out['logits'], *out['side_logits']]
    loss = sum(jnp.mean((jax.nn.sigmoid(l) - target) ** 2) for l in logits)
    return loss + jnp.mean(out['ra_map']), (out, updates)

  (loss, (train_out, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(variables['params'])
  return eval_out, train_out, updates, loss, grads


@functools.lru_cache(maxsize=None)
def _jit_eval(model):
  return jax.jit(functools.partial(model.apply, train=False))


@functools.lru_cache(maxsize=None)
def _results(reverse_attention, impl, dtype_name):
  """`_everything` of the TINY_GRAD model on fixed data, as numpy arrays."""
  dtype = jnp.dtype(dtype_name)
  with jax.enable_x64(dtype == jnp.float64):
    model = lunet_lib.LUNet(reverse_attention=reverse_attention, impl=impl,
                            dtype=dtype, **TINY_GRAD)
    x = _image(1, (2, 32, 32, 1))
    target = (_image(2, (2, 32, 32, 1)) > 0.8).astype(jnp.float32)
    variables = _random_variables(model, x.shape)
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
    out = jax.jit(functools.partial(_everything, model))(
        cast(variables), cast(x), cast(target))
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize('reverse_attention', [True, False])
def test_fast_equals_reference_float64(reverse_attention):
  """Same params, same function: eval/train outputs, batch_stats, gradients.

  In float64, so the comparison is exact up to rounding (~1e-13 measured) and
  does not depend on how XLA rounds float32 (see test_float32_matches_float64
  for float32).
  """
  fast = _results(reverse_attention, 'fast', 'float64')
  ref = _results(reverse_attention, 'reference', 'float64')
  jax.tree.map(functools.partial(assert_close, rtol=1e-9), fast, ref)
  grads = fast[-1]
  assert all(np.max(np.abs(g)) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_float32_matches_float64(impl):
  """Each form in float32 is within float32 accuracy of the exact function."""
  *outputs, grads = _results(True, impl, 'float32')
  *outputs_ref, grads_ref = _results(True, 'reference', 'float64')
  jax.tree.map(functools.partial(assert_close, rtol=1e-4), outputs,
               outputs_ref)
  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
  g, g_ref = flat(grads), flat(grads_ref)
  assert np.linalg.norm(g - g_ref) <= 1e-4 * np.linalg.norm(g_ref)
  assert np.max(np.abs(g - g_ref)) <= 1e-4 * np.max(np.abs(g_ref))


def test_outputs_shapes_and_ranges():
  model = lunet_lib.lunet_ra(**TINY)
  x = _image(3, (2, 32, 48, 1))  # H != W.
  out = _jit_eval(model)(_random_variables(model, x.shape), x)
  assert set(out) == {'logits', 'side_logits', 'ra_map'}
  assert out['logits'].shape == (2, 32, 48, 1)
  assert len(out['side_logits']) == 4
  for side in (out['logits'], *out['side_logits']):
    assert side.shape == (2, 32, 48, 1)
    assert side.dtype == jnp.float32
  ra = out['ra_map']
  assert ra.shape == (2, 32, 48, 1)
  assert float(ra.min()) >= 0.0 and float(ra.max()) <= 1.0
  np.testing.assert_allclose(
      ra, 1.0 - jax.nn.sigmoid(out['side_logits'][0]), atol=1e-6)


def test_ra_ladder_starts_at_deepest_prediction():
  """RA outputs zeroed (as initialised): every prediction is upsampled P_4."""
  model = lunet_lib.lunet_ra(**TINY)
  x = _image(4, (2, 32, 48, 1))
  variables = _random_variables(model, x.shape)
  for name in [n for n in variables['params'] if n.startswith('ra_')]:
    variables['params'][name]['out'] = jax.tree.map(
        jnp.zeros_like, variables['params'][name]['out'])
  out = _jit_eval(model)(variables, x)
  deepest = out['side_logits'][-1]
  for pred in (out['logits'], *out['side_logits'][:-1]):
    # Each is P_4 after four 2x upsamplings, in stages or at the end.
    np.testing.assert_allclose(pred, deepest, atol=1e-5)


def test_default_widths_fast_equals_reference_forward():
  x = _image(6, (1, 64, 64, 1))
  variables = _random_variables(lunet_lib.lunet_ra(), x.shape)
  outs = [_jit_eval(lunet_lib.lunet_ra(impl=impl))(variables, x)
          for impl in ('fast', 'reference')]
  jax.tree.map(functools.partial(assert_close, rtol=2e-5), *outs)


def _abstract_params(model):
  return jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jnp.zeros((1, 32, 32, 1)))['params']


def test_param_counts():
  n_ra = lunet_lib.count_params(_abstract_params(lunet_lib.lunet_ra()))
  n_plain = lunet_lib.count_params(_abstract_params(lunet_lib.lunet()))
  assert abs(n_ra - PAPER_PARAMS) <= 0.1 * PAPER_PARAMS
  # Pinned: a change here changes every checkpoint's layout.
  assert (n_plain, n_ra) == (1_727_717, 1_912_357)


def test_param_trees_identical_across_impls():
  trees = [jax.tree.map(lambda a: (a.shape, a.dtype), _abstract_params(
      lunet_lib.lunet_ra(impl=impl))) for impl in ('fast', 'reference')]
  assert trees[0] == trees[1]
  names = set(trees[0])
  assert {'stem', 'enc_0', 'enc_3', 'bottleneck', 'dec_0', 'side_4',
          'ra_0', 'ra_3'} <= names
  plain = set(_abstract_params(lunet_lib.lunet()))
  assert {'side_0', 'side_3', 'side_4'} <= plain
  assert not any(n.startswith('ra_') for n in plain)


def test_deterministic_init():
  model = lunet_lib.lunet_ra(widths=(4, 4, 4, 4), bottleneck=4,
                             convs_per_level=1, ra_convs=1)
  init = jax.jit(model.init, static_argnames='train')
  x = jnp.zeros((1, 16, 16, 1))
  a = init(jax.random.key(7), x, train=False)
  b = init(jax.random.key(7), x, train=False)
  c = init(jax.random.key(8), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  kernel = lambda v: v['params']['enc_1']['conv_0']['conv']['pointwise'][
      'kernel']
  assert not np.array_equal(kernel(a), kernel(c))
  # RA outputs start at zero: residual branches begin as the identity.
  assert not np.any(a['params']['ra_0']['out']['kernel'])


@pytest.mark.parametrize('shape', [(1, 30, 32, 1), (1, 32, 40, 1),
                                   (32, 32, 1)])
def test_bad_shape_raises(shape):
  model = lunet_lib.lunet_ra(**TINY)
  with pytest.raises(ValueError, match=re.escape(str(shape))):
    model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def test_norm_axis_name_pools_batch_statistics():
  """With norm_axis_name, shards see the statistics of the whole batch."""
  cfg = dict(widths=(4, 4), bottleneck=4, convs_per_level=1, ra_convs=1)
  x = _image(9, (4, 16, 16, 1))
  variables = _random_variables(lunet_lib.lunet_ra(**cfg), x.shape)
  apply_train = lambda m, x: m.apply(variables, x, train=True,
                                     mutable=['batch_stats'])
  whole = jax.jit(lambda x: apply_train(lunet_lib.lunet_ra(**cfg), x))(x)
  sharded = jax.jit(jax.vmap(
      lambda x: apply_train(
          lunet_lib.lunet_ra(norm_axis_name='batch', **cfg), x),
      axis_name='batch'))(x.reshape(2, 2, 16, 16, 1))
  assert_close(sharded[0]['logits'].reshape(4, 16, 16, 1),
               whole[0]['logits'], rtol=1e-4)
  stats = jax.tree.map(lambda a: a[0], sharded[1])  # Same on every shard.
  jax.tree.map(functools.partial(assert_close, rtol=1e-4), stats, whole[1])
