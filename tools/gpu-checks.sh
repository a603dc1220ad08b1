#!/bin/sh
# GPU checks for a lent CUDA machine, in one call: parity tests, the
# Fashion-MNIST samples for scoring, and the speed table.  Run from the
# project root with binaries built by `make CUDA=1` staged under $D
# (bin/, lib/, tests/test_cuda, deps/ with libcjson and libsubunit,
# shared/ = golden cases and the model); see docs/cuda.md.
#
#   tools/gpu-checks.sh [test] [sample] [guided] [bench] [bench-bf16] [profile] [profile-one]
#                       [sample-loop] [attn-ab] [ln-ab] [residual-ab]
#                       [residual-quality] [train-test] [train-bench]
#                       [train-profile] [train-fmnist] [train-compare]
set -u
D=${D:-.dev}
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
# tools/stage-device.sh packs the programs; unpack them once.
[ -f "$D/pack.tar.xz" ] && [ ! -d "$D/bin" ] && tar xJf "$D/pack.tar.xz" -C "$D"
export LD_LIBRARY_PATH="$PWD/$D/deps:${LD_LIBRARY_PATH:-}"
# cuDNN (loaded at run time for attention, cuda/cudnn_attention.cu): the
# system's if ldconfig knows it, else the one pip installed for PyTorch.
if ! ldconfig -p 2>/dev/null | grep -q "libcudnn.so.9"; then
    for dir in $(python3 -c 'import nvidia.cudnn; print(list(nvidia.cudnn.__path__)[0] + "/lib")' 2>/dev/null) \
               /usr/local/lib/python3*/dist-packages/nvidia/cudnn/lib /usr/lib/python3/dist-packages/nvidia/cudnn/lib \
               /usr/local/lib/python3*/site-packages/nvidia/cudnn/lib; do
        [ -e "$dir/libcudnn.so.9" ] && { export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"; break; }
    done
fi
for dir in $(python3 -c 'import nvidia.cuda_nvrtc; print(list(nvidia.cuda_nvrtc.__path__)[0] + "/lib")' 2>/dev/null); do
    [ -d "$dir" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"
done
echo "cuDNN: $(ldconfig -p 2>/dev/null | grep -m1 'libcudnn.so.9 ' | sed 's/.*=> //') LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export LEGO_GOLDEN_DIR="$PWD/$D/shared/golden"
MODEL="$D/shared/models/fmnist_lego_pg32.safetensors"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
ldd "$D/bin/lego-bench" "$D/tests/test_cuda" | grep "not found"

bench() { # preset [extra args]: batch 1 and 64, fp32 and bf16, with and without the top brick
    p=$1; shift
    timeout 150 "$D/bin/lego-bench" --backend cuda --preset "$p" --batch 1,64 --iters 5 --warmup 2 \
        --precision fp32,bf16 --both "$@" > "$OUT/bench_$p.log" 2>&1
    echo "-- $p $* (rc $?)"; grep -E "^(fp32|bf16|fp16) " "$OUT/bench_$p.log" || tail -3 "$OUT/bench_$p.log"
}

for what in "$@"; do
    case $what in
    test)
        echo "== test_cuda"
        start=$(date +%s)
        timeout ${TEST_TIMEOUT:-300} "$D/tests/test_cuda" > "$OUT/test_cuda.log" 2>&1
        echo "test_cuda rc=$? in $(($(date +%s) - start)) s"
        grep -E "^[0-9]+%|:[EF]:|worst|scaled error [1-9]\.[0-9]+e-0[0-3]" "$OUT/test_cuda.log" | head -40
        grep -E "^cuda cudnn" "$OUT/test_cuda.log" | head -8
        grep -c "scaled error" "$OUT/test_cuda.log"
        ;;
    sample)
        for prec in fp32 bf16; do
            echo "== 1000 Fashion-MNIST samples, Heun 18 steps, on the GPU, $prec"
            /usr/bin/time -f "%e s" timeout 200 "$D/bin/lego-sample" --backend cuda --model "$MODEL" \
                --precision $prec --seeds 0-999 --labels cycle --batch 500 --quiet \
                --npz "$OUT/fmnist_cuda_$prec.npz"
            echo "rc=$?"
        done
        ;;
    guided)
        # Guidance 2 and the seed-to-seed spread of the scores (fp32).
        for args in "--cfg 2 --seeds 0-999" "--cfg 2 --seeds 1000-1999" \
                    "--cfg 2 --seeds 0-999 --rng torch" "--seeds 1000-1999"; do
            name=$(echo "$args" | tr -d ' -' | tr -c 'a-z0-9\n' '_')
            echo "== 1000 samples $args"
            timeout 100 "$D/bin/lego-sample" --backend cuda --model "$MODEL" --labels cycle \
                --batch 500 --quiet $args --npz "$OUT/fmnist_$name.npz"
        done
        ;;
    train-test)
        # Training on the GPU: golden gradients, GPU vs CPU, resume (test_cuda's parts).
        for part in train-golden train; do
            echo "== test_cuda $part"
            CK_RUN_CASE=$part timeout 240 "$D/tests/test_cuda" > "$OUT/test_cuda_$part.log" 2>&1
            echo "rc=$?"
            grep -E "^[0-9]+%|:[EF]:|worst|resume" "$OUT/test_cuda_$part.log" | head -30
        done
        ;;
    train-bench)
        # Training throughput, Fashion-MNIST architecture, batch 256 (target on an H100:
        # >= 10,500 images/s in bf16).
        for args in "--precision fp32" "--precision bf16" "--precision bf16 --patch-fraction 0.5"; do
            timeout 200 "$D/bin/lego-train" --backend cuda $args --batch 256 --bench 30 2>&1 | tail -2
        done
        ;;
    train-fmnist)
        # The default model: MINUTES (5.5, the reference's time on an H100) of bf16 training
        # on Fashion-MNIST ($D/data, tools/stage-device.sh data), then 1000 samples (Heun 18,
        # no guidance) for ../shared/eval/fmnist_score.py at home.  The EMA checkpoint comes
        # back in 15 MB parts (the transfer's file limit): cat ema.part.* > model.safetensors.
        # Should the timeout strike first, its SIGTERM makes lego-train save after the
        # step under way (exit 143), so the EMA still comes back.
        echo "== train the Fashion-MNIST model, ${MINUTES:-5.5} min"
        timeout 480 "$D/bin/lego-train" --backend cuda --precision bf16 \
            --data "$D/data/train-images-idx3-ubyte.gz" --out /tmp/fmnist --batch ${BATCH:-256} \
            --lr ${LR:-2e-4} --warmup 200 --ema-kimg ${EMA_KIMG:-100} --label-dropout 0.1 \
            --minutes ${MINUTES:-5.5} --steps 1000000 --every 1000000 \
            ${PATCH:+--patch-fraction $PATCH} > /tmp/fmnist_train.log 2>&1
        echo "rc=$?"
        tr '\r' '\n' < /tmp/fmnist_train.log | grep -E "^step" | awk 'NR % 500 == 0' > "$OUT/train_fmnist.log"
        tr '\r' '\n' < /tmp/fmnist_train.log | tail -4 | tee -a "$OUT/train_fmnist.log"
        timeout 100 "$D/bin/lego-sample" --backend cuda --model /tmp/fmnist/ema.safetensors \
            --seeds 0-999 --labels cycle --batch 500 --quiet --npz "$OUT/fmnist_ours.npz"
        echo "sample rc=$?"
        split -b 15M /tmp/fmnist/ema.safetensors "$OUT/ema.part."
        ;;
    train-compare)
        # Patch-sampled against joint training for the same time (CMP_MINUTES each, default
        # 2): images/s and 1000 samples of each, scored at home.
        for f in 1 0.5; do
            echo "== patch fraction $f, ${CMP_MINUTES:-2} min"
            timeout 300 "$D/bin/lego-train" --backend cuda --precision bf16 \
                --data "$D/data/train-images-idx3-ubyte.gz" --out /tmp/cmp_$f --batch 256 \
                --lr ${LR:-2e-4} --warmup 200 --ema-kimg ${EMA_KIMG:-100} --patch-fraction $f \
                --minutes ${CMP_MINUTES:-2} --steps 1000000 --every 1000000 2>&1 | tr '\r' '\n' | tail -2
            timeout 100 "$D/bin/lego-sample" --backend cuda --model /tmp/cmp_$f/ema.safetensors \
                --seeds 0-999 --labels cycle --batch 500 --quiet --npz "$OUT/cmp_$f.npz"
        done
        ;;
    train-profile)
        # Where a training step's time goes (tools/train_profile.c).
        # "256 bf16 0 4": attention through the GEMMs, the default before the flash kernels;
        # "256 bf16 0 0 1": the GEMMs' algorithms timed (CUDA_OPT_TRAIN_AUTOTUNE);
        # "256 bf16 0 0 0 0": without cuBLASLt's epilogue fusions (CUDA_OPT_TRAIN_EPILOGUES);
        # "256 bf16 0 0 0 1 0": the LayerNorms' column sums as passes of their own
        # (CUDA_OPT_TRAIN_LN_SUMS).
        for args in "256 bf16" "256 bf16 0 4" "256 bf16 0 0 1" "256 bf16 0 0 0 0" \
            "256 bf16 0 0 0 1 0" "256 fp32" "256 bf16 0.5"; do
            timeout 120 "$D/tests/train_profile" $args 2>&1
        done
        ;;
    profile-one)
        timeout 120 "$D/tests/cuda_profile" lego_L_PG_64 64 bf16 2>&1
        ;;
    bench-bf16)
        for p in S-PG-64 L-PG-64 L-PR-64 XL-U-32 DiT-S-64 DiT-L-64 DiT-XL-32; do
            bench $p --precision bf16
        done
        ;;
    profile)
        echo "== where the time goes (tools/cuda_profile.c)"
        for args in "lego_L_PG_64 64 bf16" "lego_L_PG_64 64 bf16 --skip-top" "lego_XL_U_32 64 bf16" \
                    "lego_S_PG_64 1 bf16" "lego_S_PG_64 64 bf16"; do
            timeout 120 "$D/tests/cuda_profile" $args 2>&1
        done
        ;;
    sample-loop)
        # Whole lego_sample calls (Heun 18), the loop on the device: ms per
        # image at batch 1 and 64 (lego-bench --sample), then the device
        # loop against the host-driven one (tests/cuda_sample_loop, built
        # by `make CUDA=1 build/tools/cuda_sample_loop`).
        echo "== lego_sample on the GPU, Heun 18 steps"
        for p in S-PG-64 L-PG-64 XL-U-32; do
            prec=bf16; [ "$p" = S-PG-64 ] && prec=fp32,bf16
            timeout 150 "$D/bin/lego-bench" --backend cuda --preset "$p" --sample --steps 18 \
                --batch 1,64 --iters 3 --warmup 1 --precision $prec > "$OUT/sample_$p.log" 2>&1
            echo "-- $p (rc $?)"; grep -E "^(fp32|bf16|fp16) " "$OUT/sample_$p.log" || tail -3 "$OUT/sample_$p.log"
        done
        for args in "lego_S_PG_64 1 bf16" "lego_S_PG_64 64 bf16" "lego_S_PG_64 1 fp32"; do
            timeout 120 "$D/tests/cuda_sample_loop" $args 18 3 2>&1
        done
        ;;
    attn-ab)
        # Long-sequence attention: the automatic choice (mode 0: our
        # tensor-core kernel, or cuDNN where it timed faster), our kernel
        # with 32 query rows per warp (mode 3), cuDNN wherever it takes the
        # shape (mode 4), and our 16-row kernel only (mode 5, the automatic
        # choice before cuDNN): whole evaluations and the attention's share
        # (tests/cuda_profile).
        echo "== attention A/B: CUDA_OPT_ATTENTION 0, 3, 4, 5"
        for args in "lego_L_PG_64 64 bf16" "lego_XL_U_32 64 bf16"; do
            for mode in 0 3 4 5 0 3 4 5; do
                timeout 120 "$D/tests/cuda_profile" $args --attn $mode 2>&1 | grep -E "^(eval|profile|cudnn)|attention"
            done
        done
        ;;
    ln-ab)
        # The LayerNorm kernels: one warp per row (0, the default) against tiles of
        # 64 rows with the image's adaLN vectors in shared memory (1); the same bits.
        echo "== LayerNorm A/B: CUDA_OPT_LAYERNORM 0 vs 1"
        for args in "lego_L_PG_64 64 bf16" "lego_XL_U_32 64 bf16"; do
            for ln in 0 1 0 1; do
                timeout 120 "$D/tests/cuda_profile" $args --ln $ln 2>&1 | grep -E "^(eval|profile)|layernorm"
            done
        done
        ;;
    residual-ab)
        # The residual stream fp32 (0, the default) against bf16 (1, CUDA_OPT_RESIDUAL).
        echo "== residual A/B: CUDA_OPT_RESIDUAL 0 vs 1"
        for args in "lego_L_PG_64 64 bf16" "lego_XL_U_32 64 bf16" "lego_S_PG_64 1 bf16"; do
            for r in 0 1 0 1; do
                timeout 120 "$D/tests/cuda_profile" $args --residual $r 2>&1 | grep -E "^(eval|profile)|layernorm"
            done
        done
        ;;
    residual-quality)
        # The quality side of residual-ab: the default model's 1000 samples in bf16 with the
        # residual stream fp32 (0) and bf16 (1), each against the fp32 stream's images, as
        # .npz for ../shared/eval/fmnist_score.py at home.
        echo "== residual quality: 1000 samples, bf16, CUDA_OPT_RESIDUAL 0 vs 1"
        for r in 0 1; do
            timeout 100 "$D/tests/cuda_samples" models/lego_fmnist_pg32.safetensors bf16 1000 \
                "$OUT/fmnist_bf16_res$r.npz" --residual $r \
                $([ $r = 1 ] && echo "--compare $OUT/fmnist_bf16_res0.npz") 2>&1
        done
        ;;
    bench)
        echo "== speed (random weights)"
        for p in S-PG-64 L-PG-64 L-PR-64 XL-U-32 DiT-S-64 DiT-L-64 DiT-XL-32; do bench $p; done
        ;;
    esac
done

# A lent machine sends back at most 8 files per call: the logs travel as one
# archive (appended to, so that several runs in one call share it).
cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar rf logs.tar ./*.log && rm -f ./*.log
exit 0
