/*
 * preset.c -- the reference architectures by name.
 *
 * The brick lists follow lego_models.py of the reference code
 * (JegZheng/LEGODiffusion), bottom brick first, as (brick size, patch size,
 * depth).  Widths: S = D 384 with 6 heads, L = 1024/16, XL = 1152/16.  The
 * reference leaves channels and classes to the training run; the defaults
 * here are the paper's data: ImageNet 64x64 pixels (3 channels) for the S
 * and L *_64 models, Stable Diffusion latents (4 channels, 32x32 for
 * 256x256 images, 64x64 for 512x512) for the *_32 and XL models, 1000
 * classes throughout.  The dit_* baselines are one-brick models of the
 * same widths (DiT-S/2, DiT-L/2, DiT-XL/2 with LEGO's coordinate channels),
 * as the reference benchmarks them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define PRESET_MAX_BRICKS 5

typedef struct preset {
    const char *name;
    int hidden, heads, channels, resolution, classes;
    int num_bricks;
    int bricks[PRESET_MAX_BRICKS][3]; /* brick_size, patch_size, depth */
} preset;

#define S 384, 6
#define L 1024, 16
#define XL 1152, 16

static const preset presets[] = {
    /* name              width C  res classes K  bricks {size, patch, depth}, bottom up */
    {"lego_S_PG_64",     S,  3, 64, 1000, 3, {{4, 2, 2}, {16, 8, 4}, {64, 2, 6}}},
    {"lego_S_PR_64",     S,  3, 64, 1000, 3, {{64, 2, 6}, {16, 8, 4}, {4, 2, 2}}},
    {"lego_S_U_32",      S,  4, 32, 1000, 5,
     {{32, 2, 6}, {16, 8, 4}, {4, 2, 2}, {16, 8, 4}, {32, 2, 6}}},
    {"lego_S_U_64",      S,  3, 64, 1000, 5,
     {{64, 2, 6}, {16, 8, 4}, {4, 2, 2}, {16, 8, 4}, {64, 2, 6}}},
    {"lego_L_PG_32",     L,  4, 32, 1000, 3, {{4, 2, 4}, {16, 8, 8}, {32, 2, 12}}},
    {"lego_L_PG_64",     L,  3, 64, 1000, 3, {{4, 2, 6}, {16, 8, 8}, {64, 2, 12}}},
    {"lego_L_PR_32",     L,  4, 32, 1000, 3, {{32, 2, 12}, {16, 8, 8}, {4, 2, 4}}},
    {"lego_L_PR_64",     L,  3, 64, 1000, 3, {{64, 2, 12}, {16, 8, 8}, {4, 2, 6}}},
    {"lego_L_U_32",      L,  4, 32, 1000, 5,
     {{32, 2, 12}, {16, 8, 8}, {4, 2, 6}, {16, 8, 8}, {32, 2, 12}}},
    {"lego_L_U_64",      L,  3, 64, 1000, 5,
     {{64, 2, 12}, {16, 8, 8}, {4, 2, 6}, {16, 8, 8}, {64, 2, 12}}},
    /* The earlier L models, kept by the reference for its old checkpoints. */
    {"lego_L_PG_64_old", L,  3, 64, 1000, 3, {{4, 2, 6}, {16, 8, 6}, {64, 2, 12}}},
    {"lego_L_PR_64_old", L,  3, 64, 1000, 3, {{64, 2, 12}, {16, 8, 6}, {4, 2, 6}}},
    {"lego_XL_PG_32",    XL, 4, 32, 1000, 3, {{4, 2, 4}, {16, 8, 12}, {32, 2, 14}}},
    {"lego_XL_PG_64",    XL, 4, 64, 1000, 3, {{4, 2, 4}, {16, 8, 12}, {64, 2, 14}}},
    {"lego_XL_PR_32",    XL, 4, 32, 1000, 3, {{32, 2, 14}, {16, 8, 12}, {4, 2, 4}}},
    {"lego_XL_PR_64",    XL, 4, 64, 1000, 3, {{64, 2, 14}, {16, 8, 12}, {4, 2, 4}}},
    {"lego_XL_U_32",     XL, 4, 32, 1000, 5,
     {{32, 2, 14}, {16, 8, 10}, {4, 2, 4}, {16, 8, 10}, {32, 2, 14}}},
    {"lego_XL_U_64",     XL, 4, 64, 1000, 5,
     {{64, 2, 14}, {16, 8, 12}, {4, 2, 4}, {16, 8, 12}, {64, 2, 14}}},
    {"dit_S2_64",        S,  3, 64, 1000, 1, {{64, 2, 12}}},
    {"dit_L2_64",        L,  3, 64, 1000, 1, {{64, 2, 24}}},
    {"dit_XL2_32",       XL, 4, 32, 1000, 1, {{32, 2, 28}}},
    /* The Fashion-MNIST LEGO-PG of the reference model (fmnist_lego_pg32) and lego-train. */
    {"fmnist_lego_pg32", 256, 4, 1, 32, 10, 3, {{4, 2, 2}, {16, 8, 2}, {32, 2, 4}}},
};

#undef S
#undef L
#undef XL

#define NUM_PRESETS ((int)(sizeof presets / sizeof presets[0]))

static const preset *find_preset(const char *name) {
    for (int i = 0; name && i < NUM_PRESETS; i++)
        if (strcmp(presets[i].name, name) == 0) return &presets[i];
    return NULL;
}

LEGO_API int lego_preset_count(void) { return NUM_PRESETS; }

LEGO_API const char *lego_preset_name(int index) {
    return index >= 0 && index < NUM_PRESETS ? presets[index].name : NULL;
}

LEGO_API void lego_preset_options_init(lego_preset_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
    o->img_channels = 0;
    o->img_resolution = 0;
    o->label_dim = -1;
    o->backend = LEGO_BACKEND_CPU;
}

/* The preset's global settings with the caller's options applied; the
 * values are checked later, by whoever builds or counts the model. */
static lego_status preset_settings(const preset *p, const lego_preset_options *options,
                                   lego_model_config *cfg, lego_err *err) {
    lego_preset_options o;
    lego_preset_options_init(&o);
    if (options) lego_copy_options(&o, sizeof o, options, options->size);
    if (o.img_channels < 0 || o.img_resolution < 0 || o.label_dim < -1)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "preset %s: img_channels (%d) and img_resolution (%d) must be >= 0 and "
                         "label_dim (%d) >= -1", p->name, o.img_channels, o.img_resolution,
                         o.label_dim);
    lego_model_config_init(cfg);
    cfg->img_channels = o.img_channels ? o.img_channels : p->channels;
    cfg->img_resolution = o.img_resolution ? o.img_resolution : p->resolution;
    cfg->label_dim = o.label_dim >= 0 ? o.label_dim : p->classes;
    cfg->hidden_size = p->hidden;
    cfg->num_heads = p->heads;
    cfg->num_threads = o.num_threads;
    cfg->backend = o.backend;
    cfg->device = o.device;
    cfg->precision = o.precision;
    return LEGO_OK;
}

static void preset_brick(const preset *p, int k, lego_brick_config *b) {
    lego_brick_config_init(b);
    b->brick_size = p->bricks[k][0];
    b->patch_size = p->bricks[k][1];
    b->depth = p->bricks[k][2];
}

LEGO_API lego_status lego_preset_config(const char *name, const lego_preset_options *options,
                                        lego_model_config *config) {
    const preset *p = find_preset(name);
    if (!p || !config) return LEGO_ERR_INVALID_ARGUMENT;
    lego_model_config cfg;
    lego_status s = preset_settings(p, options, &cfg, NULL);
    if (s == LEGO_OK) lego_copy_options(config, config->size, &cfg, sizeof cfg);
    return s;
}

LEGO_API int lego_preset_num_bricks(const char *name) {
    const preset *p = find_preset(name);
    return p ? p->num_bricks : 0;
}

LEGO_API lego_status lego_preset_get_brick(const char *name, int index, lego_brick_config *brick) {
    const preset *p = find_preset(name);
    if (!p || !brick || index < 0 || index >= p->num_bricks) return LEGO_ERR_INVALID_ARGUMENT;
    lego_brick_config b;
    preset_brick(p, index, &b);
    lego_copy_options(brick, brick->size, &b, sizeof b);
    return LEGO_OK;
}

LEGO_API lego_status lego_preset_num_params(const char *name, const lego_preset_options *options,
                                            int64_t *count) {
    const preset *p = find_preset(name);
    if (!p || !count) return LEGO_ERR_INVALID_ARGUMENT;
    lego_model_config cfg;
    lego_brick_config bricks[PRESET_MAX_BRICKS];
    lego_status s = preset_settings(p, options, &cfg, NULL);
    for (int k = 0; k < p->num_bricks; k++) preset_brick(p, k, &bricks[k]);
    if (s == LEGO_OK) s = model_count_params(&cfg, bricks, p->num_bricks, count, NULL);
    return s;
}

/* "unknown preset "x"; the presets are a, b, ..." for a failed handle. */
static lego_model *unknown_preset(const char *name) {
    char msg[sizeof ((lego_err *)0)->msg];
    size_t used = (size_t)snprintf(msg, sizeof msg, "unknown preset \"%.64s\"; the presets are",
                                   name);
    for (int i = 0; i < NUM_PRESETS && used < sizeof msg; i++)
        used += (size_t)snprintf(msg + used, sizeof msg - used, "%s %s", i ? "," : "",
                                 presets[i].name);
    return model_new_failed(LEGO_ERR_INVALID_ARGUMENT, msg);
}

LEGO_API lego_status lego_model_create_preset(const char *name, const lego_preset_options *options,
                                              lego_model **out) {
    if (!out) return LEGO_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!name) {
        *out = model_new_failed(LEGO_ERR_INVALID_ARGUMENT, "preset name is NULL");
        return LEGO_ERR_INVALID_ARGUMENT;
    }
    const preset *p = find_preset(name);
    if (!p) {
        *out = unknown_preset(name);
        return LEGO_ERR_INVALID_ARGUMENT;
    }
    lego_err err;
    lego_err_clear(&err);
    lego_model_config cfg;
    lego_status s = preset_settings(p, options, &cfg, &err);
    if (s != LEGO_OK) {
        *out = model_new_failed(s, err.msg);
        return s;
    }
    lego_model *m = NULL;
    s = lego_model_create(&cfg, &m);
    for (int k = 0; s == LEGO_OK && k < p->num_bricks; k++) {
        lego_brick_config b;
        preset_brick(p, k, &b);
        s = lego_brick_add(m, &b);
    }
    if (s != LEGO_OK && m && !m->failed) {
        /* A brick failed (out of memory for a large preset): hand back a
         * failed handle, as every constructor does, not a half-built one. */
        lego_model *failed = model_new_failed(s, m->err.msg);
        lego_model_free(m);
        m = failed;
    }
    *out = m;
    return s;
}
