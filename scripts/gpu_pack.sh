#!/usr/bin/env bash
# Assemble one folder for a device call's `carry` (64 MiB at most, 8 paths): a tokenizer's weights + config
# (no optimizer state) and the Fashion-MNIST files, so scripts/gpu_recognition.sh can build its crop cache there.
#   bash scripts/gpu_pack.sh runs/tok16x16 runs/gpu16        # then carry ["runs/gpu16"] and run on the device:
#   TOKENIZER=runs/gpu16/tok DATA_DIR=runs/gpu16/fm CACHE=/tmp/c.safetensors EXTRA="--set num_tokens=256" \
#     VARIANTS=B PM=8 FM=2 PACK=$OUT bash scripts/gpu_recognition.sh
set -eu
TOK=${1:?usage: gpu_pack.sh TOKENIZER_RUN OUT_DIR}; DST=${2:?usage: gpu_pack.sh TOKENIZER_RUN OUT_DIR}
FM_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -f "$TOK/model.safetensors" ]; then src=$TOK; else src=$(ls -d "$TOK"/checkpoints/step-* 2>/dev/null | tail -1); fi
[ -n "$src" ] && [ -f "$src/model.safetensors" ] || { echo "gpu_pack.sh: no tokenizer checkpoint in $TOK" >&2; exit 2; }
ls "$FM_DIR"/train-images-idx3-ubyte.gz > /dev/null 2>&1 || { echo "gpu_pack.sh: no Fashion-MNIST in $FM_DIR" >&2; exit 2; }
rm -rf "$DST"; mkdir -p "$DST/tok" "$DST/fm"
cp "$src/model.safetensors" "$src/config.json" "$DST/tok/"
cp "$FM_DIR"/*-ubyte.gz "$DST/fm/"
du -sh "$DST"
