/*
 * checkpoint.c -- models from and to safetensors files.
 *
 * A checkpoint holds the reference PyTorch state dict ("model." prefix) and
 * the architecture in __metadata__["lego.config"].  Loading checks that the
 * tensors and the architecture agree exactly: a missing, extra or
 * wrongly-shaped tensor is named in the error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "model.h"
#include "safetensors.h"

static void shape_string(const int64_t *shape, int rank, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < rank && used + 24 < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
}

/* Fill a fresh parameter array from the file; on success it replaces the
 * model's, on failure the model is untouched.  Every tensor is checked
 * before the array is allocated: its size then is bounded by the file's
 * (F16 and BF16 store 2 bytes per float), whatever the architecture
 * claims. */
static lego_status read_weights(lego_model *m, const st_file *f, lego_err *err) {
    for (int i = 0; i < f->num_tensors; i++) {
        const char *name = f->tensors[i].name;
        int known = 0;
        for (int j = 0; j < m->num_params && !known; j++) known = !strcmp(m->table[j].name, name);
        if (!known)
            return lego_fail(err, LEGO_ERR_SHAPE,
                             "unexpected tensor '%s' (not part of this architecture)", name);
    }
    for (int j = 0; j < m->num_params; j++) {
        const lego_param *p = &m->table[j];
        const st_tensor *t = st_find(f, p->name);
        if (!t) return lego_fail(err, LEGO_ERR_SHAPE, "missing tensor '%s'", p->name);
        int same = t->rank == p->rank;
        for (int d = 0; same && d < p->rank; d++) same = t->shape[d] == p->shape[d];
        if (!same) {
            char want[96], got[96];
            shape_string(p->shape, p->rank, want, sizeof want);
            shape_string(t->shape, t->rank, got, sizeof got);
            return lego_fail(err, LEGO_ERR_SHAPE, "tensor '%s' has shape [%s], expected [%s]",
                             p->name, got, want);
        }
        if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
            return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                             "tensor '%s' has dtype %s; checkpoints must be F32, F16 or BF16",
                             p->name, st_dtype_name(t->dtype));
    }
    float *params = malloc(m->params_size * sizeof *params);
    if (!params) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for weights");
    for (int j = 0; j < m->num_params; j++)
        st_to_f32(st_find(f, m->table[j].name), params + m->table[j].offset, err);
    free(m->params);
    m->params = params;
    m->table_only = 0;
    model_bind_views(m);
    return LEGO_OK;
}

/* The model a file's lego.config describes, parameter table only: the
 * caller reads the weights into it (read_weights) or just compares it. */
static lego_status build_model(const char *json, const lego_load_options *o, lego_model **out,
                               lego_err *err) {
    lego_model_config cfg;
    lego_brick_config bricks[LEGO_MAX_BRICKS];
    int nb = 0;
    lego_status s = config_from_json(json, &cfg, bricks, &nb, err);
    if (s != LEGO_OK) return s;
    cfg.num_threads = o->num_threads;
    cfg.precision = o->precision;
    /* On the CPU until the weights are in (lego_model_load moves it). */
    cfg.backend = LEGO_BACKEND_CPU;
    lego_model *m = NULL;
    s = model_create(&cfg, 1, &m);
    for (int k = 0; s == LEGO_OK && k < nb; k++) s = lego_brick_add(m, &bricks[k]);
    if (s != LEGO_OK) {
        if (m) *err = m->err;
        else lego_fail(err, s, "out of memory");
        lego_model_free(m);
        return s;
    }
    *out = m;
    return LEGO_OK;
}

LEGO_API lego_status lego_model_load(const char *path, const lego_load_options *options,
                                     lego_model **out) {
    if (!out) return LEGO_ERR_INVALID_ARGUMENT;
    *out = NULL;
    lego_load_options o;
    lego_load_options_init(&o);
    if (options) lego_copy_options(&o, sizeof o, options, options->size);

    lego_err err;
    lego_err_clear(&err);
    st_file *f = NULL;
    lego_model *m = NULL;
    lego_status s;
    if (!path) {
        s = lego_fail(&err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
        goto fail;
    }
    if ((s = st_open(path, &f, &err)) != LEGO_OK) goto fail;
    const char *json = o.config_json ? o.config_json : f->metadata_config;
    if (!json) {
        s = lego_fail(&err, LEGO_ERR_FORMAT,
                      "%s: no __metadata__[\"lego.config\"]; pass the architecture in "
                      "lego_load_options.config_json", path);
        goto fail;
    }
    if ((s = build_model(json, &o, &m, &err)) != LEGO_OK) goto fail;
    if ((s = read_weights(m, f, &err)) != LEGO_OK) {
        lego_err_prefix(&err, "%s", path);
        goto fail;
    }
    /* The device copy is made once, from the weights just read. */
    if (o.backend != LEGO_BACKEND_CPU &&
        (s = lego_model_set_backend(m, o.backend, o.device)) != LEGO_OK) {
        err = m->err;
        goto fail;
    }
    st_close(f);
    *out = m;
    return LEGO_OK;

fail:
    st_close(f);
    lego_model_free(m);
    *out = model_new_failed(s, err.msg);
    return s;
}

LEGO_API lego_status lego_model_load_weights(lego_model *m, const char *path) {
    MODEL_CHECK(m);
    if (!path) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    st_file *f = NULL;
    lego_status s = st_open(path, &f, &m->err);
    if (s != LEGO_OK) return s;
    if (f->metadata_config) {
        /* The file's architecture must be this model's. */
        lego_model *other = NULL;
        lego_load_options o;
        lego_load_options_init(&o);
        o.num_threads = m->cfg.num_threads;
        s = build_model(f->metadata_config, &o, &other, &m->err);
        if (s == LEGO_OK) {
            char *a = config_to_json(m), *b = config_to_json(other);
            if (!a || !b) s = lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
            else if (strcmp(a, b) != 0)
                s = lego_fail(&m->err, LEGO_ERR_SHAPE,
                              "%s: its architecture %s differs from the model's %s", path, b, a);
            free(a);
            free(b);
        }
        lego_model_free(other);
    }
    if (s == LEGO_OK && (s = read_weights(m, f, &m->err)) != LEGO_OK)
        lego_err_prefix(&m->err, "%s", path);
    st_close(f);
    return s;
}

LEGO_API lego_status lego_model_save(lego_model *m, const char *path) {
    MODEL_CHECK(m);
    if (!path) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    if (m->num_bricks == 0) return lego_fail(&m->err, LEGO_ERR_STATE, "the model has no bricks");
    lego_status s = cuda_backend_pull(m, &m->err); /* weights trained on the GPU */
    if (s != LEGO_OK) return s;
    char *json = config_to_json(m);
    st_write_item *items = malloc((size_t)m->num_params * sizeof *items);
    if (!json || !items) {
        s = lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        items[i].name = p->name;
        items[i].rank = p->rank;
        memcpy(items[i].shape, p->shape, sizeof p->shape);
        items[i].data = m->params + p->offset;
    }
    s = st_write_f32(path, items, m->num_params, json, &m->err);
done:
    free(items);
    free(json);
    return s;
}
