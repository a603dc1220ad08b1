/*
 * cudnn_emu.cpp -- cuDNN's backend (graph) API on the host, as much of it
 * as cuda/cudnn_attention.cu uses, for the host emulation (docs/cuda.md).
 *
 * Descriptors hold their attributes as typed values; setting an attribute
 * the emulation does not know, with the wrong type or count, or on a
 * finalized descriptor fails, and finalizing checks what cuDNN's
 * documentation requires (every mandatory attribute, shapes that agree,
 * descriptors referenced only once finalized).  Heuristics offer two
 * engines for any graph the interpreter below can run; the first refuses
 * to make a plan, so callers must try the next.  Execution copies what the
 * plan and variant pack say into a self-contained program and enqueues it
 * on the handle's stream (so it is captured like a kernel): a fused SDPA
 * operation, or matmul, pointwise and reduction operations over 4-D
 * tensors with broadcasting, in double, every real tensor's range checked
 * against the device allocations.
 *
 * LEGO_EMU_CUDNN: absent (the library is not found), composite (no engine
 * for the fused operation, as before cuDNN 9.13), none (no engine at all),
 * fail-exec (execution fails), no-capture (execution fails while the
 * stream is being captured).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <set>
#include <vector>

#include "cudnn_graph.h"
#include "emu_internal.h"

#define EMU_CUDNN_VERSION 91900

struct emu_cudnn_handle {
    cudaStream_t stream = nullptr;
};

struct attr_value {
    cudnnBackendAttributeType_t type;
    int64_t count;
    std::vector<unsigned char> bytes;
};

struct emu_cudnn_desc {
    cudnnBackendDescriptorType_t type;
    bool finalized = false;
    std::map<int, attr_value> attrs;
    /* Engine configurations (filled by the heuristics) and plans. */
    emu_cudnn_desc *graph = nullptr;
    int engine = -1;
    int64_t workspace = 0;
};

static std::set<const emu_cudnn_desc *> live; /* descriptors not yet destroyed */
static thread_local char last_error[256];

static const char *mode_env(void) {
    const char *e = getenv("LEGO_EMU_CUDNN");
    return e ? e : "";
}

static cudnnStatus_t fail(cudnnStatus_t st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return st;
}

/* ---- attributes ------------------------------------------------------------------ */

static size_t elem_size(cudnnBackendAttributeType_t t) {
    switch (t) {
    case CUDNN_TYPE_HANDLE: return sizeof(cudnnHandle_t);
    case CUDNN_TYPE_DATA_TYPE: return sizeof(cudnnDataType_t);
    case CUDNN_TYPE_BOOLEAN: return sizeof(bool);
    case CUDNN_TYPE_INT64: return sizeof(int64_t);
    case CUDNN_TYPE_FLOAT: return sizeof(float);
    case CUDNN_TYPE_VOID_PTR: return sizeof(void *);
    case CUDNN_TYPE_HEUR_MODE: return sizeof(cudnnBackendHeurMode_t);
    case CUDNN_TYPE_POINTWISE_MODE: return sizeof(cudnnPointwiseMode_t);
    case CUDNN_TYPE_BACKEND_DESCRIPTOR: return sizeof(cudnnBackendDescriptor_t);
    case CUDNN_TYPE_REDUCTION_OPERATOR_TYPE: return sizeof(cudnnReduceTensorOp_t);
    }
    return 0;
}

/* The settable attributes of each descriptor type: their type, most values. */
static bool expected(cudnnBackendDescriptorType_t d, int name, cudnnBackendAttributeType_t *type,
                     int64_t *most) {
    const cudnnBackendAttributeType_t BD = CUDNN_TYPE_BACKEND_DESCRIPTOR;
    struct row {
        cudnnBackendDescriptorType_t d;
        int name;
        cudnnBackendAttributeType_t type;
        int64_t most;
    };
    static const row rows[] = {
        {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1},
        {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 8},
        {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 8},
        {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1},
        {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1},
        {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1},
        {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1},
        {CUDNN_BACKEND_POINTWISE_DESCRIPTOR, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1},
        {CUDNN_BACKEND_POINTWISE_DESCRIPTOR, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1},
        {CUDNN_BACKEND_REDUCTION_DESCRIPTOR, CUDNN_ATTR_REDUCTION_OPERATOR,
         CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1},
        {CUDNN_BACKEND_REDUCTION_DESCRIPTOR, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1},
        {CUDNN_BACKEND_MATMUL_DESCRIPTOR, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1},
        {CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, BD, 1},
        {CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, CUDNN_ATTR_OPERATION_REDUCTION_DESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, CUDNN_ATTR_OPERATION_MATMUL_DESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, CUDNN_ATTR_OPERATION_MATMUL_ADESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, CUDNN_ATTR_OPERATION_MATMUL_BDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, CUDNN_ATTR_OPERATION_MATMUL_CDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, CUDNN_ATTR_OPERATION_SDPA_FWD_STATSDESC, BD, 1},
        {CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, BD, 1},
        {CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1},
        {CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, CUDNN_ATTR_OPERATIONGRAPH_OPS, BD, 64},
        {CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, BD, 1},
        {CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1},
        {CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1},
        {CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, BD, 1},
        {CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 64},
        {CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 64},
        {CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1},
    };
    for (const row &r : rows)
        if (r.d == d && r.name == name) {
            *type = r.type;
            *most = r.most;
            return true;
        }
    return false;
}

static const attr_value *find(const emu_cudnn_desc *d, int name) {
    auto it = d->attrs.find(name);
    return it == d->attrs.end() ? nullptr : &it->second;
}

static int64_t get_i64(const emu_cudnn_desc *d, int name, int64_t fallback) {
    const attr_value *a = find(d, name);
    if (!a || a->count < 1) return fallback;
    int64_t v;
    memcpy(&v, a->bytes.data(), sizeof v);
    return v;
}

template <class V> static V get_scalar(const emu_cudnn_desc *d, int name, V fallback) {
    const attr_value *a = find(d, name);
    if (!a || a->count < 1) return fallback;
    V v;
    memcpy(&v, a->bytes.data(), sizeof v);
    return v;
}

static std::vector<int64_t> get_i64s(const emu_cudnn_desc *d, int name) {
    const attr_value *a = find(d, name);
    std::vector<int64_t> v;
    if (a) {
        v.resize((size_t)a->count);
        memcpy(v.data(), a->bytes.data(), v.size() * sizeof(int64_t));
    }
    return v;
}

static std::vector<emu_cudnn_desc *> get_descs(const emu_cudnn_desc *d, int name) {
    const attr_value *a = find(d, name);
    std::vector<emu_cudnn_desc *> v;
    if (a) {
        v.resize((size_t)a->count);
        memcpy(v.data(), a->bytes.data(), v.size() * sizeof(emu_cudnn_desc *));
    }
    for (emu_cudnn_desc *x : v)
        if (!live.count(x)) emu_abort("cuDNN: a descriptor was used after it was destroyed");
    return v;
}

static emu_cudnn_desc *get_desc(const emu_cudnn_desc *d, int name) {
    std::vector<emu_cudnn_desc *> v = get_descs(d, name);
    return v.empty() ? nullptr : v[0];
}

/* ---- tensors ------------------------------------------------------------------------ */

struct tensor_info {
    int64_t uid = 0;
    cudnnDataType_t dtype = CUDNN_DATA_FLOAT;
    bool is_virtual = false, by_value = false;
    std::vector<int64_t> dims, strides;
};

static tensor_info tensor_of(const emu_cudnn_desc *t) {
    tensor_info i;
    i.uid = get_i64(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, 0);
    i.dtype = get_scalar<cudnnDataType_t>(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_DATA_FLOAT);
    i.is_virtual = get_scalar<bool>(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, false);
    i.by_value = get_scalar<bool>(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, false);
    i.dims = get_i64s(t, CUDNN_ATTR_TENSOR_DIMENSIONS);
    i.strides = get_i64s(t, CUDNN_ATTR_TENSOR_STRIDES);
    return i;
}

static bool is_tensor(const emu_cudnn_desc *d) {
    return d && d->type == CUDNN_BACKEND_TENSOR_DESCRIPTOR && d->finalized;
}

/* Whether `x` broadcasts to `y` (same rank, each dimension equal or 1). */
static bool broadcasts(const tensor_info &x, const tensor_info &y) {
    if (x.dims.size() != y.dims.size()) return false;
    for (size_t i = 0; i < x.dims.size(); i++)
        if (x.dims[i] != y.dims[i] && x.dims[i] != 1) return false;
    return true;
}

/* ---- the API: handles and descriptors ------------------------------------------------ */

size_t cudnnGetVersion(void) { return EMU_CUDNN_VERSION; }

const char *cudnnGetErrorString(cudnnStatus_t s) {
    switch (s) {
    case CUDNN_STATUS_SUCCESS: return "CUDNN_STATUS_SUCCESS";
    case CUDNN_STATUS_NOT_INITIALIZED: return "CUDNN_STATUS_NOT_INITIALIZED";
    case CUDNN_STATUS_BAD_PARAM: return "CUDNN_STATUS_BAD_PARAM";
    case CUDNN_STATUS_NOT_SUPPORTED: return "CUDNN_STATUS_NOT_SUPPORTED";
    case CUDNN_STATUS_EXECUTION_FAILED: return "CUDNN_STATUS_EXECUTION_FAILED";
    }
    return "CUDNN_STATUS_UNKNOWN";
}

void cudnnGetLastErrorString(char *message, size_t max_size) {
    if (!message || !max_size) return;
    snprintf(message, max_size, "%s", last_error);
    last_error[0] = '\0';
}

cudnnStatus_t cudnnCreate(cudnnHandle_t *handle) {
    auto lock = emu_api_lock();
    if (!handle) return fail(CUDNN_STATUS_BAD_PARAM, "cudnnCreate: NULL");
    if (emu_inject(EMU_FAIL_SETUP)) return fail(CUDNN_STATUS_NOT_INITIALIZED, "injected failure");
    *handle = new emu_cudnn_handle();
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnDestroy(cudnnHandle_t handle) {
    auto lock = emu_api_lock();
    delete handle;
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnSetStream(cudnnHandle_t handle, cudaStream_t stream) {
    auto lock = emu_api_lock();
    if (!handle) return fail(CUDNN_STATUS_BAD_PARAM, "cudnnSetStream: no handle");
    handle->stream = stream;
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnBackendCreateDescriptor(cudnnBackendDescriptorType_t type,
                                           cudnnBackendDescriptor_t *descriptor) {
    auto lock = emu_api_lock();
    if (!descriptor) return fail(CUDNN_STATUS_BAD_PARAM, "create: NULL");
    if (type == CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR && EMU_CUDNN_VERSION < 91300)
        return fail(CUDNN_STATUS_NOT_SUPPORTED, "no SDPA operation before 9.13");
    if (emu_inject(EMU_FAIL_SETUP)) return fail(CUDNN_STATUS_NOT_INITIALIZED, "injected failure");
    emu_cudnn_desc *d = new emu_cudnn_desc();
    d->type = type;
    live.insert(d);
    *descriptor = d;
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnBackendDestroyDescriptor(cudnnBackendDescriptor_t d) {
    auto lock = emu_api_lock();
    if (!d) return CUDNN_STATUS_SUCCESS;
    if (!live.erase(d)) emu_abort("cuDNN: a descriptor was destroyed twice");
    delete d;
    return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnBackendSetAttribute(cudnnBackendDescriptor_t d,
                                       cudnnBackendAttributeName_t name,
                                       cudnnBackendAttributeType_t type, int64_t count,
                                       const void *values) {
    auto lock = emu_api_lock();
    if (!d || !live.count(d)) emu_abort("cuDNN: set on a descriptor that does not exist");
    if (d->finalized) return fail(CUDNN_STATUS_BAD_PARAM, "attribute %d set after finalize", name);
    cudnnBackendAttributeType_t want;
    int64_t most;
    if (!expected(d->type, name, &want, &most))
        return fail(CUDNN_STATUS_NOT_SUPPORTED, "attribute %d of descriptor type %d is not emulated",
                    name, d->type);
    if (type != want || count < 1 || count > most || !values)
        return fail(CUDNN_STATUS_BAD_PARAM, "attribute %d: type %d count %lld", name, type,
                    (long long)count);
    if (type == CUDNN_TYPE_BACKEND_DESCRIPTOR) {
        const emu_cudnn_desc *const *refs = (const emu_cudnn_desc *const *)values;
        for (int64_t i = 0; i < count; i++)
            if (!refs[i] || !live.count(refs[i]) || !refs[i]->finalized)
                return fail(CUDNN_STATUS_BAD_PARAM, "attribute %d: descriptor %lld not finalized",
                            name, (long long)i);
    }
    attr_value v;
    v.type = type;
    v.count = count;
    v.bytes.assign((const unsigned char *)values,
                   (const unsigned char *)values + (size_t)count * elem_size(type));
    d->attrs[name] = v;
    return CUDNN_STATUS_SUCCESS;
}

/* ---- finalize: what each descriptor type needs ---------------------------------------- */

static bool binary_mode(cudnnPointwiseMode_t m) {
    return m == CUDNN_POINTWISE_ADD || m == CUDNN_POINTWISE_MUL || m == CUDNN_POINTWISE_DIV ||
           m == CUDNN_POINTWISE_SUB;
}

static cudnnStatus_t finalize_tensor(emu_cudnn_desc *d) {
    tensor_info t = tensor_of(d);
    if (!find(d, CUDNN_ATTR_TENSOR_UNIQUE_ID) || !find(d, CUDNN_ATTR_TENSOR_DATA_TYPE) ||
        !find(d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT))
        return fail(CUDNN_STATUS_BAD_PARAM, "tensor: id, type and alignment are required");
    if (t.dims.empty() || t.dims.size() != t.strides.size())
        return fail(CUDNN_STATUS_BAD_PARAM, "tensor: dimensions and strides must agree");
    for (size_t i = 0; i < t.dims.size(); i++)
        if (t.dims[i] < 1 || t.strides[i] < 1)
            return fail(CUDNN_STATUS_BAD_PARAM, "tensor: dimension or stride below 1");
    if (t.is_virtual && t.by_value) return fail(CUDNN_STATUS_BAD_PARAM, "tensor: virtual and by value");
    return CUDNN_STATUS_SUCCESS;
}

static cudnnStatus_t finalize_op(emu_cudnn_desc *d) {
    switch (d->type) {
    case CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR: {
        emu_cudnn_desc *pw = get_desc(d, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR);
        emu_cudnn_desc *x = get_desc(d, CUDNN_ATTR_OPERATION_POINTWISE_XDESC);
        emu_cudnn_desc *b = get_desc(d, CUDNN_ATTR_OPERATION_POINTWISE_BDESC);
        emu_cudnn_desc *y = get_desc(d, CUDNN_ATTR_OPERATION_POINTWISE_YDESC);
        if (!pw || pw->type != CUDNN_BACKEND_POINTWISE_DESCRIPTOR || !is_tensor(x) || !is_tensor(y))
            return fail(CUDNN_STATUS_BAD_PARAM, "pointwise: descriptor, x and y are required");
        cudnnPointwiseMode_t m = get_scalar<cudnnPointwiseMode_t>(pw, CUDNN_ATTR_POINTWISE_MODE,
                                                                  CUDNN_POINTWISE_ADD);
        if (binary_mode(m) != (b != nullptr) || (b && !is_tensor(b)))
            return fail(CUDNN_STATUS_BAD_PARAM, "pointwise: b given to a unary mode or missing");
        tensor_info ty = tensor_of(y);
        if (!broadcasts(tensor_of(x), ty) || (b && !broadcasts(tensor_of(b), ty)))
            return fail(CUDNN_STATUS_BAD_PARAM, "pointwise: operands do not broadcast to y");
        return CUDNN_STATUS_SUCCESS;
    }
    case CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR: {
        emu_cudnn_desc *rd = get_desc(d, CUDNN_ATTR_OPERATION_REDUCTION_DESC);
        emu_cudnn_desc *x = get_desc(d, CUDNN_ATTR_OPERATION_REDUCTION_XDESC);
        emu_cudnn_desc *y = get_desc(d, CUDNN_ATTR_OPERATION_REDUCTION_YDESC);
        if (!rd || rd->type != CUDNN_BACKEND_REDUCTION_DESCRIPTOR || !is_tensor(x) || !is_tensor(y))
            return fail(CUDNN_STATUS_BAD_PARAM, "reduction: descriptor, x and y are required");
        if (!broadcasts(tensor_of(y), tensor_of(x)))
            return fail(CUDNN_STATUS_BAD_PARAM, "reduction: y must be x with some dimensions 1");
        return CUDNN_STATUS_SUCCESS;
    }
    case CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR: {
        emu_cudnn_desc *mm = get_desc(d, CUDNN_ATTR_OPERATION_MATMUL_DESC);
        emu_cudnn_desc *a = get_desc(d, CUDNN_ATTR_OPERATION_MATMUL_ADESC);
        emu_cudnn_desc *b = get_desc(d, CUDNN_ATTR_OPERATION_MATMUL_BDESC);
        emu_cudnn_desc *c = get_desc(d, CUDNN_ATTR_OPERATION_MATMUL_CDESC);
        if (!mm || mm->type != CUDNN_BACKEND_MATMUL_DESCRIPTOR || !is_tensor(a) || !is_tensor(b) ||
            !is_tensor(c))
            return fail(CUDNN_STATUS_BAD_PARAM, "matmul: descriptor, a, b and c are required");
        tensor_info ta = tensor_of(a), tb = tensor_of(b), tc = tensor_of(c);
        size_t r = tc.dims.size();
        if (r < 3 || ta.dims.size() != r || tb.dims.size() != r)
            return fail(CUDNN_STATUS_BAD_PARAM, "matmul: operands of rank 3 or more, alike");
        for (size_t i = 0; i + 2 < r; i++)
            if ((ta.dims[i] != tc.dims[i] && ta.dims[i] != 1) ||
                (tb.dims[i] != tc.dims[i] && tb.dims[i] != 1))
                return fail(CUDNN_STATUS_BAD_PARAM, "matmul: batch dimensions differ");
        if (ta.dims[r - 2] != tc.dims[r - 2] || tb.dims[r - 1] != tc.dims[r - 1] ||
            ta.dims[r - 1] != tb.dims[r - 2])
            return fail(CUDNN_STATUS_BAD_PARAM, "matmul: [M,K] x [K,N] -> [M,N] does not hold");
        return CUDNN_STATUS_SUCCESS;
    }
    case CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR: {
        emu_cudnn_desc *q = get_desc(d, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC);
        emu_cudnn_desc *k = get_desc(d, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC);
        emu_cudnn_desc *v = get_desc(d, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC);
        emu_cudnn_desc *o = get_desc(d, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC);
        emu_cudnn_desc *s = get_desc(d, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC);
        if (!is_tensor(q) || !is_tensor(k) || !is_tensor(v) || !is_tensor(o))
            return fail(CUDNN_STATUS_BAD_PARAM, "SDPA: Q, K, V and O are required");
        tensor_info tq = tensor_of(q), tk = tensor_of(k), tv = tensor_of(v), to = tensor_of(o);
        const tensor_info *all[4] = {&tq, &tk, &tv, &to};
        for (const tensor_info *t : all)
            if (t->dims.size() != 4 || t->strides[3] != 1 || t->is_virtual ||
                t->dtype != tq.dtype || tq.dtype == CUDNN_DATA_FLOAT)
                return fail(CUDNN_STATUS_BAD_PARAM,
                            "SDPA: Q, K, V, O real 4-D bf16/fp16 tensors, last stride 1");
        if (tk.dims[0] != tq.dims[0] || tk.dims[1] != tq.dims[1] || tk.dims[3] != tq.dims[3] ||
            tv.dims[0] != tq.dims[0] || tv.dims[1] != tq.dims[1] || tv.dims[2] != tk.dims[2] ||
            to.dims[0] != tq.dims[0] || to.dims[1] != tq.dims[1] || to.dims[2] != tq.dims[2] ||
            to.dims[3] != tv.dims[3])
            return fail(CUDNN_STATUS_BAD_PARAM, "SDPA: Q [b,h,s,d] K [b,h,t,d] V [b,h,t,e] O [b,h,s,e]");
        if (s) {
            tensor_info ts = tensor_of(s);
            if (!is_tensor(s) || !ts.by_value || ts.dtype != CUDNN_DATA_FLOAT)
                return fail(CUDNN_STATUS_BAD_PARAM, "SDPA: the scale is a by-value float");
        }
        return CUDNN_STATUS_SUCCESS;
    }
    default: break;
    }
    return fail(CUDNN_STATUS_BAD_PARAM, "not an operation");
}

static bool is_op(const emu_cudnn_desc *d) {
    return d->type == CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR ||
           d->type == CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR ||
           d->type == CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR ||
           d->type == CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR;
}

/* The tensors an operation reads and writes. */
static void op_tensors(const emu_cudnn_desc *op, std::vector<emu_cudnn_desc *> *in,
                       emu_cudnn_desc **out) {
    in->clear();
    *out = nullptr;
    auto add = [&](int name) {
        emu_cudnn_desc *t = get_desc(op, name);
        if (t) in->push_back(t);
    };
    switch (op->type) {
    case CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR:
        add(CUDNN_ATTR_OPERATION_POINTWISE_XDESC);
        add(CUDNN_ATTR_OPERATION_POINTWISE_BDESC);
        *out = get_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC);
        break;
    case CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR:
        add(CUDNN_ATTR_OPERATION_REDUCTION_XDESC);
        *out = get_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC);
        break;
    case CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR:
        add(CUDNN_ATTR_OPERATION_MATMUL_ADESC);
        add(CUDNN_ATTR_OPERATION_MATMUL_BDESC);
        *out = get_desc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC);
        break;
    case CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR:
        add(CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC);
        add(CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC);
        add(CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC);
        add(CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC);
        *out = get_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC);
        break;
    default: break;
    }
}

static cudnnStatus_t finalize_graph(emu_cudnn_desc *d) {
    if (!find(d, CUDNN_ATTR_OPERATIONGRAPH_HANDLE))
        return fail(CUDNN_STATUS_BAD_PARAM, "graph: no handle");
    std::vector<emu_cudnn_desc *> ops = get_descs(d, CUDNN_ATTR_OPERATIONGRAPH_OPS);
    if (ops.empty()) return fail(CUDNN_STATUS_BAD_PARAM, "graph: no operations");
    /* Every virtual tensor written by exactly one operation and read by
     * some; real tensor ids unique. */
    std::map<int64_t, int> writes, reads;
    std::map<int64_t, const emu_cudnn_desc *> by_uid;
    for (emu_cudnn_desc *op : ops) {
        if (!is_op(op)) return fail(CUDNN_STATUS_BAD_PARAM, "graph: not an operation");
        std::vector<emu_cudnn_desc *> in;
        emu_cudnn_desc *out;
        op_tensors(op, &in, &out);
        in.push_back(out);
        for (size_t i = 0; i < in.size(); i++) {
            int64_t uid = tensor_of(in[i]).uid;
            auto it = by_uid.find(uid);
            if (it != by_uid.end() && it->second != in[i])
                return fail(CUDNN_STATUS_BAD_PARAM, "graph: two tensors with id %lld", (long long)uid);
            by_uid[uid] = in[i];
            (i + 1 == in.size() ? writes : reads)[uid]++;
        }
    }
    for (auto &kv : by_uid) {
        tensor_info t = tensor_of(kv.second);
        if (t.is_virtual && (writes[kv.first] != 1 || reads[kv.first] < 1))
            return fail(CUDNN_STATUS_BAD_PARAM, "graph: virtual tensor %lld not written once and read",
                        (long long)kv.first);
        if (!t.is_virtual && writes[kv.first] && reads[kv.first])
            return fail(CUDNN_STATUS_BAD_PARAM, "graph: real tensor %lld both read and written",
                        (long long)kv.first);
    }
    return CUDNN_STATUS_SUCCESS;
}

/* Which engines the heuristics offer for a graph: 2 (engine 0 cannot make
 * a plan), or 0 when LEGO_EMU_CUDNN says so. */
static int engines_for(const emu_cudnn_desc *graph) {
    const char *mode = mode_env();
    if (!strcmp(mode, "none")) return 0;
    std::vector<emu_cudnn_desc *> ops = get_descs(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS);
    for (emu_cudnn_desc *op : ops)
        if (op->type == CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR && !strcmp(mode, "composite"))
            return 0;
    return 2;
}

cudnnStatus_t cudnnBackendFinalize(cudnnBackendDescriptor_t d) {
    auto lock = emu_api_lock();
    if (!d || !live.count(d)) emu_abort("cuDNN: finalize of a descriptor that does not exist");
    if (d->finalized) return fail(CUDNN_STATUS_BAD_PARAM, "finalized twice");
    if (emu_inject(EMU_FAIL_SETUP)) return fail(CUDNN_STATUS_NOT_SUPPORTED, "injected failure");
    cudnnStatus_t st = CUDNN_STATUS_SUCCESS;
    switch (d->type) {
    case CUDNN_BACKEND_TENSOR_DESCRIPTOR: st = finalize_tensor(d); break;
    case CUDNN_BACKEND_POINTWISE_DESCRIPTOR:
        if (!find(d, CUDNN_ATTR_POINTWISE_MODE) || !find(d, CUDNN_ATTR_POINTWISE_MATH_PREC))
            st = fail(CUDNN_STATUS_BAD_PARAM, "pointwise: mode and precision are required");
        break;
    case CUDNN_BACKEND_REDUCTION_DESCRIPTOR:
        if (!find(d, CUDNN_ATTR_REDUCTION_OPERATOR) || !find(d, CUDNN_ATTR_REDUCTION_COMP_TYPE))
            st = fail(CUDNN_STATUS_BAD_PARAM, "reduction: operator and type are required");
        break;
    case CUDNN_BACKEND_MATMUL_DESCRIPTOR:
        if (!find(d, CUDNN_ATTR_MATMUL_COMP_TYPE))
            st = fail(CUDNN_STATUS_BAD_PARAM, "matmul: compute type is required");
        break;
    case CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR: st = finalize_op(d); break;
    case CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR: st = finalize_graph(d); break;
    case CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR: {
        emu_cudnn_desc *g = get_desc(d, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH);
        if (!g || g->type != CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR || !find(d, CUDNN_ATTR_ENGINEHEUR_MODE))
            st = fail(CUDNN_STATUS_BAD_PARAM, "heuristics: graph and mode are required");
        break;
    }
    case CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR: {
        emu_cudnn_desc *cfg = get_desc(d, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG);
        if (!find(d, CUDNN_ATTR_EXECUTION_PLAN_HANDLE) || !cfg || !cfg->graph)
            st = fail(CUDNN_STATUS_BAD_PARAM, "plan: handle and an engine configuration are required");
        else if (cfg->engine == 0)
            st = fail(CUDNN_STATUS_NOT_SUPPORTED, "engine 0 takes no such graph here");
        else {
            d->graph = cfg->graph;
            d->engine = cfg->engine;
            d->workspace = 4096 * (int64_t)cfg->engine;
        }
        break;
    }
    case CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR: {
        const attr_value *ids = find(d, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS);
        const attr_value *ptrs = find(d, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS);
        if (!ids || !ptrs || ids->count != ptrs->count)
            st = fail(CUDNN_STATUS_BAD_PARAM, "variant pack: as many ids as pointers");
        break;
    }
    default: st = fail(CUDNN_STATUS_NOT_SUPPORTED, "descriptor type %d is not emulated", d->type);
    }
    if (st == CUDNN_STATUS_SUCCESS) d->finalized = true;
    return st;
}

cudnnStatus_t cudnnBackendGetAttribute(cudnnBackendDescriptor_t const d,
                                       cudnnBackendAttributeName_t name,
                                       cudnnBackendAttributeType_t type, int64_t requested,
                                       int64_t *count, void *values) {
    auto lock = emu_api_lock();
    if (!d || !live.count(d)) emu_abort("cuDNN: get on a descriptor that does not exist");
    if (!d->finalized) return fail(CUDNN_STATUS_BAD_PARAM, "get before finalize");
    if (d->type == CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR && name == CUDNN_ATTR_ENGINEHEUR_RESULTS &&
        type == CUDNN_TYPE_BACKEND_DESCRIPTOR) {
        emu_cudnn_desc *g = get_desc(d, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH);
        int n = engines_for(g);
        if (count) *count = n;
        emu_cudnn_desc **out = (emu_cudnn_desc **)values;
        for (int64_t i = 0; i < n && i < requested; i++) {
            if (!out || !live.count(out[i]) || out[i]->type != CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)
                return fail(CUDNN_STATUS_BAD_PARAM, "heuristics: results need engine configurations");
            out[i]->graph = g;
            out[i]->engine = (int)i;
            out[i]->finalized = true;
        }
        return CUDNN_STATUS_SUCCESS;
    }
    if (d->type == CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR &&
        name == CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE && type == CUDNN_TYPE_INT64 &&
        requested >= 1 && values) {
        memcpy(values, &d->workspace, sizeof d->workspace);
        if (count) *count = 1;
        return CUDNN_STATUS_SUCCESS;
    }
    return fail(CUDNN_STATUS_NOT_SUPPORTED, "get of attribute %d is not emulated", name);
}

/* ---- execution ------------------------------------------------------------------------- */

/* A tensor of the program: a real one (device pointer, element type) or a
 * virtual one (doubles of its own), or a by-value scalar. */
struct prog_tensor {
    tensor_info t;
    void *ptr = nullptr;
    double value = 0;
    std::vector<double> data;
};

struct prog_op {
    cudnnBackendDescriptorType_t kind;
    int mode = 0; /* pointwise mode or reduction operator */
    std::vector<int> in;
    int out = -1;
};

struct program {
    std::vector<prog_tensor> tensors;
    std::vector<prog_op> ops;
    void *workspace = nullptr;
    int64_t workspace_bytes = 0;
};

static int lt_type_of(cudnnDataType_t t) {
    return t == CUDNN_DATA_BFLOAT16 ? CUDA_R_16BF : t == CUDNN_DATA_HALF ? CUDA_R_16F : CUDA_R_32F;
}

/* Element offset of multi-index idx (in y's dimensions) in tensor t, which
 * broadcasts to them. */
static int64_t offset_of(const tensor_info &t, const std::vector<int64_t> &idx) {
    int64_t off = 0;
    for (size_t i = 0; i < t.dims.size(); i++) off += (t.dims[i] == 1 ? 0 : idx[i]) * t.strides[i];
    return off;
}

static double load(const prog_tensor &p, const std::vector<int64_t> &idx) {
    if (p.t.by_value) return p.value;
    int64_t off = offset_of(p.t, idx);
    if (p.t.is_virtual) return p.data[(size_t)off];
    return load_elem(p.ptr, lt_type_of(p.t.dtype), (uint64_t)off);
}

/* Element [a][b][c][d] of a real 4-D tensor. */
static int64_t at4(const prog_tensor &p, int64_t a, int64_t b, int64_t c, int64_t d) {
    const std::vector<int64_t> &s = p.t.strides;
    return a * s[0] + b * s[1] + c * s[2] + d * s[3];
}

static void store(prog_tensor &p, const std::vector<int64_t> &idx, double v) {
    int64_t off = offset_of(p.t, idx);
    if (p.t.is_virtual) p.data[(size_t)off] = v;
    else store_elem(p.ptr, lt_type_of(p.t.dtype), (uint64_t)off, v);
}

/* Call f for every multi-index of dims, last dimension fastest. */
template <class F> static void for_each_index(const std::vector<int64_t> &dims, F f) {
    std::vector<int64_t> idx(dims.size(), 0);
    int64_t total = 1;
    for (int64_t d : dims) total *= d;
    for (int64_t n = 0; n < total; n++) {
        f(idx);
        for (size_t i = dims.size(); i-- > 0;) {
            if (++idx[i] < dims[i]) break;
            idx[i] = 0;
        }
    }
}

static void run_op(program &p, const prog_op &op) {
    prog_tensor &y = p.tensors[(size_t)op.out];
    switch (op.kind) {
    case CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR:
        for_each_index(y.t.dims, [&](const std::vector<int64_t> &i) {
            double a = load(p.tensors[(size_t)op.in[0]], i);
            double b = op.in.size() > 1 ? load(p.tensors[(size_t)op.in[1]], i) : 0.0;
            double v = 0;
            switch ((cudnnPointwiseMode_t)op.mode) {
            case CUDNN_POINTWISE_ADD: v = a + b; break;
            case CUDNN_POINTWISE_MUL: v = a * b; break;
            case CUDNN_POINTWISE_DIV: v = a / b; break;
            case CUDNN_POINTWISE_SUB: v = a - b; break;
            case CUDNN_POINTWISE_EXP: v = exp(a); break;
            case CUDNN_POINTWISE_LOG: v = log(a); break;
            }
            store(y, i, v);
        });
        break;
    case CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR: {
        const prog_tensor &x = p.tensors[(size_t)op.in[0]];
        bool is_max = op.mode == CUDNN_REDUCE_TENSOR_MAX;
        for_each_index(y.t.dims, [&](const std::vector<int64_t> &i) {
            store(y, i, is_max ? -INFINITY : 0.0);
        });
        for_each_index(x.t.dims, [&](const std::vector<int64_t> &i) {
            double v = load(x, i), acc = load(y, i);
            store(y, i, is_max ? fmax(acc, v) : acc + v);
        });
        break;
    }
    case CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR: {
        const prog_tensor &a = p.tensors[(size_t)op.in[0]], &b = p.tensors[(size_t)op.in[1]];
        size_t r = y.t.dims.size();
        int64_t K = a.t.dims[r - 1];
        for_each_index(y.t.dims, [&](const std::vector<int64_t> &i) {
            std::vector<int64_t> ia = i, ib = i;
            double acc = 0;
            for (int64_t k = 0; k < K; k++) {
                ia[r - 1] = k;
                ib[r - 2] = k;
                acc += load(a, ia) * load(b, ib);
            }
            store(y, i, acc);
        });
        break;
    }
    case CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR: {
        const prog_tensor &q = p.tensors[(size_t)op.in[0]], &k = p.tensors[(size_t)op.in[1]],
                          &v = p.tensors[(size_t)op.in[2]];
        double scale = op.in.size() > 3 ? p.tensors[(size_t)op.in[3]].value : 1.0;
        int64_t B = q.t.dims[0], H = q.t.dims[1], S = q.t.dims[2], D = q.t.dims[3];
        int64_t T = k.t.dims[2], E = v.t.dims[3];
        const int qt = lt_type_of(q.t.dtype), kt = lt_type_of(k.t.dtype),
                  vt = lt_type_of(v.t.dtype), yt = lt_type_of(y.t.dtype);
        std::vector<double> s((size_t)T);
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < S; i++) {
                    double mx = -INFINITY, sum = 0;
                    for (int64_t j = 0; j < T; j++) {
                        double acc = 0;
                        for (int64_t d = 0; d < D; d++)
                            acc += load_elem(q.ptr, qt, (uint64_t)at4(q, b, h, i, d)) *
                                   load_elem(k.ptr, kt, (uint64_t)at4(k, b, h, j, d));
                        s[(size_t)j] = acc * scale;
                        mx = fmax(mx, s[(size_t)j]);
                    }
                    for (int64_t j = 0; j < T; j++) sum += (s[(size_t)j] = exp(s[(size_t)j] - mx));
                    for (int64_t e = 0; e < E; e++) {
                        double acc = 0;
                        for (int64_t j = 0; j < T; j++)
                            acc += s[(size_t)j] * load_elem(v.ptr, vt, (uint64_t)at4(v, b, h, j, e));
                        store_elem(y.ptr, yt, (uint64_t)at4(y, b, h, i, e), acc / sum);
                    }
                }
        break;
    }
    default: emu_abort("cuDNN: an operation the emulation cannot run");
    }
}

static void run_program(program p) {
    if (p.workspace_bytes) check_device_range(p.workspace, (size_t)p.workspace_bytes, "cuDNN workspace");
    for (prog_tensor &t : p.tensors) {
        if (t.t.by_value) continue;
        int64_t extent = 1;
        for (size_t i = 0; i < t.t.dims.size(); i++) extent += (t.t.dims[i] - 1) * t.t.strides[i];
        if (t.t.is_virtual) t.data.assign((size_t)extent, NAN);
        else check_device_range(t.ptr, (size_t)extent * (t.t.dtype == CUDNN_DATA_FLOAT ? 4 : 2),
                                "cuDNN tensor");
    }
    /* In dependency order: an operation runs once every virtual input is written. */
    std::vector<bool> done(p.ops.size(), false), ready(p.tensors.size(), true);
    for (const prog_op &op : p.ops)
        if (p.tensors[(size_t)op.out].t.is_virtual) ready[(size_t)op.out] = false;
    for (size_t ran = 0; ran < p.ops.size();) {
        size_t before = ran;
        for (size_t i = 0; i < p.ops.size(); i++) {
            if (done[i]) continue;
            bool can = true;
            for (int t : p.ops[i].in) can = can && ready[(size_t)t];
            if (!can) continue;
            run_op(p, p.ops[i]);
            ready[(size_t)p.ops[i].out] = true;
            done[i] = true;
            ran++;
        }
        if (ran == before) emu_abort("cuDNN: the graph has a cycle");
    }
}

cudnnStatus_t cudnnBackendExecute(cudnnHandle_t handle, cudnnBackendDescriptor_t plan,
                                  cudnnBackendDescriptor_t pack) {
    auto lock = emu_api_lock();
    if (!handle) return fail(CUDNN_STATUS_BAD_PARAM, "execute: no handle");
    if (!plan || !live.count(plan) || !plan->finalized ||
        plan->type != CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR || !live.count(plan->graph))
        return fail(CUDNN_STATUS_BAD_PARAM, "execute: not a finalized plan (or its graph is gone)");
    if (!pack || !live.count(pack) || !pack->finalized ||
        pack->type != CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)
        return fail(CUDNN_STATUS_BAD_PARAM, "execute: not a finalized variant pack");
    emu_check_stream_device(handle->stream, "cudnnBackendExecute");
    if (!strcmp(mode_env(), "fail-exec"))
        return fail(CUDNN_STATUS_EXECUTION_FAILED, "LEGO_EMU_CUDNN=fail-exec");
    if (emu_inject(EMU_FAIL_WORK)) return fail(CUDNN_STATUS_EXECUTION_FAILED, "injected failure");
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(handle->stream, &capturing);
    if (!strcmp(mode_env(), "no-capture") && capturing != cudaStreamCaptureStatusNone)
        return fail(CUDNN_STATUS_NOT_SUPPORTED, "LEGO_EMU_CUDNN=no-capture: not while capturing");
    std::vector<int64_t> ids = get_i64s(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS);
    const attr_value *pv = find(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS);
    std::vector<void *> ptrs((size_t)pv->count);
    memcpy(ptrs.data(), pv->bytes.data(), ptrs.size() * sizeof(void *));

    program prog;
    prog.workspace_bytes = plan->workspace;
    if (const attr_value *w = find(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE))
        memcpy(&prog.workspace, w->bytes.data(), sizeof(void *));
    if (prog.workspace_bytes && !prog.workspace)
        return fail(CUDNN_STATUS_BAD_PARAM, "execute: the plan needs a workspace");
    std::map<const emu_cudnn_desc *, int> index;
    auto tensor_index = [&](emu_cudnn_desc *d) -> int {
        auto it = index.find(d);
        if (it != index.end()) return it->second;
        prog_tensor t;
        t.t = tensor_of(d);
        if (!t.t.is_virtual) {
            size_t k = 0;
            while (k < ids.size() && ids[k] != t.t.uid) k++;
            if (k == ids.size()) return -1;
            t.ptr = ptrs[k];
            if (t.t.by_value) t.value = *(const float *)t.ptr; /* read now, as cuDNN does */
            else check_current_device(t.ptr, "cuDNN tensor");
        }
        prog.tensors.push_back(t);
        return index[d] = (int)prog.tensors.size() - 1;
    };
    for (emu_cudnn_desc *op : get_descs(plan->graph, CUDNN_ATTR_OPERATIONGRAPH_OPS)) {
        prog_op po;
        po.kind = op->type;
        if (op->type == CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)
            po.mode = get_scalar<int>(get_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR),
                                      CUDNN_ATTR_POINTWISE_MODE, 0);
        if (op->type == CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR)
            po.mode = get_scalar<int>(get_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC),
                                      CUDNN_ATTR_REDUCTION_OPERATOR, 0);
        std::vector<emu_cudnn_desc *> in;
        emu_cudnn_desc *out;
        op_tensors(op, &in, &out);
        for (emu_cudnn_desc *t : in) {
            int i = tensor_index(t);
            if (i < 0) return fail(CUDNN_STATUS_BAD_PARAM, "execute: no pointer for a tensor");
            po.in.push_back(i);
        }
        po.out = tensor_index(out);
        if (po.out < 0) return fail(CUDNN_STATUS_BAD_PARAM, "execute: no pointer for a tensor");
        prog.ops.push_back(po);
    }
    emu_enqueue(handle->stream, [prog] { run_program(prog); });
    return CUDNN_STATUS_SUCCESS;
}

/* ---- the "library" ------------------------------------------------------------------------ */

static int library_token;

void *emu_cudnn_dlopen(const char *name) {
    if (!strcmp(mode_env(), "absent") || strcmp(name, "libcudnn.so.9")) return nullptr;
    return &library_token;
}

void *emu_cudnn_dlsym(void *library, const char *name) {
    if (library != &library_token) return nullptr;
    static const struct {
        const char *name;
        void *fn;
    } table[] = {
        {"cudnnGetVersion", (void *)&cudnnGetVersion},
        {"cudnnGetErrorString", (void *)&cudnnGetErrorString},
        {"cudnnGetLastErrorString", (void *)&cudnnGetLastErrorString},
        {"cudnnCreate", (void *)&cudnnCreate},
        {"cudnnDestroy", (void *)&cudnnDestroy},
        {"cudnnSetStream", (void *)&cudnnSetStream},
        {"cudnnBackendCreateDescriptor", (void *)&cudnnBackendCreateDescriptor},
        {"cudnnBackendDestroyDescriptor", (void *)&cudnnBackendDestroyDescriptor},
        {"cudnnBackendFinalize", (void *)&cudnnBackendFinalize},
        {"cudnnBackendSetAttribute", (void *)&cudnnBackendSetAttribute},
        {"cudnnBackendGetAttribute", (void *)&cudnnBackendGetAttribute},
        {"cudnnBackendExecute", (void *)&cudnnBackendExecute},
    };
    for (const auto &e : table)
        if (!strcmp(e.name, name)) return e.fn;
    return nullptr;
}

int emu_cudnn_dlclose(void *library) { return library == &library_token ? 0 : -1; }
