"""Tests of vesseljax.evaluate.report: results files and Markdown tables."""

import json
import math
import os

import numpy as np
import pytest

from vesseljax.evaluate import metrics as M
from vesseljax.evaluate import report as R


def _rows():
  return [
      {'id': 'drive/01_test', 'dice': 0.81234, 'auc': 0.97, 'tp': np.int64(120),
       'sensitivity': np.float32(0.75)},
      {'id': 'drive/02_test', 'dice': 0.79, 'auc': math.nan, 'tp': 98, 'sensitivity': 0.7},
  ]


def _meta():
  return {'dataset': 'drive', 'split': 'test', 'method': 'lunet_ra',
          'command': 'python -m vesseljax.launch eval', 'working_resolution': [512, 512],
          'threshold': 0.5, 'date': '2025-01-01'}


def test_round_trip(tmp_path):
  rows = _rows()
  summary = M.summarize(rows, metrics=('dice', 'auc'))
  path = tmp_path / 'sub' / 'results.json'  # Parent is created.
  R.write_results(path, rows, summary, _meta())
  doc = R.read_results(path)
  assert set(doc) == {'meta', 'rows', 'summary'}
  assert doc['meta'] == _meta()
  assert doc['rows'][0] == {'id': 'drive/01_test', 'dice': 0.81234, 'auc': 0.97, 'tp': 120,
                            'sensitivity': pytest.approx(0.75)}
  assert doc['rows'][1]['auc'] is None  # NaN stored as null (strict JSON).
  assert doc['summary']['dice'] == pytest.approx(summary['dice'])
  assert doc['summary']['auc']['std'] is None and doc['summary']['auc']['n'] == 1
  # Strict JSON that other tools can read; re-summarising gives the same.
  json.loads(path.read_text(),
             parse_constant=lambda c: pytest.fail(f'non-standard JSON constant {c}'))
  again = M.summarize(doc['rows'], metrics=('dice', 'auc'))
  assert again['auc']['n_nan'] == 1 and again['dice'] == pytest.approx(summary['dice'])
  assert [p.name for p in path.parent.iterdir()] == ['results.json']  # No temp files left.


def test_refuses_to_overwrite(tmp_path):
  path = tmp_path / 'results.json'
  R.write_results(path, _rows(), {}, {'run': 1})
  before = path.read_bytes()
  with pytest.raises(FileExistsError, match='results.json'):
    R.write_results(path, [], {}, {'run': 2})
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['results.json']
  R.write_results(path, [], {}, {'run': 3}, overwrite=True)
  assert R.read_results(path)['meta'] == {'run': 3}


def test_unserialisable_value_names_its_place(tmp_path):
  with pytest.raises(TypeError, match=r'meta\.model'):
    R.write_results(tmp_path / 'r.json', [], {}, {'model': object()})
  assert not (tmp_path / 'r.json').exists()


def test_read_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.json'):
    R.read_results(tmp_path / 'nope.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"meta": {}, "rows": [')
  with pytest.raises(ValueError, match='bad.json.*corrupt'):
    R.read_results(bad)
  other = tmp_path / 'other.json'
  other.write_text('{"meta": {}}')
  with pytest.raises(ValueError, match='other.json.*not a results file'):
    R.read_results(other)


def test_markdown_table():
  summaries = {
      'LU-Net+RA': {'dice': {'mean': 0.8123, 'std': 0.0214, 'n': 20},
                    'auc': {'mean': 0.9801, 'std': 0.0049, 'n': 20}},
      '+Diff(20)': {'dice': {'mean': 0.8200, 'std': 0.0199, 'n': 20},
                    'auc': {'mean': 0.9811, 'std': None, 'n': 19}},
  }
  table = R.markdown_table(summaries, metrics=('dice', 'auc'), pvalues={'+Diff(20)': 0.0004})
  lines = table.split('\n')
  assert lines[0] == '| method | n | dice | auc | p (Wilcoxon) |'
  assert lines[1] == '|---|---|---|---|---|'
  assert lines[2] == '| LU-Net+RA | 20 | 0.812 ± 0.021 | 0.980 ± 0.005 | — |'
  assert lines[3] == '| +Diff(20) | 19–20 | 0.820 ± 0.020 | 0.981 ± nan | <0.001 |'
  plain = R.markdown_table(summaries, metrics=('dice', 'iou'), digits=4)
  assert 'p (Wilcoxon)' not in plain
  assert '| LU-Net+RA | 20 | 0.8123 ± 0.0214 | — |' in plain


def test_markdown_table_from_summarize():
  rows = [{'id': str(i), **{m: 0.5 + 0.01 * i for m in M.METRICS}} for i in range(4)]
  table = R.markdown_table({'m': M.summarize(rows)}, pvalues={'m': 0.0312})
  mean, std = np.mean([0.5, 0.51, 0.52, 0.53]), np.std([0.5, 0.51, 0.52, 0.53], ddof=1)
  cells = ' | '.join([f'{mean:.3f} ± {std:.3f}'] * 6)
  assert table.split('\n')[2] == f'| m | 4 | {cells} | 0.031 |'


def test_per_image_markdown():
  text = R.per_image_markdown(_rows(), metrics=('dice', 'auc', 'tp', 'iou'))
  lines = text.split('\n')
  assert lines[0] == '| id | dice | auc | tp | iou |'
  assert lines[2] == '| drive/01_test | 0.8123 | 0.9700 | 120 | — |'
  assert lines[3] == '| drive/02_test | 0.7900 | nan | 98 | — |'


def test_compare_rows_pairs_the_shared_images_only():
  from scipy import stats
  rng = np.random.default_rng(0)
  a = [{'id': f'im{i}', 'dice': float(x)} for i, x in enumerate(rng.uniform(0.7, 0.9, 12))]
  b = [{'id': f'im{i}', 'dice': float(x)} for i, x in enumerate(rng.uniform(0.7, 0.9, 20))][::-1]  # other order
  got = R.compare_rows(a, b, 'dice')
  b_by_id = {r['id']: r['dice'] for r in b}
  x = np.array([r['dice'] for r in a])
  y = np.array([b_by_id[r['id']] for r in a])
  assert got['n'] == 12 and got['only_a'] == 0 and got['only_b'] == 8
  assert got['higher'] == int((x > y).sum())
  assert got['mean_diff'] == pytest.approx(float((x - y).mean()))
  assert got['p_value'] == pytest.approx(stats.wilcoxon(x, y).pvalue)
  with pytest.raises(ValueError, match='no image id in common'):
    R.compare_rows(a, [{'id': 'other', 'dice': 0.5}])


def test_rows_of_reads_rows_or_the_coarse_rows(tmp_path):
  rows = _rows()
  coarse = [dict(r, dice=0.5) for r in rows]
  summary = M.summarize(rows, metrics=('dice',))
  R.write_results(tmp_path / 'refined.json', rows, summary, dict(_meta(), coarse_rows=coarse))
  R.write_results(tmp_path / 'plain.json', rows, summary, _meta())
  assert [r['dice'] for r in R.rows_of(tmp_path / 'refined.json')] == [0.81234, 0.79]
  assert [r['dice'] for r in R.rows_of(f'{tmp_path / "refined.json"}:coarse')] == [0.5, 0.5]
  with pytest.raises(ValueError, match='plain.json: no meta.coarse_rows'):
    R.rows_of(f'{tmp_path / "plain.json"}:coarse')
