#!/usr/bin/env bash
# Performance check on a CUDA machine (repo root): mage bench with --baseline for both presets, and the
# fast path (bf16) vs fp32 generation agreement on a trained Fashion-MNIST model.
#   MODEL=runs/mage-fmnist JUDGE=runs/judge-fmnist [DATA_DIR=dir-with-fashion-mnist-gz] OUT=/tmp/gpu_bench bash scripts/gpu_bench.sh
set -euo pipefail
export PYTHONPATH=src
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_bench}
BATCH=${BATCH:-16}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -m mage bench --preset fmnist-32,vit-b --batch-size "$BATCH" --gen-steps 8,20 --baseline --compile --repeats 3 --json "$OUT/bench.json"
if [ -n "${MODEL:-}" ]; then
  $PY - <<PYEOF
import json
from mage.bench import fast_path_agreement
r = fast_path_agreement("${MODEL}", num=500, steps=20, judge="${JUDGE:-}" or None, data_dir="${DATA_DIR:-}" or None)
print(json.dumps(r))
json.dump(r, open("$OUT/agreement.json", "w"), indent=2)
PYEOF
fi
echo GPU_BENCH_OK
