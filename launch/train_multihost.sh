#!/usr/bin/env bash
# Multi-host training: run this on every host (one process per host), e.g. via
# your cluster's launcher. Each process pmaps over its local devices; the global
# batch (config train.batch_size or diffusion.batch_size) is split across hosts
# (pipeline.process_slice) and lax.pmean spans all hosts' devices.
#
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
#     bash launch/train_multihost.sh configs/drive.py /shared/runs/drive [--mode=train_refiner ...]
#
# On Cloud TPU / SLURM / Open MPI jax.distributed.initialize() finds these by itself.
# The workdir must be on storage every host sees (Orbax writes checkpoints from all).
set -eu
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; shift 2
exec python -m vesseljax.launch --multihost --config="$CONFIG" --workdir="$WORKDIR" --mode=train "$@"
