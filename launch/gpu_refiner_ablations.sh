#!/usr/bin/env bash
# The refiner's training-time ablations, from scratch, in ONE process on one GPU:
# --mode=train_refiner_ablations trains the full refiner ('control') and each
# ablation (no image conditioning, no RA map, no edge loss, no Dice loss) in
# lockstep, one vmapped step (vesseljax/train/refiner_sweep.py), on the same
# batches, timesteps and noise. Each is exported as an ordinary refiner.
#
#   DATA=/path/to/datasets RUNS=/tmp/runs OUT=/tmp/out bash launch/gpu_refiner_ablations.sh
#
# Why one process: on a lent GPU XLA's autotuning makes compilation the cost and
# concurrent processes multiply it (BUILD_NOTES.md, "GPU ... lessons": seven
# refiner processes at once each took ~205 s to compile their first step).
#
# Then, until END seconds, --mode=evaluate_refined of each variant on the test
# split (Diff(20), start = coarse at strength 0.5, k = 5), control first; the
# variants whose sampling programs are the control's (noedge, nodice) reuse its
# compilation through the persistent cache. Whatever finishes is kept; the
# others can be evaluated elsewhere from the exported weights.
#
# ABLATIONS may also name the departures of refiner_sweep.ABLATIONS (cdrop, disagree01,
# disagree1, cstart), e.g. ABLATIONS=control,cdrop,disagree01,disagree1,cstart; EVAL_ORDER names which to evaluate.
#
# Outputs in OUT: refiner_<variant>.msgpack (params-only EMA weights, 13 MB each:
# the device tool returns at most 64 MiB, i.e. five of them) and
# refiner_ablations.tgz (sidecars, training curve, evaluation JSON/markdown, logs).
set -u
DATA=${DATA:-../shared/datasets}
RUNS=${RUNS:-$HOME/runs/gpu_refiner_ablations}
OUT=${OUT:-$RUNS/out}
CONFIG=${CONFIG:-configs/drive.py}
ABLATIONS=${ABLATIONS:-control,noimage,nora,noedge,nodice}
AE=${AE:-weights/drive_autoencoder_c4.msgpack}
COARSE=${COARSE:-weights/drive_lunet_ra.msgpack}
SOURCE=${SOURCE:-degrade}                  # the training pairs (no out-of-fold maps needed)
BATCH=${BATCH:-16}
STEPS=${STEPS:-5000}
TRAIN_SECONDS=${TRAIN_SECONDS:-460}        # diffusion.max_train_seconds (compilation included)
END=${END:-560}                            # evaluations stop here (seconds since start)
EVAL_ORDER=${EVAL_ORDER:-"control noedge nodice nora noimage"}
EXTRA=${EXTRA:-}                           # more --config overrides, training and evaluation
PYTHON=${PYTHON:-python3}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$RUNS/jax_cache}
mkdir -p "$RUNS" "$OUT"
t0=$(date +%s)
now() { echo $(( $(date +%s) - t0 )); }
log() { echo "[gpu_refiner_ablations +$(now)s] $*"; }

$PYTHON -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
# shellcheck disable=SC2206
common=(--config="$CONFIG" --config.data.root="$DATA" --config.model.impl=reference
        --config.diffusion.autoencoder_checkpoint="$AE" --config.diffusion.coarse_checkpoint="$COARSE"
        $EXTRA)
# shellcheck disable=SC2086
$PYTHON -m vesseljax.launch --mode=train_refiner_ablations --workdir="$RUNS" "${common[@]}" \
  --config.diffusion.ablations="$ABLATIONS" --config.diffusion.coarse_source="$SOURCE" \
  --config.diffusion.batch_size="$BATCH" --config.diffusion.num_steps="$STEPS" \
  --config.diffusion.max_train_seconds="$TRAIN_SECONDS" --config.diffusion.log_every=250 \
  --config.diffusion.checkpoint_every=1000 2>&1 | grep --line-buffered -v "Delay kernel" | tee "$RUNS/train.log"
for v in ${ABLATIONS//,/ }; do
  [ -f "$RUNS/$v/refiner.msgpack" ] && cp "$RUNS/$v/refiner.msgpack" "$OUT/refiner_$v.msgpack"
done
log "trained: $(ls "$OUT")"

for v in $EVAL_ORDER; do
  left=$(( END - $(now) ))
  [ "$left" -gt 20 ] || { log "no time left to evaluate $v"; break; }
  [ -f "$RUNS/$v/refiner.msgpack" ] || continue
  log "evaluate $v (at most ${left} s)"
  timeout -k 5 "$left" $PYTHON -m vesseljax.launch --mode=evaluate_refined --workdir="$RUNS/$v" "${common[@]}" \
    --config.sample.start=coarse > "$RUNS/eval_$v.log" 2>&1
  tail -n 2 "$RUNS/eval_$v.log"
done

log "collecting"
(cd "$RUNS" && tar czf "$OUT/refiner_ablations.tgz" ./*.log ./*.jsonl ./config_*.json ./*/refiner.msgpack.json \
   ./*/eval_refined_*.json ./*/eval_refined_*.md 2>/dev/null)
ls -la "$OUT"
grep -h "^| " "$RUNS"/*/eval_refined_*.md 2>/dev/null | grep -v "\-\-\-" | sort -u | head -n 20
log "done"
