/*
 * backward_cpu.c -- forward with an activation cache, and backward, of the
 * LEGO network on the CPU: the conditioning embedders and every brick.
 *
 * One brick, per image (c = conditioning vector, x = token matrix):
 *
 *   patches  = gather([F_below,] c_in*x, row, col)         [R][c_in p p]
 *   x        = patches We^T + be + pos_embed
 *   block j: mods = SiLU(c) Wa^T + ba -> shift1 scale1 gate1 shift2 scale2 gate2
 *            h1 = LN(x)(1+scale1)+shift1;  qkv = h1 Wqkv^T + b
 *            att = softmax(q k^T / sqrt(hd)) v per patch and head
 *            a = att Wproj^T + b;          x2 = x + gate1*a
 *            h2 = LN(x2)(1+scale2)+shift2; u = h2 W1^T + b1; g = GELU(u)
 *            f = g W2^T + b2;              x' = x2 + gate2*f
 *   final:   hf = LN(x)(1+scale)+shift;    F = scatter(hf Wo^T + bo)
 *
 * The backward pass walks the same steps in reverse.  Parameter gradients
 * are accumulated (GEMMs with beta = 1, column sums in a fixed order), so a
 * given thread count gives the same bits every run: training resumes
 * bit-exactly.  GEMMs go straight to cblas; the small kernels are plain C
 * threaded over rows (or columns, for the per-image sums).
 */
#include "backward.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "denoise.h"
#include "ops.h"
#include "rng.h"

#define LN_EPS 1e-6f
/* Loops touching fewer floats than this run on the calling thread: waking
 * workers (and waiting for the BLAS's threads to stop spinning) costs more
 * than tiny loops gain. */
#define PAR_MIN_WORK 32768
/* Columns per block of the bias gradient's column sums. */
#define COLSUM_BLOCK 64

/* ------------------------------------------------------------------------ */
/* The arena: a sizing pass with a NULL base, then the real one.            */
/* ------------------------------------------------------------------------ */

typedef struct arena {
    float *base; /* NULL while sizing */
    size_t used; /* floats */
    int overflow;
} arena;

/* Room for n1 * n2 floats (NULL while sizing or after an overflow). */
static float *take(arena *a, size_t n1, size_t n2) {
    size_t n, end;
    if (a->overflow || !size_mul(n1, n2, &n) || !size_add(a->used, n, &end)) {
        a->overflow = 1;
        return NULL;
    }
    float *p = a->base ? a->base + a->used : NULL;
    a->used = end;
    return p;
}

/* Workers for a loop over `work` floats. */
static int par(size_t work, int threads) { return work >= PAR_MIN_WORK ? threads : 1; }

/* Place every buffer of `c` in `a`; sets a->overflow on absurd sizes.
 * Returns the largest brick's token count. */
static size_t layout(const lego_model *m, net_cache *c, arena *a) {
    size_t n = (size_t)c->n, d = (size_t)m->cfg.hidden_size, hm = (size_t)m->mlp_hidden;
    size_t heads = (size_t)m->cfg.num_heads, chw;
    if (!size_mul((size_t)m->cfg.img_channels * (size_t)c->h, (size_t)c->w, &chw)) {
        a->overflow = 1;
        return 0;
    }
    c->emb = take(a, n, (size_t)m->cfg.frequency_embedding_size);
    c->t_pre = take(a, n, d);
    c->t_hid = take(a, n, d);
    c->cond = take(a, n, d);
    c->silu_c = take(a, n, d);
    c->labels = take(a, n, (size_t)m->cfg.label_dim);
    c->xin = take(a, n, chw);
    c->dsilu = take(a, n, d);
    c->dcond = take(a, n, d);
    c->dhid = take(a, n, d);

    size_t rmax = 0, wmax = 0, mmax = 0, amax = 0;
    for (int k = 0; k < m->num_bricks; k++) {
        const brick *b = &m->bricks[k];
        brick_acts *ba = &c->bricks[k];
        size_t T = (size_t)b->tokens, depth = (size_t)b->cfg.depth, R;
        /* The whole brick (cache_shell set the patch counts): (h/bs)(w/bs)T
         * = hw/p^2 rows per image, below 2^36 for any valid resolution. */
        if (!size_mul(n, (size_t)ba->patches_total * T, &R)) {
            a->overflow = 1;
            return 0;
        }
        ba->rows = R;
        size_t mod_row = depth * 6 * d + 2 * d;
        ba->patches = take(a, R, (size_t)b->c_in * (size_t)b->cfg.patch_size * b->cfg.patch_size);
        ba->mods = take(a, n, mod_row);
        for (size_t j = 0; j < depth; j++) {
            block_acts *A = &ba->blocks[j];
            A->x = take(a, R, d);
            A->mean1 = take(a, R, 1);
            A->rstd1 = take(a, R, 1);
            A->h1 = take(a, R, d);
            A->qkv = take(a, R, 3 * d);
            A->probs = take(a, R, heads * T);
            A->att = take(a, R, d);
            A->a = take(a, R, d);
            A->x2 = take(a, R, d);
            A->mean2 = take(a, R, 1);
            A->rstd2 = take(a, R, 1);
            A->h2 = take(a, R, d);
            A->u = take(a, R, hm);
            A->g = take(a, R, hm);
            A->f = take(a, R, d);
        }
        ba->xf = take(a, R, d);
        ba->meanf = take(a, R, 1);
        ba->rstdf = take(a, R, 1);
        ba->hf = take(a, R, d);
        ba->out = take(a, n, chw);
        if (R > rmax) rmax = R;
        size_t row_wide = model_widest_activation(m, b);
        if (row_wide > wmax) wmax = row_wide;
        if (mod_row > mmax) mmax = mod_row;
        size_t att = op_attention_train_scratch(b->tokens, m->cfg.hidden_size / m->cfg.num_heads);
        if (att > amax) amax = att;
    }
    c->dx = take(a, rmax, d);
    c->dh = take(a, rmax, d);
    c->dt = take(a, rmax, d);
    c->wide = take(a, rmax, wmax);
    c->dmods = take(a, n, mmax);
    c->att_scratch = take(a, (size_t)c->threads, amax);
    return rmax;
}

/* A cache's record, its bricks' patch counts and the room for their patch
 * tables, every brick on every patch; no activations yet. */
static lego_status cache_shell(const lego_model *m, int n, int h, int w, net_cache **out,
                               lego_err *err) {
    *out = NULL;
    net_cache *c = calloc(1, sizeof *c);
    if (c) c->bricks = calloc((size_t)(m->num_bricks > 0 ? m->num_bricks : 1), sizeof *c->bricks);
    if (!c || !c->bricks) {
        net_cache_free(c);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    }
    c->n = n;
    c->h = h;
    c->w = w;
    c->threads = m->threads;
    size_t tables = 0, one;
    for (int k = 0; k < m->num_bricks; k++) {
        const brick *b = &m->bricks[k];
        brick_acts *ba = &c->bricks[k];
        ba->patches_x = w / b->cfg.brick_size;
        ba->patches_total = (h / b->cfg.brick_size) * ba->patches_x;
        ba->rows_per_image = (size_t)ba->patches_total * (size_t)b->tokens;
        if (!size_mul((size_t)n, (size_t)ba->patches_total, &one) ||
            !size_add(tables, one, &tables) || tables > LEGO_MAX_ALLOC / sizeof(int32_t)) {
            net_cache_free(c);
            return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                             "a training batch of %d images of %dx%d is too large", n, h, w);
        }
    }
    c->index_mem = malloc((tables ? tables : 1) * sizeof *c->index_mem);
    if (!c->index_mem) {
        net_cache_free(c);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    }
    net_use_all_patches(m, c);
    *out = c;
    return LEGO_OK;
}

lego_status net_tables_create(const lego_model *m, int n, int h, int w, net_cache **out,
                              lego_err *err) {
    return cache_shell(m, n, h, w, out, err);
}

lego_status net_cache_create(const lego_model *m, int n, int h, int w, net_cache **out,
                             lego_err *err) {
    net_cache *c = NULL;
    lego_status s = cache_shell(m, n, h, w, &c, err);
    if (s != LEGO_OK) return s;
    arena a = {NULL, 0, 0};
    size_t rows = layout(m, c, &a);
    /* cblas takes int dimensions. */
    if (a.overflow || a.used > LEGO_MAX_ALLOC / sizeof(float) || rows > (size_t)INT32_MAX) {
        net_cache_free(c);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                         "a training batch of %d images of %dx%d is too large", n, h, w);
    }
    c->floats = a.used;
    c->mem = malloc((a.used ? a.used : 1) * sizeof *c->mem);
    if (!c->mem) {
        net_cache_free(c);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                         "out of memory for %zu MiB of training activations",
                         a.used * sizeof(float) >> 20);
    }
    a = (arena){c->mem, 0, 0};
    layout(m, c, &a);
    *out = c;
    return LEGO_OK;
}

void net_cache_free(net_cache *c) {
    if (!c) return;
    free(c->index_mem);
    free(c->mem);
    free(c->bricks);
    free(c);
}

/* ------------------------------------------------------------------------ */
/* Small kernels                                                            */
/* ------------------------------------------------------------------------ */

/* Where token row r of a brick starts in the image: image index and the
 * top-left pixel of its p x p patch. */
static void token_origin(const brick *b, const brick_acts *ba, size_t r, size_t *img, int *y0,
                         int *x0) {
    int bs = b->cfg.brick_size, p = b->cfg.patch_size, grid = b->grid;
    *img = r / ba->rows_per_image;
    size_t in_img = r % ba->rows_per_image;
    int patch = (int)(in_img / (size_t)b->tokens), tok = (int)(in_img % (size_t)b->tokens);
    if (ba->patch_index) patch = ba->patch_index[*img * (size_t)ba->patches_used + (size_t)patch];
    *y0 = (patch / ba->patches_x) * bs + (tok / grid) * p;
    *x0 = (patch % ba->patches_x) * bs + (tok % grid) * p;
}

/* Token rows of input pixels in the (channel, y, x) order of the patch
 * weight [D, c_in, p, p].  Channels: [F_below (bricks above the first)],
 * c_in*x, row coordinate, column coordinate. */
static void gather_patches(const lego_model *m, const brick *b, const brick_acts *ba, int h,
                           int w, const float *xin, const float *below, float *dst) {
    int C = m->cfg.img_channels, p = b->cfg.patch_size, c_in = b->c_in;
    size_t plane = (size_t)h * w, width = (size_t)c_in * p * p;
    int nb = below ? C : 0;
    float row_step = 2.0f / (float)(h - 1), col_step = 2.0f / (float)(w - 1);

    #pragma omp parallel for num_threads(par(ba->rows * width, m->threads)) schedule(static)
    for (size_t r = 0; r < ba->rows; r++) {
        size_t img;
        int y0, x0;
        token_origin(b, ba, r, &img, &y0, &x0);
        float *o = dst + r * width;
        for (int ci = 0; ci < c_in; ci++) {
            const float *src = NULL;
            if (ci < nb) src = below + (img * C + (size_t)ci) * plane;
            else if (ci < nb + C) src = xin + (img * C + (size_t)(ci - nb)) * plane;
            for (int i = 0; i < p; i++)
                for (int j = 0; j < p; j++) {
                    int y = y0 + i, x = x0 + j;
                    if (src) *o++ = src[(size_t)y * w + (size_t)x];
                    else if (ci == nb + C) *o++ = (float)y * row_step - 1.0f;
                    else *o++ = (float)x * col_step - 1.0f;
                }
        }
    }
}

/* The gather's adjoint for the F_below channels: dbelow += their part of
 * dpatches.  Every pixel belongs to exactly one token, so rows never
 * collide. */
static void scatter_below_grad(const lego_model *m, const brick *b, const brick_acts *ba, int h,
                               int w, const float *dpatches, float *dbelow) {
    int C = m->cfg.img_channels, p = b->cfg.patch_size;
    size_t plane = (size_t)h * w, width = (size_t)b->c_in * p * p;

    #pragma omp parallel for num_threads(par(ba->rows * width, m->threads)) schedule(static)
    for (size_t r = 0; r < ba->rows; r++) {
        size_t img;
        int y0, x0;
        token_origin(b, ba, r, &img, &y0, &x0);
        const float *s = dpatches + r * width;
        for (int ci = 0; ci < C; ci++)
            for (int i = 0; i < p; i++)
                for (int j = 0; j < p; j++)
                    dbelow[(img * C + (size_t)ci) * plane + (size_t)(y0 + i) * w +
                           (size_t)(x0 + j)] += *s++;
    }
}

/* Token rows laid out (y, x, channel) to and from the NCHW image: the
 * final layer's unpatchify and its adjoint. */
static void rows_to_image(const lego_model *m, const brick *b, const brick_acts *ba, int h, int w,
                          float *rows, float *image, int to_image) {
    int C = m->cfg.img_channels, p = b->cfg.patch_size;
    size_t plane = (size_t)h * w, width = (size_t)p * p * C;

    #pragma omp parallel for num_threads(par(ba->rows * width, m->threads)) schedule(static)
    for (size_t r = 0; r < ba->rows; r++) {
        size_t img;
        int y0, x0;
        token_origin(b, ba, r, &img, &y0, &x0);
        float *s = rows + r * width;
        for (int i = 0; i < p; i++)
            for (int j = 0; j < p; j++)
                for (int c = 0; c < C; c++, s++) {
                    float *px = image + (img * C + (size_t)c) * plane + (size_t)(y0 + i) * w +
                                (size_t)(x0 + j);
                    if (to_image) *px = *s;
                    else *s = *px;
                }
    }
}

/* y = LayerNorm(x) (1 + scale) + shift per row, keeping mean and 1/std.
 * Image i's shift is at mod + i*stride, its scale D floats further. */
static void ln_mod_fwd(const float *x, size_t rows, int D, size_t rows_per_image,
                       const float *mod, size_t stride, float *mean, float *rstd, float *y,
                       int threads) {
    #pragma omp parallel for num_threads(par(rows * (size_t)D, threads)) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * (size_t)D;
        const float *shift = mod + (r / rows_per_image) * stride, *scale = shift + D;
        float sum = 0, var = 0;
        for (int i = 0; i < D; i++) sum += xr[i];
        float mu = sum / (float)D;
        for (int i = 0; i < D; i++) var += (xr[i] - mu) * (xr[i] - mu);
        float rs = 1.0f / sqrtf(var / (float)D + LN_EPS);
        mean[r] = mu;
        rstd[r] = rs;
        float *yr = y + r * (size_t)D;
        for (int i = 0; i < D; i++) yr[i] = (xr[i] - mu) * rs * (1.0f + scale[i]) + shift[i];
    }
}

/* Backward of ln_mod_fwd: dx += dL/dx, and per image dshift += sum(dy),
 * dscale += sum(dy * xhat) (dshift at dmod + i*stride, dscale D further). */
static void ln_mod_bwd(const float *x, const float *mean, const float *rstd, const float *dy,
                       size_t rows, int D, size_t rows_per_image, const float *mod,
                       float *dmod, size_t stride, float *dx, int threads) {
    #pragma omp parallel for num_threads(par(rows * (size_t)D, threads)) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * (size_t)D, *dyr = dy + r * (size_t)D;
        const float *scale = mod + (r / rows_per_image) * stride + D;
        float mu = mean[r], rs = rstd[r], s1 = 0, s2 = 0;
        /* dxhat = dy (1 + scale); dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) */
        for (int i = 0; i < D; i++) {
            float dxh = dyr[i] * (1.0f + scale[i]);
            s1 += dxh;
            s2 += dxh * (xr[i] - mu) * rs;
        }
        s1 /= (float)D;
        s2 /= (float)D;
        float *dxr = dx + r * (size_t)D;
        for (int i = 0; i < D; i++) {
            float dxh = dyr[i] * (1.0f + scale[i]);
            dxr[i] += rs * (dxh - s1 - (xr[i] - mu) * rs * s2);
        }
    }
    size_t n = rows / rows_per_image;
    for (size_t img = 0; img < n; img++) {
        size_t r0 = img * rows_per_image;
        float *dshift = dmod + img * stride, *dscale = dshift + D;
        #pragma omp parallel for num_threads(par(rows_per_image * (size_t)D, threads)) schedule(static)
        for (int i = 0; i < D; i++) {
            double sh = 0, sc = 0;
            for (size_t r = r0; r < r0 + rows_per_image; r++) {
                double g = dy[r * (size_t)D + (size_t)i];
                sh += g;
                sc += g * ((x[r * (size_t)D + (size_t)i] - mean[r]) * rstd[r]);
            }
            dshift[i] += (float)sh;
            dscale[i] += (float)sc;
        }
    }
}

/* out = x + gate * y per image (gate of image i at gate + i*stride). */
static void gated_add(const float *x, const float *y, size_t rows, int D, size_t rows_per_image,
                      const float *gate, size_t stride, float *out, int threads) {
    #pragma omp parallel for num_threads(par(rows * (size_t)D, threads)) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *g = gate + (r / rows_per_image) * stride;
        for (int i = 0; i < D; i++)
            out[r * (size_t)D + (size_t)i] = x[r * (size_t)D + (size_t)i] +
                                               g[i] * y[r * (size_t)D + (size_t)i];
    }
}

/* Backward of gated_add for the y branch: dy = dout * gate, and per image
 * dgate += sum(dout * y). */
static void gated_add_bwd(const float *dout, const float *y, size_t rows, int D,
                          size_t rows_per_image, const float *gate, float *dgate, size_t stride,
                          float *dy, int threads) {
    #pragma omp parallel for num_threads(par(rows * (size_t)D, threads)) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *g = gate + (r / rows_per_image) * stride;
        for (int i = 0; i < D; i++) dy[r * (size_t)D + (size_t)i] = dout[r * (size_t)D + (size_t)i] * g[i];
    }
    size_t n = rows / rows_per_image;
    for (size_t img = 0; img < n; img++) {
        size_t r0 = img * rows_per_image;
        #pragma omp parallel for num_threads(par(rows_per_image * (size_t)D, threads)) schedule(static)
        for (int i = 0; i < D; i++) {
            double s = 0;
            for (size_t r = r0; r < r0 + rows_per_image; r++)
                s += (double)dout[r * (size_t)D + (size_t)i] * y[r * (size_t)D + (size_t)i];
            dgate[img * stride + (size_t)i] += (float)s;
        }
    }
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Backward of y = x W^T + b over `rows` rows: dW += dy^T x, db += sum of dy
 * over rows, and dx = dy W + beta*dx when dx is not NULL.  The gradient of a
 * view lives at the same offset in `grads` as the view in m->params.  When
 * the BLAS runs on its caller (see ops.h) the workers split each GEMM:
 * dW by its longer side, dx by rows. */
static void linear_bwd(const lego_model *m, float *grads, const linear *l, const float *x,
                       const float *dy, size_t rows, float *dx, float beta, int threads) {
    float *gw = grads + (l->w - m->params), *gb = grads + (l->b - m->params);
    int out = l->out, in = l->in;
    int split = threads > 1 && rows * (size_t)out >= PAR_MIN_WORK && op_blas_on_caller();
    #pragma omp parallel num_threads(split ? threads : 1)
    {
        int me = 0, nt = 1;
#ifdef _OPENMP
        me = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        if (out >= in) { /* rows o0..o1 of dW: columns o0..o1 of dy */
            int o0 = out * me / nt, o1 = out * (me + 1) / nt;
            if (o1 > o0)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o1 - o0, in, (int)rows, 1.0f,
                            dy + o0, out, x, in, 1.0f, gw + (size_t)o0 * in, in);
        } else { /* columns i0..i1 of dW: columns i0..i1 of x */
            int i0 = in * me / nt, i1 = in * (me + 1) / nt;
            if (i1 > i0)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, i1 - i0, (int)rows, 1.0f,
                            dy, out, x + i0, in, 1.0f, gw + i0, in);
        }
        /* db: each column summed over the rows in order, as one sum per
         * column would, but a block of columns at a time so that every row
         * is one contiguous read instead of a strided walk per column. */
        #pragma omp for schedule(static)
        for (int o0 = 0; o0 < out; o0 += COLSUM_BLOCK) {
            int width = out - o0 < COLSUM_BLOCK ? out - o0 : COLSUM_BLOCK;
            double sum[COLSUM_BLOCK] = {0};
            for (size_t r = 0; r < rows; r++) {
                const float *row = dy + r * (size_t)out + (size_t)o0;
                for (int i = 0; i < width; i++) sum[i] += row[i];
            }
            for (int i = 0; i < width; i++) gb[o0 + i] += (float)sum[i];
        }
        if (dx) {
            size_t r0 = rows * (size_t)me / (size_t)nt, r1 = rows * (size_t)(me + 1) / (size_t)nt;
            if (r1 > r0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)(r1 - r0), in, out, 1.0f,
                            dy + r0 * (size_t)out, out, l->w, in, beta, dx + r0 * (size_t)in, in);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Patch sampling                                                           */
/* ------------------------------------------------------------------------ */

/* A brick's pass over patches_used patches per image. */
static void set_patches_used(const brick *b, brick_acts *ba, size_t n, int used,
                             int32_t *index) {
    ba->patches_used = used;
    ba->patch_index = index;
    ba->rows_per_image = (size_t)used * (size_t)b->tokens;
    ba->rows = n * ba->rows_per_image;
}

void net_use_all_patches(const lego_model *m, net_cache *c) {
    for (int k = 0; k < m->num_bricks; k++)
        set_patches_used(&m->bricks[k], &c->bricks[k], (size_t)c->n, c->bricks[k].patches_total,
                         NULL);
}

int net_patches_kept(int total, double fraction) {
    double want = ceil(fraction * (double)total - 1e-9);
    if (want < 1) return 1;
    return want < (double)total ? (int)want : total;
}

int net_sampling_patches(const lego_model *m, const net_cache *c) {
    for (int k = 0; k < m->num_bricks; k++)
        if (c->bricks[k].patch_index) return 1;
    return 0;
}

void net_sample_patches(const lego_model *m, net_cache *c, double fraction, uint64_t seed,
                        uint64_t stream) {
    size_t n = (size_t)c->n;
    int32_t *room = c->index_mem;
    uint64_t draw = 0; /* Philox index of the next draw, over all bricks */
    for (int k = 0; k < m->num_bricks; k++) {
        brick_acts *ba = &c->bricks[k];
        int total = ba->patches_total, used = net_patches_kept(total, fraction);
        if (used == total) {
            set_patches_used(&m->bricks[k], ba, n, total, NULL);
            continue;
        }
        /* Image i's table is room[i*used ..]; its shuffle needs `total`
         * slots from there, which only reach into later images' room. */
        for (size_t i = 0; i < n; i++) {
            int32_t *t = room + i * (size_t)used;
            for (int j = 0; j < total; j++) t[j] = j;
            for (int j = 0; j < used; j++) { /* partial Fisher-Yates */
                int pick = j + (int)philox_randint(seed, stream, draw + (uint64_t)j, total - j);
                int32_t tmp = t[j];
                t[j] = t[pick];
                t[pick] = tmp;
            }
            draw += (uint64_t)total;
            for (int j = 1; j < used; j++) { /* ascending: rows in image order */
                int32_t v = t[j];
                int q = j;
                for (; q > 0 && t[q - 1] > v; q--) t[q] = t[q - 1];
                t[q] = v;
            }
        }
        set_patches_used(&m->bricks[k], ba, n, used, room);
        room += n * (size_t)used;
    }
}

/* ------------------------------------------------------------------------ */
/* Forward                                                                  */
/* ------------------------------------------------------------------------ */

static void conditioning_fwd(const lego_model *m, net_cache *c, const float *sigma,
                             const float *label_vectors) {
    int n = c->n, fdim = m->cfg.frequency_embedding_size, L = m->cfg.label_dim;
    size_t nd = (size_t)n * (size_t)m->cfg.hidden_size;
    for (int i = 0; i < n; i++)
        denoise_timestep_embedding(logf(sigma[i]) / 4.0f, fdim, c->emb + (size_t)i * fdim);
    op_linear(&m->t_fc1, c->emb, (size_t)n, c->t_pre);
    for (size_t i = 0; i < nd; i++) c->t_hid[i] = c->t_pre[i] * sigmoidf(c->t_pre[i]);
    op_linear(&m->t_fc2, c->t_hid, (size_t)n, c->cond);
    if (L > 0) {
        /* Null labels are zero rows: their embedding is the bias. */
        size_t nl = (size_t)n * (size_t)L;
        if (label_vectors) memcpy(c->labels, label_vectors, nl * sizeof *c->labels);
        else memset(c->labels, 0, nl * sizeof *c->labels);
        op_linear(&m->y_embed, c->labels, (size_t)n, c->dhid); /* dhid: free scratch now */
        for (size_t i = 0; i < nd; i++) c->cond[i] += c->dhid[i];
    }
    for (size_t i = 0; i < nd; i++) c->silu_c[i] = c->cond[i] * sigmoidf(c->cond[i]);
}

static void brick_fwd(const lego_model *m, int k, net_cache *c, const float *below,
                      const float *fill) {
    const brick *b = &m->bricks[k];
    brick_acts *ba = &c->bricks[k];
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads, nt = m->threads;
    size_t n = (size_t)c->n, d = (size_t)D, ms = 6 * d, depth = (size_t)b->cfg.depth;
    size_t R = ba->rows, rpi = ba->rows_per_image, hm = (size_t)m->mlp_hidden;

    gather_patches(m, b, ba, c->h, c->w, c->xin, below, ba->patches);
    /* adaLN vectors, once per image. */
    for (size_t j = 0; j < depth; j++)
        op_linear(&b->blocks[j].ada, c->silu_c, n, ba->mods + j * n * ms);
    const float *final_mod = ba->mods + depth * n * ms;
    op_linear(&b->final_ada, c->silu_c, n, ba->mods + depth * n * ms);

    float *x = ba->blocks[0].x;
    op_linear_act(&b->embed, ba->patches, R, x, OP_ACT_NONE, nt);
    #pragma omp parallel for num_threads(par(R * d, nt)) schedule(static)
    for (size_t r = 0; r < R; r++) {
        const float *pe = b->pos_embed + (r % (size_t)b->tokens) * d;
        for (size_t i = 0; i < d; i++) x[r * d + i] += pe[i];
    }

    for (size_t j = 0; j < depth; j++) {
        block_acts *A = &ba->blocks[j];
        const dit_block *blk = &b->blocks[j];
        const float *mod = ba->mods + j * n * ms;
        ln_mod_fwd(A->x, R, D, rpi, mod, ms, A->mean1, A->rstd1, A->h1, nt);
        op_linear_act(&blk->qkv, A->h1, R, A->qkv, OP_ACT_NONE, nt);
        op_attention_train(A->qkv, R / (size_t)b->tokens, b->tokens, heads, D / heads, A->probs,
                           A->att, c->att_scratch, nt < c->threads ? nt : c->threads);
        op_linear_act(&blk->proj, A->att, R, A->a, OP_ACT_NONE, nt);
        gated_add(A->x, A->a, R, D, rpi, mod + 2 * d, ms, A->x2, nt);
        ln_mod_fwd(A->x2, R, D, rpi, mod + 3 * d, ms, A->mean2, A->rstd2, A->h2, nt);
        op_linear_act(&blk->fc1, A->h2, R, A->u, OP_ACT_NONE, nt);
        op_gelu_tanh_to(A->u, A->g, R * hm, par(R * hm, nt));
        op_linear_act(&blk->fc2, A->g, R, A->f, OP_ACT_NONE, nt);
        float *next = j + 1 < depth ? ba->blocks[j + 1].x : ba->xf;
        gated_add(A->x2, A->f, R, D, rpi, mod + 5 * d, ms, next, nt);
    }

    ln_mod_fwd(ba->xf, R, D, rpi, final_mod, 2 * d, ba->meanf, ba->rstdf, ba->hf, nt);
    op_linear_act(&b->final_out, ba->hf, R, c->wide, OP_ACT_NONE, nt);
    /* Pixels outside the sampled patches keep the fill: the context the
     * brick above reads there (eq. 12). */
    if (ba->patch_index && fill)
        memcpy(ba->out, fill, n * (size_t)m->cfg.img_channels * c->h * c->w * sizeof *fill);
    rows_to_image(m, b, ba, c->h, c->w, c->wide, ba->out, 1);
}

void net_forward(const lego_model *m, net_cache *c, const float *x, const float *sigma,
                 const float *label_vectors, const float *fill) {
    size_t chw = (size_t)m->cfg.img_channels * c->h * c->w;
    conditioning_fwd(m, c, sigma, label_vectors);
    double sd2 = m->cfg.sigma_data * m->cfg.sigma_data;
    for (int i = 0; i < c->n; i++) {
        float c_in = (float)(1.0 / sqrt((double)sigma[i] * sigma[i] + sd2));
        for (size_t j = 0; j < chw; j++)
            c->xin[(size_t)i * chw + j] = c_in * x[(size_t)i * chw + j];
    }
    for (int k = 0; k < m->num_bricks; k++)
        brick_fwd(m, k, c, k > 0 ? c->bricks[k - 1].out : NULL, fill);
}

/* ------------------------------------------------------------------------ */
/* Backward                                                                 */
/* ------------------------------------------------------------------------ */

/* c->dx holds dL/d(block output); leaves dL/d(block input) there. */
static void block_bwd(const lego_model *m, const brick *b, int j, net_cache *c,
                      const brick_acts *ba, float *grads) {
    const block_acts *A = &ba->blocks[j];
    const dit_block *blk = &b->blocks[j];
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads, nt = m->threads;
    size_t n = (size_t)c->n, d = (size_t)D, ms = 6 * d, R = ba->rows, rpi = ba->rows_per_image;
    const float *mod = ba->mods + (size_t)j * n * ms;
    float *dmod = c->dmods + (size_t)j * n * ms;
    float *dx = c->dx, *dh = c->dh, *dt = c->dt, *wide = c->wide;

    /* MLP branch: x' = x2 + gate2 * fc2(GELU(fc1(h2))) */
    gated_add_bwd(dx, A->f, R, D, rpi, mod + 5 * d, dmod + 5 * d, ms, dt, nt);
    linear_bwd(m, grads, &blk->fc2, A->g, dt, R, wide, 0.0f, nt);
    op_gelu_tanh_grad(A->u, wide, R * (size_t)m->mlp_hidden, par(R * (size_t)m->mlp_hidden, nt));
    linear_bwd(m, grads, &blk->fc1, A->h2, wide, R, dh, 0.0f, nt);
    ln_mod_bwd(A->x2, A->mean2, A->rstd2, dh, R, D, rpi, mod + 3 * d, dmod + 3 * d, ms, dx, nt);

    /* Attention branch: x2 = x + gate1 * proj(attention(qkv(h1))) */
    gated_add_bwd(dx, A->a, R, D, rpi, mod + 2 * d, dmod + 2 * d, ms, dt, nt);
    linear_bwd(m, grads, &blk->proj, A->att, dt, R, dh, 0.0f, nt);
    op_attention_backward(A->qkv, A->probs, dh, R / (size_t)b->tokens, b->tokens, heads,
                          D / heads, wide, c->att_scratch, nt < c->threads ? nt : c->threads);
    linear_bwd(m, grads, &blk->qkv, A->h1, wide, R, dh, 0.0f, nt);
    ln_mod_bwd(A->x, A->mean1, A->rstd1, dh, R, D, rpi, mod, dmod, ms, dx, nt);
}

/* dF: dL/dF_k; dbelow: dL/dF_{k-1}, added to (NULL for the first brick). */
static void brick_bwd(const lego_model *m, int k, net_cache *c, float *dF, float *dbelow,
                      float *grads) {
    const brick *b = &m->bricks[k];
    const brick_acts *ba = &c->bricks[k];
    int D = m->cfg.hidden_size, nt = m->threads;
    size_t n = (size_t)c->n, d = (size_t)D, ms = 6 * d, depth = (size_t)b->cfg.depth;
    size_t R = ba->rows, rpi = ba->rows_per_image;
    memset(c->dmods, 0, n * (depth * ms + 2 * d) * sizeof *c->dmods);

    /* Final layer: F = unpatchify(LN(xf)(1+scale)+shift) Wo^T + bo */
    const float *final_mod = ba->mods + depth * n * ms;
    float *dfinal = c->dmods + depth * n * ms;
    rows_to_image(m, b, ba, c->h, c->w, c->wide, dF, 0);
    linear_bwd(m, grads, &b->final_out, ba->hf, c->wide, R, c->dh, 0.0f, nt);
    memset(c->dx, 0, R * d * sizeof *c->dx);
    ln_mod_bwd(ba->xf, ba->meanf, ba->rstdf, c->dh, R, D, rpi, final_mod, dfinal, 2 * d, c->dx,
               nt);

    for (int j = (int)depth - 1; j >= 0; j--) block_bwd(m, b, j, c, ba, grads);

    /* Patch embedding (the position embedding is fixed). */
    linear_bwd(m, grads, &b->embed, ba->patches, c->dx, R, dbelow ? c->wide : NULL, 0.0f, nt);
    if (dbelow) scatter_below_grad(m, b, ba, c->h, c->w, c->wide, dbelow);

    /* adaLN linears all read SiLU(c). */
    for (size_t j = 0; j < depth; j++)
        linear_bwd(m, grads, &b->blocks[j].ada, c->silu_c, c->dmods + j * n * ms, n, c->dsilu,
                   1.0f, nt);
    linear_bwd(m, grads, &b->final_ada, c->silu_c, dfinal, n, c->dsilu, 1.0f, nt);
}

static void conditioning_bwd(const lego_model *m, net_cache *c, float *grads) {
    int n = c->n, nt = m->threads;
    size_t nd = (size_t)n * (size_t)m->cfg.hidden_size;
    /* SiLU'(z) = s (1 + z (1 - s)), s = sigmoid(z) */
    for (size_t i = 0; i < nd; i++) {
        float z = c->cond[i], s = sigmoidf(z);
        c->dcond[i] = c->dsilu[i] * s * (1.0f + z * (1.0f - s));
    }
    linear_bwd(m, grads, &m->t_fc2, c->t_hid, c->dcond, (size_t)n, c->dhid, 0.0f, nt);
    for (size_t i = 0; i < nd; i++) {
        float z = c->t_pre[i], s = sigmoidf(z);
        c->dhid[i] *= s * (1.0f + z * (1.0f - s));
    }
    linear_bwd(m, grads, &m->t_fc1, c->emb, c->dhid, (size_t)n, NULL, 0.0f, nt);
    if (m->cfg.label_dim > 0)
        linear_bwd(m, grads, &m->y_embed, c->labels, c->dcond, (size_t)n, NULL, 0.0f, nt);
}

void net_backward(const lego_model *m, net_cache *c, float *dF, float *grads) {
    size_t img = (size_t)c->n * (size_t)m->cfg.img_channels * c->h * c->w;
    memset(c->dsilu, 0, (size_t)c->n * (size_t)m->cfg.hidden_size * sizeof *c->dsilu);
    /* Top down: brick k's gradient for F_{k-1} is complete before k-1 runs. */
    for (int k = m->num_bricks - 1; k >= 0; k--)
        brick_bwd(m, k, c, dF + (size_t)k * img, k > 0 ? dF + (size_t)(k - 1) * img : NULL,
                  grads);
    conditioning_bwd(m, c, grads);
}
