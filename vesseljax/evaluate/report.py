"""Results files (JSON) and Markdown tables.

A results file is one JSON object:
  {"meta": {...}, "rows": [{...}, ...], "summary": {...}}
`meta` is free-form and should say what produced the numbers (dataset, split,
method, command, working resolution, threshold, date, ...); `rows` holds the
per-image metrics (each with an 'id'); `summary` is `metrics.summarize(rows)`.

The file is strict JSON: NaN and +-inf are written as null (read back as
None; `metrics.summarize` and `metrics.wilcoxon` read None as NaN), NumPy
scalars and arrays become plain numbers and lists. Writes are atomic (a
temporary file in the same folder, then a rename) and never replace an
existing file unless asked to.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from vesseljax.evaluate.metrics import METRICS

PathLike = Union[str, os.PathLike]
_KEYS = ('meta', 'rows', 'summary')
_MISSING = '—'


def _to_json(obj: Any, where: str) -> Any:
  """Plain-JSON copy of `obj`; NaN/inf -> None. TypeError names `where`."""
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, (bool, int)):
    return obj
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, np.ndarray):
    return _to_json(obj.tolist(), where)
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise TypeError(f'{where}: key {k!r} is not a string')
      out[k] = _to_json(v, f'{where}.{k}')
    return out
  if isinstance(obj, (list, tuple)):
    return [_to_json(v, f'{where}[{i}]') for i, v in enumerate(obj)]
  raise TypeError(f'{where}: cannot store {type(obj).__name__} in JSON')


def write_results(path: PathLike,
                  rows: Sequence[Mapping[str, Any]],
                  summary: Mapping[str, Any],
                  meta: Mapping[str, Any],
                  *,
                  overwrite: bool = False) -> None:
  """Writes a results file atomically.

  Args:
    path: destination .json path; missing parent folders are created.
    rows: per-image metric dicts.
    summary: per-metric summary, e.g. `metrics.summarize(rows)`.
    meta: free dict saying how the numbers were produced.
    overwrite: replace an existing file. Without it an existing file is
      never touched.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
    TypeError: a value that JSON cannot hold (the message names where).
  """
  path = pathlib.Path(path)
  if not isinstance(meta, Mapping) or not isinstance(summary, Mapping):
    raise TypeError('meta and summary must be dicts')
  if isinstance(rows, (str, bytes, Mapping)):
    raise TypeError('rows must be a list of dicts')
  doc = {
      'meta': _to_json(meta, 'meta'),
      'rows': _to_json(list(rows), 'rows'),
      'summary': _to_json(summary, 'summary'),
  }
  text = json.dumps(doc, indent=1, allow_nan=False, ensure_ascii=False) + '\n'
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      # A hard link fails if `path` appeared meanwhile: no silent clobbering.
      try:
        os.link(tmp, path)
      except FileExistsError:
        raise FileExistsError(f'{path} exists; pass overwrite=True to replace it') from None
      except OSError:  # File systems without hard links.
        if path.exists():
          raise FileExistsError(f'{path} exists; pass overwrite=True to replace it') from None
        os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def read_results(path: PathLike) -> dict[str, Any]:
  """Reads a results file written by `write_results`.

  Args:
    path: the .json file.

  Returns:
    {'meta': dict, 'rows': list of dicts, 'summary': dict}; stored nulls
    (NaN at write time) are None.

  Raises:
    FileNotFoundError: no such file (the message names it).
    ValueError: not valid JSON, or not a results object (names the file).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'results file not found: {path}')
  try:
    doc = json.loads(path.read_text(encoding='utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: corrupt results file (not valid JSON: {e})') from None
  if not isinstance(doc, dict) or any(k not in doc for k in _KEYS):
    found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
    raise ValueError(f'{path}: not a results file: expected keys {list(_KEYS)}, found {found}')
  if not (isinstance(doc['rows'], list) and isinstance(doc['summary'], dict)
          and isinstance(doc['meta'], dict)):
    raise ValueError(f'{path}: not a results file: meta/summary must be objects and rows a list')
  return doc


def rows_of(spec: PathLike) -> list[dict[str, Any]]:
  """The per-image rows a results file names: 'path.json', or 'path.json:coarse'
  for the coarse-model rows that an `evaluate_refined` file keeps in meta.coarse_rows.

  Raises:
    ValueError: ':coarse' of a file without coarse rows (names it).
  """
  spec = str(spec)
  coarse = spec.endswith(':coarse')
  path = spec[:-len(':coarse')] if coarse else spec
  doc = read_results(path)
  if coarse:
    rows = doc['meta'].get('coarse_rows')
    if not isinstance(rows, list):
      raise ValueError(f'{path}: no meta.coarse_rows (not an evaluate_refined results file)')
    return rows
  return doc['rows']


def compare_rows(rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]],
                 metric: str = 'dice') -> dict[str, Any]:
  """A against B on the images both score: `metrics.wilcoxon` plus how many images A scores higher.

  Files often hold different images (a first-10 run against the whole test
  split): the rows are paired by 'id' on the shared ones only.

  Returns:
    `metrics.wilcoxon`'s dict with 'higher' (images where A > B) and
    'only_a', 'only_b' (how many ids the other file lacks).

  Raises:
    ValueError: no image in common.
  """
  from vesseljax.evaluate import metrics  # pylint: disable=g-import-not-at-top
  ids_b = {r['id'] for r in rows_b}
  shared = [r for r in rows_a if r['id'] in ids_b]
  if not shared:
    raise ValueError('compare_rows: the two sets of rows have no image id in common')
  shared_ids = {r['id'] for r in shared}
  b = [r for r in rows_b if r['id'] in shared_ids]
  out = metrics.wilcoxon(shared, b, metric)
  b_by_id = {r['id']: r for r in b}
  out['higher'] = sum(float(r[metric]) > float(b_by_id[r['id']][metric]) for r in shared)
  out['only_a'], out['only_b'] = len(rows_a) - len(shared), len(rows_b) - len(b)
  return out


# ----------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------


def _fmt(x: Any, digits: int) -> str:
  if x is None:
    return 'nan'
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return str(int(x))
  try:
    x = float(x)
  except (TypeError, ValueError):
    return str(x)
  return 'nan' if math.isnan(x) else f'{x:.{digits}f}'


def _fmt_p(p: Optional[float]) -> str:
  if p is None or (isinstance(p, float) and math.isnan(p)):
    return _MISSING
  return '<0.001' if p < 0.001 else f'{p:.3f}'


def _cell(text: Any) -> str:
  return str(text).replace('|', '\\|').replace('\n', ' ')


def markdown_table(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   metrics: Sequence[str] = METRICS,
                   pvalues: Optional[Mapping[str, float]] = None,
                   digits: int = 3) -> str:
  """Methods x metrics table of `mean ± std` cells.

  Args:
    summaries: {method: summarize(rows)} in the order the rows should appear.
    metrics: columns, in order.
    pvalues: optional {method: Wilcoxon p-value}; adds a last column, "—"
      for methods without one (e.g. the reference method). p < 0.001 prints
      as "<0.001".
    digits: decimals of mean and std.

  Returns:
    A GitHub Markdown table (no trailing newline). Columns: method, n (the
    number of images: one value, or "min–max" when metrics differ because
    some were NaN), one per metric, then the optional p column. A metric a
    method lacks shows "—".
  """
  header = ['method', 'n'] + list(metrics) + (['p (Wilcoxon)'] if pvalues is not None else [])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * len(header)) + '|']
  for method, summary in summaries.items():
    ns = sorted({int(summary[m]['n']) for m in metrics
                 if m in summary and summary[m].get('n') is not None})
    n_cell = _MISSING if not ns else str(ns[0]) if len(ns) == 1 else f'{ns[0]}–{ns[-1]}'
    cells = [_cell(method), n_cell]
    for m in metrics:
      s = summary.get(m)
      if s is None:
        cells.append(_MISSING)
      else:
        cells.append(f"{_fmt(s.get('mean'), digits)} ± {_fmt(s.get('std'), digits)}")
    if pvalues is not None:
      cells.append(_fmt_p(pvalues.get(method)))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def per_image_markdown(rows: Sequence[Mapping[str, Any]],
                       metrics: Sequence[str] = METRICS,
                       digits: int = 4) -> str:
  """Images x metrics table, one row per image in the given order.

  Args:
    rows: per-image dicts with 'id' and the metric keys (floats, or ints
      such as the 'tp' counts, which print without decimals).
    metrics: columns, in order.
    digits: decimals of float values.

  Returns:
    A GitHub Markdown table (no trailing newline); missing values show "—",
    NaN/None shows "nan".
  """
  header = ['id'] + list(metrics)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * len(header)) + '|']
  for i, row in enumerate(rows):
    cells = [_cell(row.get('id', f'#{i}'))]
    cells += [_fmt(row[m], digits) if m in row else _MISSING for m in metrics]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
