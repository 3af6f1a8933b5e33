r"""Paired comparison of per-image results: A against each B.

  python launch/compare_results.py results/drive/refined_plain_ft_control_ddim20_coarse0.5_k5.json \
      results/drive/refined_plain_scratch_ddim20_coarse0.5_k5.json results/drive/lunet_ra.json --metrics=dice,auc

The first file is A, every other file a B. A file may be given as
'<file>.json:coarse' for the coarse-model rows an `--mode=evaluate_refined`
file keeps beside its refined rows. Rows are paired by image id, on the images
both files hold (a run on the first 10 HRF images against the whole split
compares those 10; the line says how many). For each B and metric it prints
the mean of A - B, on how many images A is higher, and the two-sided paired
Wilcoxon p (`vesseljax.evaluate.metrics.wilcoxon`).
"""

import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_METRICS = flags.DEFINE_list('metrics', ['dice', 'auc'], 'Row keys to compare.')


def main(argv):
  from vesseljax.evaluate import report  # pylint: disable=g-import-not-at-top
  if len(argv) < 3:
    raise app.UsageError('give a results file A and at least one file B')
  a_spec, b_specs = argv[1], argv[2:]
  rows_a = report.rows_of(a_spec)
  print(f'A = {a_spec} ({len(rows_a)} images)')
  for b_spec in b_specs:
    rows_b = report.rows_of(b_spec)
    for metric in _METRICS.value:
      c = report.compare_rows(rows_a, rows_b, metric)
      print(f'  vs {b_spec}: {metric} A - B {c["mean_diff"]:+.4f}, A higher on {c["higher"]} of {c["n"]}, '
            f'Wilcoxon p = {c["p_value"]:.3g}' + (f' ({c["note"]})' if c.get('note') else ''))


if __name__ == '__main__':
  app.run(main)
