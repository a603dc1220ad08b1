/*
 * config.c -- the architecture as JSON ("lego.config" in a checkpoint's
 * __metadata__):
 *
 *   {"format": "lego-diffusion", "version": 1, "img_channels": 3,
 *    "img_resolution": 32, "label_dim": 10, "hidden_size": 64,
 *    "num_heads": 4, "mlp_ratio": 4.0, "frequency_embedding_size": 256,
 *    "sigma_data": 0.5, "bricks": [{"brick_size": 4, "patch_size": 2,
 *    "depth": 1}, ...]}
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model.h"

static lego_status get_int(const cJSON *obj, const char *key, int required, int *out,
                           const char *where, lego_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) {
        if (!required) return LEGO_OK;
        return lego_fail(err, LEGO_ERR_FORMAT, "%s: missing \"%s\"", where, key);
    }
    double d = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    if (!(d >= -2147483648.0 && d <= 2147483647.0) || d != floor(d))
        return lego_fail(err, LEGO_ERR_FORMAT, "%s: \"%s\" must be an integer", where, key);
    *out = (int)d;
    return LEGO_OK;
}

static lego_status get_double(const cJSON *obj, const char *key, double *out, const char *where,
                              lego_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) return LEGO_OK;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return lego_fail(err, LEGO_ERR_FORMAT, "%s: \"%s\" must be a number", where, key);
    *out = v->valuedouble;
    return LEGO_OK;
}

lego_status config_from_json(const char *json, lego_model_config *cfg, lego_brick_config *bricks,
                             int *num_bricks, lego_err *err) {
    const char *where = "lego.config";
    cJSON *root = cJSON_Parse(json);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return lego_fail(err, LEGO_ERR_FORMAT, "%s is not a JSON object", where);
    }
    lego_status s = LEGO_OK;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(root, "format");
    if (fmt && (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "lego-diffusion") != 0)) {
        s = lego_fail(err, LEGO_ERR_FORMAT, "%s: format is not \"lego-diffusion\"", where);
        goto done;
    }
    int version = 1;
    if ((s = get_int(root, "version", 0, &version, where, err)) != LEGO_OK) goto done;
    if (version != 1) {
        s = lego_fail(err, LEGO_ERR_UNSUPPORTED, "%s: version %d is not supported", where, version);
        goto done;
    }
    lego_model_config_init(cfg);
    cfg->img_resolution = 0;
    if ((s = get_int(root, "img_channels", 1, &cfg->img_channels, where, err)) ||
        (s = get_int(root, "img_resolution", 0, &cfg->img_resolution, where, err)) ||
        (s = get_int(root, "label_dim", 0, &cfg->label_dim, where, err)) ||
        (s = get_int(root, "hidden_size", 1, &cfg->hidden_size, where, err)) ||
        (s = get_int(root, "num_heads", 1, &cfg->num_heads, where, err)) ||
        (s = get_int(root, "frequency_embedding_size", 0, &cfg->frequency_embedding_size, where, err)) ||
        (s = get_double(root, "mlp_ratio", &cfg->mlp_ratio, where, err)) ||
        (s = get_double(root, "sigma_data", &cfg->sigma_data, where, err)))
        goto done;

    const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "bricks");
    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) < 1 ||
        cJSON_GetArraySize(list) > LEGO_MAX_BRICKS) {
        s = lego_fail(err, LEGO_ERR_FORMAT, "%s: \"bricks\" must be a list of 1 to %d bricks",
                      where, LEGO_MAX_BRICKS);
        goto done;
    }
    int k = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, list) {
        char here[64];
        snprintf(here, sizeof here, "%s brick %d", where, k);
        lego_brick_config *b = &bricks[k];
        lego_brick_config_init(b);
        if (!cJSON_IsObject(item)) {
            s = lego_fail(err, LEGO_ERR_FORMAT, "%s is not an object", here);
            goto done;
        }
        if ((s = get_int(item, "brick_size", 1, &b->brick_size, here, err)) ||
            (s = get_int(item, "patch_size", 1, &b->patch_size, here, err)) ||
            (s = get_int(item, "depth", 1, &b->depth, here, err)))
            goto done;
        k++;
    }
    *num_bricks = k;
done:
    cJSON_Delete(root);
    return s;
}

char *config_to_json(const lego_model *m) {
    cJSON *root = cJSON_CreateObject(), *list;
    if (!root) return NULL;
    const lego_model_config *c = &m->cfg;
    int ok = cJSON_AddStringToObject(root, "format", "lego-diffusion") &&
             cJSON_AddNumberToObject(root, "version", 1) &&
             cJSON_AddNumberToObject(root, "img_channels", c->img_channels) &&
             cJSON_AddNumberToObject(root, "img_resolution", c->img_resolution) &&
             cJSON_AddNumberToObject(root, "label_dim", c->label_dim) &&
             cJSON_AddNumberToObject(root, "hidden_size", c->hidden_size) &&
             cJSON_AddNumberToObject(root, "num_heads", c->num_heads) &&
             cJSON_AddNumberToObject(root, "mlp_ratio", c->mlp_ratio) &&
             cJSON_AddNumberToObject(root, "frequency_embedding_size", c->frequency_embedding_size) &&
             cJSON_AddNumberToObject(root, "sigma_data", c->sigma_data) &&
             (list = cJSON_AddArrayToObject(root, "bricks"));
    for (int k = 0; ok && k < m->num_bricks; k++) {
        cJSON *b = cJSON_CreateObject();
        if (!b || !cJSON_AddItemToArray(list, b)) {
            cJSON_Delete(b);
            ok = 0;
            break;
        }
        ok = cJSON_AddNumberToObject(b, "brick_size", m->bricks[k].cfg.brick_size) &&
             cJSON_AddNumberToObject(b, "patch_size", m->bricks[k].cfg.patch_size) &&
             cJSON_AddNumberToObject(b, "depth", m->bricks[k].cfg.depth);
    }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return json;
}
