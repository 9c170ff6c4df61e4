#!/usr/bin/env bash
# GPU smoke check (run on a CUDA machine from the repo root): the same code paths as on CPU, on the GPU.
set -euo pipefail
export PYTHONPATH=src MAGE_DEBUG=1
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# 1. unit tests (CPU parts, but on this machine's torch)
($PY -m pytest -q tests/test_model.py tests/test_sampler.py tests/test_editing.py -p no:cacheprovider 2>&1 || true) | tail -3
# 1b. the CUDA-only tests: features / token cache on the GPU, pretrain --compile with and without CUDA graphs
($PY -m pytest -q tests/test_pretrain.py tests/test_recognition.py -k "cuda or compile" -p no:cacheprovider 2>&1 || true) | tail -3
# 2. training-step throughput of the real sizes, fp32 vs bf16, eager vs torch.compile
$PY -m mage bench --preset fmnist-32,vit-b --batch-size 64 --workloads train,gen-8 --compile --repeats 5 --json "$OUT/bench.json"
# 3. tokenize on the fly + pre-train vit-b on the GPU (random 256 px tokenizer), then generate
$PY - <<'PYEOF'
import torch
from mage.config import tokenizer_preset
from mage.checkpoint import save_checkpoint
from mage.vqgan import VQTokenizer
torch.manual_seed(0)
t = VQTokenizer(tokenizer_preset("maskgit-256"))
save_checkpoint("/tmp/gpu_check/tok256", t.state_dict(), t.config)
PYEOF
rm -rf /tmp/gpu_check/vitb   # a warm machine keeps /tmp: a second run starts over (pretrain refuses to overwrite a run)
$PY -m mage pretrain --data synthetic --tokenizer /tmp/gpu_check/tok256 --preset vit-b --max-steps 6 \
    --set batch_size=32 --set log_every=2 --set data_augment=flip --out /tmp/gpu_check/vitb 2>&1 | tail -2
$PY -m mage generate --model /tmp/gpu_check/vitb --num 8 --steps 8 --out "$OUT/vitb_samples.png"
echo GPU_CHECK_OK
