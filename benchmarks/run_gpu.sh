#!/usr/bin/env bash
# Build, test and benchmark on a CUDA machine in one go.
#
#   bash benchmarks/run_gpu.sh [install] [tests] [w1-vllm] [w1-hf]   (default: all but w1-hf)
#
# Logs and JSON results go to $OUT (default ./gpu_logs); a summary table is printed last.
# Test models come from $VLLM_TEST_MODELS_DIR (default ../shared/models).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export VLLM_TEST_MODELS_DIR=${VLLM_TEST_MODELS_DIR:-$PWD/../shared/models}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(install tests w1-vllm)
summary=()

run() {  # run NAME LOG COMMAND...
    local name=$1 log=$2 start=$SECONDS rc=0
    shift 2
    echo "=== $name: $*"
    "$@" > "$OUT/$log" 2>&1 || rc=$?
    tail -n 5 "$OUT/$log"
    summary+=("$(printf '%-10s rc=%-3s %5ss  %s' "$name" "$rc" $((SECONDS - start)) "$(grep -E 'passed|failed|Throughput' "$OUT/$log" | tail -n 1)")")
}

W1=(benchmarks/benchmark_throughput.py --model benchmarks/configs/qwen3-0.6b
    --load-format dummy --dataset-name w1 --max-model-len 4096 --dtype bfloat16)

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

for stage in "${stages[@]}"; do
    case $stage in
        install) run install install.log python3 -m pip install --no-build-isolation --no-deps -e . ;;
        tests) run tests pytest.log python3 -m pytest tests/ -q -ra -p no:cacheprovider ;;
        w1-vllm) run w1-vllm w1_vllm.log python3 "${W1[@]}" --backend vllm --output-json "$OUT/w1_vllm.json" ;;
        w1-hf) run w1-hf w1_hf.log python3 "${W1[@]}" --backend hf --output-json "$OUT/w1_hf.json" ;;
        *) echo "unknown stage $stage"; exit 2 ;;
    esac
done

echo
echo "=== summary ($(cat "$OUT/device.txt" | head -n 1))"
printf '%s\n' "${summary[@]}"
