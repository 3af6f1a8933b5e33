"""Fast CPU forms in vesseljax.models.layers equal the reference forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close

from vesseljax.models import layers


def _normal(seed, shape, dtype=jnp.float32):
  # numpy, not jax.random: threefry compiles anew per shape (~1 s on CPU).
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _vjps(fn, args, seed=100):
  """Output and the VJP of fn at args for a random cotangent (one jit)."""
  out = jax.eval_shape(fn, *args)
  cotangent = _normal(seed, out.shape, out.dtype)

  @jax.jit
  def out_and_vjp(args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)

  return out_and_vjp(args, cotangent)


@pytest.mark.parametrize('shape', [(2, 8, 8, 4), (1, 5, 7, 3), (3, 1, 4, 2)])
def test_depthwise_shifted_equals_reference(shape):
  x, k = _normal(0, shape), _normal(1, (3, 3, shape[-1]))
  out, (dx, dk) = _vjps(layers.depthwise_conv3x3_shifted, (x, k))
  ref, (dx_ref, dk_ref) = _vjps(layers.depthwise_conv3x3_reference, (x, k))
  assert_close(out, ref)
  assert_close(dx, dx_ref)
  assert_close(dk, dk_ref)


def test_depthwise_kernel_grad_in_row_blocks(monkeypatch):
  # Tiny blocks: 2 rows of (W=6, C=4) float32 per block, 4 blocks per image.
  monkeypatch.setattr(layers, '_KERNEL_GRAD_BLOCK_BYTES', 2 * 6 * 4 * 4)
  assert layers._rows_per_block(8, 6, 4, 4) == 2
  x, k = _normal(2, (2, 8, 6, 4)), _normal(3, (3, 3, 4))
  _, (dx, dk) = _vjps(layers.depthwise_conv3x3_shifted, (x, k))
  _, (dx_ref, dk_ref) = _vjps(layers.depthwise_conv3x3_reference, (x, k))
  assert_close(dx, dx_ref)
  assert_close(dk, dk_ref)


def test_rows_per_block_divides_height():
  assert layers._rows_per_block(128, 128, 32, 4) == 32  # 512 KiB blocks.
  assert layers._rows_per_block(512, 512, 32, 4) == 8
  assert layers._rows_per_block(16, 16, 8, 4) == 16  # Whole image.
  assert layers._rows_per_block(7, 4096, 64, 4) == 1  # Floor of one row.


def test_depthwise_shifted_under_jit_grad():
  x, k = _normal(4, (2, 8, 8, 3)), _normal(5, (3, 3, 3))
  loss = lambda fn: lambda x, k: jnp.sum(jnp.sin(fn(x, k)))
  g = jax.jit(jax.grad(loss(layers.depthwise_conv3x3_shifted), (0, 1)))(x, k)
  g_ref = jax.grad(loss(layers.depthwise_conv3x3_reference), (0, 1))(x, k)
  for a, b in zip(g, g_ref):
    assert_close(a, b)


def test_pointwise_dense_equals_conv1x1():
  x, k, b = _normal(6, (2, 4, 5, 3)), _normal(7, (3, 6)), _normal(8, (6,))
  out, grads = _vjps(layers.pointwise_dense, (x, k, b))
  ref, grads_ref = _vjps(layers.pointwise_reference, (x, k, b))
  assert_close(out, ref)
  for a, r in zip(grads, grads_ref):
    assert_close(a, r)
  # The reference form is what a 1x1 nn.Conv computes with kernel[None, None].
  conv = nn.Conv(6, (1, 1)).apply(
      {'params': {'kernel': k[None, None], 'bias': b}}, x)
  assert_close(conv, ref)
  np.testing.assert_allclose(layers.pointwise_dense(x, k), out - b,
                             rtol=1e-5, atol=1e-6)


def test_pointwise_kernel_grad_in_row_blocks(monkeypatch):
  monkeypatch.setattr(layers, '_DENSE_GRAD_BLOCK_ROWS', 8)  # 40 rows: 5 blocks.
  x, k, b = _normal(17, (2, 4, 5, 3)), _normal(18, (3, 6)), _normal(19, (6,))
  _, grads = _vjps(layers.pointwise_dense, (x, k, b))
  _, grads_ref = _vjps(layers.pointwise_reference, (x, k, b))
  for a, r in zip(grads, grads_ref):
    assert_close(a, r)


def test_conv3x3_im2col_equals_conv():
  x, k = _normal(9, (2, 6, 5, 2)), _normal(10, (3, 3, 2, 4))
  out, grads = _vjps(layers.conv3x3_im2col, (x, k))
  ref, grads_ref = _vjps(layers.conv3x3_reference, (x, k))
  assert_close(out, ref)
  for a, r in zip(grads, grads_ref):
    assert_close(a, r)
  conv = nn.Conv(4, (3, 3), use_bias=False).apply({'params': {'kernel': k}}, x)
  assert_close(conv, ref)


@pytest.mark.parametrize('shape', [(2, 4, 4, 3), (1, 3, 5, 2), (1, 1, 2, 1)])
def test_upsample2x_equals_image_resize(shape):
  x = _normal(11, shape)
  out, (dx,) = _vjps(layers.upsample2x_bilinear, (x,))
  ref, (dx_ref,) = _vjps(layers.upsample2x_reference, (x,))
  b, h, w, c = shape
  assert out.shape == (b, 2 * h, 2 * w, c)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-5)


def test_upsample2x_weights_and_edges():
  x = jnp.arange(4.0).reshape(1, 4, 1, 1)
  y = layers.upsample2x_bilinear(jnp.tile(x, (1, 1, 2, 1)))[0, :, 0, 0]
  np.testing.assert_array_equal(y, [0, .25, .75, 1.25, 1.75, 2.25, 2.75, 3])


def test_upsample_pow2_repeats_2x():
  x = _normal(12, (1, 2, 3, 1))
  y = jax.jit(lambda x: layers.upsample_pow2(x, 3, 'fast'))(x)
  ref = jax.jit(lambda x: layers.upsample_pow2(x, 3, 'reference'))(x)
  assert y.shape == (1, 16, 24, 1)
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize('ties', [False, True])
def test_max_pool2x2_equals_nn_max_pool(ties):
  x = _normal(13, (2, 4, 6, 3))
  if ties:  # ReLU-like zeros: whole windows tie.
    x = jnp.maximum(x, 0.0).at[:, :2, :2].set(0.0)
  pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  out, (dx,) = _vjps(layers.max_pool2x2, (x,))
  ref, (dx_ref,) = _vjps(pool, (x,))
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(dx, dx_ref)
  # Each window's cotangent goes to exactly one of its pixels.
  nonzero = (np.asarray(dx) != 0).reshape(2, 2, 2, 3, 2, 3).sum(axis=(2, 4))
  assert np.all(nonzero == 1)


@pytest.mark.parametrize('module_fn', [
    lambda impl: layers.SeparableConv(5, impl=impl),
    lambda impl: layers.Conv3x3(5, impl=impl),
    lambda impl: layers.Pointwise(5, impl=impl),
])
def test_modules_share_params_and_agree(module_fn):
  x = _normal(14, (2, 6, 6, 3))
  fast, ref = module_fn('fast'), module_fn('reference')
  v_fast = jax.jit(fast.init)(jax.random.key(0), x)
  v_ref = jax.jit(ref.init)(jax.random.key(0), x)
  # Same tree, shapes and initial values: a checkpoint runs in either form.
  assert (jax.tree.map(jnp.shape, v_fast) == jax.tree.map(jnp.shape, v_ref))
  jax.tree.map(np.testing.assert_array_equal, v_fast, v_ref)
  # Non-zero bias so it is exercised.
  params = jax.tree.map(lambda p: p + 0.1, v_fast['params'])
  loss = lambda m: lambda p: jnp.sum(jnp.tanh(m.apply({'params': p}, x)))
  val, g = jax.jit(jax.value_and_grad(loss(fast)))(params)
  val_ref, g_ref = jax.jit(jax.value_and_grad(loss(ref)))(params)
  assert_close(val, val_ref)
  jax.tree.map(assert_close, g, g_ref)


def test_separable_conv_param_layout():
  v = layers.SeparableConv(8).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  shapes = jax.tree.map(jnp.shape, v['params'])
  assert shapes == {'depthwise': {'kernel': (3, 3, 3)},
                    'pointwise': {'kernel': (3, 8), 'bias': (8,)}}
  no_bias = layers.SeparableConv(8, use_bias=False).init(
      jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  assert 'bias' not in no_bias['params']['pointwise']


def test_conv_norm_act_train_and_eval_agree_across_impls():
  x = _normal(15, (2, 4, 4, 3))
  fast = layers.ConvNormAct(4, impl='fast')
  ref = layers.ConvNormAct(4, impl='reference')
  v = jax.jit(fast.init, static_argnames='train')(
      jax.random.key(1), x, train=False)
  out, upd = fast.apply(v, x, train=True, mutable=['batch_stats'])
  out_ref, upd_ref = ref.apply(v, x, train=True, mutable=['batch_stats'])
  assert_close(out, out_ref)
  jax.tree.map(assert_close, upd, upd_ref)
  assert float(out.min()) >= 0.0
  assert_close(fast.apply(v, x, train=False), ref.apply(v, x, train=False))


def test_bfloat16_compute():
  x = _normal(16, (1, 4, 4, 3))
  m = layers.SeparableConv(4, dtype=jnp.bfloat16)
  v = jax.jit(m.init)(jax.random.key(0), x)
  assert jax.tree.leaves(v)[0].dtype == jnp.float32
  assert m.apply(v, x).dtype == jnp.bfloat16
  g = jax.jit(jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x).astype(
      jnp.float32))))(v['params'])
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))


def test_bad_impl_raises():
  with pytest.raises(ValueError, match='impl'):
    layers.upsample2x(jnp.zeros((1, 2, 2, 1)), impl='slow')
  with pytest.raises(ValueError, match='impl'):
    layers.Pointwise(2, impl='slow').init(jax.random.key(0),
                                          jnp.zeros((1, 2, 2, 1)))
