#!/usr/bin/env bash
# Sample-quality benchmark (not a test): 1000 Fashion-MNIST samples per setting, scored with
# ../shared/eval/fmnist_score.py (class accuracy, FD), plus wall time per image.
# OpenBLAS runs single-threaded so liblego spreads the GEMMs over its own THREADS workers.
#   examples/fmnist-quality.sh [THREADS] [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
model=${2:-models/lego_fmnist_pg32.safetensors}
out=${OUT:-out/quality}
mkdir -p "$out"
make -s examples
run() {
    local name=$1; shift
    local t0=$(date +%s.%N)
    OPENBLAS_NUM_THREADS=1 bin/lego-sample --quiet --model "$model" --threads "$threads" \
        --seeds 0-999 --labels cycle --batch 100 --npz "$out/$name.npz" "$@"
    local t1=$(date +%s.%N)
    local score=$(/usr/bin/python3 ../shared/eval/fmnist_score.py "$out/$name.npz")
    printf '%-28s %s  %.1f ms/image (%s threads)\n' "$name" "$score" \
        "$(echo "($t1 - $t0) * 1000 / 1000" | bc -l)" "$threads"
}
run heun18 --steps 18
run heun18_cfg2 --steps 18 --cfg 2
run heun18_skip_gt9 --steps 18 --skip pg:0.5
run heun18_skip_gt5 --steps 18 --skip pg:0.3
run dpmpp2m_10 --solver dpmpp2m --steps 10
run dpmpp2m_14 --solver dpmpp2m --steps 14
