set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
S="python3 benchmarks/scale.py --layers 3 --work /tmp/qs --results $OUT"
echo "=== $(date +%T) start"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$S --shape mixtral-8x7b --name scale-H200-mixtral-8x7b-bf16-3L-default-gpu-memory-24GB --timeout 150 --tf32 --gpu-memory 24GB --eval --eval-profile 8 2>&1 | grep -v "Warning\|warn(" | tail -8
rm -rf /tmp/qs/mixtral*; echo "=== $(date +%T) qwen3-30b"
$S --shape qwen3-30b-a3b --name scale-H200-qwen3-30b-a3b-bf16-3L-default-gpu-memory-24GB --timeout 120 --tf32 --gpu-memory 24GB 2>&1 | grep -v "Warning\|warn(" | tail -6
rm -rf /tmp/qs/qwen3-30b*; echo "=== $(date +%T) qwen3-235b"
$S --shape qwen3-235b-a22b --name scale-H200-qwen3-235b-a22b-bf16-3L-default --timeout 200 --tf32 2>&1 | grep -v "Warning\|warn(" | tail -6
echo "=== $(date +%T) done"; df -h /tmp | tail -1
