/*
 * philox.cu -- Philox4x32-10 normals on the device, the twin of
 * philox_normal_f32 in src/rng.c (formulas in src/rng.h):
 *
 *   key = { seed lo, seed hi },  block b = e / 4,
 *   ctr = { b lo, b hi, stream lo, stream hi },  w = philox4x32_10(ctr, key)
 *   u(x) = (x + 1) * 2^-32                        (exact in double)
 *   r = sqrt(-2 log u(w0)), t = 2 pi u(w1)  ->  r cos t, r sin t
 *   r = sqrt(-2 log u(w2)), t = 2 pi u(w3)  ->  r cos t, r sin t
 *   rounded to float once at the end.
 *
 * The integer part is bit-exact.  sqrt and the products are IEEE double on
 * both sides; CUDA's double log/sin/cos are within 1-2 double ulps of
 * glibc's, so after the final rounding to float the two agree exactly
 * except, very rarely, by one float ulp.  For the on-device sampling loop
 * (latents, churn noise) and its test against the CPU.
 */
#include "cuda_internal.h"
#include "philox_device.h"

/* One thread per Philox block; the first and last blocks of the range may
 * be partial. */
__global__ void philox_normal_kernel(uint64_t seed, uint64_t stream, uint64_t first, size_t n,
                                     size_t blocks, float *out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < blocks;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t block = first / 4 + i;
        double z[4];
        philox_normal4(seed, stream, block, z);
        for (int lane = 0; lane < 4; lane++) {
            uint64_t e = block * 4 + (uint64_t)lane;
            if (e >= first && e - first < n) out[e - first] = (float)z[lane];
        }
    }
}

__global__ void philox_blocks_kernel(uint64_t seed, uint64_t stream, uint64_t first_block,
                                     size_t blocks, uint32_t *out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < blocks;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t w[4];
        philox_block(seed, stream, first_block + i, w);
        for (int j = 0; j < 4; j++) out[4 * i + (size_t)j] = w[j];
    }
}

/* Runs on the legacy default stream of `device`: these entry points serve
 * tests and have no model handle. */
static lego_status select_device(int device, int *previous, lego_err *err) {
    int count = cuda_device_count();
    if (device < 0 || device >= count)
        return lego_fail(err, count ? LEGO_ERR_INVALID_ARGUMENT : LEGO_ERR_UNSUPPORTED,
                         "CUDA device %d does not exist (%d present)", device, count);
    CU_TRY(cudaGetDevice(previous));
    CU_TRY(cudaSetDevice(device));
    return LEGO_OK;
}

/* The end of both entry points: unless s already failed, copy `bytes` of
 * `dev` to `out`; then free dev and select the previous device again. */
static lego_status copy_back_and_release(lego_status s, void *out, void *dev, size_t bytes,
                                         int previous, const char *what, lego_err *err) {
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpy(out, dev, bytes, cudaMemcpyDeviceToHost), err, what);
    if (dev) cudaFree(dev);
    cudaSetDevice(previous);
    return s;
}

/* The Philox blocks holding elements first .. first + n - 1 (n >= 1). */
static size_t blocks_covering(uint64_t first, size_t n) {
    return (size_t)((first + n - 1) / 4 - first / 4 + 1);
}

extern "C" lego_status cuda_philox_normal_f32(int device, uint64_t seed, uint64_t stream,
                                              uint64_t first, size_t n, float *out,
                                              lego_err *err) {
    if (!out || n == 0)
        return n == 0 ? LEGO_OK : lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "out is NULL");
    size_t bytes;
    if (!size_mul(n, sizeof(float), &bytes) || n - 1 > UINT64_MAX - first)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "%zu normals from element %llu are too many", n,
                         (unsigned long long)first);
    int previous = 0;
    LEGO_TRY(select_device(device, &previous, err));
    float *dev = NULL;
    size_t blocks = blocks_covering(first, n);
    lego_status s = cu_status(cudaMalloc(&dev, bytes), err, "cudaMalloc");
    if (s == LEGO_OK) {
        LAUNCH(philox_normal_kernel, ew_blocks(blocks), EW_THREADS, 0, 0)(seed, stream, first, n,
                                                                          blocks, dev);
        s = cu_status(cudaGetLastError(), err, "philox_normal_kernel");
    }
    return copy_back_and_release(s, out, dev, bytes, previous, "cudaMemcpy (philox normals)",
                                 err);
}

extern "C" lego_status cuda_philox_blocks(int device, uint64_t seed, uint64_t stream,
                                          uint64_t first_block, size_t blocks, uint32_t *out,
                                          lego_err *err) {
    if (!out || blocks == 0)
        return blocks == 0 ? LEGO_OK : lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "out is NULL");
    size_t bytes;
    if (!size_mul(blocks, 4 * sizeof(uint32_t), &bytes))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "%zu Philox blocks are too many", blocks);
    int previous = 0;
    LEGO_TRY(select_device(device, &previous, err));
    uint32_t *dev = NULL;
    lego_status s = cu_status(cudaMalloc(&dev, bytes), err, "cudaMalloc");
    if (s == LEGO_OK) {
        LAUNCH(philox_blocks_kernel, ew_blocks(blocks), EW_THREADS, 0, 0)(seed, stream,
                                                                          first_block, blocks, dev);
        s = cu_status(cudaGetLastError(), err, "philox_blocks_kernel");
    }
    return copy_back_and_release(s, out, dev, bytes, previous, "cudaMemcpy (philox blocks)",
                                 err);
}

/* The normals into device memory on a stream (training draws its noise
 * there). */
lego_status k_philox_normal(cudaStream_t s, uint64_t seed, uint64_t stream, uint64_t first,
                            size_t n, float *out, lego_err *err) {
    if (n == 0) return LEGO_OK;
    size_t blocks = blocks_covering(first, n);
    LAUNCH(philox_normal_kernel, ew_blocks(blocks), EW_THREADS, 0, s)(seed, stream, first, n,
                                                                      blocks, out);
    LAUNCH_CHECK("philox_normal");
    return LEGO_OK;
}
