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
# the released sampler: class-balanced, 8 steps, choice temperature 3 (the steps table below says why)
SAMPLER=${SAMPLER:---steps 8 --choice-temperature 3}
FID_CFG=${FID_CFG:-1}
AGREE_SAMPLER=${AGREE_SAMPLER:---steps 8 --choice-temperature 3 --cfg 4 --temperature 0.7}
if [[ ",$STAGES," == *",evaluate,"* ]]; then
  # each result once, as JSON (a rerun skips what is there)
  ev() { local out=$1; shift; [[ -s "$EVAL/$out" ]] || { "$@" --json > "$EVAL/$out.tmp" && mv "$EVAL/$out.tmp" "$EVAL/$out"; }; }
  ev tokenizer.json $MAGE reconstruct --tokenizer "$RUN/tokenizer" --data fashion-mnist --split test
  ev fid-5000.json $MAGE evaluate fid --model "$RUN/mage" --data fashion-mnist --num 5000 --class-conditional \
    $SAMPLER --cfg "$FID_CFG" --seed 0
  ev agreement.json $MAGE evaluate agreement --model "$RUN/mage" --judge "$RUN/judge" --per-class 100 $AGREE_SAMPLER \
    --seed 0 --grid "$EVAL/agreement.png"
  for s in 4 8 12 20; do
    ev "steps-$s-fid-1000.json" $MAGE evaluate fid --model "$RUN/mage" --data fashion-mnist --num 1000 \
      --class-conditional --steps "$s" --choice-temperature 3 --cfg "$FID_CFG" --seed 0
    ev "steps-$s-agreement.json" $MAGE evaluate agreement --model "$RUN/mage" --judge "$RUN/judge" --per-class 100 \
      --steps "$s" --choice-temperature 3 --cfg 4 --temperature 0.7 --seed 0
  done
  ev floor-1000.json $MAGE evaluate fid --images fashion-mnist --data fashion-mnist --num 1000
  ev rfid-1000.json $MAGE evaluate fid --images fashion-mnist --images-split test --through-tokenizer "$RUN/tokenizer" \
    --data fashion-mnist --num 1000
  for pool in mean flat; do
    ev "linear-$pool.json" $MAGE probe linear --model "$RUN/mage" --data fashion-mnist --pool "$pool" \
      --epochs 30 --out "$RUN/probe-$pool"
    ev "fewshot-$pool.json" $MAGE probe few-shot --model "$RUN/mage" --data fashion-mnist --pool "$pool" \
      --shots 1,10 --draws 5
  done
fi

if [[ ",$STAGES," == *",pack,"* ]]; then
  .venv/bin/python scripts/pack_release.py --run "$RUN" --out weights/fashion-mnist
fi
