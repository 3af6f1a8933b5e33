#!/usr/bin/env bash
# Trains every coarse model of the paper's tables on ONE GPU in one go, then
# exports params-only weights (and out-of-fold maps) for evaluation elsewhere.
#
#   DATA=/path/to/datasets RUNS=/tmp/runs OUT=/tmp/out bash launch/gpu_coarse.sh
#
# Runs (each its own process, MAX_PARALLEL at a time):
#   {drive,chase,hrf}_{lunet_ra,lunet}   STEPS steps each (the issue-3 table)
#   hrf512_lunet_ra                      HRF at a 512x512 working size
#   drive_fold{0..3}                     LU-Net+RA without one of 4 folds of
#                                        DRIVE train (FOLD_STEPS steps), then
#                                        --mode=holdout: out-of-fold coarse maps
# Training stops at DEADLINE_S seconds at the latest (SIGINT: the last Orbax
# checkpoint stays); every run is then exported from its best-validation
# checkpoint, so a run cut short is still usable and says how far it got
# (steps_trained in its params.json).
#
# Outputs in OUT: <run>.msgpack (params-only weights), runs.tgz (params.json
# sidecars, metrics JSONL, logs, configs, holdout maps, benchmark_gpu.json).
# Evaluation runs on any machine afterwards with --mode=evaluate
# --config.eval.checkpoint=<run>.msgpack (the sidecar must sit beside it).
set -u
DATA=${DATA:-../shared/datasets}
RUNS=${RUNS:-$HOME/runs/gpu}
OUT=${OUT:-$RUNS/out}
STEPS=${STEPS:-}            # unset: calibrated from the benchmark (below)
FOLD_STEPS=${FOLD_STEPS:-}  # unset: STEPS / 2
DEADLINE_S=${DEADLINE_S:-420}
BENCH_S=${BENCH_S:-120}     # 0 skips the benchmark
PYTHON=${PYTHON:-python3}
# Runs at a time. XLA's GPU autotuning makes compilation the cost: 11 processes
# at once took ~4.5 min each to compile (one alone: 37 s); see BUILD_NOTES.md.
MAX_PARALLEL=${MAX_PARALLEL:-3}
ONLY=${ONLY:-}              # e.g. "chase_lunet drive_fold0": only these runs (smoke tests)
EXTRA=${EXTRA:-}            # more config overrides for every run
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
mkdir -p "$RUNS" "$OUT"
t0=$(date +%s)
log() { echo "[gpu_coarse +$(( $(date +%s) - t0 ))s] $*"; }

$PYTHON -c 'import jax, flax, optax, orbax.checkpoint, ml_collections; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

if [ "$BENCH_S" -gt 0 ]; then
  log "benchmark (reference and fast forms, at most ${BENCH_S}s)"
  timeout -s INT "$BENCH_S" $PYTHON launch/benchmark.py --impls=reference,fast --repeats=20 \
    --figures=train_b16_p128,infer_b1,infer_b8,train_b4_512 \
    --out="$RUNS/benchmark_gpu.json" --overwrite > "$RUNS/benchmark.log" 2>&1
  log "benchmark exit $?"; tail -n 25 "$RUNS/benchmark.log"
fi
if [ -z "$STEPS" ]; then
  # Steps that finish by the deadline if the runs go one after another on the
  # GPU: 60 s of start-up and compilation per wave of MAX_PARALLEL runs,
  # 7 main runs and 4 half-length fold runs = 9 run-equivalents of steps.
  STEPS=$($PYTHON - "$RUNS/benchmark_gpu.json" "$DEADLINE_S" "$MAX_PARALLEL" <<'PY'
import json, sys
try:
  step_s = json.load(open(sys.argv[1]))['figures']['reference/train_b16_p128']['seconds_per_step']
except (OSError, KeyError, ValueError):
  step_s = 0.03
waves = -(-11 // int(sys.argv[3]))
print(max(400, min(4000, int((float(sys.argv[2]) - 60 * waves) / (9 * step_s) // 100 * 100))))
PY
)
  log "calibrated STEPS=$STEPS"
fi
FOLD_STEPS=${FOLD_STEPS:-$(( STEPS / 2 ))}

common=(--config.data.root="$DATA" --config.model.impl=reference
        --config.train.checkpoint_every=250 --config.train.eval_every=250 --config.train.log_every=50)
# shellcheck disable=SC2206
common+=($EXTRA)
declare -A ARGS
ARGS[drive_lunet_ra]="--config=configs/drive.py"
ARGS[drive_lunet]="--config=configs/drive.py --config.model.name=lunet"
ARGS[chase_lunet_ra]="--config=configs/chase.py"
ARGS[chase_lunet]="--config=configs/chase.py --config.model.name=lunet"
ARGS[hrf_lunet_ra]="--config=configs/hrf.py"
ARGS[hrf_lunet]="--config=configs/hrf.py --config.model.name=lunet"
ARGS[hrf512_lunet_ra]="--config=configs/hrf.py --config.data.image_size=512"
MAIN=(drive_lunet_ra drive_lunet chase_lunet_ra chase_lunet hrf_lunet_ra hrf_lunet hrf512_lunet_ra)
FOLDS=()
for k in 0 1 2 3; do
  ARGS[drive_fold$k]="--config=configs/drive.py --config.data.num_folds=4 --config.data.fold=$k"
  FOLDS+=(drive_fold$k)
done

if [ -n "$ONLY" ]; then
  keep() { local r out=(); for r in "$@"; do [[ " $ONLY " == *" $r "* ]] && out+=("$r"); done; echo "${out[@]}"; }
  read -r -a MAIN <<< "$(keep "${MAIN[@]}")"; read -r -a FOLDS <<< "$(keep "${FOLDS[@]}")"
fi
log "training ${#MAIN[@]} main runs ($STEPS steps) and ${#FOLDS[@]} fold runs ($FOLD_STEPS steps), deadline ${DEADLINE_S}s"
t_train=$(date +%s)
for run in "${MAIN[@]}" "${FOLDS[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$MAX_PARALLEL" ]; do sleep 2; done
  left=$(( DEADLINE_S - ($(date +%s) - t_train) ))
  if [ "$left" -le 30 ]; then log "no time left to start $run"; continue; fi
  steps=$STEPS; [[ $run == *fold* ]] && steps=$FOLD_STEPS
  log "start $run ($steps steps, at most ${left}s)"
  # shellcheck disable=SC2086
  timeout -s INT -k 60 "$left" $PYTHON -m vesseljax.launch --mode=train --workdir="$RUNS/$run" \
    ${ARGS[$run]} "${common[@]}" --config.train.num_steps="$steps" > "$RUNS/$run.log" 2>&1 &
done
while [ -n "$(jobs -rp)" ]; do
  sleep 30
  log "$(for run in "${MAIN[@]}" "${FOLDS[@]}"; do
    printf '%s:%s ' "$run" "$(grep -o 'step [0-9]*/' "$RUNS/$run.log" | tail -n 1 | tr -dc 0-9)"; done)"
done
wait
log "training done"

for run in "${MAIN[@]}" "${FOLDS[@]}"; do
  if [ ! -f "$RUNS/$run/params.msgpack" ]; then
    log "$run stopped early; exporting its best checkpoint"
    # shellcheck disable=SC2086
    $PYTHON -m vesseljax.launch --mode=export --workdir="$RUNS/$run" ${ARGS[$run]} "${common[@]}" \
      >> "$RUNS/$run.log" 2>&1 || log "$run: export failed"
  fi
done
for run in "${FOLDS[@]}"; do
  # shellcheck disable=SC2086
  $PYTHON -m vesseljax.launch --mode=holdout --workdir="$RUNS/$run" ${ARGS[$run]} "${common[@]}" \
    >> "$RUNS/$run.log" 2>&1 &
done
wait
for run in "${MAIN[@]}"; do
  [ -f "$RUNS/$run/params.msgpack" ] && cp "$RUNS/$run/params.msgpack" "$OUT/$run.msgpack"
done
(cd "$RUNS" && tar czf "$OUT/runs.tgz" ./*.log ./benchmark_gpu.json ./*/config.json ./*/params.msgpack.json ./*/*.jsonl ./*/holdout_maps.npz)
ls -la "$OUT"
log "done"
