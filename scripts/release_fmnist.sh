#!/usr/bin/env bash
# Reproduce the released Fashion-MNIST weights (weights/fashion-mnist/) end to end on a CPU, with the project's
# own commands. Every training stage runs with --resume: rerunning the script after a kill continues where it
# stopped, and a finished stage returns at once. Minutes per stage can be changed with the variables below
# (a longer run continues the same cosine only if started with the longer budget).
#   bash scripts/release_fmnist.sh            # train, evaluate, pack into weights/fashion-mnist/
#   STAGES=train bash scripts/release_fmnist.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MAGE=${MAGE:-.venv/bin/mage}
RUN=${RUN:-runs/release-fmnist}
TOK_MIN=${TOK_MIN:-22}  # wall-clock minutes per stage (2 CPU cores)
MAGE_MIN=${MAGE_MIN:-50}
FT_MIN=${FT_MIN:-8}
JUDGE_MIN=${JUDGE_MIN:-5}
STAGES=${STAGES:-train,evaluate,pack}
mkdir -p "$RUN"

if [[ ",$STAGES," == *",train,"* ]]; then
  # tokenizer: the fmnist-32 VQGAN (8x8 tokens, 512 codes), fp32
  $MAGE train-tokenizer --data fashion-mnist --preset fmnist-32 --max-minutes "$TOK_MIN" --max-steps 100000 \
    --out "$RUN/tokenizer" --resume
  # tokens of the 60,000 train images and their mirror images
  [[ -f "$RUN/tokens-train.safetensors" ]] ||
    $MAGE cache-tokens --tokenizer "$RUN/tokenizer" --data fashion-mnist --out "$RUN/tokens-train.safetensors"
  # MAGE, class-conditional (label dropout 0.1 keeps it unconditional too)
  $MAGE pretrain --cache "$RUN/tokens-train.safetensors" --preset fmnist-32 --class-conditional \
    --max-minutes "$MAGE_MIN" --max-steps 1000000 --out "$RUN/mage" --resume
  # the judge: a pixel CNN trained on real images only, for class agreement
  [[ -f "$RUN/judge/judge.safetensors" ]] ||
    $MAGE evaluate train-judge --data fashion-mnist --epochs 3 --width 32 --max-minutes "$JUDGE_MIN" --out "$RUN/judge"
  # the classifier: the whole encoder fine-tuned with a head
  $MAGE finetune --model "$RUN/mage" --cache "$RUN/tokens-train.safetensors" --preset fmnist-32 \
    --max-minutes "$FT_MIN" --out "$RUN/classifier" --resume
fi

EVAL="$RUN/eval"
mkdir -p "$EVAL"
# sampling for FID: class-balanced (labels cycle through the classes), choice temperature 3; the number of steps
# and the guidance are chosen below on N = 500 (the lowest FID), then measured at N = 5,000.
# Agreement: strong guidance, a cooler token temperature (the sampler that shows how often a class is right)
AGREE_SAMPLER=${AGREE_SAMPLER:---choice-temperature 3 --cfg 4 --temperature 0.7}
if [[ ",$STAGES," == *",evaluate,"* ]]; then
  # each result once, as JSON (a rerun skips what is there)
  ev() { local out=$1; shift; [[ -s "$EVAL/$out" ]] || { "$@" --json > "$EVAL/$out.tmp" && mv "$EVAL/$out.tmp" "$EVAL/$out"; }; }
  ev tokenizer.json $MAGE reconstruct --tokenizer "$RUN/tokenizer" --data fashion-mnist --split test
  # the steps table (FID at N = 500, the demo's N: its floor ships with the release; agreement on 1,000 samples)
  for s in 4 8 12 20; do
    ev "steps-$s-cfg-1-fid-500.json" $MAGE evaluate fid --model "$RUN/mage" --data fashion-mnist --num 500 \
      --class-conditional --steps "$s" --choice-temperature 3 --cfg 1 --seed 0
    ev "steps-$s-agreement.json" $MAGE evaluate agreement --model "$RUN/mage" --judge "$RUN/judge" --per-class 100 \
      --steps "$s" $AGREE_SAMPLER --seed 0
  done
  for c in 0 2; do
    ev "steps-8-cfg-$c-fid-500.json" $MAGE evaluate fid --model "$RUN/mage" --data fashion-mnist --num 500 \
      --class-conditional --steps 8 --choice-temperature 3 --cfg "$c" --seed 0
  done
  # the best of those at N = 5,000 (vs 5,000 test images), and agreement with the same number of steps
  read -r STEPS CFG < <(.venv/bin/python -c "
import glob, json, re
runs = [(json.load(open(f))['fid'], re.findall(r'steps-(\d+)-cfg-(\d+)', f)[0]) for f in glob.glob('$EVAL/steps-*-fid-500.json')]
print(*min(runs)[1])")
  ev fid-5000.json $MAGE evaluate fid --model "$RUN/mage" --data fashion-mnist --num 5000 --class-conditional \
    --steps "$STEPS" --choice-temperature 3 --cfg "$CFG" --seed 0
  echo "{\"steps\": $STEPS, \"choice_temperature\": 3.0, \"cfg\": $CFG}" > "$EVAL/sampler.json"
  ev agreement.json $MAGE evaluate agreement --model "$RUN/mage" --judge "$RUN/judge" --per-class 100 \
    --steps "$STEPS" $AGREE_SAMPLER --seed 1 --grid "$EVAL/agreement.png"
  ev floor-500.json $MAGE evaluate fid --images fashion-mnist --data fashion-mnist --num 500
  ev rfid-500.json $MAGE evaluate fid --images fashion-mnist --images-split test --through-tokenizer "$RUN/tokenizer" \
    --data fashion-mnist --num 500
  for pool in mean flat; do
    ev "linear-$pool.json" $MAGE probe linear --model "$RUN/mage" --data fashion-mnist --pool "$pool" \
      --epochs 30 --out "$RUN/probe-$pool"
    ev "fewshot-$pool.json" $MAGE probe few-shot --model "$RUN/mage" --data fashion-mnist --pool "$pool" \
      --shots 1,10 --draws 5
  done
fi

if [[ ",$STAGES," == *",pack,"* ]]; then
  .venv/bin/python scripts/pack_release.py --run "$RUN" --out weights/fashion-mnist --sampler "$(cat "$EVAL/sampler.json")"
fi
