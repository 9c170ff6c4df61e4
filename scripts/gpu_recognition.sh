#!/usr/bin/env bash
# Recognition on a CUDA machine (repo root): MAGE, MAGE-C and a wider MAGE pre-trained side by side for the same
# wall time on one crop token cache, each then fine-tuned; frozen-feature probes are run afterwards anywhere.
#   CACHE=runs/demo60b/tokens-crops3.safetensors [DATA_DIR=dir-with-fashion-mnist-gz] bash scripts/gpu_recognition.sh
# The cache: mage cache-tokens --tokenizer runs/demo60b/tokenizer --data fashion-mnist --crops 3 --crop-scale 0.35 --out ...
# Measured (README, Results): PM=6.5 FM=1.5 on one H200, ~8.5 minutes in all.
set -u
: "${CACHE:?set CACHE to a token cache made by mage cache-tokens (with --crops)}"
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
PY=${PY:-python3}
PM=${PM:-6.5}; FM=${FM:-1.5}; R=${RUNS:-runs}
LOGS=${LOGS:-$R/gpu-logs}
mkdir -p "$LOGS"
# epochs=100000: the run is bounded by --max-minutes and the cosine follows wall time
# EXTRA: more pre-training flags, e.g. EXTRA="--set codebook_size=2048" for a cache of the 2048-code tokenizer
P="--cache $CACHE --preset fmnist-32-gpu --max-minutes $PM --set epochs=100000 ${EXTRA:-}"
WIDE="--set embed_dim=192 --set num_heads=6 --set decoder_embed_dim=192 --set decoder_depth=4 --set decoder_num_heads=6"
declare -A X=([A]="" [B]="--contrastive" [C]="$WIDE")   # A = MAGE, B = MAGE-C, C = wider MAGE
V=${VARIANTS:-A B C}   # e.g. VARIANTS=B PM=11 FM=2: MAGE-C alone (fine-tuning alone ran 2x the images/s of one of three)
for r in $V; do [[ -v X[$r] ]] || { echo "unknown variant $r (A, B or C)" >&2; exit 2; }; done   # before any launch
for r in $V; do
  $PY -m mage pretrain $P ${X[$r]} --out "$R/g$r" > "$LOGS/p$r.log" 2>&1 &
done
wait
F="--cache $CACHE ${DATA_DIR:+--data-dir $DATA_DIR} --preset fmnist-32-gpu --max-minutes $FM --set epochs=100000"
for r in $V; do
  $PY -m mage finetune --model "$R/g$r" $F --out "$R/f$r" > "$LOGS/f$r.log" 2>&1 &
done
wait
for r in $V; do
  echo "== $r"; tail -c 300 "$LOGS/p$r.log" | tr '\r' '\n' | tail -1; tail -c 300 "$LOGS/f$r.log" | tr '\r' '\n' | tail -1
done
