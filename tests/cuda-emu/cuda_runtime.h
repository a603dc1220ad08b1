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

#include "cuda_bf16.h"
#include "cuda_fp16.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
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
    cudaErrorNoDevice = 100,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorUnknown = 999
} cudaError_t;
typedef struct emu_stream *cudaStream_t;
/* Graphs: a capture records the stream's work as closures; a launch runs
 * them in order. */
typedef struct emu_graph *cudaGraph_t;
typedef struct emu_graph *cudaGraphExec_t;
enum cudaStreamCaptureMode { cudaStreamCaptureModeThreadLocal = 1 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
typedef struct emu_event *cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
#define cudaStreamNonBlocking 1u
typedef int cudaDataType;
typedef int cudaDataType_t;
#define CUDA_R_32F 0
#define CUDA_R_16F 2
#define CUDA_R_16BF 14

struct uint4 {
    unsigned x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct float4 {
    float x, y, z, w;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) {
    return float4{x, y, z, w};
}
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}

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
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph,
                                 unsigned long long flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status);
/* Events hold the host clock when the stream reaches them. */
cudaError_t cudaEventCreate(cudaEvent_t *event);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t stop);
/* Run `work` now, or record it if `stream` is capturing. */
void emu_enqueue(cudaStream_t stream, const std::function<void()> &work);
/* Abort unless `stream` (NULL: the default one) belongs to the current device. */
void emu_check_stream_device(cudaStream_t stream, const char *what);
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
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }

/* Every lane of the warp contributes `words` words and receives all 32
 * contributions, lane by lane, in all[32 * words]; a scheduling point. */
void emu_warp_gather(const uint32_t *mine, int words, uint32_t *all);

/* mma.m16n8k16 (cuda_internal.h) from the fragments of the whole warp,
 * with the layout PTX documents: A (r, c) is in lane (r%8)*4 + (c%8)/2,
 * word (r >= 8) + 2 (c >= 8), half c%2; B (k, n) in lane n*4 + (k%8)/2,
 * word k >= 8, half k%2; D (r, n) in lane (r%8)*4 + n/2, value
 * 2 (r >= 8) + n%2.  Products and sums in double. */
#define LEGO_EMU_MMA 1
template <class T> inline float emu_half_of(uint32_t w, int hi) {
    uint16_t u = (uint16_t)(hi ? w >> 16 : w & 0xffffu);
    T v;
    memcpy(&v, &u, 2);
    return emu_to_float(v);
}
template <class T> inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    uint32_t A[32 * 4], B[32 * 2];
    emu_warp_gather(a, 4, A);
    emu_warp_gather(b, 2, B);
    int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    for (int e = 0; e < 4; e++) {
        int r = g + (e >= 2 ? 8 : 0), n = 2 * q + (e & 1);
        double acc = d[e];
        for (int k = 0; k < 16; k++) {
            int la = (r % 8) * 4 + (k % 8) / 2, wa = (r >= 8) + 2 * (k >= 8);
            int lb = n * 4 + (k % 8) / 2, wb = k >= 8;
            acc += (double)emu_half_of<T>(A[la * 4 + wa], k % 2) *
                   (double)emu_half_of<T>(B[lb * 2 + wb], k % 2);
        }
        d[e] = (float)acc;
    }
}

/* ldmatrix (cuda_internal.h): every lane's row address is gathered, then
 * each lane reads its pieces of the matrices from them. */
inline void emu_ldmatrix(uint32_t *r, int count, const void *row, bool trans) {
    uint32_t mine[2], all[32 * 2];
    uintptr_t p = (uintptr_t)row;
    mine[0] = (uint32_t)p;
    mine[1] = (uint32_t)(p >> 32);
    emu_warp_gather(mine, 2, all);
    int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    auto addr = [&](int l) {
        return (const uint16_t *)(uintptr_t)((uint64_t)all[2 * l] | (uint64_t)all[2 * l + 1] << 32);
    };
    for (int m = 0; m < count; m++) {
        uint16_t lo, hi;
        if (!trans) {
            lo = addr(m * 8 + g)[2 * q];
            hi = addr(m * 8 + g)[2 * q + 1];
        } else {
            lo = addr(m * 8 + 2 * q)[g];
            hi = addr(m * 8 + 2 * q + 1)[g];
        }
        r[m] = (uint32_t)lo | (uint32_t)hi << 16;
    }
}
inline void ldmatrix_x4(uint32_t r[4], const void *row) { emu_ldmatrix(r, 4, row, false); }
/* cp.async (emu.cpp): the source is read at once, but shared memory is
 * written only when the issuing thread's cp_async_wait<N> completes the
 * copy's group, as on a GPU; a thread that reads other threads' copies
 * without a barrier after their waits sees the old contents. */
void emu_cp_async16(void *dst, const void *src, bool valid);
void emu_cp_async_commit(void);
void emu_cp_async_wait(int pending);
inline void cp_async16(void *dst, const void *src, bool valid) { emu_cp_async16(dst, src, valid); }
inline void cp_async_commit(void) { emu_cp_async_commit(); }
template <int N> inline void cp_async_wait(void) { emu_cp_async_wait(N); }
inline void ldmatrix_x2(uint32_t r[2], const void *row) { emu_ldmatrix(r, 2, row, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], const void *row) { emu_ldmatrix(r, 4, row, true); }

/* Launches: every block in turn, its threads as user-level contexts. */
void emu_run(const std::function<void()> &body, size_t grid, size_t block, size_t smem,
             const void *kernel);
void emu_count_launch(void);
template <class K> struct emu_launch {
    K kernel;
    size_t grid, block, smem;
    cudaStream_t stream;
    template <class... A> void operator()(A... args) {
        emu_check_stream_device(stream, "kernel launch");
        emu_count_launch();
        K k = kernel;
        size_t g = grid, b = block, sm = smem;
        std::function<void()> body = [=] { k(args...); };
        emu_enqueue(stream, [=] { emu_run(body, g, b, sm, (const void *)k); });
    }
};
template <class K>
emu_launch<K> emu_launcher(K kernel, size_t grid, size_t block, size_t smem,
                           cudaStream_t stream) {
    return emu_launch<K>{kernel, grid, block, smem, stream};
}
#define LAUNCH(kernel, grid, block, smem, stream) \
    emu_launcher(kernel, (grid), (block), (smem), (stream))
#define DYNAMIC_SMEM(type, name) type *name = (type *)emu_smem

#endif
