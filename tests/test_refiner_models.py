"""Refiner models: mask autoencoder, image encoder, conditional denoiser.

Shapes, methods, parameter counts, zero-initialised output, and that the
denoiser's output depends on each input (and on the image only when the
image is not dropped for classifier-free guidance). Tiny sizes: each test
compiles in about a second on the busy 2-core CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesseljax.models import autoencoder as autoencoder_lib
from vesseljax.models import denoiser as denoiser_lib
from vesseljax.models import image_encoder as image_encoder_lib
from vesseljax.models import layers
from vesseljax.models import lunet as lunet_lib

PAPER_DENOISER_PARAMS = 3.1e6

# A tiny denoiser: 4 levels (latent sides divisible by 8), small embedding.
TINY_DENOISER = dict(widths=(8, 8, 16, 16), num_res_blocks=1, num_heads=2,
                     embed_dim=32)
LATENT = (16, 16, 4)  # (h, w, C).
TOKENS = (4, 8)  # (N, D).


pytestmark = pytest.mark.usefixtures('fast_compiles')  # conftest: XLA optimisations off


def _normal(seed, shape):
  # numpy, not jax.random: threefry compiles anew per shape (~1 s on CPU).
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


def _re_shape(shape):
  """The regex of a shape as printed in an error message."""
  return r'\(' + r', '.join(str(s) for s in shape) + (',' if len(shape) == 1
                                                     else '') + r'\)'


def _abstract_params(model, *shapes_and_dtypes):
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes_and_dtypes]
  return jax.eval_shape(model.init, jax.random.key(0), *args)['params']


def _randomise(params, seed=0):
  """Every leaf random, zero-initialised ones included.

  Kernels N(0, 1/fan_in), GroupNorm scales 1 + 0.1 |N|, the rest 0.1 N.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == 'kernel':
      return jnp.asarray(noise / np.sqrt(math.prod(leaf.shape[:-1])))
    if name == 'scale':
      return jnp.asarray(1.0 + 0.1 * np.abs(noise))
    return jnp.asarray(0.1 * noise)

  return jax.tree_util.tree_map_with_path(fill, params)


# --------------------------------------------------------------------------
# Mask autoencoder.


def test_autoencoder_shapes_and_methods():
  model = autoencoder_lib.MaskAutoencoder(latent_channels=3)
  mask = (_uniform(0, (2, 32, 24, 1)) > 0.7).astype(jnp.float32)  # H != W.
  variables = {'params': _randomise(
      model.init(jax.random.key(0), mask)['params'])}
  encode = jax.jit(functools.partial(
      model.apply, method=autoencoder_lib.MaskAutoencoder.encode))
  decode = jax.jit(functools.partial(
      model.apply, method=autoencoder_lib.MaskAutoencoder.decode))
  z = encode(variables, mask)
  assert z.shape == (2, 8, 6, 3) and z.dtype == jnp.float32
  logits = decode(variables, z)
  assert logits.shape == (2, 32, 24, 1) and logits.dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(model.apply)(variables, mask), logits,
                             rtol=1e-5, atol=1e-5)
  assert np.std(np.asarray(logits)) > 0  # Not constant.
  # Every parameter is used: each gradient is nonzero.
  grads = jax.grad(lambda p: jnp.sum(jax.nn.sigmoid(
      model.apply({'params': p}, mask))))(variables['params'])
  assert all(np.max(np.abs(g)) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('shape', [(1, 30, 32, 1), (1, 32, 18, 1),
                                   (1, 32, 32, 3), (32, 32, 1)])
def test_autoencoder_bad_shape_raises(shape):
  model = autoencoder_lib.MaskAutoencoder()
  with pytest.raises(ValueError,
                     match=r'divisible by 4.*' + _re_shape(shape)):
    model.init(jax.random.key(0), jnp.zeros(shape))


def test_autoencoder_decode_checks_channels():
  model = autoencoder_lib.MaskAutoencoder(latent_channels=4)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match='decode'):
    model.apply(params, jnp.zeros((1, 2, 2, 5)),
                method=autoencoder_lib.MaskAutoencoder.decode)


# --------------------------------------------------------------------------
# Image encoder.


@pytest.mark.parametrize('token_grid', [4, 3])  # 4 divides 64/8; 3 does not.
def test_image_encoder_shapes_and_pooled(token_grid):
  model = image_encoder_lib.ImageEncoder(widths=(4, 8, 8),
                                         token_grid=token_grid)
  image = _uniform(1, (2, 64, 64, 3))
  params = _randomise(model.init(jax.random.key(0), image)['params'])
  (tokens, pooled), state = model.apply(
      {'params': params}, image, capture_intermediates=True)
  n = token_grid * token_grid
  assert tokens.shape == (2, n, 8) and tokens.dtype == jnp.float32
  assert pooled.shape == (2, 8) and pooled.dtype == jnp.float32
  pos = params['pos_embedding']
  assert pos.shape == (token_grid, token_grid, 8)
  # pooled = mean of the tokens without the positional embedding.
  np.testing.assert_allclose(tokens.mean(axis=1) - pos.mean(axis=(0, 1)),
                             pooled, rtol=1e-5, atol=1e-6)
  # The tokens are the grid-pooled features plus the positional embedding,
  # row-major; the features F are maxpool(silu(conv_2 output)).
  conv_2 = state['intermediates']['conv_2']['__call__'][0]
  features = layers.max_pool2x2(jax.nn.silu(conv_2))
  assert features.shape == (2, 8, 8, 8)
  grid = image_encoder_lib.pool_to_grid(features, token_grid)
  np.testing.assert_allclose(
      tokens, (grid + pos).reshape(2, n, 8), rtol=1e-5, atol=1e-6)
  if token_grid == 4:  # Exact block means: pooled is the global mean of F.
    np.testing.assert_allclose(pooled, features.mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        grid[:, 1, 2], features[:, 2:4, 4:6].mean(axis=(1, 2)), rtol=1e-5)
  # Different images give different tokens.
  tokens_2, _ = model.apply({'params': params}, _uniform(2, (2, 64, 64, 3)))
  assert np.max(np.abs(tokens_2 - tokens)) > 1e-4


@pytest.mark.parametrize('shape', [(1, 60, 64, 3), (1, 64, 64, 1)])
def test_image_encoder_bad_shape_raises(shape):
  model = image_encoder_lib.ImageEncoder(widths=(4, 8, 8), token_grid=4)
  with pytest.raises(ValueError, match=_re_shape(shape)):
    model.init(jax.random.key(0), jnp.zeros(shape))


# --------------------------------------------------------------------------
# Denoiser.


def test_timestep_embedding():
  t = jnp.array([0, 1, 999], jnp.int32)
  emb = denoiser_lib.timestep_embedding(t, 8)
  assert emb.shape == (3, 8) and emb.dtype == jnp.float32
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
  freqs = 10_000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(emb[2, :4], np.sin(999 * freqs), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(emb[2, 4:], np.cos(999 * freqs), rtol=1e-4,
                             atol=1e-5)


def _denoiser_inputs(batch, seed=0, drop=False):
  h, w, c = LATENT
  n, d = TOKENS
  return dict(
      z_t=_normal(seed, (batch, h, w, c)),
      t=jnp.arange(1, batch + 1, dtype=jnp.int32) * 123,
      coarse_latent=_normal(seed + 1, (batch, h, w, c)),
      ra_map=_uniform(seed + 2, (batch, h, w, 1)),
      image_tokens=_normal(seed + 3, (batch, n, d)),
      image_pooled=_normal(seed + 4, (batch, d)),
      drop_image=jnp.full((batch,), drop))


@functools.lru_cache(maxsize=None)
def _tiny_denoiser():
  """(model, init params, randomised params, jitted apply(params, inputs))."""
  model = denoiser_lib.Denoiser(**TINY_DENOISER)
  params = model.init(jax.random.key(0), **_denoiser_inputs(1))['params']
  apply = jax.jit(lambda p, inputs: model.apply({'params': p}, **inputs))
  return model, params, _randomise(params), apply


def test_denoiser_shape_dtype_and_zero_at_init():
  _, params, _, apply = _tiny_denoiser()
  eps = apply(params, _denoiser_inputs(2))
  assert eps.shape == (2, *LATENT) and eps.dtype == jnp.float32
  assert np.all(np.asarray(eps) == 0)  # Zero-initialised output conv.
  assert params['null_tokens'].shape == TOKENS
  assert params['null_pooled'].shape == TOKENS[1:]
  # Default attention levels (1, 2, 3) and the middle; none at level 0.
  assert 'down_0_attn' not in params and 'up_0_attn' not in params
  assert {'down_1_attn', 'mid_attn', 'up_3_attn'} <= set(params)


def _differs(a, b, tol=1e-4):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > tol


@pytest.mark.parametrize('name', ['z_t', 't', 'coarse_latent', 'ra_map',
                                  'image_tokens', 'image_pooled'])
def test_denoiser_depends_on_each_input(name):
  """Changing one input changes eps; the image only where not dropped."""
  _, _, params, apply = _tiny_denoiser()
  base = _denoiser_inputs(1)
  other = _denoiser_inputs(1, seed=10)
  if name == 't':
    other['t'] = base['t'] + 500
  changed = dict(base, **{name: other[name]})
  assert _differs(apply(params, base), apply(params, changed))

  dropped = dict(base, drop_image=jnp.array([True]))
  dropped_changed = dict(changed, drop_image=jnp.array([True]))
  eps_dropped = apply(params, dropped)
  eps_dropped_changed = apply(params, dropped_changed)
  if name in ('image_tokens', 'image_pooled'):
    np.testing.assert_array_equal(eps_dropped, eps_dropped_changed)
    assert _differs(apply(params, base), eps_dropped)  # The null differs.
  else:
    assert _differs(eps_dropped, eps_dropped_changed)


def test_denoiser_drop_image_per_example():
  """A batch with drop_image [False, True] equals the two separate calls."""
  _, _, params, apply = _tiny_denoiser()
  inputs = _denoiser_inputs(2)
  inputs['drop_image'] = jnp.array([False, True])
  eps = apply(params, inputs)
  for i, drop in enumerate([False, True]):
    single = {k: v[i:i + 1] for k, v in inputs.items()}
    assert bool(single['drop_image'][0]) == drop
    np.testing.assert_allclose(eps[i:i + 1], apply(params, single),
                               rtol=1e-5, atol=1e-5)
  assert _differs(eps[0], eps[1])


def test_denoiser_jit_matches_eager_and_has_gradients():
  model, _, params, apply = _tiny_denoiser()
  inputs = _denoiser_inputs(1)
  eager = model.apply({'params': params}, **inputs)
  np.testing.assert_allclose(apply(params, inputs), eager, rtol=1e-5,
                             atol=1e-5)
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(apply(p, inputs) ** 2)))(params)
  # Every parameter gets a gradient, except the null condition (unused when
  # nothing is dropped).
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if 'null' not in jax.tree_util.keystr(path):
      assert np.max(np.abs(g)) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize('latent', [(12, 16, 4), (16, 20, 4)])
def test_denoiser_bad_latent_raises(latent):
  model = denoiser_lib.Denoiser(**TINY_DENOISER)
  inputs = _denoiser_inputs(1)
  inputs['z_t'] = jnp.zeros((1, *latent))
  with pytest.raises(ValueError, match=r'divisible by 8.*' +
                     _re_shape((1, *latent))):
    model.init(jax.random.key(0), **inputs)


def test_denoiser_mismatched_condition_raises():
  model = denoiser_lib.Denoiser(**TINY_DENOISER)
  inputs = _denoiser_inputs(1)
  inputs['ra_map'] = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(ValueError, match='ra_map'):
    model.init(jax.random.key(0), **inputs)


# --------------------------------------------------------------------------
# Parameter counts of the default models (no compile: eval_shape).


def test_default_parameter_counts():
  f32 = jnp.float32
  counts = {}
  for c in (4, 64):
    counts[f'autoencoder C={c}'] = lunet_lib.count_params(_abstract_params(
        autoencoder_lib.MaskAutoencoder(latent_channels=c),
        ((1, 32, 32, 1), f32)))
  counts['image encoder'] = lunet_lib.count_params(_abstract_params(
      image_encoder_lib.ImageEncoder(), ((1, 128, 128, 3), f32)))
  counts['denoiser C=4'] = lunet_lib.count_params(_abstract_params(
      denoiser_lib.Denoiser(),
      ((1, 16, 16, 4), f32), ((1,), jnp.int32), ((1, 16, 16, 4), f32),
      ((1, 16, 16, 1), f32), ((1, 256, 128), f32), ((1, 128), f32),
      ((1,), jnp.bool_)))
  for name, count in counts.items():
    print(f'{name}: {count:,} parameters')
  assert counts['autoencoder C=4'] < 50_000
  assert counts['autoencoder C=4'] == 18_565
  assert counts['autoencoder C=64'] == 53_185
  assert counts['image encoder'] == 126_016
  assert abs(counts['denoiser C=4'] / PAPER_DENOISER_PARAMS - 1) < 0.1
  assert counts['denoiser C=4'] == 3_127_900
