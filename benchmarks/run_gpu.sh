#!/usr/bin/env bash
# Build, test and benchmark on a CUDA machine in one go.
#
#   bash benchmarks/run_gpu.sh [STAGE ...]     (default: install kernels tests w1-vllm w2-vllm)
#
# Stages: install (build vllm._C), kernels (tests/kernels), tests (every test
# marked cuda), sampler (tests/samplers marked cuda and the sampler
# micro-benchmark), w1-vllm, w1-hf (W1 throughput), w2-vllm, w2-hf (W2
# latency), profile, profile-w2 (W1 / W2 decode steps: GPU kernels and host
# time), kernel-bench (benchmarks/kernels/*.py), cpu-tests (the whole suite).
# Logs and JSON results go to $OUT (default ./gpu_logs); a summary table is
# printed last. Test models come from $VLLM_TEST_MODELS_DIR (default
# ../shared/models). TORCH_CUDA_ARCH_LIST defaults to the local GPU's arch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export VLLM_TEST_MODELS_DIR=${VLLM_TEST_MODELS_DIR:-$PWD/../shared/models}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(install kernels tests w1-vllm w2-vllm)
summary=()

run() {  # run NAME LOG COMMAND...
    local name=$1 log=$2 start=$SECONDS rc=0
    shift 2
    echo "=== $name: $*"
    "$@" > "$OUT/$log" 2>&1 || rc=$?
    tail -n 5 "$OUT/$log"
    summary+=("$(printf '%-12s rc=%-3s %5ss  %s' "$name" "$rc" $((SECONDS - start)) \
        "$(grep -E 'passed|failed|Throughput|Avg latency|achieved|Decode step|/ greedy' "$OUT/$log" | tail -n 1)")")
}

W1=(benchmarks/benchmark_throughput.py --model benchmarks/configs/qwen3-0.6b
    --load-format dummy --dataset-name w1 --max-model-len 4096 --dtype bfloat16)
W2=(benchmarks/benchmark_latency.py --model benchmarks/configs/llama-3-8b
    --load-format dummy --dtype bfloat16 --input-len 128 --output-len 256
    --batch-size 1 --max-model-len 4096)

python3 - <<'PY' | tee "$OUT/device.txt"
import torch, transformers
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__,
      "| transformers", transformers.__version__)
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
print(f"device-to-device copy: {2 * 20 * x.numel() / start.elapsed_time(end) / 1e9:.2f} TB/s")
PY

arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
for stage in "${stages[@]}"; do
    case $stage in
        install) TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
            run install install.log python3 -m pip install -v --no-build-isolation --no-deps -e . ;;
        kernels) run kernels kernels.log python3 -m pytest tests/kernels -q -ra -p no:cacheprovider ;;
        tests) run tests pytest_cuda.log python3 -m pytest tests/ -m cuda -q -ra -p no:cacheprovider ;;
        sampler)
            run sampler-tests sampler_tests.log python3 -m pytest tests/samplers -m cuda -q -ra \
                -p no:cacheprovider
            run sampler-bench sampler.log python3 benchmarks/kernels/benchmark_sampler.py \
                --output-json "$OUT/sampler.json" ;;
        cpu-tests) run cpu-tests pytest.log python3 -m pytest tests/ -q -ra -p no:cacheprovider ;;
        w1-vllm) run w1-vllm w1_vllm.log python3 "${W1[@]}" --backend vllm --output-json "$OUT/w1_vllm.json" ;;
        w1-hf) run w1-hf w1_hf.log python3 "${W1[@]}" --backend hf --output-json "$OUT/w1_hf.json" ;;
        w2-vllm) run w2-vllm w2_vllm.log python3 "${W2[@]}" --backend vllm --num-iters-warmup 2 \
            --num-iters 5 --output-json "$OUT/w2_vllm.json" ;;
        w2-hf) run w2-hf w2_hf.log python3 "${W2[@]}" --backend hf --num-iters-warmup 1 \
            --num-iters 2 --output-json "$OUT/w2_hf.json" ;;
        profile) run profile profile.log python3 benchmarks/profile_decode_step.py \
            --model benchmarks/configs/qwen3-0.6b --load-format dummy --max-model-len 4096 \
            --dtype bfloat16 --trace "$OUT/decode_step_trace.json" ;;
        profile-w2) run profile-w2 profile_w2.log python3 benchmarks/profile_decode_step.py \
            --workload w2 --model benchmarks/configs/llama-3-8b --load-format dummy \
            --max-model-len 4096 --dtype bfloat16 --trace "$OUT/decode_step_trace_w2.json" ;;
        kernel-bench)
            for f in benchmarks/kernels/benchmark_*.py; do
                run "$(basename "$f" .py | sed 's/benchmark_//')" "$(basename "$f" .py).log" python3 "$f"
            done ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done

echo
echo "=== summary ($(head -n 1 "$OUT/device.txt"))"
printf '%s\n' "${summary[@]}"
