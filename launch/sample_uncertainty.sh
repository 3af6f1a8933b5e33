#!/usr/bin/env bash
# Refined vessel maps with ensemble uncertainty for your own photos.
#
#   bash launch/sample_uncertainty.sh PHOTO_OR_FOLDER OUT_DIR [WORKDIR] [--config overrides]
#
# WORKDIR holds refiner.msgpack and autoencoder.msgpack (and the coarse model as
# params.msgpack, or pass --config.diffusion.coarse_checkpoint=...). Per photo:
# <stem>_prob.png (16-bit), _mask.png, _overlay.png, _variance.png (colour map,
# 0..0.25) and _uncertain.png (pixels with variance >= sample.uncertain_variance
# in magenta). Exits non-zero if any photo could not be read (the rest are done).
# Existing outputs in OUT_DIR are refused; add --overwrite to replace them.
set -eu
INPUT=${1:?photo or folder}; OUTPUT=${2:?output folder}; WORKDIR=${3:-$HOME/runs/drive_refiner}
shift $(( $# < 3 ? $# : 3 ))
python -m vesseljax.launch --config="${CONFIG:-configs/drive.py}" --workdir="$WORKDIR" --mode=uncertainty \
  --input="$INPUT" --output="$OUTPUT" --config.sample.ensemble="${K:-5}" "$@"
