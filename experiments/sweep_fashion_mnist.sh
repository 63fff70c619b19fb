#!/usr/bin/env bash
# The README's Fashion-MNIST sweep table (issue 7): five methods x sigma 0.3/0.5/0.8 x seeds 0-2, LeNet-5,
# 100 evaluation chips on the first 2,000 test images, then the table and figure.
# Sequential by default; add `hydra/launcher=joblib hydra.launcher.n_jobs=2` to use two cores.
set -euo pipefail
OUT=${1:-multirun/fashion_mnist_lenet5}
python -m correctnet.train -m seed=0,1,2 variation.sigma=0.3,0.5,0.8 \
    method=vanilla,noise_aware,suppression,correctnet,correctnet_noise_aware \
    dataset=fashion_mnist training.epochs=3 ++compensation.steps=200 evaluation.test_samples=2000 \
    progress=false hydra.sweep.dir="$OUT"
python -m correctnet.aggregate "$OUT"
