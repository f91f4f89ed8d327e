set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
S="python3 benchmarks/scale.py --layers 3 --work /tmp/qs --results $OUT"
F='Warning\|warn('
echo "=== $(date +%T) start"
$S --shape mixtral-8x7b --name scale-H200-mixtral-8x7b-bf16-3L-default-gpu-memory-24GB --timeout 150 --tf32 --gpu-memory 24GB --eval --eval-dtype float32 bfloat16 --eval-profile 8 2>&1 | grep -v "$F" | tail -4
rm -rf /tmp/qs/mixtral*; echo "=== $(date +%T) qwen3-30b"
$S --shape qwen3-30b-a3b --name scale-H200-qwen3-30b-a3b-bf16-3L-default-gpu-memory-24GB --timeout 120 --tf32 --gpu-memory 24GB 2>&1 | grep -v "$F" | tail -3
rm -rf /tmp/qs/qwen3-30b*; echo "=== $(date +%T) qwen3-235b"
$S --shape qwen3-235b-a22b --name scale-H200-qwen3-235b-a22b-bf16-3L-default-gpu-memory-70GB --timeout 200 --tf32 --gpu-memory 70GB 2>&1 | grep -v "$F" | tail -3
echo "=== $(date +%T) done"
