/*
 * cudnn_attention.cu -- long-sequence attention through cuDNN's fused
 * (flash) attention: the other candidate, beside attention.cu's
 * tensor-core kernel, for the image bricks' 64-1024-token sequences in
 * bf16/fp16.  backend.cu times the two at a shape's first use and keeps the
 * faster (docs/cuda.md, "Attention through cuDNN").
 *
 * cuDNN is loaded at run time (dlopen of libcudnn.so.9) when a handle first
 * wants it, so liblego neither links it nor needs it: without the library,
 * or without an engine for a shape, the caller keeps its own kernel.  The
 * tests' host emulation provides a cuDNN of its own through the same three
 * loader calls (tests/cuda-emu/cudnn_graph.h).
 *
 * Two operation graphs are tried per shape, in this order:
 *   1. one SDPA_FWD operation (cuDNN >= 9.13): Q, K, V, O and a by-value
 *      scale;
 *   2. the composite graph that cuDNN's flash-attention engines recognise
 *      in every 9.x: S = Q K^T, S *= scale, softmax as max, subtract, exp,
 *      sum, divide, O = P V, every intermediate a virtual fp32 tensor.
 * Q, K and V are read in place from the qkv rows (row stride 3D, heads
 * hd apart) and O is written straight into the attention output rows
 * (row stride D): no copies.  The plan of each shape (its descriptors, its
 * workspace size) is built once, outside graph capture; a run only makes a
 * variant pack and executes, so it may be captured.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cudnn_graph.h>

#include "cuda_internal.h"

#ifdef LEGO_EMU_CUDNN
#define LIB_OPEN(name) emu_cudnn_dlopen(name)
#define LIB_SYM(lib, name) emu_cudnn_dlsym(lib, name)
#define LIB_CLOSE(lib) emu_cudnn_dlclose(lib)
#else
/* RTLD_NODELETE: cuDNN keeps its own state (loaded sub-libraries, kernel
 * caches) for the process; unmapping it under a live CUDA context is not
 * worth the risk. */
#define LIB_OPEN(name) dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE)
#define LIB_SYM(lib, name) dlsym(lib, name)
#define LIB_CLOSE(lib) dlclose(lib)
#endif

/* The unified graph needs cuDNN 9.13.0. */
#define SDPA_OP_VERSION 91300
#define PLAN_CACHE 16
#define MAX_DESCS 40
#define HEUR_RESULTS 8

/* Tensor ids in the graphs and the variant pack. */
enum { UID_Q = 1, UID_K, UID_V, UID_O, UID_SCALE, UID_VIRTUAL = 100 };

/* The entry points used, resolved from the library. */
typedef struct cudnn_fns {
    decltype(&cudnnGetVersion) get_version;
    decltype(&cudnnGetErrorString) error_string;
    decltype(&cudnnGetLastErrorString) last_error; /* may be NULL */
    decltype(&cudnnCreate) create;
    decltype(&cudnnDestroy) destroy;
    decltype(&cudnnSetStream) set_stream;
    decltype(&cudnnBackendCreateDescriptor) create_desc;
    decltype(&cudnnBackendDestroyDescriptor) destroy_desc;
    decltype(&cudnnBackendFinalize) finalize;
    decltype(&cudnnBackendSetAttribute) set_attr;
    decltype(&cudnnBackendGetAttribute) get_attr;
    decltype(&cudnnBackendExecute) execute;
} cudnn_fns;

/* One shape's plan and every descriptor it was built from. */
typedef struct attn_plan {
    int used;
    attn_shape key;
    int graph; /* CUDNN_GRAPH_SDPA or CUDNN_GRAPH_COMPOSITE */
    cudnnBackendDescriptor_t plan;
    cudnnBackendDescriptor_t descs[MAX_DESCS];
    int ndesc;
    int64_t workspace;
} attn_plan;

struct cudnn_attn {
    void *lib;
    cudnn_fns f;
    cudnnHandle_t handle;
    cudaStream_t stream;
    int available;
    long version;
    attn_plan plans[PLAN_CACHE];
    int next_evict;
    /* Shapes cuDNN cannot take, so that they are not retried. */
    attn_shape refused[PLAN_CACHE];
    int nrefused;
    void *workspace;
    size_t workspace_bytes;
    uint64_t plans_built, runs;
    /* Moves when a plan is dropped or the workspace moves: CUDA graphs
     * that captured a run are stale then. */
    uint64_t generation;
    int last_graph;
    char note[256];
};

/* ---- loading ------------------------------------------------------------------ */

static int load_library(cudnn_attn *c) {
    const char *names[] = {"libcudnn.so.9", "libcudnn_graph.so.9"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !c->lib; i++)
        c->lib = LIB_OPEN(names[i]);
    if (!c->lib) {
        snprintf(c->note, sizeof c->note, "cuDNN not loaded: libcudnn.so.9 was not found");
        return 0;
    }
    int missing = 0;
#define RESOLVE(field, name)                                                   \
    do {                                                                       \
        void *sym_ = LIB_SYM(c->lib, name);                                    \
        memcpy(&c->f.field, &sym_, sizeof sym_);                               \
        if (!sym_ && !missing) {                                               \
            missing = 1;                                                       \
            snprintf(c->note, sizeof c->note, "cuDNN not used: %s is missing", name); \
        }                                                                      \
    } while (0)
    RESOLVE(get_version, "cudnnGetVersion");
    RESOLVE(error_string, "cudnnGetErrorString");
    RESOLVE(create, "cudnnCreate");
    RESOLVE(destroy, "cudnnDestroy");
    RESOLVE(set_stream, "cudnnSetStream");
    RESOLVE(create_desc, "cudnnBackendCreateDescriptor");
    RESOLVE(destroy_desc, "cudnnBackendDestroyDescriptor");
    RESOLVE(finalize, "cudnnBackendFinalize");
    RESOLVE(set_attr, "cudnnBackendSetAttribute");
    RESOLVE(get_attr, "cudnnBackendGetAttribute");
    RESOLVE(execute, "cudnnBackendExecute");
#undef RESOLVE
    if (missing) return 0;
    void *last = LIB_SYM(c->lib, "cudnnGetLastErrorString"); /* optional */
    memcpy(&c->f.last_error, &last, sizeof last);
    c->version = (long)c->f.get_version();
    if (c->version < 90000) {
        snprintf(c->note, sizeof c->note, "cuDNN %ld is older than 9.0", c->version);
        return 0;
    }
    cudnnStatus_t st = c->f.create(&c->handle);
    if (st != CUDNN_STATUS_SUCCESS) {
        c->handle = NULL;
        snprintf(c->note, sizeof c->note, "cuDNN %ld: cudnnCreate failed: %s", c->version,
                 c->f.error_string(st));
        return 0;
    }
    st = c->f.set_stream(c->handle, c->stream);
    if (st != CUDNN_STATUS_SUCCESS) {
        snprintf(c->note, sizeof c->note, "cuDNN %ld: cudnnSetStream failed: %s", c->version,
                 c->f.error_string(st));
        return 0;
    }
    return 1;
}

lego_status cudnn_attn_open(cudaStream_t stream, cudnn_attn **out, lego_err *err) {
    cudnn_attn *c = (cudnn_attn *)calloc(1, sizeof *c);
    if (!c) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    c->stream = stream;
    c->available = load_library(c);
    *out = c;
    return LEGO_OK;
}

static void plan_free(const cudnn_fns *f, attn_plan *p) {
    if (p->plan) f->destroy_desc(p->plan);
    for (int i = p->ndesc - 1; i >= 0; i--) f->destroy_desc(p->descs[i]);
    memset(p, 0, sizeof *p);
}

void cudnn_attn_close(cudnn_attn *c) {
    if (!c) return;
    if (c->f.destroy_desc)
        for (int i = 0; i < PLAN_CACHE; i++)
            if (c->plans[i].used) plan_free(&c->f, &c->plans[i]);
    if (c->handle) c->f.destroy(c->handle);
    if (c->workspace) cudaFree(c->workspace);
    if (c->lib) LIB_CLOSE(c->lib);
    free(c);
}

size_t cudnn_attn_bytes(const cudnn_attn *c) { return c ? c->workspace_bytes : 0; }

uint64_t cudnn_attn_generation(const cudnn_attn *c) { return c ? c->generation : 0; }

void cudnn_attn_get_info(const cudnn_attn *c, cudnn_attn_info *out) {
    memset(out, 0, sizeof *out);
    if (!c) return;
    out->available = c->available;
    out->version = c->version;
    out->plans = c->plans_built;
    out->runs = c->runs;
    out->last_graph = c->last_graph;
    memcpy(out->note, c->note, sizeof out->note < sizeof c->note ? sizeof out->note
                                                                   : sizeof c->note);
    out->note[sizeof out->note - 1] = '\0';
}

/* ---- building a plan --------------------------------------------------------- */

/* Descriptor calls in sequence: the first failure stops the rest and names
 * the step. */
typedef struct builder {
    const cudnn_fns *f;
    attn_plan *p;
    cudnnStatus_t st;
    const char *step;
} builder;

static cudnnBackendDescriptor_t make(builder *b, cudnnBackendDescriptorType_t type,
                                     const char *what) {
    if (b->st != CUDNN_STATUS_SUCCESS) return NULL;
    if (b->p->ndesc == MAX_DESCS) {
        b->st = CUDNN_STATUS_NOT_SUPPORTED;
        b->step = "descriptor count";
        return NULL;
    }
    cudnnBackendDescriptor_t d = NULL;
    b->st = b->f->create_desc(type, &d);
    if (b->st != CUDNN_STATUS_SUCCESS) {
        b->step = what;
        return NULL;
    }
    b->p->descs[b->p->ndesc++] = d;
    return d;
}

static void set(builder *b, cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name,
                cudnnBackendAttributeType_t type, int64_t count, const void *value,
                const char *what) {
    if (b->st != CUDNN_STATUS_SUCCESS) return;
    b->st = b->f->set_attr(d, name, type, count, value);
    if (b->st != CUDNN_STATUS_SUCCESS) b->step = what;
}

static void finish(builder *b, cudnnBackendDescriptor_t d, const char *what) {
    if (b->st != CUDNN_STATUS_SUCCESS) return;
    b->st = b->f->finalize(d);
    if (b->st != CUDNN_STATUS_SUCCESS) b->step = what;
}

static cudnnBackendDescriptor_t tensor(builder *b, int64_t uid, cudnnDataType_t type,
                                       const int64_t dims[4], const int64_t strides[4],
                                       bool is_virtual, bool by_value) {
    cudnnBackendDescriptor_t d = make(b, CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor descriptor");
    const int64_t align = 16;
    set(b, d, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type, "tensor type");
    set(b, d, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims, "tensor dimensions");
    set(b, d, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides, "tensor strides");
    set(b, d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid, "tensor id");
    set(b, d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align, "tensor alignment");
    if (is_virtual)
        set(b, d, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual,
            "virtual tensor");
    if (by_value)
        set(b, d, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value,
            "by-value tensor");
    finish(b, d, "finalize tensor");
    return d;
}

/* A descriptor-valued attribute; NULL values are left unset. */
typedef struct desc_attr {
    cudnnBackendAttributeName_t name;
    cudnnBackendDescriptor_t value;
} desc_attr;

/* A finalized descriptor of `type` (an operation) with these attributes. */
static cudnnBackendDescriptor_t operation(builder *b, cudnnBackendDescriptorType_t type,
                                          const char *what, const desc_attr *attrs, int n) {
    cudnnBackendDescriptor_t d = make(b, type, what);
    for (int i = 0; i < n; i++)
        if (attrs[i].value)
            set(b, d, attrs[i].name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &attrs[i].value, what);
    finish(b, d, what);
    return d;
}

/* The operands every graph shares: Q, K (or K^T), V, O, the scale. */
typedef struct operands {
    cudnnBackendDescriptor_t q, k, v, o, scale;
} operands;

static operands io_tensors(builder *b, const attn_shape *sh, int k_transposed) {
    const int64_t S = sh->tokens, H = sh->heads, d = sh->head_dim, D = H * d;
    const cudnnDataType_t io = sh->type == CUDA_R_16BF ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_HALF;
    /* [sequence][head][token][dim] over rows of 3D (qkv) or D (out). */
    const int64_t in_dims[4] = {(int64_t)sh->seqs, H, S, d};
    const int64_t in_strides[4] = {S * 3 * D, d, 3 * D, 1};
    const int64_t kt_dims[4] = {(int64_t)sh->seqs, H, d, S};
    const int64_t kt_strides[4] = {S * 3 * D, d, 1, 3 * D};
    const int64_t out_strides[4] = {S * D, d, D, 1};
    const int64_t one[4] = {1, 1, 1, 1};
    operands t;
    t.q = tensor(b, UID_Q, io, in_dims, in_strides, false, false);
    t.k = k_transposed ? tensor(b, UID_K, io, kt_dims, kt_strides, false, false)
                       : tensor(b, UID_K, io, in_dims, in_strides, false, false);
    t.v = tensor(b, UID_V, io, in_dims, in_strides, false, false);
    t.o = tensor(b, UID_O, io, in_dims, out_strides, false, false);
    t.scale = tensor(b, UID_SCALE, CUDNN_DATA_FLOAT, one, one, false, true);
    return t;
}

/* Graph 1: the fused SDPA operation.  Returns the operation count. */
static int graph_sdpa(builder *b, const attn_shape *sh, cudnnBackendDescriptor_t *ops) {
    operands t = io_tensors(b, sh, 0);
    const desc_attr a[] = {{CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, t.q},
                           {CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, t.k},
                           {CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, t.v},
                           {CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, t.o},
                           {CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, t.scale}};
    ops[0] = operation(b, CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, "SDPA operation", a, 5);
    return 1;
}

static cudnnBackendDescriptor_t pointwise(builder *b, cudnnPointwiseMode_t mode,
                                          cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y2,
                                          cudnnBackendDescriptor_t y) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t pw = make(b, CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise");
    set(b, pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode, "pointwise mode");
    set(b, pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &f32, "pointwise precision");
    finish(b, pw, "finalize pointwise");
    const desc_attr a[] = {{CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw},
                           {CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x},
                           {CUDNN_ATTR_OPERATION_POINTWISE_BDESC, y2},
                           {CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y}};
    return operation(b, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "pointwise operation", a,
                     4);
}

static cudnnBackendDescriptor_t reduction(builder *b, cudnnReduceTensorOp_t what,
                                          cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t rd = make(b, CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction");
    set(b, rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &what,
        "reduction operator");
    set(b, rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32, "reduction type");
    finish(b, rd, "finalize reduction");
    const desc_attr a[] = {{CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd},
                           {CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x},
                           {CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y}};
    return operation(b, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "reduction operation", a,
                     3);
}

static cudnnBackendDescriptor_t matmul(builder *b, cudnnBackendDescriptor_t a,
                                       cudnnBackendDescriptor_t bm, cudnnBackendDescriptor_t c) {
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t mm = make(b, CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul");
    set(b, mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32, "matmul type");
    finish(b, mm, "finalize matmul");
    const desc_attr at[] = {{CUDNN_ATTR_OPERATION_MATMUL_DESC, mm},
                            {CUDNN_ATTR_OPERATION_MATMUL_ADESC, a},
                            {CUDNN_ATTR_OPERATION_MATMUL_BDESC, bm},
                            {CUDNN_ATTR_OPERATION_MATMUL_CDESC, c}};
    return operation(b, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "matmul operation", at, 4);
}

/* Graph 2: the composite graph.  Returns the operation count. */
static int graph_composite(builder *b, const attn_shape *sh, cudnnBackendDescriptor_t *ops) {
    operands t = io_tensors(b, sh, 1);
    const int64_t B = (int64_t)sh->seqs, H = sh->heads, S = sh->tokens;
    const int64_t s_dims[4] = {B, H, S, S}, s_strides[4] = {H * S * S, S * S, S, 1};
    const int64_t r_dims[4] = {B, H, S, 1}, r_strides[4] = {H * S, S, 1, 1};
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    int64_t uid = UID_VIRTUAL;
    cudnnBackendDescriptor_t scores = tensor(b, uid++, f32, s_dims, s_strides, true, false);
    cudnnBackendDescriptor_t scaled = tensor(b, uid++, f32, s_dims, s_strides, true, false);
    cudnnBackendDescriptor_t row_max = tensor(b, uid++, f32, r_dims, r_strides, true, false);
    cudnnBackendDescriptor_t shifted = tensor(b, uid++, f32, s_dims, s_strides, true, false);
    cudnnBackendDescriptor_t e = tensor(b, uid++, f32, s_dims, s_strides, true, false);
    cudnnBackendDescriptor_t row_sum = tensor(b, uid++, f32, r_dims, r_strides, true, false);
    cudnnBackendDescriptor_t p = tensor(b, uid++, f32, s_dims, s_strides, true, false);
    int n = 0;
    ops[n++] = matmul(b, t.q, t.k, scores);
    ops[n++] = pointwise(b, CUDNN_POINTWISE_MUL, scores, t.scale, scaled);
    ops[n++] = reduction(b, CUDNN_REDUCE_TENSOR_MAX, scaled, row_max);
    ops[n++] = pointwise(b, CUDNN_POINTWISE_SUB, scaled, row_max, shifted);
    ops[n++] = pointwise(b, CUDNN_POINTWISE_EXP, shifted, NULL, e);
    ops[n++] = reduction(b, CUDNN_REDUCE_TENSOR_ADD, e, row_sum);
    ops[n++] = pointwise(b, CUDNN_POINTWISE_DIV, e, row_sum, p);
    ops[n++] = matmul(b, p, t.v, t.o);
    return n;
}

/* The operation graph, the heuristic's engine configurations, and the first
 * of them that makes an execution plan. */
static void build_plan(builder *b, cudnnHandle_t handle, const cudnnBackendDescriptor_t *ops,
                       int nops) {
    const cudnnBackendAttributeType_t bd = CUDNN_TYPE_BACKEND_DESCRIPTOR;
    cudnnBackendDescriptor_t graph = make(b, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR,
                                          "operation graph");
    set(b, graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle, "graph handle");
    set(b, graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, bd, nops, ops, "graph operations");
    finish(b, graph, "finalize operation graph");
    cudnnBackendDescriptor_t heur = make(b, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "heuristics");
    const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    set(b, heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, bd, 1, &graph, "heuristics graph");
    set(b, heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode, "heuristics mode");
    finish(b, heur, "finalize heuristics");
    cudnnBackendDescriptor_t cfgs[HEUR_RESULTS];
    for (int i = 0; i < HEUR_RESULTS; i++)
        cfgs[i] = make(b, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine configuration");
    int64_t count = 0;
    if (b->st == CUDNN_STATUS_SUCCESS) {
        b->st = b->f->get_attr(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, bd, HEUR_RESULTS, &count, cfgs);
        if (b->st != CUDNN_STATUS_SUCCESS) b->step = "heuristics results";
    }
    if (b->st != CUDNN_STATUS_SUCCESS) return;
    if (count > HEUR_RESULTS) count = HEUR_RESULTS;
    b->st = CUDNN_STATUS_NOT_SUPPORTED;
    b->step = "no engine for the graph";
    for (int64_t i = 0; i < count; i++) {
        cudnnBackendDescriptor_t plan = NULL;
        if (b->f->create_desc(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan) !=
            CUDNN_STATUS_SUCCESS)
            continue;
        cudnnStatus_t st = b->f->set_attr(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
                                          CUDNN_TYPE_HANDLE, 1, &handle);
        if (st == CUDNN_STATUS_SUCCESS)
            st = b->f->set_attr(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, bd, 1, &cfgs[i]);
        if (st == CUDNN_STATUS_SUCCESS) st = b->f->finalize(plan);
        int64_t ws = 0, got = 0;
        if (st == CUDNN_STATUS_SUCCESS)
            st = b->f->get_attr(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64,
                                1, &got, &ws);
        if (st != CUDNN_STATUS_SUCCESS || ws < 0) {
            b->st = st != CUDNN_STATUS_SUCCESS ? st : CUDNN_STATUS_NOT_SUPPORTED;
            b->step = "finalize execution plan";
            b->f->destroy_desc(plan);
            continue;
        }
        b->p->plan = plan;
        b->p->workspace = ws;
        b->st = CUDNN_STATUS_SUCCESS;
        return;
    }
}

/* Append a graph's failure, with cuDNN's own account of it, to note. */
static void note_failure(const cudnn_attn *c, char *note, size_t size, const char *graph,
                         const builder *b) {
    char detail[160] = "";
    if (c->f.last_error) c->f.last_error(detail, sizeof detail);
    size_t used = strlen(note);
    snprintf(note + used, size - used, "%s%s: %s at %s%s%s", used ? "; " : "", graph,
             c->f.error_string(b->st), b->step ? b->step : "?", detail[0] ? ": " : "", detail);
}

static attn_plan *find_plan(cudnn_attn *c, const attn_shape *sh) {
    for (int i = 0; i < PLAN_CACHE; i++)
        if (c->plans[i].used && attn_shape_equal(&c->plans[i].key, sh)) return &c->plans[i];
    return NULL;
}

int cudnn_attn_supports(const attn_shape *sh) {
    return (sh->type == CUDA_R_16BF || sh->type == CUDA_R_16F) && sh->head_dim % 8 == 0 &&
           sh->head_dim <= 128 && sh->tokens > 0 && sh->seqs > 0 && sh->heads > 0;
}

int cudnn_attn_prepare(cudnn_attn *c, const attn_shape *sh, size_t room) {
    if (!c->available || !cudnn_attn_supports(sh)) return 0;
    if (find_plan(c, sh)) return 1;
    for (int i = 0; i < c->nrefused; i++)
        if (attn_shape_equal(&c->refused[i], sh)) return 0;

    attn_plan *slot = NULL;
    for (int i = 0; i < PLAN_CACHE && !slot; i++)
        if (!c->plans[i].used) slot = &c->plans[i];
    if (!slot) {
        slot = &c->plans[c->next_evict];
        c->next_evict = (c->next_evict + 1) % PLAN_CACHE;
        plan_free(&c->f, slot);
        c->generation++;
    }
    char note[sizeof c->note] = ""; /* why graphs failed, kept when one did */
    static const struct {
        int graph;
        const char *name;
        int (*build)(builder *, const attn_shape *, cudnnBackendDescriptor_t *);
    } graphs[] = {{CUDNN_GRAPH_SDPA, "SDPA graph", graph_sdpa},
                  {CUDNN_GRAPH_COMPOSITE, "composite graph", graph_composite}};
    for (size_t g = 0; g < sizeof graphs / sizeof graphs[0]; g++) {
        if (graphs[g].graph == CUDNN_GRAPH_SDPA && c->version < SDPA_OP_VERSION) continue;
        memset(slot, 0, sizeof *slot);
        if (c->f.last_error) { /* drop an older message, so that a failure below reports its own */
            char stale[8];
            c->f.last_error(stale, sizeof stale);
        }
        builder b = {&c->f, slot, CUDNN_STATUS_SUCCESS, NULL};
        cudnnBackendDescriptor_t ops[8] = {NULL};
        int nops = graphs[g].build(&b, sh, ops);
        build_plan(&b, c->handle, ops, nops);
        if (b.st == CUDNN_STATUS_SUCCESS) {
            slot->used = 1;
            slot->key = *sh;
            slot->graph = graphs[g].graph;
            break;
        }
        note_failure(c, note, sizeof note, graphs[g].name, &b);
        plan_free(&c->f, slot);
    }
    if (note[0]) memcpy(c->note, note, sizeof note);
    if (!slot->used) {
        if (c->nrefused < PLAN_CACHE) c->refused[c->nrefused++] = *sh;
        return 0;
    }
    c->plans_built++;
    c->last_graph = slot->graph;

    /* The workspace only grows, within the room the caller's budget leaves. */
    size_t need = (size_t)slot->workspace;
    if (need > c->workspace_bytes) {
        if (need - c->workspace_bytes > room) {
            snprintf(c->note, sizeof c->note,
                     "cuDNN workspace of %zu bytes would pass the device budget", need);
            plan_free(&c->f, slot);
            return 0;
        }
        /* The new one first: the plans made so far keep the old one if this fails. */
        void *fresh = NULL;
        if (cudaMalloc(&fresh, need) != cudaSuccess) {
            cudaGetLastError(); /* not an error of the request: our kernels need no workspace */
            snprintf(c->note, sizeof c->note, "cuDNN workspace of %zu bytes: out of memory", need);
            plan_free(&c->f, slot);
            return 0;
        }
        if (c->workspace) cudaFree(c->workspace);
        c->workspace = fresh;
        c->workspace_bytes = need;
        c->generation++;
    }
    return 1;
}

lego_status cudnn_attn_run(cudnn_attn *c, const attn_shape *sh, const void *qkv, void *out,
                           lego_err *err) {
    attn_plan *p = c ? find_plan(c, sh) : NULL;
    if (!p) return lego_fail(err, LEGO_ERR_BACKEND, "internal: cuDNN attention without a plan");
    const size_t D = (size_t)sh->heads * (size_t)sh->head_dim, bytes = 2;
    const char *base = (const char *)qkv;
    float scale = 1.0f / sqrtf((float)sh->head_dim);
    int64_t uids[5] = {UID_Q, UID_K, UID_V, UID_O, UID_SCALE};
    void *ptrs[5] = {(void *)base, (void *)(base + D * bytes), (void *)(base + 2 * D * bytes), out,
                     &scale};
    void *ws = c->workspace;
    cudnnBackendDescriptor_t vp = NULL;
    cudnnStatus_t st = c->f.create_desc(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &vp);
    if (st == CUDNN_STATUS_SUCCESS)
        st = c->f.set_attr(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 5, uids);
    if (st == CUDNN_STATUS_SUCCESS)
        st = c->f.set_attr(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 5, ptrs);
    if (st == CUDNN_STATUS_SUCCESS)
        st = c->f.set_attr(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
    if (st == CUDNN_STATUS_SUCCESS) st = c->f.finalize(vp);
    if (st == CUDNN_STATUS_SUCCESS) st = c->f.execute(c->handle, p->plan, vp);
    if (vp) c->f.destroy_desc(vp);
    if (st != CUDNN_STATUS_SUCCESS) {
        char detail[160] = "";
        if (c->f.last_error) c->f.last_error(detail, sizeof detail);
        snprintf(c->note, sizeof c->note, "cuDNN %ld: execution failed: %s%s%s", c->version,
                 c->f.error_string(st), detail[0] ? ": " : "", detail);
        return lego_fail(err, LEGO_ERR_BACKEND, "%s", c->note);
    }
    c->runs++;
    return LEGO_OK;
}
