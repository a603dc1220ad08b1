/*
 * mma_tile.h -- what the tensor-core attention kernels share
 * (attention.cu's forward, attention_bwd.cu's backward): head tiles copied
 * from the token rows into padded shared memory with cp.async, and A
 * fragments read from a row.  Device code; included after cuda_internal.h.
 */
#ifndef LEGO_MMA_TILE_H
#define LEGO_MMA_TILE_H

#define MMA_MAX_HEAD_DIM 128
#define MMA_PAD 8 /* row padding (elements): ldmatrix rows spread over the banks */

/* Two consecutive 16-bit values as one fragment register. */
template <class TT> __device__ __forceinline__ uint32_t word_at(const TT *p) {
    return *(const uint32_t *)p;
}

/* Rows [t0, t0+rows) of one head's Q, K or V (column offset `col` in the
 * row) into shared memory, [rows][HDP] at row stride `ld`, zero past T
 * and past hd, with cp.async (16 bytes each: hd and the strides are
 * multiples of 8 elements), so the copies run while the block computes. */
template <class TT, int HDP>
__device__ __forceinline__ void mma_load_tile_async(const TT *base, size_t stride, int col,
                                                    int t0, int rows, int T, int hd, TT *dst,
                                                    int ld) {
    const int chunks = HDP / 8;
    for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
        int r = idx / chunks, c = (idx % chunks) * 8, t = t0 + r;
        bool in = t < T && c < hd;
        cp_async16(dst + (size_t)r * ld + c, in ? base + (size_t)t * stride + col + c : base, in);
    }
}

#endif
