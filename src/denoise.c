/*
 * denoise.c -- the EDM-preconditioned LEGO denoiser D(x; sigma):
 * conditioning, the brick stack (with skipping), classifier-free guidance.
 *
 *   c      = t_embedder(ln(sigma)/4) + y_embedder(one-hot label)
 *   F_k    = brick_k([F_below, c_in*x, row, col]; c)
 *   D(x)   = c_skip*x + c_out*F_last
 */
#include "denoise.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "brick.h"
#include "ops.h"

void denoise_timestep_embedding(float c_noise, int dim, float *out) {
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        float f = expf(-9.21034037f * (float)i / (float)half); /* ln(10000) */
        float arg = c_noise * f;
        out[i] = (float)cos((double)arg);
        out[half + i] = (float)sin((double)arg);
    }
}

/* c for nb images; label_vectors is nb x label_dim or NULL (all null). */
static void conditioning(const lego_model *m, int nb, const float *sigma, const float *label_vectors,
                         float *emb, float *hid, float *cond) {
    int fdim = m->cfg.frequency_embedding_size, D = m->cfg.hidden_size;
    for (int i = 0; i < nb; i++)
        denoise_timestep_embedding(logf(sigma[i]) / 4.0f, fdim, emb + (size_t)i * fdim);
    op_linear(&m->t_fc1, emb, (size_t)nb, hid);
    op_silu(hid, (size_t)nb * D);
    op_linear(&m->t_fc2, hid, (size_t)nb, cond);
    if (m->cfg.label_dim > 0) {
        /* y_embedder is a Linear; with a NULL table every row is the null
         * label, whose embedding is the bias alone. */
        if (label_vectors) {
            op_linear(&m->y_embed, label_vectors, (size_t)nb, hid);
        } else {
            for (int i = 0; i < nb; i++)
                memcpy(hid + (size_t)i * D, m->y_embed.b, (size_t)D * sizeof *hid);
        }
        for (size_t i = 0; i < (size_t)nb * D; i++) cond[i] += hid[i];
    }
}

/* out = F_u + g (F_c - F_u) for the n conditional images of `f` (n
 * conditional then n unconditional ones); with g == 1, a plain copy. */
static void guide(const float *f, int n, size_t chw, float g, float *out) {
    size_t len = (size_t)n * chw;
    if (g == 1.0f) {
        memcpy(out, f, len * sizeof *out);
        return;
    }
    for (size_t j = 0; j < len; j++) out[j] = f[len + j] + g * (f[j] - f[len + j]);
}

lego_status labels_to_rows(lego_model *m, int n, const int32_t *labels, float **out) {
    int L = m->cfg.label_dim;
    *out = NULL;
    if (L == 0 || !labels) return LEGO_OK;
    size_t len = (size_t)n * (size_t)L;
    float *rows = len <= LEGO_MAX_ALLOC / sizeof(float) ? calloc(len, sizeof *rows) : NULL;
    if (!rows) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for labels");
    for (int i = 0; i < n; i++) {
        if (labels[i] < -1 || labels[i] >= L) {
            free(rows);
            return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                             "label[%d] = %d is out of range [-1, %d)", i, labels[i], L);
        }
        if (labels[i] >= 0) rows[(size_t)i * L + (size_t)labels[i]] = 1.0f;
    }
    *out = rows;
    return LEGO_OK;
}

lego_status model_denoise_floats(const lego_model *m, int n, int h, int w, int guided,
                                 size_t *floats) {
    size_t nb = (size_t)n * (guided ? 2 : 1), chw, img, t;
    size_t D = (size_t)m->cfg.hidden_size, L = (size_t)m->cfg.label_dim;
    size_t fdim = (size_t)m->cfg.frequency_embedding_size;
    if (!size_mul((size_t)h * (size_t)w, (size_t)m->cfg.img_channels, &chw) ||
        !size_mul(chw, nb, &img) || img > LEGO_MAX_ALLOC / 16)
        return LEGO_ERR_OUT_OF_MEMORY;
    size_t total = nb * (fdim + 3 * D + L + 1) + 3 * img, most = 0;
    for (int k = 0; k < m->num_bricks; k++) {
        /* rows * (2D + widest) must be bounded before the exact figure. */
        size_t pix = (size_t)h * (size_t)w, per_pixel = 2 * D + 3 * D + (size_t)m->mlp_hidden +
                                                        (2 * (size_t)m->cfg.img_channels + 2);
        if (!size_mul(pix, nb, &t) || !size_mul(t, per_pixel, &t) || t > LEGO_MAX_ALLOC / 4)
            return LEGO_ERR_OUT_OF_MEMORY;
        size_t s = brick_scratch_floats(m, k, (int)nb, h, w);
        if (s > most) most = s;
    }
    if (!size_add(total, most, &total) || total > LEGO_MAX_ALLOC / sizeof(float))
        return LEGO_ERR_OUT_OF_MEMORY;
    *floats = total;
    return LEGO_OK;
}

int denoise_guided(const lego_model *m, float guidance) {
    return m->cfg.label_dim > 0 && guidance != 1.0f && guidance != 0.0f;
}

lego_status denoise_memory_check(lego_model *m, int n, int h, int w, int guided,
                                 size_t temp_bytes) {
    size_t need, extra;
    if (model_denoise_floats(m, n, h, w, guided, &need) != LEGO_OK)
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY,
                         "a batch of %d images of %dx%d is too large", n, h, w);
    /* A model on the GPU keeps its scratch there. */
    size_t growth = m->cuda ? 0 : model_work_growth(m, need);
    if (!size_add(growth, temp_bytes, &extra)) extra = SIZE_MAX;
    return model_memory_check(m, extra);
}

lego_status model_denoise(lego_model *m, const denoise_args *a) {
    /* A model on the GPU runs the same computation there (cuda/). */
    if (m->cuda) return cuda_backend_denoise(m, a);
    int n = a->n, h = a->h, w = a->w, C = m->cfg.img_channels, D = m->cfg.hidden_size;
    int L = m->cfg.label_dim;
    /* Guidance needs a second, unconditional pass; the two passes run as one
     * batch of 2n: conditional images first, then the same with null labels. */
    int guided = denoise_guided(m, a->guidance);
    int nb = guided ? 2 * n : n;
    size_t chw = (size_t)C * h * w, fdim = (size_t)m->cfg.frequency_embedding_size;

    size_t need;
    if (model_denoise_floats(m, n, h, w, guided, &need) != LEGO_OK)
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY,
                         "a batch of %d images of %dx%d is too large", n, h, w);
    lego_status s = model_reserve_work(m, need);
    if (s != LEGO_OK) return s;

    float *emb = m->work;
    float *hid = emb + (size_t)nb * fdim;
    float *cond = hid + (size_t)nb * D;
    float *silu_c = cond + (size_t)nb * D;
    float *labels = silu_c + (size_t)nb * D;
    float *xin = labels + (size_t)nb * L;
    float *fa = xin + (size_t)nb * chw, *fb = fa + (size_t)nb * chw;
    float *sigma = fb + (size_t)nb * chw; /* per image, repeated for the unconditional half */
    float *scratch = sigma + nb;
    for (int i = 0; i < nb; i++) sigma[i] = a->sigma[i % n];

    const float *label_rows = NULL;
    if (L > 0 && a->label_vectors && a->guidance != 0.0f) {
        memcpy(labels, a->label_vectors, (size_t)n * L * sizeof *labels);
        if (guided) memset(labels + (size_t)n * L, 0, (size_t)n * L * sizeof *labels);
        label_rows = labels;
    }
    conditioning(m, nb, sigma, label_rows, emb, hid, cond);
    if (a->cond_out) memcpy(a->cond_out, cond, (size_t)n * D * sizeof *cond);
    memcpy(silu_c, cond, (size_t)nb * D * sizeof *cond);
    op_silu(silu_c, (size_t)nb * D);

    for (int i = 0; i < nb; i++) {
        float c_in = (float)(1.0 / sqrt((double)sigma[i] * sigma[i] + m->cfg.sigma_data * m->cfg.sigma_data));
        const float *src = a->x + (size_t)(i % n) * chw;
        float *dst = xin + (size_t)i * chw;
        for (size_t j = 0; j < chw; j++) dst[j] = c_in * src[j];
    }

    const float *below = NULL;
    float *cur = fa;
    for (int k = 0; k < m->num_bricks; k++) {
        if (!(a->brick_mask >> k & 1u)) continue;
        brick_forward(m, k, nb, h, w, xin, below, silu_c, cur, scratch);
        /* Each pass feeds its own output upwards; guidance mixes only what
         * is reported. */
        if (a->brick_outputs)
            guide(cur, n, chw, guided ? a->guidance : 1.0f, a->brick_outputs + (size_t)k * n * chw);
        below = cur;
        cur = cur == fa ? fb : fa;
    }

    /* D = c_skip x + c_out F, with F guided; the mix lands in fa or fb,
     * whichever is free, then is scaled into the caller's output. */
    guide(below, n, chw, guided ? a->guidance : 1.0f, cur);
    double sd2 = m->cfg.sigma_data * m->cfg.sigma_data;
    for (int i = 0; i < n; i++) {
        double s2 = (double)a->sigma[i] * a->sigma[i];
        float c_skip = (float)(sd2 / (s2 + sd2));
        float c_out = (float)((double)a->sigma[i] * m->cfg.sigma_data / sqrt(s2 + sd2));
        const float *x = a->x + (size_t)i * chw, *f = cur + (size_t)i * chw;
        float *o = a->out + (size_t)i * chw;
        for (size_t j = 0; j < chw; j++) o[j] = c_skip * x[j] + c_out * f[j];
    }
    return LEGO_OK;
}
