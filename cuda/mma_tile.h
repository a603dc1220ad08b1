/*
 * mma_tile.h -- what the tensor-core attention kernels share
 * (attention.cu's forward, attention_bwd.cu's backward): head tiles copied
 * from the token rows into padded shared memory with cp.async, fragments
 * read from a row, and the product of a warp's accumulators with a tile.
 * Device code; included after cuda_internal.h.
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

/* acc[nt] (16 x 8 tiles, nt < KT/8) = A B^T for one warp's 16 rows: A's
 * fragments `fa` (16 x HDP), B's KT rows (HDP wide) in shared memory at
 * `rows` with stride LD, read by ldmatrix as B fragments (a row of B is a
 * column of the right factor); one x4 serves two k-steps of an 8-row
 * tile.  Attention's Q K^T, K Q^T, V dO^T and dO V^T. */
template <class TT, int HDP, int KT>
__device__ __forceinline__ void mma_rows(float acc[KT / 8][4], const uint32_t fa[HDP / 16][4],
                                         const TT *rows, int LD) {
    const int lane = threadIdx.x % 32, lm = lane / 8, lr = lane % 8;
#pragma unroll
    for (int nt = 0; nt < KT / 8; nt++) {
        acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        const TT *r = rows + (nt * 8 + lr) * LD;
#pragma unroll
        for (int kk = 0; kk + 1 < HDP / 16; kk += 2) {
            uint32_t b[4];
            ldmatrix_x4(b, r + lm * 8 + kk * 16);
            mma_16816<TT>(acc[nt], fa[kk], b);
            mma_16816<TT>(acc[nt], fa[kk + 1], b + 2);
        }
        if ((HDP / 16) % 2) {
            const int kk = HDP / 16 - 1;
            uint32_t b[2];
            ldmatrix_x2(b, r + (lm % 2) * 8 + kk * 16);
            mma_16816<TT>(acc[nt], fa[kk], b);
        }
    }
}

/* out[dt] (16 x HDP, accumulators) += X M for one warp: X its 16 x KT
 * values in accumulator layout (x[nt] the 16 x 8 tile nt), rounded to TT
 * and re-packed as A fragments (the accumulators of tiles 2ks and 2ks+1
 * are exactly the A fragment of k-step ks); M's KT rows of HDP values in
 * shared memory at `rows` with stride LD, read by ldmatrix.trans as B
 * fragments, one x4 for two 8-column tiles.  Attention's P V, dP^T dO,
 * dS^T Q and dS K. */
template <class TT, int HDP, int KT>
__device__ __forceinline__ void mma_acc_rows(float out[HDP / 8][4], const float x[KT / 8][4],
                                             const TT *rows, int LD) {
    const int lane = threadIdx.x % 32, lm = lane / 8, lr = lane % 8;
#pragma unroll
    for (int ks = 0; ks < KT / 16; ks++) {
        uint32_t pa[4] = {pack2<TT>(x[2 * ks][0], x[2 * ks][1]),
                          pack2<TT>(x[2 * ks][2], x[2 * ks][3]),
                          pack2<TT>(x[2 * ks + 1][0], x[2 * ks + 1][1]),
                          pack2<TT>(x[2 * ks + 1][2], x[2 * ks + 1][3])};
        const TT *r = rows + (ks * 16 + (lm % 2) * 8 + lr) * LD + (lm / 2) * 8;
#pragma unroll
        for (int dt = 0; dt < HDP / 8; dt += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, r + dt * 8);
            mma_16816<TT>(out[dt], pa, b);
            mma_16816<TT>(out[dt + 1], pa, b + 2);
        }
    }
}

#endif
