#!/bin/sh
# Assemble the folder tools/gpu-checks.sh runs from on a lent GPU machine
# (which has the CUDA runtime, cuBLASLt, libpng and zlib, but no cJSON, no
# Check and no registry): a CUDA=1 build of the library, the example
# programs, test_cuda, cuda_profile, cuda_sample_loop and cuda_samples, the
# two shared libraries the device lacks, the golden cases, and on request
#   model  the Fashion-MNIST reference model, as fp16 (the transfer's 64 MiB
#          would not hold the fp32 file beside the rest)
#   data   Debian's Fashion-MNIST training set, for lego-train there
# The folder is $D (default .dev; add /.dev/ to .git/info/exclude) and
# travels with `carry: [".dev"]`.  The programs (each statically linked with
# the fat CUDA binary, ~11 MB) travel as one pack.tar.xz (about 10 MB for
# 55) that gpu-checks.sh unpacks; even so model and data together exceed
# the transfer's 64 MiB: stage them for separate calls.
#
#   tools/stage-device.sh [model] [data]
#
# The CUDA build replaces the CPU one in build/ and lib/: `make clean &&
# make` goes back.
set -eu
D=${D:-.dev}
SHARED=${SHARED:-../shared}
rm -rf "$D"
mkdir -p "$D/bin" "$D/lib" "$D/tests" "$D/deps" "$D/shared"
make CUDA=1 -j2 lib examples build/tests/test_cuda build/tools/cuda_profile \
    build/tools/cuda_sample_loop build/tools/train_profile build/tools/cuda_samples >/dev/null
cp -a lib/liblego.so* "$D/lib/"
cp bin/lego-* "$D/bin/"
cp build/tests/test_cuda build/tools/cuda_profile build/tools/train_profile build/tools/cuda_sample_loop \
    build/tools/cuda_samples "$D/tests/"
strip "$D"/bin/* "$D"/tests/* "$D"/lib/liblego.so.*.*.*
for lib in libcjson.so.1 libsubunit.so.0; do
    cp -L "/usr/lib/x86_64-linux-gnu/$lib" "$D/deps/"
done
cp -r "$SHARED/golden" "$D/shared/"
for what in "$@"; do
    case $what in
    model)
        mkdir -p "$D/shared/models"
        /usr/bin/python3 tools/lego-convert --heads 4 --quiet --dtype f16 \
            "$SHARED/models/fmnist_lego_pg32.safetensors" \
            "$D/shared/models/fmnist_lego_pg32.safetensors"
        ;;
    data)
        mkdir -p "$D/data"
        cp /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
           /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz "$D/data/"
        ;;
    *)
        echo "stage-device.sh: unknown part '$what' (model, data)" >&2
        exit 2
        ;;
    esac
done
tar cf - -C "$D" bin lib tests deps | xz -6 -T2 > "$D/pack.tar.xz"
rm -rf "$D/bin" "$D/lib" "$D/tests" "$D/deps"
du -sh "$D"
