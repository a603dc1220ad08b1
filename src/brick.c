/*
 * brick.c -- one LEGO brick on the CPU: the full image in, the full image
 * out.
 *
 * The brick cuts the image into brick_size x brick_size patches and runs each
 * as an independent DiT over (brick/patch)^2 tokens.  Rather than loop over
 * patches, the tokens of many patches form one token matrix, so every linear
 * layer is a large GEMM; only attention respects the patch boundaries.
 * Token order: image, patch row, patch column, token row, token column.
 *
 * When the GEMMs run on our own workers (see ops.h), the batch's token
 * matrix is run in chunks of whole sequences, each taken through every
 * layer before the next, so a chunk's activations stay in cache between the
 * passes of a block.  When OpenBLAS threads the GEMMs itself, every switch
 * between its threads and ours costs (both pools spin while waiting), so
 * the whole batch is one chunk: the fewest, largest GEMMs.
 */
#include "brick.h"

#include "ops.h"

/* Activations of one chunk (residual stream, LayerNorm output, the widest
 * layer output).  A few MiB keeps them in L2/L3 from pass to pass. */
#define CHUNK_BYTES ((size_t)8 << 20)
/* ... but never fewer rows than keep the GEMMs efficient. */
#define CHUNK_MIN_ROWS 512

typedef struct brick_geom {
    size_t rows;           /* tokens in the whole batch */
    size_t rows_per_image;
    int patches_x;         /* brick patches per image row */
    int patches_per_image;
} brick_geom;

static brick_geom geometry(const brick *b, int n, int h, int w) {
    brick_geom g;
    int bs = b->cfg.brick_size;
    g.patches_x = w / bs;
    g.patches_per_image = (h / bs) * g.patches_x;
    g.rows_per_image = (size_t)g.patches_per_image * b->tokens;
    g.rows = (size_t)n * g.rows_per_image;
    return g;
}

/* The image of batch row r and the top-left pixel (y0, x0) of its token's
 * p x p patch; rows run image, brick patch, token row, token column. */
static void token_origin(const brick *b, brick_geom g, size_t r, size_t *img, int *y0, int *x0) {
    int bs = b->cfg.brick_size, p = b->cfg.patch_size;
    size_t in_img = r % g.rows_per_image;
    int patch = (int)(in_img / (size_t)b->tokens), tok = (int)(in_img % (size_t)b->tokens);
    *img = r / g.rows_per_image;
    *y0 = (patch / g.patches_x) * bs + (tok / b->grid) * p;
    *x0 = (patch % g.patches_x) * bs + (tok % b->grid) * p;
}

static size_t row_floats(const lego_model *m, const brick *b) {
    return 2 * (size_t)m->cfg.hidden_size + model_widest_activation(m, b);
}

/* The most rows one chunk holds: whole images when an image fits the
 * budget, else whole sequences of one image. */
static size_t chunk_capacity(const lego_model *m, const brick *b, brick_geom g) {
    if (!op_blas_on_caller()) return g.rows;
    size_t want = CHUNK_BYTES / (row_floats(m, b) * sizeof(float));
    if (want < CHUNK_MIN_ROWS) want = CHUNK_MIN_ROWS;
    size_t unit = g.rows_per_image <= want ? g.rows_per_image : (size_t)b->tokens;
    size_t cap = want / unit * unit;
    if (cap < unit) cap = unit;
    return cap < g.rows ? cap : g.rows;
}

/* adaLN vectors: [depth][n][6D] for the blocks, then [n][2D] for the final
 * layer. */
static size_t modulation_floats(const lego_model *m, const brick *b, int n) {
    size_t d = (size_t)m->cfg.hidden_size;
    return (size_t)n * ((size_t)b->cfg.depth * 6 * d + 2 * d);
}

size_t brick_scratch_floats(const lego_model *m, int k, int n, int h, int w) {
    const brick *b = &m->bricks[k];
    brick_geom g = geometry(b, n, h, w);
    size_t head_dim = (size_t)m->cfg.hidden_size / (size_t)m->cfg.num_heads;
    /* Room for the whole batch as one chunk, whichever way the BLAS is
     * threaded at the time of the call.  Callers have bounded n*h*w, so
     * these products cannot overflow. */
    return g.rows * row_floats(m, b) + modulation_floats(m, b, n) +
           (size_t)m->threads * op_attention_scratch(b->tokens, (int)head_dim);
}

/* Gather the c_in x p x p input pixels of batch rows r0 .. r0+rows-1, one
 * row each, in the (channel, y, x) order of the patch-embedding weight
 * [D, c_in, p, p]. */
static void gather_tokens(const lego_model *m, const brick *b, brick_geom g, int h, int w,
                          const float *xin, const float *below, size_t r0, size_t rows,
                          float *dst_rows, int threads) {
    int C = m->cfg.img_channels, p = b->cfg.patch_size, c_in = b->c_in;
    size_t plane = (size_t)h * w, width = (size_t)c_in * p * p;
    float row_step = 2.0f / (float)(h - 1), col_step = 2.0f / (float)(w - 1);

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i_row = 0; i_row < rows; i_row++) {
        size_t img;
        int y0, x0;
        token_origin(b, g, r0 + i_row, &img, &y0, &x0);
        float *dst = dst_rows + i_row * width;
        for (int ci = 0; ci < c_in; ci++) {
            /* Channels: [F_below (bricks above the first)], c_in*x, row, col. */
            const float *src = NULL;
            int coord = 0;
            if (below && ci < C) src = below + (img * C + (size_t)ci) * plane;
            else if (ci < (below ? 2 * C : C))
                src = xin + (img * C + (size_t)(ci - (below ? C : 0))) * plane;
            else coord = ci - (below ? 2 * C : C) + 1; /* 1 = row, 2 = column */
            for (int i = 0; i < p; i++)
                for (int j = 0; j < p; j++) {
                    float v;
                    if (src) v = src[(size_t)(y0 + i) * w + (size_t)(x0 + j)];
                    else if (coord == 1) v = (float)(y0 + i) * row_step - 1.0f;
                    else v = (float)(x0 + j) * col_step - 1.0f;
                    *dst++ = v;
                }
        }
    }
}

/* Put the p x p x C output of batch rows r0 .. r0+rows-1, laid out
 * (y, x, channel), back into the NCHW image. */
static void scatter_tokens(const lego_model *m, const brick *b, brick_geom g, int h, int w,
                           const float *src_rows, size_t r0, size_t rows, float *out,
                           int threads) {
    int C = m->cfg.img_channels, p = b->cfg.patch_size;
    size_t plane = (size_t)h * w, width = (size_t)p * p * C;

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i_row = 0; i_row < rows; i_row++) {
        size_t img;
        int y0, x0;
        token_origin(b, g, r0 + i_row, &img, &y0, &x0);
        const float *src = src_rows + i_row * width;
        for (int i = 0; i < p; i++)
            for (int j = 0; j < p; j++)
                for (int c = 0; c < C; c++)
                    out[(img * C + (size_t)c) * plane + (size_t)(y0 + i) * w + (size_t)(x0 + j)] =
                        *src++;
    }
}

/* Buffers of one chunk, rows x (D, D, widest). */
typedef struct chunk_bufs {
    float *x;    /* the residual stream          */
    float *h;    /* LayerNorm output, attention  */
    float *wide; /* qkv, MLP hidden, patch rows  */
    float *attn; /* per-worker attention scratch */
} chunk_bufs;

/* Batch rows r0 .. r0+rows-1 through the whole brick on nt workers.  A
 * new image starts every `per_image` rows of the chunk. */
static void run_chunk(lego_model *m, const brick *b, brick_geom g, int h, int w, int n,
                      const float *xin, const float *below, size_t r0, size_t rows,
                      size_t per_image, const float *mods, float *out, chunk_bufs c, int nt) {
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads;
    size_t d = (size_t)D, ms = 6 * d, depth = (size_t)b->cfg.depth;
    size_t img0 = r0 / g.rows_per_image;
    /* Block j's vectors, per image: shift_msa scale_msa gate_msa shift_mlp
     * scale_mlp gate_mlp; the final layer's: shift scale. */
    const float *block_mod = mods + img0 * ms;
    const float *final_mod = mods + depth * (size_t)n * ms + img0 * 2 * d;

    gather_tokens(m, b, g, h, w, xin, below, r0, rows, c.wide, nt);
    op_linear_act(&b->embed, c.wide, rows, c.x, OP_ACT_NONE, nt);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        /* Chunks start on a sequence boundary. */
        const float *pe = b->pos_embed + (r % (size_t)b->tokens) * d;
        float *xr = c.x + r * d;
        for (size_t i = 0; i < d; i++) xr[i] += pe[i];
    }

    /* depth >= 1 (model_validate_brick).  Each block's residual add is
     * fused with the LayerNorm that follows it. */
    op_layernorm_modulate(c.x, rows, D, per_image, block_mod, block_mod + d, ms, c.h, nt);
    for (size_t j = 0; j < depth; j++) {
        const dit_block *blk = &b->blocks[j];
        const float *mod = block_mod + j * (size_t)n * ms;

        op_linear_act(&blk->qkv, c.h, rows, c.wide, OP_ACT_NONE, nt);
        op_attention(c.wide, rows / (size_t)b->tokens, b->tokens, heads, D / heads, c.h, c.attn,
                     nt);
        op_linear_act(&blk->proj, c.h, rows, c.wide, OP_ACT_NONE, nt);
        op_gated_residual_layernorm(c.x, c.wide, rows, D, per_image, mod + 2 * d, ms,
                                    mod + 3 * d, mod + 4 * d, ms, c.h, nt);

        op_linear_act(&blk->fc1, c.h, rows, c.wide, OP_ACT_GELU_TANH, nt);
        op_linear_act(&blk->fc2, c.wide, rows, c.h, OP_ACT_NONE, nt);
        /* The LayerNorm that follows: the next block's first, or the final one. */
        const float *next = j + 1 < depth ? mod + (size_t)n * ms : final_mod;
        size_t next_stride = j + 1 < depth ? ms : 2 * d;
        op_gated_residual_layernorm(c.x, c.h, rows, D, per_image, mod + 5 * d, ms, next,
                                    next + d, next_stride, c.h, nt);
    }

    op_linear_act(&b->final_out, c.h, rows, c.wide, OP_ACT_NONE, nt);
    scatter_tokens(m, b, g, h, w, c.wide, r0, rows, out, nt);
}

void brick_forward(lego_model *m, int k, int n, int h, int w, const float *xin,
                   const float *below, const float *silu_c, float *out, float *scratch) {
    const brick *b = &m->bricks[k];
    brick_geom g = geometry(b, n, h, w);
    size_t d = (size_t)m->cfg.hidden_size, depth = (size_t)b->cfg.depth;
    size_t cap = chunk_capacity(m, b, g);
    int nt = op_workers(m->threads);

    /* adaLN vectors of every image, computed once per image, never per
     * token: SiLU(c) -> Linear. */
    float *mods = scratch;
    for (size_t j = 0; j < depth; j++)
        op_linear_act(&b->blocks[j].ada, silu_c, (size_t)n, mods + j * (size_t)n * 6 * d,
                      OP_ACT_NONE, nt);
    op_linear_act(&b->final_ada, silu_c, (size_t)n, mods + depth * (size_t)n * 6 * d,
                  OP_ACT_NONE, nt);

    chunk_bufs c;
    c.x = mods + modulation_floats(m, b, n);
    c.h = c.x + cap * d;
    c.wide = c.h + cap * d;
    c.attn = c.wide + cap * model_widest_activation(m, b);

    for (size_t r0 = 0; r0 < g.rows;) {
        size_t img = r0 / g.rows_per_image, rows, per_image;
        if (cap >= g.rows_per_image) { /* whole images */
            rows = g.rows - r0 < cap ? g.rows - r0 : cap;
            per_image = g.rows_per_image;
        } else { /* part of one image */
            size_t left = (img + 1) * g.rows_per_image - r0;
            rows = left < cap ? left : cap;
            per_image = rows;
        }
        run_chunk(m, b, g, h, w, n, xin, below, r0, rows, per_image, mods, out, c, nt);
        r0 += rows;
    }
}
