#!/usr/bin/env bash
# Evaluation of a Fashion-MNIST model on a CUDA machine (repo root): FID at N = 5,000 and its floor, a
# stronger judge and class agreement (100 per class), and the fast-path (bf16) vs fp32 generation agreement.
#   MODEL=runs/demo60/mage DATA_DIR=dir-with-fashion-mnist-gz OUT=/tmp/gpu_eval bash scripts/gpu_eval.sh
set -euo pipefail
export PYTHONPATH=src MAGE_CACHE_DIR=${MAGE_CACHE_DIR:-/tmp/mage-cache}
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_eval}
D="--data fashion-mnist --data-dir $DATA_DIR"
S="--steps 8 --choice-temperature 3"
mkdir -p "$OUT"
$PY -m mage evaluate train-judge $D --epochs 10 --width 32 --batch-size 256 --out "$OUT/judge32"
for cfg in 2 4; do
  $PY -m mage evaluate agreement --model "$MODEL" --judge "$OUT/judge32" --per-class 100 --cfg $cfg $S --batch-size 500 \
      --grid "$OUT/agree_cfg$cfg.png" --out "$OUT/agree_cfg$cfg.json"
done
$PY -m mage evaluate fid --model "$MODEL" $D --num 5000 --class-conditional $S --batch-size 500 --out "$OUT/fid5000.json"
$PY -m mage evaluate fid --model "$MODEL" $D --num 5000 --class-conditional $S --cfg 2 --batch-size 500 --out "$OUT/fid5000_cfg2.json"
$PY -m mage evaluate fid --images fashion-mnist $D --num 5000 --out "$OUT/floor5000.json"
$PY - <<PYEOF
import json
from mage.bench import fast_path_agreement
r = fast_path_agreement("$MODEL", num=1000, steps=20, judge="$OUT/judge32", data_dir="$DATA_DIR")
print("fast path:", json.dumps(r))
json.dump(r, open("$OUT/fast_path.json", "w"), indent=2)
PYEOF
echo GPU_EVAL_OK
