#!/usr/bin/env bash
# CorrectNet against the standard defence on Fashion-MNIST: noise-aware training vs method=correctnet (chip-agnostic;
# its run also holds the vanilla reference, stage "baseline") and method=correctnet_calibrated (stage "calibrated"),
# sigma 0.5/0.3/0.8 x seeds 0-2, 3 epochs, 100 evaluation chips on the first 2,000 test images; then the table and
# figure (experiments/compare_methods.py OUT --out ... writes the tier comparison).
# usage: [SIGMAS=0.5] [SEEDS=0] experiments/sweep_correctnet_fashion_mnist.sh MODEL OUT [extra overrides...]
# Sequential, one thread per job (OMP_NUM_THREADS=1): add `hydra/launcher=joblib hydra.launcher.n_jobs=2` for two cores.
set -euo pipefail
MODEL=${1:-lenet5}
OUT=${2:-multirun/correctnet_fashion_mnist_$MODEL}
shift 2 || true
export OMP_NUM_THREADS=1
SIGMAS=${SIGMAS:-0.5,0.3,0.8}
SEEDS=${SEEDS:-0,1,2}
python -m correctnet.train -m variation.sigma=$SIGMAS seed=$SEEDS method=noise_aware,correctnet,correctnet_calibrated \
    model="$MODEL" dataset=fashion_mnist training.epochs=3 evaluation.test_samples=2000 progress=false \
    hydra.sweep.dir="$OUT" "$@"
python -m correctnet.aggregate "$OUT"
