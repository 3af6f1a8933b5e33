"""Errors by vessel width (evaluate/width.py) on drawn bars with known widths."""

import numpy as np
import pytest

from vesseljax.evaluate import width


def _bars(widths, length=40, gap=6):
  """A label of horizontal bars, one per width, and each bar's (rows, interior cols)."""
  h = sum(widths) + gap * (len(widths) + 1)
  label = np.zeros((h, length + 2 * gap), bool)
  bars, y = [], gap
  for w in widths:
    label[y:y + w, gap:gap + length] = True
    bars.append((slice(y, y + w), slice(gap + 3, gap + length - 3)))
    y += w + gap
  return label, bars


def test_width_classes_of_bars():
  widths = (1, 2, 3, 4, 5, 7)
  label, bars = _bars(widths)
  classes = width.width_classes(label)
  assert set(np.unique(classes[~label])) == {0}
  want = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 7: 3}
  for w, (rows, cols) in zip(widths, bars):
    assert np.all(classes[rows, cols] == want[w]), (w, np.unique(classes[rows, cols]))


def test_error_breakdown_counts_by_hand():
  label, bars = _bars((1, 5))
  fov = np.ones_like(label)
  prob = label.astype(np.float32)
  thin_rows, thin_cols = bars[0]
  prob[thin_rows, thin_cols.start:thin_cols.start + 10] = 0.0  # miss 10 thin pixels
  prob[0, 0] = 1.0                                             # one far false positive
  thick_rows, thick_cols = bars[1]
  prob[thick_rows.start - 1, thick_cols] = 0.9                 # a row of near false positives
  got = width.error_breakdown(prob, label, fov)
  classes = width.width_classes(label)
  n_thin = int((classes == 1).sum())
  assert got['n_thin'] == n_thin == 40
  assert got['sens_thin'] == pytest.approx((n_thin - 10) / n_thin)
  assert got['sens_thick'] == got['sens_medium'] == 1.0
  assert got['n_medium'] <= 8  # only the thick bar's end corners, which the 5-px disc misses
  negatives = (~label).sum()
  n_near = thick_cols.stop - thick_cols.start
  assert got['fp'] == n_near + 1 and got['fn'] == 10
  assert got['fp_far'] == pytest.approx(1 / negatives)
  assert got['fp_near'] == pytest.approx(n_near / negatives)


def test_disc_refuses_even_diameters():
  assert width.disc(3).all() and width.disc(5).sum() == 21
  with pytest.raises(ValueError, match='odd'):
    width.disc(4)
