/*
 * cuda_runtime.h (emulation) -- the part of the CUDA runtime and of the
 * device language that liblego's backend uses, so that the .cu files of
 * cuda/ run on the host as plain C++ (make cuda-emu-check; docs/cuda.md).
 * Not a general CUDA emulator: 1-D launches, float shuffles, blocks of
 * whole warps, one device unless LEGO_EMU_DEVICES says how many.  Streams
 * are synchronous.
 */
#ifndef LEGO_EMU_CUDA_RUNTIME_H
#define LEGO_EMU_CUDA_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(threads)
#define __restrict__ __restrict

struct dim3 {
    unsigned x, y, z;
};
/* The running emulated thread's coordinates (the scheduler sets them). */
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
/* The running block's dynamic shared memory, exactly the launch's size. */
extern void *emu_smem;

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorNoDevice = 100
} cudaError_t;
typedef struct emu_stream *cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define cudaStreamNonBlocking 1u
typedef int cudaDataType;
typedef int cudaDataType_t;
#define CUDA_R_32F 0

const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetLastError(void);
cudaError_t emu_malloc(void **p, size_t bytes);
template <class T> cudaError_t cudaMalloc(T **p, size_t bytes) {
    return emu_malloc((void **)p, bytes);
}
cudaError_t cudaFree(void *p);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t emu_set_max_smem(const void *kernel, int bytes);
template <class F> cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int bytes) {
    return emu_set_max_smem((const void *)kernel, bytes);
}

/* Warp and block primitives: each is a scheduling point. */
float __shfl_sync(unsigned mask, float v, int src_lane);
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
void __syncwarp(unsigned mask = 0xffffffffu);
void __syncthreads(void);
static inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
/* Built with -ffp-contract=off, so these round as CUDA's do. */
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }

/* Launches: every block in turn, its threads as user-level contexts. */
void emu_run(const std::function<void()> &body, size_t grid, size_t block, size_t smem,
             const void *kernel);
template <class K> struct emu_launch {
    K kernel;
    size_t grid, block, smem;
    template <class... A> void operator()(A... args) {
        K k = kernel;
        emu_run([=] { k(args...); }, grid, block, smem, (const void *)kernel);
    }
};
template <class K>
emu_launch<K> emu_launcher(K kernel, size_t grid, size_t block, size_t smem, cudaStream_t) {
    return emu_launch<K>{kernel, grid, block, smem};
}
#define LAUNCH(kernel, grid, block, smem, stream) \
    emu_launcher(kernel, (grid), (block), (smem), (stream))
#define DYNAMIC_SMEM(type, name) type *name = (type *)emu_smem

#endif
