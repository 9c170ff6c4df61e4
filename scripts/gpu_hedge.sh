#!/usr/bin/env bash
# Issue #5 in one device call (a call is at most 10 minutes): MAGE-C on 8x8 tokens (for the 10-shot goal) and on
# 16x16 tokens (for the linear goal: through 8x8 tokens even a supervised CNN stays near 90%) side by side on one
# GPU, each on a crop cache built there; then both probed (linear + few-shot, mean-pooled and flat). No fine-tuning
# (measured on an H200, 2026-11-27). Timeline: caches ~1-1.5 min, PM minutes of pre-training (compiling included),
# probes ~2 min.
#   here:    bash scripts/gpu_pack.sh runs/tok16x16 runs/gpu16 runs/gpu/tok      # carry ["runs/gpu16"] (34 MB)
#   device:  PACK=$OUT bash scripts/gpu_hedge.sh
# Knobs: G (the packed folder, default runs/gpu16), PM (default 5), HEDGE_EXTRA (pre-training flags for both, e.g.
# "--set batch_size=256" for a smoke run on a CPU: the 16x16 run at batch 1024 needs ~20 GB), and every
# gpu_recognition.sh knob that is not set here (COMPILE, LIMIT, POOLS, PY, ...).
set -u
G=${G:-runs/gpu16}
for f in "$G/tok/model.safetensors" "$G/tok2/model.safetensors" "$G/fm/train-images-idx3-ubyte.gz"; do
  [ -f "$f" ] || { echo "gpu_hedge.sh: missing $f (make it with scripts/gpu_pack.sh)" >&2; exit 2; }
done
common=(DATA_DIR="$G/fm" VARIANTS=B PM="${PM:-5}" FM=0)
env "${common[@]}" TOKENIZER="$G/tok" CACHE=/tmp/hedge-c16.safetensors EXTRA="--set num_tokens=256 ${HEDGE_EXTRA:-}" RUNS=runs/t16 \
    PACK="${PACK:+$PACK/t16}" bash scripts/gpu_recognition.sh > /tmp/hedge-t16.out 2>&1 &
env "${common[@]}" TOKENIZER="$G/tok2" CACHE=/tmp/hedge-c8.safetensors EXTRA="${HEDGE_EXTRA:-}" RUNS=runs/t8 \
    PACK="${PACK:+$PACK/t8}" bash scripts/gpu_recognition.sh > /tmp/hedge-t8.out 2>&1 &
wait
echo "### MAGE-C, 8x8 tokens"; cat /tmp/hedge-t8.out
echo "### MAGE-C, 16x16 tokens"; cat /tmp/hedge-t16.out
