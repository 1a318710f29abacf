#!/usr/bin/env bash
# Everything normkit checks and times on a GPU, in one command with a bounded run time (for a short lease
# on a lent machine, or any CUDA box): the CUDA tests, the conformance matrix on CUDA, the kernel
# benchmark against torch eager, torch.compile and Liger-Kernel, and converted Hugging Face and timm models.
#
#   RESULTS=gpu-results bash benchmarks/gpu_session.sh [PHASE ...]
#
# PHASE: tests verify bench compile convert profile tune (default: all, in that order). Each phase has its own time
# limit (seconds, overridable as e.g. LIMIT_bench=200) and writes its log and results under $RESULTS; a
# phase that fails or times out does not stop the next one. With PACK=file.tgz the results folder is
# packed into that file after every phase (for machines that return only a few files). Liger-Kernel and
# other missing packages can be put as wheels in .whl/ (installed with --no-deps into a private folder).
# The last lines printed are a summary.
set -u
cd "$(dirname "$0")/.."
OUT=${RESULTS:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/nk-site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/nk-site
fi

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(tests verify bench compile convert profile tune)
summary=()

run_phase() {  # name default_limit command...
    local name=$1 limit=$2; shift 2
    local var="LIMIT_$name"; limit=${!var:-$limit}
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc in $((SECONDS - start))s")
    tail -n "${TAIL:-15}" "$OUT/$name.log"
    if [ -n "${PACK:-}" ]; then tar czf "$PACK" -C "$OUT" .; fi
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 -m pip list 2>/dev/null | grep -i -E "^(transformers|timm|liger|torchvision) "
} 2>&1 | tee "$OUT/env.log"

for phase in "${phases[@]}"; do
    case $phase in
    tests)  # the CUDA cases of the triton tests, and the compile tests on CUDA
        run_phase tests 90 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_triton_backend.py ;;
    verify)  # every normkit.nn module against torch.nn on CUDA tensors, with the triton backend
        run_phase verify 100 python3 -m normkit verify --device cuda --backend triton -q --json "$OUT/verify.json" ;;
    bench)  # the issue's matrix: normkit, torch eager and Liger (torch.compile in its own phase)
        run_phase bench 170 python3 -m normkit.bench.gpu --providers normkit torch liger --time-limit 140 \
            --out "$OUT/bench" ;;
    compile)  # torch.compile (inductor) on one shape per op: each cell compiles twice
        run_phase compile 150 python3 -m normkit.bench.gpu --providers normkit torch compile --time-limit 120 \
            --out "$OUT/compile" --only "32768x4096 bf16" "group_norm_silu" "batch_norm_train" ;;
    convert)  # converted Hugging Face and timm models: outputs and paired speed (ResNet-50 and MobileNetV3 first)
        run_phase convert 150 python3 benchmarks/convert_speed.py --device cuda --reps 11 \
            --out "$OUT/convert-gpu.json" ;;
    profile)  # where a converted ResNet-50's time goes (kernels vs host), inference and a training step
        run_phase profile 120 python3 benchmarks/profile_convert.py --device cuda --top 15 \
            --out "$OUT/profile-gpu.json" ;;
    tune)  # the launch heuristics' choices against alternatives, on the cells the H200 found slowest
        run_phase tune 170 python3 benchmarks/gpu_tune.py --time-limit 140 --out "$OUT/tune.json" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
    esac
done
echo "== summary"
printf '%s\n' "${summary[@]}"
