#!/usr/bin/env bash
# Trains the refiner (mask autoencoder, then image encoder + denoiser) for one
# dataset on one GPU and exports params-only weights.
#
#   DATA=/path/to/datasets MAPS=a.npz,b.npz,... RUNS=/tmp/runs OUT=/tmp/out bash launch/gpu_refiner.sh
#
# MAPS: the holdout_maps.npz files of the k-fold coarse runs (launch/gpu_coarse.sh
# writes them); empty trains on the degradation model instead. CONFIG (default
# configs/drive.py), AE_STEPS, STEPS and EXTRA (more --config overrides) as named.
# Outputs in OUT: autoencoder.msgpack(.json), refiner.msgpack(.json), refiner_runs.tgz.
set -u
DATA=${DATA:-../shared/datasets}
RUNS=${RUNS:-$HOME/runs/gpu}
OUT=${OUT:-$RUNS/out}
CONFIG=${CONFIG:-configs/drive.py}
MAPS=${MAPS:-}
AE_STEPS=${AE_STEPS:-2000}
STEPS=${STEPS:-10000}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$OUT"
W="$RUNS/refiner"
args=(--config="$CONFIG" --workdir="$W" --config.data.root="$DATA" --config.diffusion.log_every=100
      --config.diffusion.checkpoint_every=500 --config.diffusion.ae_steps="$AE_STEPS"
      --config.diffusion.num_steps="$STEPS")
[ -n "$MAPS" ] && args+=(--config.diffusion.coarse_source=oof --config.diffusion.coarse_maps="$MAPS")
# shellcheck disable=SC2206
args+=($EXTRA)
$PYTHON -m vesseljax.launch --mode=train_autoencoder "${args[@]}" 2>&1 | tee "$RUNS/refiner_ae.log" | grep -v "Delay kernel"
$PYTHON -m vesseljax.launch --mode=train_refiner "${args[@]}" 2>&1 | tee "$RUNS/refiner.log" | grep -v "Delay kernel"
for f in autoencoder.msgpack autoencoder.msgpack.json refiner.msgpack refiner.msgpack.json; do
  [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"
done
(cd "$RUNS" && tar czf "$OUT/refiner_runs.tgz" ./refiner*.log ./refiner/*.jsonl ./refiner/config.json)
ls -la "$OUT"
