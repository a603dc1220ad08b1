#!/usr/bin/env bash
# Training benchmark (not a test): patch-sampled brick training (paper eq. 12) against joint
# training for the same time.  Trains the Fashion-MNIST architecture with lego-train for
# MINUTES at each patch fraction (1 = joint, as the reference trains), then draws 1000 samples
# of each model's EMA (Heun 18, no guidance, 100 per class) and scores them with
# ../shared/eval/fmnist_score.py.  Prints steps, images/s, ms per step and the scores.
#   examples/fmnist-train-compare.sh [MINUTES] [FRACTION ...]        (default: 30 1 0.5)
# Environment: BACKEND (cpu|cuda), PRECISION (fp32|bf16), BATCH, LR, THREADS, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
shift || true
fractions=${*:-1 0.5}
backend=${BACKEND:-cpu}
out=${OUT:-out/train-compare}
score=../shared/eval/fmnist_score.py
mkdir -p "$out"
make -s examples
threads=()
[ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")

for f in $fractions; do
    dir="$out/f$f"
    rm -rf "$dir"
    bin/lego-train --backend "$backend" --precision "${PRECISION:-fp32}" "${threads[@]}" \
        --out "$dir" --batch "${BATCH:-64}" --lr "${LR:-2e-4}" --warmup 200 --ema-kimg 100 \
        --label-dropout 0.1 --patch-fraction "$f" --minutes "$minutes" --steps 100000000 \
        --every 100000000 > "$dir.log" 2>&1
    # "lego-train: N steps, M images in S s of training (R img/s)"
    summary=$(grep -E '^lego-train: [0-9]+ steps' "$dir.log" | tail -1)
    steps=$(echo "$summary" | awk '{print $2}')
    secs=$(echo "$summary" | awk '{print $7}')
    bin/lego-sample --quiet --backend "$backend" "${threads[@]}" --model "$dir/ema.safetensors" \
        --seeds 0-999 --labels cycle --steps 18 --batch 100 --npz "$dir.npz"
    scores="(not scored: $score missing)"
    [ -f "$score" ] && scores=$(/usr/bin/python3 "$score" "$dir.npz")
    printf 'patch fraction %-5s %7s steps in %6.0f s: %6.1f ms/step, %s | %s\n' "$f" "$steps" \
        "$secs" "$(echo "$secs * 1000 / $steps" | bc -l)" \
        "$(echo "$summary" | sed 's/.*(\(.*\)).*/\1/')" "$scores"
done
