"""Where the coarse model meets configs, files and data.

`create_model` turns `config.model` into an `LUNet`; `export_params` /
`load_params` write and read the params-only release format (flax msgpack +
a JSON sidecar holding the model config and a hash of it); `infer_probs` runs
whole images through a predict function in fixed-size batches.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vesseljax.data import pipeline
from vesseljax.models import lunet

MODEL_FIELDS = ('name', 'widths', 'bottleneck', 'dtype')


def resolve_impl(impl: str) -> str:
  """'auto' -> 'fast' on the CPU (shifted depthwise, matmul 1x1) and 'reference' elsewhere.

  PERF_NOTES: on the GPU the grouped-conv forms train faster; on the CPU the
  fast forms are ~10x faster at inference.
  """
  if impl == 'auto':
    return 'fast' if jax.default_backend() == 'cpu' else 'reference'
  if impl not in ('fast', 'reference'):
    raise ValueError(f"model.impl must be auto, fast or reference, got {impl!r}")
  return impl


def model_spec(model_config) -> dict:
  """The fields that define the network's parameters (what a checkpoint must match)."""
  spec = {k: model_config[k] for k in MODEL_FIELDS}
  spec['widths'] = list(spec['widths'])
  if spec['name'] not in ('lunet', 'lunet_ra'):
    raise ValueError(f"model.name must be lunet or lunet_ra, got {spec['name']!r}")
  return spec


def spec_hash(spec: dict) -> str:
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def create_model(model_config, norm_axis_name: Optional[str] = None,
                 impl: Optional[str] = None) -> lunet.LUNet:
  """An LUNet from `config.model` (a ConfigDict or a spec dict)."""
  spec = model_spec(model_config)
  return lunet.LUNet(
      widths=tuple(spec['widths']), bottleneck=int(spec['bottleneck']),
      reverse_attention=spec['name'] == 'lunet_ra',
      impl=resolve_impl(impl or model_config.get('impl', 'auto')),
      dtype=jnp.dtype(spec['dtype']), norm_axis_name=norm_axis_name)


def export_params(path: str | pathlib.Path, variables: dict, model_config, meta: dict) -> pathlib.Path:
  """Writes params + batch_stats (`<path>`, msgpack) and `<path>.json` (spec, hash, meta)."""
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return write_params(path, variables, model_spec(model_config), meta)


def write_params(path: str | pathlib.Path, variables: dict, spec: dict, meta: dict) -> pathlib.Path:
  """Writes any variables tree (`<path>`, msgpack) and `<path>.json` ({'model': spec, 'model_hash', **meta}).

  The msgpack goes through a temporary file, so an interrupted write never
  leaves a truncated checkpoint under the final name.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  variables = jax.device_get(variables)
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_bytes(flax.serialization.msgpack_serialize(variables))
  tmp.replace(path)
  sidecar = {'model': spec, 'model_hash': spec_hash(spec), **meta}
  pathlib.Path(str(path) + '.json').write_text(json.dumps(sidecar, indent=2))
  return path


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or does not match the model."""


def load_params(path: str | pathlib.Path) -> tuple[dict, dict]:
  """Reads an exported checkpoint. Returns (sidecar dict, variables)."""
  path = pathlib.Path(path)
  sidecar_path = pathlib.Path(str(path) + '.json')
  if not path.is_file():
    raise CheckpointError(f'{path}: checkpoint file not found')
  if not sidecar_path.is_file():
    raise CheckpointError(f'{sidecar_path}: missing the sidecar JSON that says which model {path.name} is')
  try:
    sidecar = json.loads(sidecar_path.read_text())
    spec = sidecar['model']
  except (json.JSONDecodeError, KeyError) as e:
    raise CheckpointError(f'{sidecar_path}: unreadable sidecar ({e})') from e
  if spec_hash(spec) != sidecar.get('model_hash'):
    raise CheckpointError(f'{sidecar_path}: model hash does not match its model spec')
  try:
    variables = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several types on corrupt bytes
    raise CheckpointError(f'{path}: not a readable msgpack checkpoint ({type(e).__name__}: {e})') from e
  return sidecar, variables


def check_variables(variables: dict, model: Optional[lunet.LUNet], input_channels: int, source: str,
                    expected: Optional[dict] = None) -> None:
  """Raises CheckpointError naming `source` when the tree or shapes differ from `model`'s.

  `expected` (a tree of shapes, e.g. from jax.eval_shape) replaces `model` for other networks.
  """
  if expected is None:
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, input_channels)),
                                                 train=False))
  exp = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(variables)}
  missing = sorted(set(exp) - set(got))
  extra = sorted(set(got) - set(exp))
  wrong = sorted(k for k in set(exp) & set(got) if tuple(exp[k]) != tuple(got[k]))
  if missing or extra or wrong:
    detail = '; '.join(filter(None, [
        f'missing {missing[:3]}' if missing else '', f'unexpected {extra[:3]}' if extra else '',
        f'shape mismatch {[(k, got[k], exp[k]) for k in wrong[:3]]}' if wrong else '']))
    raise CheckpointError(f'{source}: checkpoint does not fit the model ({detail})')


def infer_probs(predict_fn: Callable, variables: dict, images: np.ndarray,
                batch_size: int) -> np.ndarray:
  """Vessel probabilities for whole images, every image once, fixed batch shape.

  Args:
    predict_fn: `(variables, image (B, H, W, C)) -> outputs dict` (eval mode).
    images: (N, H, W, C) float32 in [0, 1].

  Returns:
    (N, H, W) float32 probabilities in [0, 1].
  """
  n = images.shape[0]
  dummy = np.zeros(images.shape[:3], bool)
  data = pipeline.ArrayDataset(images=images, labels=dummy, fovs=dummy, ids=[str(i) for i in range(n)])
  out = np.zeros(images.shape[:3], np.float32)
  for batch in pipeline.image_batches(data, batch_size):
    logits = predict_fn(variables, jnp.asarray(batch['image']))['logits'][..., 0]
    prob = np.asarray(jax.nn.sigmoid(logits))
    valid = np.asarray(batch['valid'])
    out[np.asarray(batch['index'])[valid]] = prob[valid]
  return out
