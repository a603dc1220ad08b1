/*
 * emu.cpp -- runs liblego's CUDA backend on the host, for machines and CI
 * without a GPU (make cuda-emu-check; docs/cuda.md).
 *
 * Launches: the blocks of a launch run one after the other; the threads of
 * a block are user-level contexts on their own stacks, and the scheduler
 * switches between them only at __shfl_sync, __syncwarp and
 * __syncthreads.  A warp's shuffle completes when every live lane of the
 * warp has reached it, a block barrier when every live thread has; a
 * shuffle with exited lanes, a warp split between a shuffle and a block
 * barrier, or a deadlock aborts with a message (they are bugs on a GPU).
 * LEGO_EMU_SCHEDULE picks the order threads take turns in (see
 * schedule_mode): the other orders expose missing barriers.  cp.async
 * writes shared memory only at the wait that completes it.
 * Shared and device memory come from the heap, filled with NaN bytes, so
 * that ASan sees overruns and results show reads of unwritten memory.
 *
 * cuBLASLt: descriptors are checked for consistency (op(A) is m x k, op(B)
 * k x n, D m x n) and the matmul is a double-accumulated reference with the
 * bias and GELU epilogues and training's GELU_AUX_BIAS, DGELU and BGRADB.  The runtime is synchronous: streams are
 * nothing, copies are memcpy with range checks against the allocations.
 *
 * x86-64 System V only (the context switch is a few lines of assembly).
 */
#include <execinfo.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <atomic>
#include <map>
#include <mutex>
#include <vector>

/* LEGO_EMU_COUNT: at exit, how many kernels and GEMMs the process launched
 * (what a GPU would pay launch overhead for, e.g. per training step). */
static std::atomic<long> emu_launches{0}, emu_gemms{0};

static void emu_report_counts(void) {
    if (getenv("LEGO_EMU_COUNT"))
        fprintf(stderr, "emu: %ld kernel launches, %ld GEMMs\n", emu_launches.load(),
                emu_gemms.load());
}

void emu_count_launch(void) {
    if (emu_launches++ == 0) atexit(emu_report_counts);
}

static void emu_count_gemm(void) { emu_gemms++; }

#include "cublasLt.h"
#include "emu_internal.h"

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

dim3 threadIdx, blockIdx, blockDim, gridDim;
void *emu_smem;

/* As in CUDA, the current device and the last error belong to the host
 * thread.  Everything shared (allocations, the kernel threads, the
 * globals above) is used under api_mutex: calls from several host threads
 * run one at a time, each whole (a launch runs every block before another
 * call starts), which is one legal order of concurrent GPUs. */
static thread_local cudaError_t last_error = cudaSuccess;
static thread_local int current_device;
struct allocation {
    size_t bytes;
    int device;
};
static std::map<const char *, allocation> allocations; /* device memory by base */
static std::map<const void *, int> max_smem;           /* cudaFuncSetAttribute */
static std::recursive_mutex api_mutex;
#define EMU_API std::lock_guard<std::recursive_mutex> api_guard_(api_mutex)

std::unique_lock<std::recursive_mutex> emu_api_lock(void) {
    return std::unique_lock<std::recursive_mutex>(api_mutex);
}

[[noreturn]] void emu_abort(const char *what) {
    fprintf(stderr, "liblego CUDA emulation: %s\n", what);
    void *frames[48];
    backtrace_symbols_fd(frames, backtrace(frames, 48), 2); /* where the library went wrong */
    abort();
}

/* ---- user-level threads ------------------------------------------------------ */

/* Save the callee-saved registers and the stack pointer in *save, switch to
 * the stack `to` and restore the registers found there. */
extern "C" void emu_switch(void **save, void *to);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

enum { RUNNABLE, AT_WARP, AT_BLOCK, EXITED };

struct emu_thread {
    void *sp;
    int state;
    int phase; /* which half of the warp's shuffle buffer is next */
    char *stack;
};

static const size_t STACK_BYTES = 256 * 1024;
/* The contexts, with their stacks freed at exit (for leak checkers). */
static struct thread_pool {
    std::vector<emu_thread> all;
    ~thread_pool() {
        for (emu_thread &t : all) free(t.stack);
    }
} pool;
static std::vector<emu_thread> &threads = pool.all;
static void *scheduler_sp;
static int current;
static const std::function<void()> *kernel_body;
static float shuffle_buf[32][2][32]; /* [warp][phase][lane] */

/* From an emulated thread back to the scheduler. */
static void yield_to_scheduler() {
#if EMU_ASAN
    void *fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, nullptr, 0);
#endif
    emu_switch(&threads[current].sp, scheduler_sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

static void thread_entry() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    (*kernel_body)();
    threads[current].state = EXITED;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, nullptr, 0);
#endif
    emu_switch(&threads[current].sp, scheduler_sp);
    emu_abort("an exited thread was resumed");
}

/* cp.async copies not yet complete, per thread: 16 bytes read from the
 * source at issue, written to shared memory by the wait that completes
 * their group (the commit count when issued). */
struct pending_copy {
    void *dst;
    unsigned char data[16];
    int group;
};
static std::vector<pending_copy> copies_in_flight[1024];
static int copy_groups[1024]; /* groups committed so far, per thread */

void emu_cp_async16(void *dst, const void *src, bool valid) {
    pending_copy c;
    c.dst = dst;
    c.group = copy_groups[current];
    if (valid) memcpy(c.data, src, 16);
    else memset(c.data, 0, 16);
    copies_in_flight[current].push_back(c);
}

void emu_cp_async_commit(void) { copy_groups[current]++; }

void emu_cp_async_wait(int pending) {
    std::vector<pending_copy> &q = copies_in_flight[current];
    size_t kept = 0;
    for (size_t i = 0; i < q.size(); i++) {
        if (q[i].group < copy_groups[current] - pending) memcpy(q[i].dst, q[i].data, 16);
        else q[kept++] = q[i];
    }
    q.resize(kept);
}

float __shfl_sync(unsigned, float v, int src_lane) {
    int lane = current % 32, warp = current / 32, phase = threads[current].phase;
    shuffle_buf[warp][phase][lane] = v;
    threads[current].state = AT_WARP;
    yield_to_scheduler();
    /* Every lane has written this phase's slot; the next shuffle writes the
     * other half, and none can get two ahead (it would wait here). */
    threads[current].phase ^= 1;
    return shuffle_buf[warp][phase][src_lane & 31];
}

static uint32_t gather_buf[32][2][32][8]; /* [warp][phase][lane][word] */

void emu_warp_gather(const uint32_t *mine, int words, uint32_t *all) {
    if (words < 1 || words > 8) emu_abort("emu_warp_gather: 1 to 8 words");
    int lane = current % 32, warp = current / 32, phase = threads[current].phase;
    memcpy(gather_buf[warp][phase][lane], mine, (size_t)words * 4);
    threads[current].state = AT_WARP;
    yield_to_scheduler();
    threads[current].phase ^= 1; /* as for shuffles */
    for (int l = 0; l < 32; l++) memcpy(all + l * words, gather_buf[warp][phase][l], (size_t)words * 4);
}

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    return __shfl_sync(mask, v, (current % 32) ^ lane_mask);
}

void __syncwarp(unsigned) {
    threads[current].state = AT_WARP;
    yield_to_scheduler();
}

void __syncthreads(void) {
    threads[current].state = AT_BLOCK;
    yield_to_scheduler();
}

/* Release warp w's collective if every lane has reached it; 1 if so. */
static int release_warp(int w) {
    int at_warp = 0, exited = 0, blocked = 0;
    for (int l = 0; l < 32; l++) {
        int s = threads[w * 32 + l].state;
        at_warp += s == AT_WARP;
        exited += s == EXITED;
        blocked += s == AT_BLOCK;
    }
    if (at_warp && blocked) emu_abort("a warp is split between a shuffle and __syncthreads");
    if (!at_warp || at_warp + exited < 32) return 0;
    if (exited) emu_abort("a shuffle or __syncwarp with exited lanes in the warp");
    for (int l = 0; l < 32; l++) threads[w * 32 + l].state = RUNNABLE;
    return 1;
}

/* Release whatever barrier is complete; 0 if none is (a deadlock). */
static int release_barriers(int n) {
    int live = 0, at_block = 0, released = 0;
    for (int t = 0; t < n; t++) {
        live += threads[t].state != EXITED;
        at_block += threads[t].state == AT_BLOCK;
    }
    for (int w = 0; w < n / 32; w++) released |= release_warp(w);
    if (!released && live > 0 && at_block == live) {
        for (int t = 0; t < n; t++)
            if (threads[t].state == AT_BLOCK) threads[t].state = RUNNABLE;
        released = 1;
    }
    return released;
}

/* LEGO_EMU_SCHEDULE: how the threads of a block (and the blocks of a
 * launch) take turns.  "forward" (the default) runs every runnable thread
 * by index until it waits, then completes the barriers that can complete:
 * so every thread has written what it writes before a barrier before any
 * thread reads after it, and a missing __syncthreads or __syncwarp goes
 * unseen.  "reverse" and "shuffle" instead run one thread at a time, the
 * highest-numbered runnable one or a random one (LEGO_EMU_SEED), and let a
 * warp go on as soon as its own last lane reaches a warp collective; the
 * blocks of a launch run last to first.  Each is a legal GPU interleaving,
 * so a result that changes with the schedule is a race: a warp reading
 * shared memory other warps have not written yet, lanes without a
 * __syncwarp, a block reading what another block of the launch writes. */
enum { SCHED_FORWARD, SCHED_REVERSE, SCHED_SHUFFLE };

static int schedule_mode() {
    static int mode = -1;
    if (mode < 0) {
        const char *e = getenv("LEGO_EMU_SCHEDULE");
        mode = SCHED_FORWARD;
        if (e && !strcmp(e, "reverse")) mode = SCHED_REVERSE;
        else if (e && !strcmp(e, "shuffle")) mode = SCHED_SHUFFLE;
        else if (e && *e && strcmp(e, "forward")) emu_abort("LEGO_EMU_SCHEDULE: forward, reverse or shuffle");
    }
    return mode;
}

/* xorshift64*, seeded from LEGO_EMU_SEED: reproducible shuffles. */
static uint64_t schedule_random() {
    static uint64_t state = 0;
    if (!state) {
        const char *e = getenv("LEGO_EMU_SEED");
        state = (e ? strtoull(e, nullptr, 10) : 1) * 0x9E3779B97F4A7C15ull | 1;
    }
    state ^= state >> 12, state ^= state << 25, state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
}

/* The next thread to run under "reverse" or "shuffle"; -1 if none can. */
static int pick_thread(int n) {
    int runnable[1024], count = 0;
    for (int t = n - 1; t >= 0; t--)
        if (threads[t].state == RUNNABLE) {
            if (schedule_mode() == SCHED_REVERSE) return t;
            runnable[count++] = t;
        }
    return count ? runnable[schedule_random() % (uint64_t)count] : -1;
}

/* Run thread t until it waits or exits. */
static void run_thread(int t) {
    current = t;
    threadIdx = {(unsigned)t, 0, 0};
#if EMU_ASAN
    void *fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, threads[t].stack, STACK_BYTES);
#endif
    emu_switch(&scheduler_sp, threads[t].sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

static int live_threads(int n) {
    int live = 0;
    for (int t = 0; t < n; t++) live += threads[t].state != EXITED;
    return live;
}

cudaError_t emu_set_max_smem(const void *kernel, int bytes) {
    EMU_API;
    if (bytes < 0 || bytes > 227 * 1024) return cudaErrorInvalidValue;
    max_smem[kernel] = bytes;
    return cudaSuccess;
}

void emu_run(const std::function<void()> &body, size_t grid, size_t block, size_t smem,
             const void *kernel) {
    if (block == 0 || block > 1024 || block % 32 != 0 || grid == 0 || grid > 2147483647u ||
        smem > 227 * 1024) {
        last_error = cudaErrorInvalidValue; /* block % 32: this emulator's limitation */
        return;
    }
    if (smem > 48 * 1024) {
        auto it = max_smem.find(kernel);
        if (it == max_smem.end() || (size_t)it->second < smem) {
            last_error = cudaErrorInvalidValue; /* no opt-in: the launch fails on a GPU */
            return;
        }
    }
    kernel_body = &body;
    int n = (int)block;
    while (threads.size() < block) {
        emu_thread t = {nullptr, EXITED, 0, (char *)malloc(STACK_BYTES)};
        if (!t.stack) emu_abort("out of memory for thread stacks");
        threads.push_back(t);
    }
    blockDim = {(unsigned)block, 1, 1};
    gridDim = {(unsigned)grid, 1, 1};
    for (size_t i = 0; i < grid; i++) {
        /* Blocks run one after the other: reversed, a block that reads what
         * a later one writes sees a different value. */
        size_t b = schedule_mode() == SCHED_FORWARD ? i : grid - 1 - i;
        blockIdx = {(unsigned)b, 0, 0};
        emu_smem = malloc(smem ? smem : 1);
        if (!emu_smem) emu_abort("out of memory for shared memory");
        memset(emu_smem, 0xff, smem);
        for (int t = 0; t < n; t++) {
            /* A fresh stack whose first "return" enters thread_entry with
             * the alignment of a call. */
            uintptr_t *sp = (uintptr_t *)(((uintptr_t)threads[t].stack + STACK_BYTES) & ~(uintptr_t)15);
            *--sp = 0;
            *--sp = (uintptr_t)thread_entry;
            for (int r = 0; r < 6; r++) *--sp = 0;
            threads[t].sp = sp;
            threads[t].state = RUNNABLE;
            threads[t].phase = 0;
            copies_in_flight[t].clear();
            copy_groups[t] = 0;
        }
        if (schedule_mode() == SCHED_FORWARD) {
            for (;;) {
                for (int t = 0; t < n; t++)
                    if (threads[t].state == RUNNABLE) run_thread(t);
                if (!live_threads(n)) break;
                if (!release_barriers(n)) emu_abort("deadlock: no barrier can complete");
            }
        } else {
            for (;;) {
                int t = pick_thread(n);
                if (t >= 0) {
                    /* A warp whose last lane arrived goes on at once. */
                    run_thread(t);
                    if (threads[t].state == AT_WARP) release_warp(t / 32);
                    else release_barriers(n);
                    continue;
                }
                if (!live_threads(n)) break;
                if (!release_barriers(n)) emu_abort("deadlock: no barrier can complete");
            }
        }
        free(emu_smem);
        emu_smem = nullptr;
    }
}

/* ---- injected failures ------------------------------------------------------------ */


/* test_cuda's fault sweep: emu_fail_nth(kind, n) makes the n-th call of
 * that kind from now on fail, once, as a GPU could (an allocation that
 * finds no memory, a launch or copy that reports an error).  Kinds:
 * EMU_FAIL_SETUP, the calls that allocate or create something or change a
 * stream's state (memory, streams, events, graphs, cuBLASLt objects and
 * heuristics), copies and synchronisations; EMU_FAIL_WORK, kernel launches
 * (seen at cudaGetLastError) and matmuls.  emu_failable_calls(kind) counts
 * the calls of a kind since the last emu_fail_nth. */
static std::atomic<long> fail_countdown[2], failable[2];

extern "C" void emu_fail_nth(int kind, long n) {
    for (int k = 0; k < 2; k++) {
        fail_countdown[k] = k == kind ? n : 0;
        failable[k] = 0;
    }
}

extern "C" long emu_failable_calls(int kind) { return failable[kind]; }

bool emu_inject(int kind) {
    failable[kind]++;
    long left = fail_countdown[kind].load();
    while (left > 0 && !fail_countdown[kind].compare_exchange_weak(left, left - 1)) {
    }
    return left == 1;
}

static bool inject_setup() { return emu_inject(EMU_FAIL_SETUP); }

/* ---- runtime ------------------------------------------------------------------ */

const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : "error (emulated runtime)";
}

const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorUnknown: return "cudaErrorUnknown";
    }
    return "cudaError";
}

static int device_count() {
    const char *e = getenv("LEGO_EMU_DEVICES");
    return e ? atoi(e) : 1;
}

cudaError_t cudaGetDeviceCount(int *count) {
    *count = device_count();
    return *count > 0 ? cudaSuccess : cudaErrorNoDevice;
}

cudaError_t cudaGetDevice(int *device) {
    *device = current_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    if (device < 0 || device >= device_count()) return cudaErrorInvalidValue;
    current_device = device;
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    if (e == cudaSuccess && emu_inject(EMU_FAIL_WORK)) e = cudaErrorUnknown;
    return e;
}

cudaError_t emu_malloc(void **p, size_t bytes) {
    EMU_API;
    *p = nullptr;
    if (inject_setup()) return cudaErrorMemoryAllocation;
    *p = aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (!*p) return cudaErrorMemoryAllocation;
    memset(*p, 0xff, bytes);
    allocations[(const char *)*p] = allocation{bytes, current_device};
    return cudaSuccess;
}

cudaError_t cudaFree(void *p) {
    EMU_API;
    if (!p) return cudaSuccess;
    if (!allocations.erase((const char *)p)) emu_abort("cudaFree of memory cudaMalloc did not give");
    free(p);
    return cudaSuccess;
}

/* Abort unless [p, p + bytes) lies inside one device allocation. */
void check_device_range(const void *p, size_t bytes, const char *what) {
    EMU_API;
    auto it = allocations.upper_bound((const char *)p);
    if (it == allocations.begin()) {
        fprintf(stderr, "%s: %p is not device memory\n", what, p);
        emu_abort("bad device pointer");
    }
    --it;
    if ((const char *)p + bytes > it->first + it->second.bytes) {
        fprintf(stderr, "%s: %zu bytes at %p run past their allocation\n", what, bytes, p);
        emu_abort("device range overrun");
    }
}

/* Abort unless p lies in memory of the current device: a kernel, GEMM or
 * cuDNN graph of device d reads and writes only d's memory. */
void check_current_device(const void *p, const char *what) {
    EMU_API;
    auto it = allocations.upper_bound((const char *)p);
    if (it == allocations.begin()) return; /* check_device_range reports it */
    --it;
    if (it->second.device != current_device) {
        fprintf(stderr, "%s: %p is memory of device %d, device %d is current\n", what, p,
                it->second.device, current_device);
        emu_abort("work on another device's memory");
    }
}

/* The copy itself, as enqueued work runs it. */
static void copy_now(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    EMU_API;
    if (kind == cudaMemcpyHostToDevice) check_device_range(dst, bytes, "cudaMemcpy destination");
    else check_device_range(src, bytes, "cudaMemcpy source");
    memcpy(dst, src, bytes);
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (inject_setup()) return cudaErrorUnknown;
    copy_now(dst, src, bytes, kind);
    return cudaSuccess;
}

struct emu_graph {
    std::vector<std::function<void()>> work;
};

struct emu_stream {
    emu_graph *capture = nullptr; /* recording into this graph */
    int device = 0;               /* the device current when it was made */
};

void emu_enqueue(cudaStream_t stream, const std::function<void()> &work) {
    EMU_API;
    if (stream && stream->capture) stream->capture->work.push_back(work);
    else work();
}

void emu_check_stream_device(cudaStream_t stream, const char *what) {
    if (stream && stream->device != current_device) {
        fprintf(stderr, "%s: a stream of device %d while device %d is current\n", what,
                stream->device, current_device);
        emu_abort("work enqueued on another device's stream");
    }
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
    if (inject_setup()) return cudaErrorUnknown;
    /* The range checks happen when the copy runs. */
    emu_enqueue(stream, [=] { copy_now(dst, src, bytes, kind); });
    return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status) {
    *status = stream && stream->capture ? cudaStreamCaptureStatusActive
                                        : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}

struct emu_event {
    double ms;
};

cudaError_t cudaEventCreate(cudaEvent_t *event) {
    if (inject_setup()) return cudaErrorMemoryAllocation;
    *event = new emu_event{0.0};
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
    delete event;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    emu_enqueue(stream, [=] {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        event->ms = (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
    });
    return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t stop) {
    *ms = (float)(stop->ms - start->ms);
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
    if (!stream || stream->capture) return cudaErrorInvalidValue;
    if (inject_setup()) return cudaErrorUnknown;
    stream->capture = new emu_graph();
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph) {
    if (!stream || !stream->capture) return cudaErrorInvalidValue;
    *graph = stream->capture;
    stream->capture = nullptr;
    if (inject_setup()) { /* the capture ends all the same, without a graph */
        delete *graph;
        *graph = nullptr;
        return cudaErrorUnknown;
    }
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long) {
    *exec = nullptr;
    if (inject_setup()) return cudaErrorMemoryAllocation;
    *exec = new emu_graph(*graph);
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
    EMU_API;
    if (stream && stream->capture) return cudaErrorStreamCaptureUnsupported;
    if (emu_inject(EMU_FAIL_WORK)) return cudaErrorUnknown;
    emu_check_stream_device(stream, "cudaGraphLaunch");
    for (auto &w : exec->work) w();
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    delete graph;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    delete exec;
    return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned) {
    *stream = nullptr;
    if (inject_setup()) return cudaErrorMemoryAllocation;
    *stream = new emu_stream();
    (*stream)->device = current_device;
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    if (stream) delete stream->capture;
    delete stream;
    return cudaSuccess;
}

/* As on a GPU, a capturing stream cannot be waited for. */
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    if (stream && stream->capture) return cudaErrorStreamCaptureUnsupported;
    /* An error of earlier work, reported here. */
    return inject_setup() ? cudaErrorUnknown : cudaSuccess;
}

/* ---- cuBLASLt ----------------------------------------------------------------- */

struct emu_lt {
    int unused;
};
struct emu_desc {
    int32_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
    uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr; /* BGRADB: the gradient written */
    const void *aux = nullptr;  /* GELU_AUX_BIAS: written; DGELU: read */
    int64_t aux_ld = 0;
};
struct emu_layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch;
    int64_t stride; /* elements between the matrices of a strided batch */
};

static size_t type_bytes(int type) { return type == CUDA_R_32F ? 4 : 2; }

/* Element i of a matrix of `type` as a double, and back. */
double load_elem(const void *p, int type, uint64_t i) {
    if (type == CUDA_R_32F) return ((const float *)p)[i];
    if (type == CUDA_R_16BF) return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return __half2float(((const __half *)p)[i]);
}

void store_elem(void *p, int type, uint64_t i, double v) {
    if (type == CUDA_R_32F) ((float *)p)[i] = (float)v;
    else if (type == CUDA_R_16BF) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn((float)v);
    else ((__half *)p)[i] = __float2half_rn((float)v);
}
struct emu_pref {
    uint64_t workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256}; /* A, B, C, D: what pointers promise */
};

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    *h = nullptr;
    if (inject_setup()) return CUBLAS_STATUS_ALLOC_FAILED;
    *h = new emu_lt();
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasLtGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "success" : "failure (emulated cuBLASLt)";
}

const char *cublasLtGetStatusName(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_ERROR";
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
    if ((type != CUDA_R_32F && type != CUDA_R_16BF && type != CUDA_R_16F) || rows == 0 ||
        cols == 0 || ld < (int64_t)rows)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (inject_setup()) return CUBLAS_STATUS_ALLOC_FAILED;
    *l = new emu_layout{type, rows, cols, ld, 1, 0};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l,
                                                cublasLtMatrixLayoutAttribute_t attr,
                                                const void *buf, size_t bytes) {
    if (attr == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT && bytes == sizeof l->batch) {
        int32_t v;
        memcpy(&v, buf, bytes);
        if (v < 1) return CUBLAS_STATUS_INVALID_VALUE;
        l->batch = v;
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET && bytes == sizeof l->stride) {
        memcpy(&l->stride, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
    if (compute != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
    if (inject_setup()) return CUBLAS_STATUS_ALLOC_FAILED;
    *d = new emu_desc();
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                              cublasLtMatmulDescAttributes_t attr, const void *buf,
                                              size_t bytes) {
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
        if (bytes != sizeof d->transa) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->transa, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_TRANSB:
        if (bytes != sizeof d->transb) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->transb, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
        if (bytes != sizeof d->epilogue) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->epilogue, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
        if (bytes != sizeof d->bias) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->bias, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER:
        if (bytes != sizeof d->aux) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->aux, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD:
        if (bytes != sizeof d->aux_ld) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->aux_ld, buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    if (inject_setup()) return CUBLAS_STATUS_ALLOC_FAILED;
    *p = new emu_pref();
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void *buf, size_t bytes) {
    if (attr >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES &&
        attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES && bytes == sizeof(uint32_t)) {
        memcpy(&p->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, bytes);
        return CUBLAS_STATUS_SUCCESS;
    }
    if (attr != CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES || bytes != sizeof p->workspace)
        return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(&p->workspace, buf, bytes);
    return CUBLAS_STATUS_SUCCESS;
}

static bool consistent(const emu_desc *d, const emu_layout *a, const emu_layout *b,
                       const emu_layout *dl) {
    /* A and B of one type; D fp32 or that type (what the backend uses). */
    if (a->type != b->type || (dl->type != CUDA_R_32F && dl->type != a->type)) return false;
    uint64_t am = d->transa ? a->cols : a->rows, ak = d->transa ? a->rows : a->cols;
    uint64_t bk = d->transb ? b->cols : b->rows, bn = d->transb ? b->rows : b->cols;
    return am == dl->rows && bn == dl->cols && ak == bk && a->batch == b->batch &&
           a->batch == dl->batch;
}

static bool has_bias(uint32_t e) {
    return e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_BIAS ||
           e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
}

static bool has_aux(uint32_t e) {
    return e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || e == CUBLASLT_EPILOGUE_DGELU;
}

static double gelu_tanh(double v) {
    return 0.5 * v * (1 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
}

static double gelu_tanh_grad(double v) {
    double t = tanh(0.7978845608028654 * (v + 0.044715 * v * v * v));
    return 0.5 * (1 + t) +
           0.5 * v * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * v * v);
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t d,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t *results,
                                              int *returned) {
    *returned = 0;
    if (requested < 1 || !consistent(d, a, b, dl) || c->rows != dl->rows || c->cols != dl->cols)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (inject_setup()) return CUBLAS_STATUS_ALLOC_FAILED;
    bool training = has_aux(d->epilogue) || d->epilogue == CUBLASLT_EPILOGUE_BGRADB;
    if ((getenv("LEGO_EMU_NO_GELU_EPILOGUE") && d->epilogue == CUBLASLT_EPILOGUE_GELU_BIAS) ||
        (getenv("LEGO_EMU_NO_BIAS_EPILOGUE") && d->epilogue != CUBLASLT_EPILOGUE_DEFAULT) ||
        (getenv("LEGO_EMU_NO_TRAIN_EPILOGUES") && training))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    /* The heuristic reads the bias pointer's alignment: 256 by default;
     * likewise the aux pointer's, whose leading dimension must be a
     * multiple of 8 and cover D's rows. */
    bool bias_used = has_bias(d->epilogue) || d->epilogue == CUBLASLT_EPILOGUE_BGRADB;
    if (bias_used && (!d->bias || (uintptr_t)d->bias % 256 != 0))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (has_aux(d->epilogue) && (!d->aux || (uintptr_t)d->aux % 256 != 0 || d->aux_ld % 8 ||
                                 d->aux_ld < (int64_t)dl->rows || dl->batch > 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    /* The bias gradient has D's type (fp32 here: a weight gradient). */
    if (d->epilogue == CUBLASLT_EPILOGUE_BGRADB && (dl->type != CUDA_R_32F || dl->batch > 1))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    /* Two candidates, so that the backend's tuning has a choice to make. */
    int count = requested < 2 ? requested : 2;
    for (int i = 0; i < count; i++) {
        memset(&results[i], 0, sizeof results[i]);
        results[i].algo.data[0] = d->epilogue;
        results[i].algo.data[1] = (uint64_t)i;
        /* The alignments the algorithm relies on: what the preference
         * promised (256 unless told otherwise), as on a GPU. */
        for (int k = 0; k < 4; k++) results[i].algo.data[2 + k] = pref->align[k];
        results[i].state = CUBLAS_STATUS_SUCCESS;
    }
    *returned = count;
    return CUBLAS_STATUS_SUCCESS;
}

static void matmul_now(const emu_desc *d, double alf, const void *a, const emu_layout *al,
                       const void *b, const emu_layout *bl, double bet, const void *c,
                       const emu_layout *cl, void *dst, const emu_layout *dl, void *workspace,
                       size_t workspace_bytes);

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t d, const void *alpha,
                              const void *a, cublasLtMatrixLayout_t al, const void *b,
                              cublasLtMatrixLayout_t bl, const void *beta, const void *c,
                              cublasLtMatrixLayout_t cl, void *dst, cublasLtMatrixLayout_t dl,
                              const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
    emu_count_gemm();
    if (!consistent(d, al, bl, dl) || !algo || algo->data[0] != d->epilogue)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (emu_inject(EMU_FAIL_WORK)) return CUBLAS_STATUS_EXECUTION_FAILED;
    /* Operands (and every matrix of a batch) aligned as the algorithm was
     * chosen for. */
    const void *ptrs[4] = {a, b, c, dst};
    const emu_layout *lays[4] = {al, bl, cl, dl};
    for (int k = 0; k < 4; k++) {
        uint64_t need = algo->data[2 + k] ? algo->data[2 + k] : 256;
        uint64_t stride_bytes = (uint64_t)lays[k]->stride * type_bytes(lays[k]->type);
        if ((uintptr_t)ptrs[k] % need || (lays[k]->batch > 1 && stride_bytes % need))
            return CUBLAS_STATUS_INVALID_VALUE;
    }
    emu_check_stream_device(stream, "cublasLtMatmul");
    for (int k = 0; k < 4; k++) check_current_device(ptrs[k], "cublasLtMatmul operand");
    /* What a GPU bakes into the launch: the descriptors' values now. */
    emu_desc dv = *d;
    emu_layout av = *al, bv = *bl, cv = *cl, dlv = *dl;
    double alf = *(const float *)alpha, bet = *(const float *)beta;
    emu_enqueue(stream, [=] {
        matmul_now(&dv, alf, a, &av, b, &bv, bet, c, &cv, dst, &dlv, workspace, workspace_bytes);
    });
    return CUBLAS_STATUS_SUCCESS;
}

static void matmul_now(const emu_desc *d, double alf, const void *a, const emu_layout *al,
                       const void *b, const emu_layout *bl, double bet, const void *c,
                       const emu_layout *cl, void *dst, const emu_layout *dl, void *workspace,
                       size_t workspace_bytes) {
    if (workspace_bytes) check_device_range(workspace, workspace_bytes, "matmul workspace");
    size_t ab = type_bytes(al->type), db = type_bytes(dl->type);
    auto extent = [](const emu_layout *l) {
        return (l->cols - 1) * l->ld + l->rows + (uint64_t)(l->batch - 1) * (uint64_t)l->stride;
    };
    check_device_range(a, extent(al) * ab, "matmul A");
    check_device_range(b, extent(bl) * ab, "matmul B");
    check_device_range(dst, extent(dl) * db, "matmul D");
    if (dl->batch > 1) {
        /* Strided batch: each matrix in turn, as a batch of one. */
        emu_layout a1 = *al, b1 = *bl, c1 = *cl, d1 = *dl;
        a1.batch = b1.batch = c1.batch = d1.batch = 1;
        size_t cb = type_bytes(cl->type);
        for (int32_t i = 0; i < dl->batch; i++)
            matmul_now(d, alf, (const char *)a + (size_t)i * al->stride * ab, &a1,
                       (const char *)b + (size_t)i * bl->stride * ab, &b1, bet,
                       (const char *)c + (size_t)i * cl->stride * cb, &c1,
                       (char *)dst + (size_t)i * dl->stride * db, &d1, workspace,
                       workspace_bytes);
        return;
    }
    /* The bias has the type of D (no CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE),
     * as has aux; a bias gradient is as long as D's columns. */
    if (has_bias(d->epilogue)) check_device_range(d->bias, dl->rows * db, "matmul bias");
    if (d->epilogue == CUBLASLT_EPILOGUE_BGRADB)
        check_device_range(d->bias, dl->cols * db, "matmul bias gradient");
    if (has_aux(d->epilogue))
        check_device_range(d->aux, ((dl->cols - 1) * d->aux_ld + dl->rows) * db, "matmul aux");
    uint64_t m = dl->rows, n = dl->cols, k = d->transa ? al->rows : al->cols;
    const char *gelu = getenv("LEGO_EMU_GELU");
    bool erf_gelu = gelu && strcmp(gelu, "erf") == 0;
    /* A misread epilogue, for the backend's check of them: GELU_AUX_BIAS
     * storing GELU's output as aux, DGELU multiplying by GELU instead of
     * GELU', BGRADB summing op(A) (BGRADA's reading). */
    const char *bad = getenv("LEGO_EMU_BAD_EPILOGUE");
    bool bad_aux = bad && strcmp(bad, "gelu_aux") == 0;
    bool bad_dgelu = bad && strcmp(bad, "dgelu") == 0;
    bool bad_bgrad = bad && strcmp(bad, "bgradb") == 0;
    /* op(A) as m rows and op(B) as n columns of k doubles each, so that
     * every product below reads two contiguous runs; eight columns at a
     * time keep eight independent sums going.  Each sum still adds its
     * products in q order, so the result does not depend on the blocking. */
    std::vector<double> ap(m * k), bp(n * k);
    for (uint64_t i = 0; i < m; i++)
        for (uint64_t q = 0; q < k; q++)
            ap[i * k + q] = load_elem(a, al->type, d->transa ? q + i * al->ld : i + q * al->ld);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t q = 0; q < k; q++)
            bp[j * k + q] = load_elem(b, bl->type, d->transb ? j + q * bl->ld : q + j * bl->ld);
    constexpr uint64_t COLS = 8;
    std::vector<double> out(m * n); /* D may alias C */
    for (uint64_t j0 = 0; j0 < n; j0 += COLS) {
        const uint64_t nc = n - j0 < COLS ? n - j0 : COLS;
        for (uint64_t i = 0; i < m; i++) {
            const double *ar = &ap[i * k];
            double acc[COLS] = {0};
            if (nc == COLS) {
                const double *bc = &bp[j0 * k];
                for (uint64_t q = 0; q < k; q++) {
                    const double x = ar[q];
                    for (uint64_t c = 0; c < COLS; c++) acc[c] += x * bc[c * k + q];
                }
            } else {
                for (uint64_t c = 0; c < nc; c++)
                    for (uint64_t q = 0; q < k; q++) acc[c] += ar[q] * bp[(j0 + c) * k + q];
            }
            for (uint64_t c = 0; c < nc; c++) out[i + (j0 + c) * m] = acc[c];
        }
    }
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) {
            double v = alf * out[i + j * m] +
                       (bet != 0 ? bet * load_elem(c, cl->type, i + j * cl->ld) : 0.0);
            if (has_bias(d->epilogue)) v += load_elem(d->bias, dl->type, i);
            if (d->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS)
                store_elem((void *)d->aux, dl->type, i + j * (uint64_t)d->aux_ld,
                           bad_aux ? gelu_tanh(v) : v);
            if (d->epilogue == CUBLASLT_EPILOGUE_DGELU) {
                double a = load_elem(d->aux, dl->type, i + j * (uint64_t)d->aux_ld);
                v *= bad_dgelu ? gelu_tanh(a) : gelu_tanh_grad(a);
            }
            if (d->epilogue == CUBLASLT_EPILOGUE_GELU_BIAS ||
                d->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS)
                v = erf_gelu ? 0.5 * v * (1 + erf(v / sqrt(2.0))) : gelu_tanh(v);
            out[i + j * m] = v;
        }
    if (d->epilogue == CUBLASLT_EPILOGUE_BGRADB)
        for (uint64_t j = 0; j < n; j++) {
            double sum = 0;
            if (!bad_bgrad)
                for (uint64_t q = 0; q < k; q++) sum += bp[j * k + q];
            else if (j < m)
                for (uint64_t q = 0; q < k; q++) sum += ap[j * k + q];
            store_elem((void *)d->bias, CUDA_R_32F, j, sum);
        }
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) store_elem(dst, dl->type, i + j * dl->ld, out[i + j * m]);
}


