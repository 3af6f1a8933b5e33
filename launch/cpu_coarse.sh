#!/usr/bin/env bash
# Trains and evaluates the coarse models of the issue-3 table on this CPU, one
# run after another (one training process already keeps both cores busy).
#
#   bash launch/cpu_coarse.sh                 # every run below, in this order
#   ONLY="chase_lunet hrf512_lunet_ra" bash launch/cpu_coarse.sh
#
# Each run trains in $RUNS/<run> (800 steps of 16x128x128 patches, ~45 min on
# the 2-core CPU) and resumes from its Orbax checkpoint when started again, so
# the script can be stopped at any point and rerun; an evaluation whose
# eval_test.json exists is skipped (delete the file to redo it).
# LU-Net runs are compared (paired Wilcoxon) with the LU-Net+RA run of their
# dataset; the `_flips4` evaluations average 4 mirror images at test time.
set -u
RUNS=${RUNS:-$HOME/runs}
ONLY=${ONLY:-}
EXTRA=${EXTRA:-}   # more config overrides for every run, e.g. --config.train.num_steps=400
PYTHON=${PYTHON:-python}
L="$PYTHON -m vesseljax.launch"

# run  config  model  extra overrides
RUN_TABLE="
drive_lunet_ra   configs/drive.py lunet_ra
drive_lunet      configs/drive.py lunet
chase_lunet_ra   configs/chase.py lunet_ra
chase_lunet      configs/chase.py lunet
hrf_lunet_ra     configs/hrf.py   lunet_ra
hrf_lunet        configs/hrf.py   lunet
hrf512_lunet_ra  configs/hrf.py   lunet_ra --config.data.image_size=512
"

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

status=0
while read -r run config model extra; do
  [ -z "$run" ] && continue
  wanted "$run" || continue
  dir=$RUNS/$run
  common="--config=$config --config.model.name=$model $extra $EXTRA"
  echo "[cpu_coarse] $run: train"
  $L $common --workdir="$dir" --mode=train || { echo "[cpu_coarse] $run: training failed"; status=1; continue; }
  compare=""
  if [ "$model" = lunet ] && [ -f "$RUNS/${run%_lunet}_lunet_ra/eval_test.json" ]; then
    compare="--config.eval.compare_to=$RUNS/${run%_lunet}_lunet_ra/eval_test.json"
  fi
  if [ ! -f "$dir/eval_test.json" ]; then
    echo "[cpu_coarse] $run: evaluate"
    $L $common --workdir="$dir" --mode=evaluate $compare || status=1
  fi
  if [ ! -f "${dir}_flips4/eval_test.json" ]; then
    echo "[cpu_coarse] $run: evaluate with 4 test-time flips"
    $L $common --mode=evaluate --workdir="${dir}_flips4" --config.eval.checkpoint="$dir/params.msgpack" \
        --config.eval.flips=4 --config.eval.compare_to="$dir/eval_test.json" || status=1
  fi
done <<< "$RUN_TABLE"
exit $status
