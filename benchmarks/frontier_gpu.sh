#!/usr/bin/env bash
# DeepSeek-V3's real shapes from an FP8 source on one GPU, within one device lease (benchmarks/README.md):
#   bash benchmarks/frontier_gpu.sh OUT_DIR "70GB 40GB" [LAYERS]
# writes an FP8 checkpoint of one dense and LAYERS-1 MoE layers (once: scale.py reuses it while it exists), then
# quantizes it with the default recipe (--tf32) under each --gpu-memory budget given, one result JSON each.
# HOST_MEMORY=32GB adds --host-memory 32GB (and -host-memory-32GB to the result's name).
set -u
OUT=${1:?usage: frontier_gpu.sh OUT_DIR "BUDGETS" [LAYERS]}
BUDGETS=${2:-70GB}
LAYERS=${3:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
W=/tmp/quantmoe-frontier
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0
PY=${PYTHON:-python3}
echo "=== $(date +%T) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for b in $BUDGETS; do
  echo "=== $(date +%T) quantize --gpu-memory $b"
  host=()
  [ -n "${HOST_MEMORY:-}" ] && host=(--host-memory "$HOST_MEMORY")
  args=(--shape deepseek-v3 --source fp8 --layers "$LAYERS" --work "$W" --results "$OUT"
        --name "scale-H200-deepseek-v3-fp8-${LAYERS}L-default-gpu-memory-$b${HOST_MEMORY:+-host-memory-$HOST_MEMORY}"
        --timeout "${TIMEOUT:-1500}")
  $PY "$HERE/benchmarks/scale.py" "${args[@]}" --tf32 --gpu-memory "$b" ${host[@]+"${host[@]}"} 2>&1 | grep -v "Warning\|warn(" | tail -40
  ls -d $W/*/ 2>/dev/null
done
df -h /tmp | tail -1
echo "=== $(date +%T) done"
