#!/usr/bin/env bash
# Out-of-fold coarse maps for the refiner's training pairs, on this CPU.
#
#   bash launch/cpu_oof_folds.sh configs/drive.py $HOME/runs/drive_oof
#
# For k in 0..K-1: LU-Net+RA trained without fold k of the training split
# (FOLD_STEPS steps of 16x128x128 patches; ~4.5 s a step on the 2-core CPU),
# then --mode=holdout writes <root>/fold<k>/holdout_maps.npz: the fold's model on
# the training images it never saw. A run resumes from its Orbax checkpoint and
# a fold whose maps exist is skipped, so the script can be stopped and rerun.
# The comma-separated list it prints is --config.diffusion.coarse_maps for
# --config.diffusion.coarse_source=oof.
set -eu
CONFIG=${1:?config file}; ROOT=${2:?root folder for the fold runs}; shift 2
FOLDS=${FOLDS:-4}; FOLD_STEPS=${FOLD_STEPS:-200}
PYTHON=${PYTHON:-python}
for k in $(seq 0 $((FOLDS - 1))); do
  w=$ROOT/fold$k
  [ -f "$w/holdout_maps.npz" ] && { echo "[oof] fold $k: maps exist"; continue; }
  a=(--config="$CONFIG" --workdir="$w" --config.data.num_folds="$FOLDS" --config.data.fold="$k"
     --config.train.num_steps="$FOLD_STEPS" --config.train.eval_every="$FOLD_STEPS"
     --config.train.checkpoint_every=50 --config.train.log_every=25 "$@")
  echo "[oof] fold $k: train"
  $PYTHON -m vesseljax.launch --mode=train "${a[@]}"
  [ -f "$w/params.msgpack" ] || $PYTHON -m vesseljax.launch --mode=export "${a[@]}"
  echo "[oof] fold $k: holdout"
  $PYTHON -m vesseljax.launch --mode=holdout "${a[@]}"
done
ls "$ROOT"/fold*/holdout_maps.npz | paste -sd, -
