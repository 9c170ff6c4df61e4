#!/usr/bin/env bash
# Recognition on a CUDA machine (repo root): MAGE, MAGE-C and a wider MAGE pre-trained side by side for the same
# wall time on one crop token cache; then each is fine-tuned while its frozen features are probed (linear probe and
# few-shot, mean-pooled and flat), so one device call returns every number of issue #5.
#   CACHE=runs/demo60b/tokens-crops3.safetensors [DATA_DIR=dir-with-fashion-mnist-gz] bash scripts/gpu_recognition.sh
# With TOKENIZER set and no file at CACHE, the crop cache is built first, on the GPU (a 16x16-token cache is ~140 MB,
# more than a device call carries; building it there takes about a minute):
#   TOKENIZER=runs/tok16x16 CACHE=/tmp/tok16-crops3.safetensors EXTRA="--set num_tokens=256" VARIANTS=B PM=6 FM=0 ...
# scripts/gpu_pack.sh assembles what a device call needs to carry for that (tokenizer + Fashion-MNIST files).
# Knobs: VARIANTS (A = MAGE, B = MAGE-C, C = wider MAGE; default "A B C"), PM / FM (pre-train / fine-tune minutes;
# FM=0: no fine-tuning),
# EXTRA / FEXTRA (more pre-training / fine-tuning flags), PROBE=0 (no probes), POOLS (default "mean flat"), RUNS, LOGS,
# PACK=DIR (copy weights -- no optimizer state -- probe results and logs there, in 15 MB pieces: for $OUT).
# COMPILE (pretrain / finetune --compile mode, default "default"; COMPILE= for eager; a compiler error falls back to eager).
# Measured (README, Results): PM=6.5 FM=1.5 on one H200, ~8.5 minutes in all.
set -u
: "${CACHE:?set CACHE to a token cache made by mage cache-tokens (with --crops), or to where TOKENIZER should build one}"
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
PY=${PY:-python3}
PM=${PM:-6.5}; FM=${FM:-1.5}; R=${RUNS:-runs}
LOGS=${LOGS:-$R/gpu-logs}
D=${DATA_DIR:+--data-dir $DATA_DIR}
WIDE="--set embed_dim=192 --set num_heads=6 --set decoder_embed_dim=192 --set decoder_depth=4 --set decoder_num_heads=6"
declare -A X=([A]="" [B]="--contrastive" [C]="$WIDE")   # A = MAGE, B = MAGE-C, C = wider MAGE
V=${VARIANTS:-A B C}   # e.g. VARIANTS=B PM=6 FM=1.5 (one device call is at most 10 minutes: cache + PM + FM must fit)
for r in $V; do [[ -v X[$r] ]] || { echo "unknown variant $r (A, B or C)" >&2; exit 2; }; done   # before any launch
mkdir -p "$LOGS"
t0=$(date +%s)
if [ ! -f "$CACHE" ]; then
  : "${TOKENIZER:?no cache at $CACHE: set TOKENIZER to build it}"
  echo "building $CACHE"
  $PY -m mage cache-tokens --tokenizer "$TOKENIZER" --data fashion-mnist $D --crops "${CROPS:-3}" \
      --crop-scale "${CROP_SCALE:-0.35}" ${LIMIT:+--limit $LIMIT} --out "$CACHE" > "$LOGS/cache.log" 2>&1 \
    || { tail -c 400 "$LOGS/cache.log" >&2; exit 1; }
  echo "cache built in $(( $(date +%s) - t0 )) s"
fi
# epochs=100000: the run is bounded by --max-minutes and the cosine follows wall time
COMPILE=${COMPILE-default}   # the 8x8 step was launch-bound on the H200 (21 ms per step at batch 16)
P="--cache $CACHE ${TOKENIZER:+--tokenizer $TOKENIZER} --preset fmnist-32-gpu --max-minutes $PM --set epochs=100000 ${COMPILE:+--compile $COMPILE} ${EXTRA:-}"
for r in $V; do
  for d in "$R/g$r" "$R/f$r"; do   # a second call starts fresh runs; earlier ones are moved aside, not lost
    [ -d "$d" ] && mv "$d" "$d.before-$(date +%s)"; done   # (pretrain / finetune refuse to train over a run)
  $PY -m mage pretrain $P ${X[$r]} --out "$R/g$r" > "$LOGS/p$r.log" 2>&1 &
done
wait
echo "pre-training done at $(( $(date +%s) - t0 )) s"
F="--cache $CACHE $D --preset fmnist-32-gpu --max-minutes $FM --set epochs=100000 ${COMPILE:+--compile $COMPILE} ${FEXTRA:-}"
Q="--data fashion-mnist $D ${LIMIT:+--limit $LIMIT}"
for r in $V; do
  [ "$FM" = 0 ] || $PY -m mage finetune --model "$R/g$r" $F --out "$R/f$r" > "$LOGS/f$r.log" 2>&1 &
  if [ "${PROBE:-1}" != 0 ]; then
    (for pool in ${POOLS:-mean flat}; do   # features on the GPU, probes on the CPU; numbers as JSON lines
       echo "linear probe, $pool:"; $PY -m mage probe linear --model "$R/g$r" $Q --pool "$pool" --out "$R/q$r-$pool" --json
       echo "few-shot, $pool:"; $PY -m mage probe few-shot --model "$R/g$r" $Q --pool "$pool" --shots 1,2,5,10 --draws 5 --out "$R/q$r-$pool" --json
       rm -rf "$R/g$r/features"   # flat 16x16 features are ~9 GB
     done) > "$LOGS/q$r.log" 2> "$LOGS/q$r.err" &
  fi
done
wait
echo "all done at $(( $(date +%s) - t0 )) s"
for r in $V; do
  echo "== $r"; tail -c 300 "$LOGS/p$r.log" | tr '\r' '\n' | tail -1
  [ -f "$LOGS/f$r.log" ] && tail -c 300 "$LOGS/f$r.log" | tr '\r' '\n' | tail -1
  [ -f "$LOGS/q$r.log" ] && cat "$LOGS/q$r.log"
done
if [ -n "${PACK:-}" ]; then
  mkdir -p "$PACK"
  for r in $V; do
    last=$(ls -d "$R/g$r"/checkpoints/step-* 2>/dev/null | tail -1)
    [ -n "$last" ] || continue
    tar czf - --exclude=train_state.pt "$last" $(ls -d "$R/g$r"/{log.jsonl,curve.png,classes.json} "$R/f$r"/{model,classifier.json,log.jsonl} \
        "$R/q$r"-* 2>/dev/null) | split -b 15m - "$PACK/$r.tgz."
  done
  tar czf "$PACK/logs.tgz" -C "$LOGS" .
fi
