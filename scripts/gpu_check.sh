#!/usr/bin/env bash
# One-command GPU check (about 5-8 minutes on one H100/H200):
#   1. the CUDA tests (`pytest -m cuda`): backend parity in fp32 and bf16, training micro-batches
#      that never wait for the GPU, a compiled FCMAE step, a fine-tuning step;
#   2. benchmarks/pretrain_speed.py on CUDA in bf16: atto, tiny and base at 224 px, batch 64 and
#      128, mask ratio 0.6, modes sparse, masked and dense.
# Everything lands in one markdown file, $GPU_CHECK_DIR/results.md (default gpu_check/results.md),
# with the machine, the commands and their outputs.
#
# Usage:   bash scripts/gpu_check.sh
# Needs:   a CUDA build of torch already installed (this script never installs torch); the package
#          is installed editable (pip install --no-deps -e .) when it does not import yet.
# Env:     GPU_CHECK_DIR  output folder (default gpu_check)
#          PYTHON         interpreter (default python)
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT_DIR="${GPU_CHECK_DIR:-gpu_check}"
RESULTS="$OUT_DIR/results.md"
mkdir -p "$OUT_DIR"

log() { echo "[gpu_check] $*" >&2; }

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device visible to torch (torch.cuda.is_available() is False); nothing to check."
    log "Install a CUDA build of torch on a GPU machine, then re-run."
    exit 1
fi
if ! "$PYTHON" -c "import models, fcmae, engine" 2>/dev/null; then
    log "installing this repository in editable mode (no dependencies)"
    "$PYTHON" -m pip install --no-deps -q -e . || { log "pip install -e . failed"; exit 1; }
fi

{
    echo "# GPU check"
    echo
    echo "\`bash scripts/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    "$PYTHON" - <<'EOF'
import platform, torch
props = torch.cuda.get_device_properties(0)
print(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"Python {platform.python_version()}")
EOF
    echo
} > "$RESULTS"

status=0

log "1/2 CUDA tests (pytest -m cuda)"
TEST_LOG="$OUT_DIR/pytest_cuda.log"
timeout 300 "$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py > "$TEST_LOG" 2>&1
test_status=$?
[ "$test_status" -eq 0 ] || status=1
{
    echo "## CUDA tests"
    echo
    echo "\`python -m pytest -m cuda -q -rs tests/test_cuda.py\`: exit code $test_status"
    echo
    echo '```'
    tail -n 40 "$TEST_LOG"
    echo '```'
    echo
} >> "$RESULTS"

log "2/2 pretraining speed on CUDA, bf16 (atto, tiny, base; batch 64 and 128)"
SPEED_CMD=("$PYTHON" -m benchmarks.pretrain_speed --device cuda --amp bf16 --models atto tiny base
           --batch-sizes 64 128 --mask-ratios 0.6 --backends sparse masked dense
           --warmup 2 --steps 5 --repeats 3 --output "$OUT_DIR/pretrain_speed_cuda.md")
timeout 360 "${SPEED_CMD[@]}" > "$OUT_DIR/pretrain_speed.log" 2>&1
speed_status=$?
[ "$speed_status" -eq 0 ] || status=1
{
    echo "## Pretraining speed (benchmarks/pretrain_speed.py)"
    echo
    echo "\`python -m benchmarks.pretrain_speed --device cuda --amp bf16 --models atto tiny base --batch-sizes 64 128 --mask-ratios 0.6 --backends sparse masked dense --warmup 2 --steps 5 --repeats 3\`: exit code $speed_status"
    echo
    if [ -s "$OUT_DIR/pretrain_speed_cuda.md" ]; then
        cat "$OUT_DIR/pretrain_speed_cuda.md"
    else
        echo '```'
        tail -n 40 "$OUT_DIR/pretrain_speed.log"
        echo '```'
    fi
    echo
} >> "$RESULTS"

log "results: $RESULTS (logs beside it)"
[ "$status" -eq 0 ] && log "all passed" || log "something failed: see $RESULTS"
exit "$status"
