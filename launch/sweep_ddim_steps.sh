#!/usr/bin/env bash
# DDIM step sweep of the refined pipeline: Dice and seconds per image for each N.
#
#   bash launch/sweep_ddim_steps.sh configs/drive.py $HOME/runs/drive_refiner [more --config overrides]
#
# Each N writes <workdir>/eval_refined_<split>_ddim<N>_....json/.md (refined and
# coarse rows, Wilcoxon, variance AUROC, seconds per image); existing files are
# kept (the evaluate stage refuses to overwrite), so an interrupted sweep resumes.
set -eu
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
STEPS=${STEPS:-"10 20 30 50 100"}
for n in $STEPS; do
  python -m vesseljax.launch --config="$CONFIG" --workdir="$WORKDIR" --mode=evaluate_refined \
    --config.sample.steps="$n" "$@" || echo "steps=$n: exit $? (kept going)"
done
grep -h "diff(" "$WORKDIR"/eval_refined_*ddim*.md || true
