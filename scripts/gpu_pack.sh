#!/usr/bin/env bash
# Assemble one folder for a device call's `carry` (64 MiB at most, 8 paths): a tokenizer's weights + config
# (no optimizer state) and the Fashion-MNIST files, so scripts/gpu_recognition.sh can build its crop cache there.
# A second tokenizer run, if given, goes to OUT_DIR/tok2 (README: the 8x8 + 16x16 hedge in one device call).
#   bash scripts/gpu_pack.sh runs/tok16x16 runs/gpu16        # then carry ["runs/gpu16"] and run on the device:
#   TOKENIZER=runs/gpu16/tok DATA_DIR=runs/gpu16/fm CACHE=/tmp/c.safetensors EXTRA="--set num_tokens=256" \
#     VARIANTS=B PM=6 FM=0 PACK=$OUT bash scripts/gpu_recognition.sh
set -eu
U="usage: gpu_pack.sh TOKENIZER_RUN OUT_DIR [SECOND_TOKENIZER_RUN]"
TOK=${1:?$U}; DST=${2:?$U}; TOK2=${3:-}
FM_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
weights() {  # a tokenizer run (or checkpoint) -> the folder holding its newest weights
  local src
  if [ -f "$1/model.safetensors" ]; then src=$1; else src=$(ls -d "$1"/checkpoints/step-* 2>/dev/null | tail -1); fi
  [ -n "$src" ] && [ -f "$src/model.safetensors" ] || { echo "gpu_pack.sh: no tokenizer checkpoint in $1" >&2; exit 2; }
  echo "$src"
}
src=$(weights "$TOK"); [ -z "$TOK2" ] || src2=$(weights "$TOK2")
ls "$FM_DIR"/train-images-idx3-ubyte.gz > /dev/null 2>&1 || { echo "gpu_pack.sh: no Fashion-MNIST in $FM_DIR" >&2; exit 2; }
rm -rf "$DST"; mkdir -p "$DST/tok" "$DST/fm"
cp "$src/model.safetensors" "$src/config.json" "$DST/tok/"
[ -z "$TOK2" ] || { mkdir -p "$DST/tok2"; cp "$src2/model.safetensors" "$src2/config.json" "$DST/tok2/"; }
cp "$FM_DIR"/*-ubyte.gz "$DST/fm/"
du -sh "$DST"
