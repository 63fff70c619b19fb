#!/usr/bin/env bash
# Ready sweeps for users who have CIFAR-10/100 (python-pickle batches in DATA) and a GPU: LeNet-5 and
# VGG16 (full width, BatchNorm), the five methods, sigma 0.3/0.5/0.8, three seeds. Not run here (no CIFAR
# data and no GPU on the machine the README's numbers come from).
#   bash experiments/sweep_cifar.sh /data/cifar-10-batches-py cifar10
#   bash experiments/sweep_cifar.sh /data/cifar-100-python cifar100
set -euo pipefail
DATA=${1:?usage: sweep_cifar.sh DATA_DIR cifar10|cifar100}
SET=${2:-cifar10}
for MODEL in lenet5 vgg16; do
  WIDTH=$([ "$MODEL" = vgg16 ] && echo "model.width=1.0" || echo "")
  python -m correctnet.train -m seed=0,1,2 variation.sigma=0.3,0.5,0.8 \
      method=vanilla,noise_aware,suppression,correctnet,correctnet_noise_aware \
      dataset=$SET dataset.root="$DATA" model=$MODEL $WIDTH training.epochs=60 \
      progress=false hydra.sweep.dir=multirun/${SET}_${MODEL}
  python -m correctnet.aggregate multirun/${SET}_${MODEL}
done
