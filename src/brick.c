/*
 * brick.c -- one LEGO brick on the CPU: the full image in, the full image
 * out.
 *
 * The brick cuts the image into brick_size x brick_size patches and runs each
 * as an independent DiT over (brick/patch)^2 tokens.  Rather than loop over
 * patches, all tokens of all patches of all images form one token matrix, so
 * every linear layer is a single large GEMM; only attention respects the
 * patch boundaries.  Token order: image, patch row, patch column, token row,
 * token column.
 */
#include "brick.h"

#include <string.h>

#include "ops.h"

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

static size_t widest_activation(const lego_model *m, const brick *b) {
    size_t p2 = (size_t)b->cfg.patch_size * b->cfg.patch_size, wide = 3 * (size_t)m->cfg.hidden_size;
    if ((size_t)m->mlp_hidden > wide) wide = (size_t)m->mlp_hidden;
    if (b->c_in * p2 > wide) wide = b->c_in * p2;
    if (m->cfg.img_channels * p2 > wide) wide = m->cfg.img_channels * p2;
    return wide;
}

size_t brick_scratch_floats(const lego_model *m, int k, int n, int h, int w) {
    const brick *b = &m->bricks[k];
    brick_geom g = geometry(b, n, h, w);
    size_t d = (size_t)m->cfg.hidden_size;
    size_t per_row = 2 * d + widest_activation(m, b);
    size_t head_dim = d / (size_t)m->cfg.num_heads;
    /* Callers have bounded n*h*w, so these products cannot overflow. */
    return g.rows * per_row + (size_t)n * 6 * d +
           (size_t)m->threads * op_attention_scratch(b->tokens, (int)head_dim);
}

/* Gather each token's c_in x p x p input pixels into a row, in the
 * (channel, y, x) order of the patch-embedding weight [D, c_in, p, p]. */
static void gather_tokens(const lego_model *m, const brick *b, brick_geom g, int h, int w,
                          const float *xin, const float *below, float *rows) {
    int C = m->cfg.img_channels, p = b->cfg.patch_size, bs = b->cfg.brick_size;
    int grid = b->grid, c_in = b->c_in;
    size_t plane = (size_t)h * w, width = (size_t)c_in * p * p;
    float row_step = 2.0f / (float)(h - 1), col_step = 2.0f / (float)(w - 1);

    #pragma omp parallel for num_threads(m->threads) schedule(static)
    for (size_t r = 0; r < g.rows; r++) {
        size_t img = r / g.rows_per_image, in_img = r % g.rows_per_image;
        int patch = (int)(in_img / (size_t)b->tokens), tok = (int)(in_img % (size_t)b->tokens);
        int y0 = (patch / g.patches_x) * bs + (tok / grid) * p;
        int x0 = (patch % g.patches_x) * bs + (tok % grid) * p;
        float *dst = rows + r * width;
        for (int ci = 0; ci < c_in; ci++) {
            /* Channels: [F_below (bricks above the first)], c_in*x, row, col. */
            const float *src = NULL;
            int coord = 0;
            if (below && ci < C) src = below + (img * C + (size_t)ci) * plane;
            else if (ci < (below ? 2 * C : C)) src = xin + (img * C + (size_t)(ci - (below ? C : 0))) * plane;
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

/* Put each token's p x p x C output, laid out (y, x, channel), back into
 * the NCHW image. */
static void scatter_tokens(const lego_model *m, const brick *b, brick_geom g, int h, int w,
                           const float *rows, float *out) {
    int C = m->cfg.img_channels, p = b->cfg.patch_size, bs = b->cfg.brick_size, grid = b->grid;
    size_t plane = (size_t)h * w, width = (size_t)p * p * C;

    #pragma omp parallel for num_threads(m->threads) schedule(static)
    for (size_t r = 0; r < g.rows; r++) {
        size_t img = r / g.rows_per_image, in_img = r % g.rows_per_image;
        int patch = (int)(in_img / (size_t)b->tokens), tok = (int)(in_img % (size_t)b->tokens);
        int y0 = (patch / g.patches_x) * bs + (tok / grid) * p;
        int x0 = (patch % g.patches_x) * bs + (tok % grid) * p;
        const float *src = rows + r * width;
        for (int i = 0; i < p; i++)
            for (int j = 0; j < p; j++)
                for (int c = 0; c < C; c++)
                    out[(img * C + (size_t)c) * plane + (size_t)(y0 + i) * w + (size_t)(x0 + j)] =
                        *src++;
    }
}

/* adaLN vectors of every image: SiLU(c) -> Linear.  n rows, computed once
 * per image, never per token. */
static void modulation(const linear *ada, const float *silu_c, int n, float *mod) {
    op_linear(ada, silu_c, (size_t)n, mod);
}

void brick_forward(lego_model *m, int k, int n, int h, int w, const float *xin,
                   const float *below, const float *silu_c, float *out, float *scratch) {
    const brick *b = &m->bricks[k];
    brick_geom g = geometry(b, n, h, w);
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads, nt = m->threads;
    size_t d = (size_t)D;
    float *x = scratch;                        /* rows x D: the residual stream */
    float *hbuf = x + g.rows * d;              /* rows x D                      */
    float *wide = hbuf + g.rows * d;           /* rows x widest                 */
    float *mod = wide + g.rows * widest_activation(m, b); /* n x 6D             */
    float *attn_scratch = mod + (size_t)n * 6 * d;

    gather_tokens(m, b, g, h, w, xin, below, wide);
    op_linear(&b->embed, wide, g.rows, x);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (size_t r = 0; r < g.rows; r++) {
        const float *pe = b->pos_embed + (r % (size_t)b->tokens) * d;
        float *xr = x + r * d;
        for (size_t i = 0; i < d; i++) xr[i] += pe[i];
    }

    size_t ms = 6 * d; /* shift_msa scale_msa gate_msa shift_mlp scale_mlp gate_mlp */
    for (int j = 0; j < b->cfg.depth; j++) {
        const dit_block *blk = &b->blocks[j];
        modulation(&blk->ada, silu_c, n, mod);

        op_layernorm_modulate(x, g.rows, D, g.rows_per_image, mod, mod + d, ms, hbuf, nt);
        op_linear(&blk->qkv, hbuf, g.rows, wide);
        op_attention(wide, g.rows / (size_t)b->tokens, b->tokens, heads, D / heads, hbuf,
                     attn_scratch, nt);
        op_linear(&blk->proj, hbuf, g.rows, wide);
        op_gated_residual(x, wide, g.rows, D, g.rows_per_image, mod + 2 * d, ms, nt);

        op_layernorm_modulate(x, g.rows, D, g.rows_per_image, mod + 3 * d, mod + 4 * d, ms,
                              hbuf, nt);
        op_linear(&blk->fc1, hbuf, g.rows, wide);
        op_gelu_tanh(wide, g.rows * (size_t)m->mlp_hidden, nt);
        op_linear(&blk->fc2, wide, g.rows, hbuf);
        op_gated_residual(x, hbuf, g.rows, D, g.rows_per_image, mod + 5 * d, ms, nt);
    }

    modulation(&b->final_ada, silu_c, n, mod); /* shift, scale */
    op_layernorm_modulate(x, g.rows, D, g.rows_per_image, mod, mod + d, 2 * d, hbuf, nt);
    op_linear(&b->final_out, hbuf, g.rows, wide);
    scatter_tokens(m, b, g, h, w, wide, out);
}
