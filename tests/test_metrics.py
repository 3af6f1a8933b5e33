"""Tests of vesseljax.evaluate.metrics against scikit-learn and scipy."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from vesseljax.evaluate import metrics as M


def _rng(seed=0):
  return np.random.default_rng(seed)


def _image(seed=0, shape=(61, 83), vessel_frac=0.1):
  """A random probability map correlated with a random label, and a disc FOV."""
  rng = _rng(seed)
  label = rng.random(shape) < vessel_frac
  prob = np.clip(0.35 * label + rng.random(shape) * 0.7, 0.0, 1.0).astype(np.float32)
  h, w = shape
  yy, xx = np.mgrid[:h, :w]
  fov = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 < 0.8
  return prob, label, fov


# ---------------------------------------------------------------- AUC-ROC ---


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auc_matches_sklearn_continuous(seed):
  rng = _rng(seed)
  y = rng.random(5000) < 0.2
  s = rng.normal(size=5000) + 0.8 * y
  assert abs(M.auc_roc(s, y) - skm.roc_auc_score(y, s)) < 1e-9


@pytest.mark.parametrize('levels', [2, 3, 11, 101])
def test_auc_matches_sklearn_heavy_ties(levels):
  rng = _rng(levels)
  y = rng.random(20000) < 0.1
  s = np.round((rng.random(20000) * 0.8 + 0.2 * y) * (levels - 1)) / (levels - 1)
  assert abs(M.auc_roc(s.astype(np.float32), y) - skm.roc_auc_score(y, s)) < 1e-9


def test_auc_binary_and_integer_scores():
  rng = _rng(3)
  y = rng.random(3000) < 0.3
  s = (rng.random(3000) < 0.3 + 0.4 * y)
  want = skm.roc_auc_score(y, s)
  assert abs(M.auc_roc(s, y) - want) < 1e-9  # bool scores
  assert abs(M.auc_roc(s.astype(np.int64), y.astype(np.uint8)) - want) < 1e-9
  assert abs(M.auc_roc(s.astype(np.float64), y.astype(np.float32)) - want) < 1e-9


def test_auc_large_input_with_ties():
  rng = _rng(4)
  n = 2_000_000
  y = rng.random(n) < 0.09
  s = (np.round(rng.random(n) * 200 + 40 * y) / 255).astype(np.float32)
  assert abs(M.auc_roc(s, y) - skm.roc_auc_score(y, s)) < 1e-9


def test_auc_2d_input_and_extremes():
  y = np.array([[True, False], [False, True]])
  assert M.auc_roc(np.array([[0.9, 0.1], [0.2, 0.8]]), y) == 1.0
  assert M.auc_roc(np.array([[0.1, 0.9], [0.8, 0.2]]), y) == 0.0
  assert M.auc_roc(np.full((2, 2), 0.5), y) == 0.5


def test_auc_invariant_to_monotone_transform():
  rng = _rng(5)
  y = rng.random(4000) < 0.2
  # On an exact grid (ties stay ties), so float rounding cannot merge values.
  s = (np.floor(rng.random(4000) * 50) + 5 * y) / 50
  a = M.auc_roc(s, y)
  assert M.auc_roc(np.exp(3 * s) - 7, y) == pytest.approx(a, abs=1e-12)
  assert M.auc_roc(1 / (1 + np.exp(-10 * (s - 0.3))), y) == pytest.approx(a, abs=1e-12)
  assert M.auc_roc(-s, y) == pytest.approx(1 - a, abs=1e-12)


def test_auc_single_class_is_nan():
  assert math.isnan(M.auc_roc(np.array([0.1, 0.7]), np.array([True, True])))
  assert math.isnan(M.auc_roc(np.array([0.1, 0.7]), np.array([False, False])))
  assert math.isnan(M.auc_roc(np.zeros(0), np.zeros(0, bool)))


def test_auc_errors():
  with pytest.raises(ValueError, match=r'\(3,\).*\(4,\)'):
    M.auc_roc(np.zeros(3), np.zeros(4, bool))
  with pytest.raises(ValueError, match='NaN'):
    M.auc_roc(np.array([0.1, np.nan]), np.array([True, False]))
  with pytest.raises(ValueError, match='0/1'):
    M.auc_roc(np.array([0.1, 0.2]), np.array([0, 2]))


# ------------------------------------------------------- image_metrics ---


@pytest.mark.parametrize('seed', [0, 1])
def test_image_metrics_match_sklearn_inside_fov(seed):
  prob, label, fov = _image(seed)
  r = M.image_metrics(prob, label, fov, threshold=0.5)
  y, p = label[fov], prob[fov]
  pred = p >= 0.5
  assert r['dice'] == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
  assert r['iou'] == pytest.approx(skm.jaccard_score(y, pred), abs=1e-12)
  assert r['accuracy'] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
  assert r['sensitivity'] == pytest.approx(skm.recall_score(y, pred), abs=1e-12)
  assert r['specificity'] == pytest.approx(skm.recall_score(~y, ~pred), abs=1e-12)
  assert r['auc'] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-9)
  tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
  assert (r['tp'], r['fp'], r['fn'], r['tn']) == (tp, fp, fn, tn)
  assert all(type(r[k]) is int for k in M.COUNTS)
  assert all(type(r[k]) is float for k in M.METRICS)
  assert r['tp'] + r['fp'] + r['fn'] + r['tn'] == fov.sum()


def test_fov_none_is_whole_image_and_differs_from_fov():
  prob, label, fov = _image(2)
  whole = M.image_metrics(prob, label, None)
  assert whole == M.image_metrics(prob, label, np.ones_like(fov))
  assert sum(whole[k] for k in M.COUNTS) == prob.size
  # Dark, certain background outside the FOV inflates whole-image figures.
  prob_out = np.where(fov, prob, 0.0).astype(np.float32)
  label_out = label & fov
  in_fov = M.image_metrics(prob_out, label_out, fov)
  whole = M.image_metrics(prob_out, label_out, None)
  assert whole['specificity'] > in_fov['specificity']
  assert whole['accuracy'] > in_fov['accuracy']
  assert whole['tp'] == in_fov['tp'] and whole['dice'] == in_fov['dice']


def test_image_metrics_both():
  prob, label, fov = _image(3)
  both = M.image_metrics_both(prob, label, fov, threshold=0.4)
  in_fov = M.image_metrics(prob, label, fov, threshold=0.4)
  whole = M.image_metrics(prob, label, None, threshold=0.4)
  assert {k: both[k] for k in in_fov} == in_fov
  assert {k: both['whole_' + k] for k in whole} == whole
  assert len(both) == 2 * len(in_fov)
  with pytest.raises(ValueError, match='fov'):
    M.image_metrics_both(prob, label, None)


def test_threshold_semantics_is_greater_or_equal():
  prob = np.array([[0.2, 0.5, 0.5000001, 0.8]], np.float32)
  label = np.array([[False, True, True, True]])
  r = M.image_metrics(prob, label)
  assert (r['tp'], r['fp'], r['fn'], r['tn']) == (3, 0, 0, 1)  # 0.5 counts as vessel.
  r = M.image_metrics(prob, label, threshold=0.51)
  assert (r['tp'], r['fp'], r['fn'], r['tn']) == (1, 0, 2, 1)
  r = M.image_metrics(prob, label, threshold=0.0)
  assert (r['tp'], r['fp'], r['fn'], r['tn']) == (3, 1, 0, 0)
  # Threshold does not move AUC.
  assert M.image_metrics(prob, label, threshold=0.9)['auc'] == r['auc'] == 1.0


def test_perfect_prediction_gives_one_everywhere():
  _, label, fov = _image(4)
  r = M.image_metrics(label.astype(np.float32), label, fov)
  for k in M.METRICS:
    assert r[k] == 1.0, k
  assert r['fp'] == r['fn'] == 0


def test_empty_conventions():
  label = np.zeros((4, 5), bool)
  r = M.image_metrics(np.zeros((4, 5)), label)
  assert r['dice'] == r['iou'] == r['accuracy'] == r['specificity'] == 1.0
  assert math.isnan(r['sensitivity']) and math.isnan(r['auc'])
  r = M.image_metrics(np.ones((4, 5)), label)  # All false positives.
  assert r['dice'] == r['iou'] == r['accuracy'] == r['specificity'] == 0.0
  r = M.image_metrics(np.ones((4, 5)), ~label)
  assert math.isnan(r['specificity']) and r['sensitivity'] == 1.0
  with pytest.raises(ValueError, match='fov is empty'):
    M.image_metrics(np.ones((4, 5)), label, np.zeros((4, 5), bool))


def test_image_metrics_errors():
  prob, label, fov = _image(5, shape=(10, 12))
  with pytest.raises(ValueError, match=r'label shape \(12, 10\) != prob shape \(10, 12\)'):
    M.image_metrics(prob, label.T, fov)
  with pytest.raises(ValueError, match=r'fov shape \(10, 11\) != prob shape \(10, 12\)'):
    M.image_metrics(prob, label, fov[:, :11])
  bad = prob.copy()
  bad[3, 4] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    M.image_metrics(bad, label, fov)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    M.image_metrics(prob * 2 - 0.5, label, fov)
  with pytest.raises(ValueError, match='label must be bool'):
    M.image_metrics(prob, label.astype(np.uint8), fov)
  with pytest.raises(ValueError, match='fov must be bool'):
    M.image_metrics(prob, label, fov.astype(np.uint8))
  with pytest.raises(ValueError, match='float'):
    M.image_metrics((prob * 255).astype(np.uint8), label, fov)
  with pytest.raises(ValueError, match=r'\(H, W\)'):
    M.image_metrics(prob[None], label[None], None)
  with pytest.raises(ValueError, match='threshold'):
    M.image_metrics(prob, label, fov, threshold=float('nan'))


# ---------------------------------------------------------- summarize ---


def _rows(seed, n=12, shift=0.0):
  rng = _rng(seed)
  rows = []
  for i in range(n):
    values = {m: float(np.clip(0.8 + shift + 0.05 * rng.normal(), 0, 1)) for m in M.METRICS}
    rows.append({'id': f'img{i:02d}', **values})
  return rows


def test_summarize_matches_numpy():
  rows = _rows(0)
  s = M.summarize(rows)
  assert set(s) == set(M.METRICS)
  for m in M.METRICS:
    v = np.array([r[m] for r in rows])
    assert s[m]['mean'] == pytest.approx(v.mean(), abs=1e-15)
    assert s[m]['std'] == pytest.approx(v.std(ddof=1), abs=1e-15)
    assert (s[m]['n'], s[m]['n_nan']) == (12, 0)
    assert (s[m]['min'], s[m]['max']) == (v.min(), v.max())


def test_summarize_skips_and_counts_nan():
  rows = _rows(1, n=5)
  rows[1]['auc'] = math.nan
  rows[3]['auc'] = None  # As read back from JSON.
  s = M.summarize(rows, metrics=('auc', 'dice'))
  v = np.array([rows[i]['auc'] for i in (0, 2, 4)])
  assert (s['auc']['n'], s['auc']['n_nan']) == (3, 2)
  assert s['auc']['mean'] == pytest.approx(v.mean())
  assert s['auc']['std'] == pytest.approx(v.std(ddof=1))
  assert s['dice']['n'] == 5 and set(s) == {'auc', 'dice'}
  one = M.summarize(rows[:1], metrics=('dice',))['dice']
  assert one['n'] == 1 and one['mean'] == rows[0]['dice'] and math.isnan(one['std'])


def test_summarize_errors():
  with pytest.raises(ValueError, match='no rows'):
    M.summarize([])
  with pytest.raises(ValueError, match="'img00' has no metric 'auc'"):
    M.summarize([{'id': 'img00', 'dice': 0.5}], metrics=('dice', 'auc'))


# ----------------------------------------------------------- wilcoxon ---


def test_wilcoxon_matches_scipy_and_pairs_by_id():
  a, b = _rows(2), _rows(3, shift=-0.03)
  b_shuffled = [b[i] for i in _rng(9).permutation(len(b))]
  r = M.wilcoxon(a, b_shuffled, metric='dice')
  xa, xb = np.array([x['dice'] for x in a]), np.array([x['dice'] for x in b])
  want = stats.wilcoxon(xa, xb)
  assert r['p_value'] == pytest.approx(want.pvalue, abs=1e-12)
  assert r['statistic'] == pytest.approx(want.statistic)
  assert r['n'] == 12 and r['mean_diff'] == pytest.approx((xa - xb).mean())
  assert r['note'] is None


def test_wilcoxon_all_zero_differences():
  a = _rows(4)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    r = M.wilcoxon(a, [dict(x) for x in a], metric='auc')
  assert r['p_value'] == 1.0 and r['statistic'] == 0.0 and r['mean_diff'] == 0.0
  assert 'zero' in r['note']


def test_wilcoxon_some_zero_differences_match_scipy():
  a = _rows(5)
  b = [dict(x) for x in a]
  for i, x in enumerate(b):
    if i % 3:
      x['dice'] -= 0.01 * i
  r = M.wilcoxon(a, b)
  want = stats.wilcoxon([x['dice'] for x in a], [x['dice'] for x in b])
  assert r['p_value'] == pytest.approx(want.pvalue, abs=1e-12)
  assert '4 zero differences' in r['note']


def test_wilcoxon_errors():
  a, b = _rows(6, n=5), _rows(7, n=5)
  b[0]['id'] = 'other'
  want = r"missing from rows_b: \['img00'\].*missing from rows_a: \['other'\]"
  with pytest.raises(ValueError, match=want):
    M.wilcoxon(a, b)
  with pytest.raises(ValueError, match='duplicate id'):
    M.wilcoxon(a + a[:1], a)
  c = [dict(x) for x in a]
  c[2]['dice'] = math.nan
  with pytest.raises(ValueError, match='img02'):
    M.wilcoxon(a, c)


def test_library_does_not_import_sklearn():
  import subprocess
  import sys
  code = ('import sys, vesseljax.evaluate.metrics, vesseljax.evaluate.report; '
          'assert "sklearn" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True)
