#!/bin/sh
# GPU checks for a lent CUDA machine, in one call: parity tests, the
# Fashion-MNIST samples for scoring, and the speed table.  Run from the
# project root with binaries built by `make CUDA=1` staged under $D
# (bin/, lib/, tests/test_cuda, deps/ with libcjson and libsubunit,
# shared/ = golden cases and the model); see docs/cuda.md.
#
#   tools/gpu-checks.sh [test] [sample] [bench] [bench-full]
set -u
D=${D:-.dev}
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$D/deps:${LD_LIBRARY_PATH:-}"
export LEGO_GOLDEN_DIR="$PWD/$D/shared/golden"
MODEL="$D/shared/models/fmnist_lego_pg32.safetensors"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
ldd "$D/bin/lego-bench" "$D/tests/test_cuda" | grep "not found"

bench() { # preset batches [extra args]
    p=$1; b=$2; shift 2
    timeout 120 "$D/bin/lego-bench" --backend cuda --preset "$p" --batch "$b" --iters 10 --warmup 2 "$@" \
        > "$OUT/bench_$p$*.log" 2>&1
    echo "-- $p $* (rc $?)"; grep -E "^ +[0-9]+ " "$OUT/bench_$p$*.log" || tail -3 "$OUT/bench_$p$*.log"
}

for what in "$@"; do
    case $what in
    test)
        echo "== test_cuda"
        timeout 240 "$D/tests/test_cuda" > "$OUT/test_cuda.log" 2>&1
        echo "test_cuda rc=$?"
        grep -E "^[0-9]+%|:[EF]:|worst|scaled error [1-9]\.[0-9]+e-0[0-3]" "$OUT/test_cuda.log" | head -40
        grep -c "scaled error" "$OUT/test_cuda.log"
        ;;
    sample)
        echo "== 1000 Fashion-MNIST samples, Heun 18 steps, on the GPU"
        /usr/bin/time -f "%e s" timeout 200 "$D/bin/lego-sample" --backend cuda --model "$MODEL" \
            --seeds 0-999 --labels cycle --batch 500 --quiet --npz "$OUT/fmnist_cuda.npz"
        echo "rc=$?"
        ;;
    bench)
        echo "== speed (random weights, fp32 unless the build has more)"
        bench S-PG-64 1,64
        bench L-PG-64 1,64
        bench XL-U-32 1,64
        ;;
    bench-full)
        bench S-PG-64 1,64 --skip-top
        bench L-PG-64 1,64 --skip-top
        bench L-PR-64 1,64
        bench XL-U-32 1,64 --skip-top
        bench DiT-S-64 1,64
        ;;
    esac
done
