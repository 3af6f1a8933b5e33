"""Per-image segmentation metrics, their summaries and a paired test (NumPy).

Host-side and exact: every metric is computed from integer pixel counts, and
AUC-ROC is the exact Mann-Whitney statistic with ties counted as one half, so
it equals `sklearn.metrics.roc_auc_score` (the library does not import
scikit-learn; the tests compare against it). Everything is vectorised; an HRF
image (3504x2336, about 8.2M pixels) is scored in well under a second.

Protocol (see `datasets/README.md`, "Protocol notes"): score probability maps
at the label's native resolution, inside the field of view (FOV). Whole-image
figures may be reported beside them, always under a `whole_` prefix
(`image_metrics_both`).

Conventions:
  * Prediction: a pixel is called vessel where `prob >= threshold` (so a
    probability of exactly 0.5 is a vessel at the default threshold).
  * Empty denominators: Dice and IoU are 1.0 when neither the prediction nor
    the label has a positive pixel (perfect agreement on "nothing");
    sensitivity is NaN when the label has no positive pixel, specificity NaN
    when it has no negative pixel, AUC-ROC NaN when either class is absent.
    An empty FOV is an error. `summarize` skips NaN values and counts them.
  * Summaries use the sample standard deviation (ddof=1), as papers do.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

METRICS = ('dice', 'iou', 'accuracy', 'sensitivity', 'specificity', 'auc')
COUNTS = ('tp', 'fp', 'fn', 'tn')
WHOLE_PREFIX = 'whole_'


# ----------------------------------------------------------------------------
# AUC-ROC.
# ----------------------------------------------------------------------------


def _as_scores(scores: Any, name: str = 'scores') -> np.ndarray:
  """Real-valued array without NaN; bool becomes uint8. Raises ValueError."""
  arr = np.asarray(scores)
  if arr.dtype == np.bool_:
    return arr.view(np.uint8)
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f'{name} must be a real-valued array, got dtype {arr.dtype}')
  if np.issubdtype(arr.dtype, np.floating) and arr.size and np.isnan(arr.min()):
    raise ValueError(f'{name} contains NaN ({int(np.isnan(arr).sum())} values)')
  return arr


def _as_binary_labels(labels: Any, name: str = 'labels') -> np.ndarray:
  """Bool array from bool or {0, 1}-valued input. Raises ValueError."""
  arr = np.asarray(labels)
  if arr.dtype == np.bool_:
    return arr
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f'{name} must be bool or 0/1-valued, got dtype {arr.dtype}')
  bad = (arr != 0) & (arr != 1)
  if bad.any():
    examples = np.unique(arr[bad])[:5].tolist()
    raise ValueError(f'{name} must be bool or 0/1-valued, found other values, e.g. {examples}')
  return arr == 1


def _auc_pos_neg(pos: np.ndarray, neg: np.ndarray) -> float:
  """Exact AUC from the scores of the positives and of the negatives.

  AUC = P(s_pos > s_neg) + 0.5 P(s_pos == s_neg), counted exactly: for each
  positive, `searchsorted` on the sorted negatives gives the number of
  strictly lower (left) and lower-or-equal (right) negatives; left + right is
  twice that positive's count of wins with ties as halves. The sum is an
  int64 (exact for any image), divided once in float64.
  """
  n_pos, n_neg = pos.size, neg.size
  if n_pos == 0 or n_neg == 0:
    return math.nan
  neg_sorted = np.sort(neg.ravel())
  pos_sorted = np.sort(pos.ravel())  # Sorted queries: cache-friendly search.
  left = np.searchsorted(neg_sorted, pos_sorted, side='left')
  right = np.searchsorted(neg_sorted, pos_sorted, side='right')
  twice_u = int(left.sum(dtype=np.int64)) + int(right.sum(dtype=np.int64))
  return float(twice_u / (2.0 * float(n_pos) * float(n_neg)))


def auc_roc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Exact area under the ROC curve, ties handled.

  Equal to the Mann-Whitney U statistic over n_pos * n_neg (tied scores count
  one half, i.e. the average-rank form; the same as a trapezoid ROC where
  tied scores are one threshold, and as `sklearn.metrics.roc_auc_score`).
  Invariant to any strictly increasing transform of the scores.

  Args:
    scores: any shape, real dtype (float, int or bool); higher means "more
      positive". NaN is rejected.
    labels: same shape, bool or {0, 1}-valued.

  Returns:
    AUC in [0, 1] as a Python float; NaN when `labels` holds only one class
    (or is empty): AUC is undefined there.

  Raises:
    ValueError: shape mismatch, NaN scores, non-binary labels.
  """
  s = _as_scores(scores)
  y = _as_binary_labels(labels)
  if s.shape != y.shape:
    raise ValueError(f'scores shape {s.shape} != labels shape {y.shape}')
  return _auc_pos_neg(s[y], s[~y])


# ----------------------------------------------------------------------------
# Per-image metrics.
# ----------------------------------------------------------------------------


def _ratio(num: int, den: int, empty: float) -> float:
  return float(num) / float(den) if den else empty


def _metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
  """The five confusion-based metrics, with the module's empty conventions."""
  return {
      'dice': _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
      'iou': _ratio(tp, tp + fp + fn, 1.0),
      'accuracy': _ratio(tp + tn, tp + fp + fn + tn, math.nan),
      'sensitivity': _ratio(tp, tp + fn, math.nan),
      'specificity': _ratio(tn, tn + fp, math.nan),
  }


def _validate(prob: Any, label: Any, fov: Any, threshold: float):
  """Checks inputs of `image_metrics`; returns them as arrays."""
  prob = np.asarray(prob)
  label = np.asarray(label)
  if prob.ndim != 2:
    raise ValueError(f'prob must be (H, W), got shape {prob.shape}')
  if not np.issubdtype(prob.dtype, np.floating):
    raise ValueError(f'prob must be a float array of probabilities, got dtype {prob.dtype}')
  if label.shape != prob.shape:
    raise ValueError(f'label shape {label.shape} != prob shape {prob.shape}')
  if label.dtype != np.bool_:
    raise ValueError(
        f'label must be bool, got dtype {label.dtype} (convert explicitly, e.g. label > 0)')
  if fov is not None:
    fov = np.asarray(fov)
    if fov.shape != prob.shape:
      raise ValueError(f'fov shape {fov.shape} != prob shape {prob.shape}')
    if fov.dtype != np.bool_:
      raise ValueError(
          f'fov must be bool, got dtype {fov.dtype} (convert explicitly, e.g. fov > 0)')
  if prob.size == 0:
    raise ValueError('prob is empty: no pixels to score')
  lo, hi = prob.min(), prob.max()  # NaN propagates through min/max.
  if np.isnan(lo) or np.isnan(hi):
    raise ValueError(f'prob contains NaN ({int(np.isnan(prob).sum())} pixels)')
  if lo < 0.0 or hi > 1.0:
    raise ValueError(f'prob must lie in [0, 1], got range [{float(lo)}, {float(hi)}]')
  is_number = isinstance(threshold, (int, float, np.integer, np.floating))
  if not is_number or not math.isfinite(threshold):
    raise ValueError(f'threshold must be a finite number, got {threshold!r}')
  return prob, label, fov


def image_metrics(prob: np.ndarray,
                  label: np.ndarray,
                  fov: Optional[np.ndarray] = None,
                  threshold: float = 0.5) -> dict[str, Any]:
  """Dice, IoU, accuracy, sensitivity, specificity and AUC-ROC of one image.

  Only pixels inside `fov` are scored (the whole image when `fov` is None).
  The prediction is `prob >= threshold`; AUC-ROC uses `prob` itself.

  Args:
    prob: (H, W) float (any float dtype) vessel probabilities in [0, 1], at
      the label's native resolution.
    label: (H, W) bool ground truth, True on vessel pixels.
    fov: (H, W) bool field-of-view mask, or None for the whole image.
    threshold: finite float; a pixel is predicted vessel where
      `prob >= threshold`.

  Returns:
    Dict with the six `METRICS` as Python floats (in [0, 1], or NaN where
    undefined, see the module docstring) and the counts 'tp', 'fp', 'fn',
    'tn' as Python ints (their sum is the number of scored pixels).

  Raises:
    ValueError: wrong ndim/dtype, shape mismatch (naming both shapes), NaN or
      out-of-range probabilities, non-finite threshold, empty FOV.
  """
  prob, label, fov = _validate(prob, label, fov, threshold)
  pred = prob >= threshold
  if fov is None:
    n = prob.size
    tp = int(np.count_nonzero(pred & label))
    n_pred = int(np.count_nonzero(pred))
    n_label = int(np.count_nonzero(label))
    pos, neg = prob[label], prob[~label]
  else:
    n = int(np.count_nonzero(fov))
    if n == 0:
      raise ValueError('fov is empty: no pixels to score')
    label_in = label & fov
    tp = int(np.count_nonzero(pred & label_in))
    n_pred = int(np.count_nonzero(pred & fov))
    n_label = int(np.count_nonzero(label_in))
    pos, neg = prob[label_in], prob[fov & ~label]
  fp = n_pred - tp
  fn = n_label - tp
  tn = n - tp - fp - fn
  out: dict[str, Any] = _metrics_from_counts(tp, fp, fn, tn)
  out['auc'] = _auc_pos_neg(pos, neg)
  out.update(tp=tp, fp=fp, fn=fn, tn=tn)
  return {k: out[k] for k in METRICS + COUNTS}


def image_metrics_both(prob: np.ndarray,
                       label: np.ndarray,
                       fov: np.ndarray,
                       threshold: float = 0.5) -> dict[str, Any]:
  """FOV metrics under their plain names plus whole-image ones as `whole_*`.

  Args:
    prob: (H, W) float probabilities in [0, 1].
    label: (H, W) bool ground truth.
    fov: (H, W) bool field of view (required here).
    threshold: prediction is `prob >= threshold`.

  Returns:
    The keys of `image_metrics` (inside the FOV: the protocol's figures) and
    the same keys prefixed with 'whole_' (e.g. 'whole_dice', 'whole_tp')
    computed over every pixel of the image.

  Raises:
    ValueError: as `image_metrics`, or `fov` is None.
  """
  if fov is None:
    raise ValueError('image_metrics_both needs a fov mask; '
                     'use image_metrics(fov=None) for the whole image only')
  out = image_metrics(prob, label, fov, threshold)
  whole = image_metrics(prob, label, None, threshold)
  out.update({WHOLE_PREFIX + k: v for k, v in whole.items()})
  return out


# ----------------------------------------------------------------------------
# Across images.
# ----------------------------------------------------------------------------


def _row_value(row: Mapping[str, Any], metric: str, index: int) -> float:
  """Float value of `metric` in `row`; None (JSON null) reads as NaN."""
  if metric not in row:
    ident = row.get('id', f'#{index}')
    raise ValueError(f'row {ident!r} has no metric {metric!r} (keys: {sorted(row)})')
  value = row[metric]
  if value is None:
    return math.nan
  try:
    return float(value)
  except (TypeError, ValueError):
    ident = row.get('id', f'#{index}')
    raise ValueError(f'row {ident!r}: metric {metric!r} is not a number: {value!r}') from None


def summarize(rows: Sequence[Mapping[str, Any]],
              metrics: Sequence[str] = METRICS) -> dict[str, dict[str, Any]]:
  """Mean, sample std, n, min and max of each metric over images.

  NaN values (and None, as stored in JSON) are left out and counted.

  Args:
    rows: per-image dicts, e.g. from `image_metrics` plus an 'id' key.
    metrics: the metric names to summarise; each must be in every row.

  Returns:
    {metric: {'mean', 'std', 'n', 'n_nan', 'min', 'max'}}: 'n' counts the
    finite values used, 'n_nan' the skipped ones; 'std' is the sample
    standard deviation (ddof=1), NaN when n < 2; mean/min/max are NaN when
    n == 0. Floats and ints are Python scalars.

  Raises:
    ValueError: no rows, a metric missing from a row, a non-numeric value.
  """
  if len(rows) == 0:
    raise ValueError('summarize: no rows')
  out = {}
  for metric in metrics:
    values = np.array([_row_value(r, metric, i) for i, r in enumerate(rows)], np.float64)
    nan = np.isnan(values)
    v = values[~nan]
    n = int(v.size)
    out[metric] = {
        'mean': float(v.mean()) if n else math.nan,
        'std': float(v.std(ddof=1)) if n >= 2 else math.nan,
        'n': n,
        'n_nan': int(nan.sum()),
        'min': float(v.min()) if n else math.nan,
        'max': float(v.max()) if n else math.nan,
    }
  return out


def _by_id(rows: Sequence[Mapping[str, Any]], which: str) -> dict[str, Mapping[str, Any]]:
  out = {}
  for i, row in enumerate(rows):
    if 'id' not in row:
      raise ValueError(f'{which}: row #{i} has no "id" field')
    if row['id'] in out:
      raise ValueError(f'{which}: duplicate id {row["id"]!r}')
    out[row['id']] = row
  return out


def wilcoxon(rows_a: Sequence[Mapping[str, Any]],
             rows_b: Sequence[Mapping[str, Any]],
             metric: str = 'dice') -> dict[str, Any]:
  """Two-sided paired Wilcoxon signed-rank test of method A against B.

  Rows are paired by their 'id' field, and the test is
  `scipy.stats.wilcoxon(a, b)` with scipy's defaults (zero differences
  dropped, 'wilcox' method, exact p-value for small n without ties/zeros).

  Args:
    rows_a: per-image dicts of method A, each with 'id' and `metric`.
    rows_b: the same images scored for method B.
    metric: which metric to compare.

  Returns:
    {'p_value': float, 'statistic': float, 'n': number of pairs,
     'mean_diff': mean of a - b, 'note': None or a string}. When every
    difference is zero the test is undefined: p_value is 1.0, statistic 0.0
    and 'note' says so.

  Raises:
    ValueError: missing or duplicate ids (naming them), a metric missing or
      NaN in any row (naming the ids), fewer than one pair.
  """
  from scipy import stats  # Local: keeps `import vesseljax` light.

  a_by_id, b_by_id = _by_id(rows_a, 'rows_a'), _by_id(rows_b, 'rows_b')
  only_a = sorted(set(a_by_id) - set(b_by_id), key=str)
  only_b = sorted(set(b_by_id) - set(a_by_id), key=str)
  if only_a or only_b:
    raise ValueError(
        f'ids do not match: missing from rows_b: {only_a}; missing from rows_a: {only_b}')
  if not a_by_id:
    raise ValueError('wilcoxon: no rows')
  ids = sorted(a_by_id, key=str)
  a = np.array([_row_value(a_by_id[k], metric, i) for i, k in enumerate(ids)], np.float64)
  b = np.array([_row_value(b_by_id[k], metric, i) for i, k in enumerate(ids)], np.float64)
  bad = [k for k, x, y in zip(ids, a, b) if np.isnan(x) or np.isnan(y)]
  if bad:
    raise ValueError(f'metric {metric!r} is NaN/missing for ids {bad}')
  diff = a - b
  result = {'n': len(ids), 'mean_diff': float(diff.mean()), 'note': None}
  if not np.any(diff != 0):
    result.update(p_value=1.0, statistic=0.0,
                  note='all differences are zero: no evidence of a difference')
    return result
  res = stats.wilcoxon(a, b, alternative='two-sided')
  result.update(p_value=float(res.pvalue), statistic=float(res.statistic))
  n_zero = int(np.sum(diff == 0))
  if n_zero:
    result['note'] = f'{n_zero} zero differences dropped (zero_method="wilcox")'
  return result
