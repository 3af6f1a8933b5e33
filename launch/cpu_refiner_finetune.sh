#!/usr/bin/env bash
# A refiner fine-tuned on out-of-fold training pairs, on this CPU (DRIVE unless
# CONFIG says otherwise, below):
#
#   bash launch/cpu_refiner_finetune.sh [$HOME/runs]
#
# 1. launch/cpu_oof_folds.sh: 4 LU-Net+RA fold runs (FOLD_STEPS each) and their
#    out-of-fold maps of the 20 training images (skipped where they exist);
# 2. fine-tunes a refiner (INIT; default the committed weights/drive_refiner.msgpack;
#    the third session's run started from the degrade refiner, see BUILD_NOTES.md)
#    on 'oof+degrade' pairs (each training image once with its out-of-fold
#    maps, once degraded), FT_STEPS planned steps, stopped after FT_SECONDS
#    (checkpointed, exported; rerun to resume);
# 3. evaluates it on the test split, Diff(20) from the coarse latent
#    noised halfway, k = 5, with 'direct' and 'residual' decoding (DECODES).
#
# MAPS (comma-separated holdout_maps.npz files) replaces step 1, e.g. the in-fold maps of
# launch/infold_maps.py with SOURCE=oof.
# Variants: NAME names the workdir ($RUNS/$NAME) and EXTRA adds config flags, e.g.
#   NAME=drive_refiner_detail EXTRA=--config.diffusion.pixel_detail=True DECODES=direct \
#     bash launch/cpu_refiner_finetune.sh
# Another dataset: CONFIG, its coarse model COARSE, the refiner to start from
# INIT (its autoencoder AE, a path without .msgpack), SOURCE=degrade (no folds:
# DEGRADE_VARIANTS degraded maps per training image), e.g.
#   CONFIG=configs/chase.py COARSE=weights/chase_db1_lunet_ra.msgpack SOURCE=degrade \
#     DECODES=direct bash launch/cpu_refiner_finetune.sh
set -eu
RUNS=${1:-$HOME/runs}
FT_STEPS=${FT_STEPS:-1200}; FT_SECONDS=${FT_SECONDS:-2400}
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/drive.py}; DATASET=$(basename "$CONFIG" .py)
COARSE=${COARSE:-weights/drive_lunet_ra.msgpack}
INIT=${INIT:-weights/drive_refiner.msgpack}; AE=${AE:-weights/drive_autoencoder_c4}
SOURCE=${SOURCE:-oof+degrade}
NAME=${NAME:-${DATASET}_refiner_oof}; EXTRA=${EXTRA:-}; DECODES=${DECODES:-direct residual}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$RUNS/$NAME
PAIRS=(--config.diffusion.coarse_source="$SOURCE")
if [[ $SOURCE == *oof* ]]; then
  if [ -z "${MAPS:-}" ]; then
    PYTHON=$PYTHON bash "$HERE/cpu_oof_folds.sh" "$CONFIG" "$RUNS/${DATASET}_oof"
    MAPS=$(ls "$RUNS/${DATASET}"_oof/fold*/holdout_maps.npz | paste -sd, -)
  fi
  PAIRS+=(--config.diffusion.coarse_maps="$MAPS" --config.diffusion.degrade_variants="${DEGRADE_VARIANTS:-1}")
else
  PAIRS+=(--config.diffusion.degrade_variants="${DEGRADE_VARIANTS:-4}")
fi
mkdir -p "$W"
for ext in msgpack msgpack.json; do  # the autoencoder the refiner to start from was trained with
  [ -f "$W/autoencoder.$ext" ] || cp "$AE.$ext" "$W/autoencoder.$ext"
done
$PYTHON -m vesseljax.launch --config="$CONFIG" --mode=train_refiner --workdir="$W" \
  --config.diffusion.init_checkpoint="$INIT" "${PAIRS[@]}" --config.diffusion.num_steps="$FT_STEPS" \
  --config.diffusion.learning_rate=1e-4 --config.diffusion.warmup_steps=50 \
  --config.diffusion.max_train_seconds="$FT_SECONDS" --config.diffusion.checkpoint_every=100 $EXTRA
for decode in $DECODES; do
  $PYTHON -m vesseljax.launch --config="$CONFIG" --mode=evaluate_refined --workdir="$W" $EXTRA \
    --config.diffusion.coarse_checkpoint="$COARSE" \
    --config.sample.start=coarse --config.sample.decode=$decode || echo "evaluate ($decode): exit $?"
done
