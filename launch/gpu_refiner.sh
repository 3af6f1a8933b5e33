#!/usr/bin/env bash
# The whole DRIVE refiner table on ONE GPU inside a fixed wall-clock budget:
# out-of-fold coarse maps, mask autoencoders, the refiner and its ablations,
# then their evaluation on the test split.
#
#   DATA=/path/to/datasets RUNS=/tmp/runs OUT=/tmp/out bash launch/gpu_refiner.sh
#
# Phase A (t = 0; the folds one after another, beside the autoencoders):
#   fold{0..3}  LU-Net+RA without one of 4 folds of DRIVE train (FOLD_STEPS
#               steps), then --mode=holdout: the out-of-fold coarse maps
#   ae4, ae64   the mask autoencoder at C = 4 and C = 64 (AE_STEPS steps or
#               until AE_END seconds, whichever comes first)
# Phase B (once the maps and ae4 exist; each trains until TRAIN_END seconds,
#   diffusion.max_train_seconds, or STEPS steps):
#   oof         the refiner on the out-of-fold maps (the main row)
#   degrade     ... on the degradation model instead (the alternative source)
#   noimage, nora, noedge, nodice   oof without image conditioning / RA map /
#               edge loss / Dice loss
#   c64         oof with the C = 64 autoencoder
#   c64w        the same with widths (64, 32, 48, 72) (4.0M denoiser params): at the
#               default widths[0] = 16 a C = 64 denoiser cannot fit the noise (DDPM
#               loss >= 1 - 16/64; BUILD_NOTES.md, "A C = 64 refiner")
# Phase C (each refiner once trained; until END seconds): --mode=evaluate_refined
#   on the test split with the committed coarse model (COARSE), every variant at
#   DDIM 20 (k = 5); the main row then also start=coarse, 50 and the sweep
#   steps, one after another; whatever finishes by END is kept.
#
# Measured on an H100 (BUILD_NOTES.md): XLA's GPU autotuning makes compilation
# the cost and concurrent processes multiply it. Six processes at once (4 folds,
# 2 autoencoders) got no fold past its first 100 steps in 200 s; seven refiner
# processes at once each took ~205 s to compile their first step. One refiner
# process alone: ~45 s to compile, then ~20-25 steps/s at batch 8. Hence
# MAX_PARALLEL variant chains at a time (default 2), the folds one after
# another, and a persistent compilation cache; the default VARIANTS is
# "oof degrade" and the ablations need a longer budget than ~10 minutes. This
# ordering has not run on a GPU yet (the session that measured the above had
# no device time left); it ran end to end on the CPU with tiny step counts.
# If the out-of-fold maps are missing at FOLD_WAIT seconds, every variant uses
# the degradation model (the log says so).
#
# Reusing earlier work (then phase A skips that part):
#   AE=path/autoencoder.msgpack   a trained C = 4 autoencoder (its .json beside it)
#   MAPS=a.npz,b.npz,...          out-of-fold holdout maps (all training images)
#   SOURCE_KIND=oof+degrade       how the variants use them (default oof)
#   EVALS=0                       train only: evaluate the weights elsewhere
#   BENCH="forward_b2,ddim"       then launch/benchmark_refiner.py --figures=BENCH
#                                 (--steps=BENCH_STEPS) until END, into OUT
#
# The AE/MAPS/EVALS=0 path ran on an H100 in the fifth session (two variants at
# once; BUILD_NOTES.md); the fold ordering above still has not.
#
# Outputs in OUT: refiner_<variant>.msgpack for each variant (params-only EMA
# weights), refiner_runs.tgz (sidecars, autoencoders, metrics, evaluation JSON
# and markdown, holdout maps, logs), benchmark_refiner_gpu.json (BENCH). The device
# tool returns at most 8 files: with all seven variants, leave BENCH off.
set -u
DATA=${DATA:-../shared/datasets}
RUNS=${RUNS:-$HOME/runs/gpu_refiner}
OUT=${OUT:-$RUNS/out}
CONFIG=${CONFIG:-configs/drive.py}
COARSE=${COARSE:-weights/drive_lunet_ra.msgpack}
FOLD_STEPS=${FOLD_STEPS:-800}
AE_STEPS=${AE_STEPS:-3000}
AE_END=${AE_END:-160}
STEPS=${STEPS:-6000}
FOLD_WAIT=${FOLD_WAIT:-200}
TRAIN_END=${TRAIN_END:-380}
END=${END:-545}
VARIANTS=${VARIANTS:-"oof degrade"}           # + noimage nora noedge nodice c64 c64w (the ablations), detail
MAIN_EVALS=${MAIN_EVALS:-"50 10 30 100 coarse"}  # besides DDIM 20; "coarse" = start=coarse at DDIM 20
ENSEMBLE=${ENSEMBLE:-5}
EVAL_IMAGES=${EVAL_IMAGES:-0}                 # 0: the whole test split
EXTRA=${EXTRA:-}                              # more --config overrides for every refiner command
COARSE_EXTRA=${COARSE_EXTRA:-}                # ... for the fold runs
AE=${AE:-}
MAPS=${MAPS:-}
SOURCE_KIND=${SOURCE_KIND:-oof}
EVALS=${EVALS:-1}
BENCH=${BENCH:-}
BENCH_STEPS=${BENCH_STEPS:-20}
PYTHON=${PYTHON:-python3}
MAX_PARALLEL=${MAX_PARALLEL:-2}               # variant chains at a time (see the header)
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
# Processes with the same step (the folds; evaluations) compile it once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$RUNS/jax_cache}
mkdir -p "$RUNS" "$OUT"
t0=$(date +%s)
now() { echo $(( $(date +%s) - t0 )); }
log() { echo "[gpu_refiner +$(now)s] $*"; }
left() { local l=$(( $1 - $(now) )); echo $(( l > 1 ? l : 1 )); }
launch() { $PYTHON -m vesseljax.launch "$@" 2>&1 | grep --line-buffered -v "Delay kernel"; }

$PYTHON -c 'import jax, flax, optax, orbax.checkpoint, ml_collections; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

# ---- phase A
fold_chain() {
  local k=$1 w="$RUNS/fold$1"
  # shellcheck disable=SC2086
  local a=(--config="$CONFIG" --workdir="$w" --config.data.root="$DATA" --config.model.impl=reference
           --config.data.num_folds=4 --config.data.fold="$k" --config.train.num_steps="$FOLD_STEPS"
           --config.train.eval_every=400 --config.train.checkpoint_every=400 --config.train.log_every=100 $COARSE_EXTRA)
  timeout -s INT -k 20 "$(left "$FOLD_WAIT")" $PYTHON -m vesseljax.launch --mode=train "${a[@]}"
  [ -f "$w/params.msgpack" ] || $PYTHON -m vesseljax.launch --mode=export "${a[@]}"
  timeout -k 10 "$(left "$FOLD_WAIT")" $PYTHON -m vesseljax.launch --mode=holdout "${a[@]}"
}
ae_args() {  # <C> <workdir>
  # shellcheck disable=SC2206
  local a=(--config="$CONFIG" --workdir="$2" --config.data.root="$DATA" --config.model.impl=reference
           --config.diffusion.latent_channels="$1" --config.diffusion.ae_steps="$AE_STEPS"
           --config.diffusion.max_train_seconds="$(left "$AE_END")" --config.diffusion.log_every=250
           --config.diffusion.checkpoint_every=1000 $EXTRA)
  echo "${a[@]}"
}
# One fold after another: folds 1-3 reuse fold 0's compiled steps (persistent cache).
[ -n "$MAPS" ] || (for k in 0 1 2 3; do fold_chain "$k" > "$RUNS/fold$k.log" 2>&1; done) &
if [ -n "$AE" ]; then
  mkdir -p "$RUNS/ae4" && cp "$AE" "$RUNS/ae4/autoencoder.msgpack" && cp "$AE.json" "$RUNS/ae4/autoencoder.msgpack.json"
else
  # shellcheck disable=SC2046
  launch --mode=train_autoencoder $(ae_args 4 "$RUNS/ae4") > "$RUNS/ae4.log" &
  ae4_pid=$!
fi
if [[ " $VARIANTS " == *" c64 "* || " $VARIANTS " == *" c64w "* ]]; then
  # shellcheck disable=SC2046
  launch --mode=train_autoencoder $(ae_args 64 "$RUNS/ae64") > "$RUNS/ae64.log" &
  ae64_pid=$!
fi
if [ -n "$AE" ]; then log "autoencoder: $AE"
else wait "$ae4_pid"; log "ae4 done: $(grep -ho 'exported.*' "$RUNS/ae4.log" | tail -n 1)"; fi
# Reconstruction Dice of the test labels, for each autoencoder once trained.
# shellcheck disable=SC2046
(if [ -z "$AE" ]; then launch --mode=evaluate_autoencoder $(ae_args 4 "$RUNS/ae4") > "$RUNS/eval_ae4.log"; fi
 while kill -0 "${ae64_pid:-0}" 2>/dev/null; do sleep 2; done
 [ -f "$RUNS/ae64/autoencoder.msgpack" ] &&
   launch --mode=evaluate_autoencoder $(ae_args 64 "$RUNS/ae64") > "$RUNS/eval_ae64.log") &
if [ -z "$MAPS" ]; then
  while [ "$(now)" -lt "$FOLD_WAIT" ] && [ "$(ls "$RUNS"/fold*/holdout_maps.npz 2>/dev/null | wc -l)" -lt 4 ]; do sleep 2; done
  MAPS=$(ls "$RUNS"/fold*/holdout_maps.npz 2>/dev/null | paste -sd, -)
fi
if [ "$(echo "$MAPS" | tr ',' '\n' | grep -c npz)" -ge 4 ]; then
  SOURCE=(--config.diffusion.coarse_source="$SOURCE_KIND" --config.diffusion.coarse_maps="$MAPS")
  log "out-of-fold maps: $MAPS"
else
  SOURCE=(--config.diffusion.coarse_source=degrade)
  log "out-of-fold maps missing at ${FOLD_WAIT}s ($MAPS): every variant uses the degradation model"
  tail -n 5 "$RUNS"/fold*.log
fi

# ---- phase B then C, one chain per variant
refiner_args() {  # <variant> -> the variant's config flags
  local v=$1 ae="$RUNS/ae4/autoencoder.msgpack" c=4 src=("${SOURCE[@]}") more=()
  case $v in
    degrade) src=(--config.diffusion.coarse_source=degrade) ;;
    noimage) more=(--config.diffusion.use_image=False) ;;
    nora) more=(--config.diffusion.use_ra=False) ;;
    noedge) more=(--config.diffusion.edge_weight=0.0) ;;
    nodice) more=(--config.diffusion.dice_weight=0.0) ;;
    c64) ae="$RUNS/ae64/autoencoder.msgpack"; c=64 ;;
    c64w) ae="$RUNS/ae64/autoencoder.msgpack"; c=64; more=(--config.diffusion.widths="(64,32,48,72)") ;;
    detail) more=(--config.diffusion.pixel_detail=True) ;;
  esac
  # shellcheck disable=SC2206
  echo --config="$CONFIG" --workdir="$RUNS/$v" --config.data.root="$DATA" --config.model.impl=reference \
    --config.diffusion.autoencoder_checkpoint="$ae" --config.diffusion.latent_channels=$c \
    --config.diffusion.num_steps="$STEPS" --config.diffusion.log_every=250 \
    --config.diffusion.checkpoint_every=1000 --config.diffusion.coarse_checkpoint="$COARSE" \
    --config.eval.max_images="$EVAL_IMAGES" --config.sample.ensemble="$ENSEMBLE" "${src[@]}" "${more[@]}" $EXTRA
}
evaluate() {  # <variant> <steps> [more flags]: one evaluate_refined, bounded by END
  local v=$1 n=$2; shift 2
  # shellcheck disable=SC2046
  timeout -k 5 "$(left "$END")" $PYTHON -m vesseljax.launch --mode=evaluate_refined $(refiner_args "$v") \
    --config.sample.steps="$n" "$@" > "$RUNS/eval_${v}_$n$*.log" 2>&1
}
variant_chain() {
  local v=$1
  if [ "$v" = c64 ] || [ "$v" = c64w ]; then  # ae64 is a sibling, not a child: poll it
    while kill -0 "${ae64_pid:-0}" 2>/dev/null && [ "$(now)" -lt "$TRAIN_END" ]; do sleep 2; done
  fi
  # shellcheck disable=SC2046
  launch --mode=train_refiner $(refiner_args "$v") --config.diffusion.max_train_seconds="$(left "$TRAIN_END")"
  [ "$EVALS" = 1 ] || return 0
  evaluate "$v" 20
  if [ "$v" = oof ]; then
    for e in $MAIN_EVALS; do
      if [ "$e" = coarse ]; then evaluate "$v" 20 --config.sample.start=coarse
      else evaluate "$v" "$e"; fi
    done
  fi
}
for v in $VARIANTS; do
  while [ "$(jobs -rp | wc -l)" -ge "$MAX_PARALLEL" ]; do sleep 2; done
  variant_chain "$v" > "$RUNS/$v.log" 2>&1 &
done
while [ -n "$(jobs -rp)" ] && [ "$(now)" -lt "$END" ]; do
  sleep 20
  log "$(for v in $VARIANTS; do printf '%s:%s ' "$v" "$(grep -o 'step [0-9]*/' "$RUNS/$v.log" 2>/dev/null | tail -n 1 | tr -dc 0-9)"; done)" \
      "evals done: $(ls "$RUNS"/*/eval_refined_*.json 2>/dev/null | wc -l)"
done
if [ -n "$BENCH" ] && [ "$(now)" -lt "$END" ]; then
  log "benchmark: $BENCH"
  timeout -k 5 "$(left "$END")" $PYTHON launch/benchmark_refiner.py --figures="$BENCH" --steps="$BENCH_STEPS" \
    --repeats=5 --out="$OUT/benchmark_refiner_gpu.json" 2>&1 | grep -v "Delay kernel"
fi
log "collecting"
for v in $VARIANTS; do
  [ -f "$RUNS/$v/refiner.msgpack" ] && cp "$RUNS/$v/refiner.msgpack" "$OUT/refiner_$v.msgpack"
done
(cd "$RUNS" && tar czf "$OUT/refiner_runs.tgz" ./*.log ./*/*.msgpack.json ./ae*/autoencoder.msgpack \
   ./*/*.jsonl ./*/eval_refined_* ./ae*/eval_autoencoder_* ./fold*/holdout_maps.npz 2>/dev/null)
ls -la "$OUT"
grep -h "^| " "$RUNS"/*/eval_refined_*.md 2>/dev/null | grep -v "\-\-\-" | sort -u | head -n 40
log "done"
