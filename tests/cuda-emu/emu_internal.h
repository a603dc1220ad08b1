/*
 * emu_internal.h -- what the files of the host emulation share (emu.cpp:
 * the runtime and cuBLASLt; cudnn_emu.cpp: cuDNN's backend API).
 */
#ifndef LEGO_EMU_INTERNAL_H
#define LEGO_EMU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <mutex>

/* Print `what` and abort: a bug a GPU would punish. */
[[noreturn]] void emu_abort(const char *what);
/* Abort unless [p, p + bytes) lies inside one device allocation. */
void check_device_range(const void *p, size_t bytes, const char *what);
/* Abort unless p lies in memory of the current device. */
void check_current_device(const void *p, const char *what);
/* The lock every emulated API call holds (recursive): calls from several
 * host threads run one at a time. */
std::unique_lock<std::recursive_mutex> emu_api_lock(void);
/* Injected failures (emu_fail_nth in emu.cpp): counts a call of `kind` and
 * says whether it is the one to fail. */
enum { EMU_FAIL_SETUP = 0, EMU_FAIL_WORK = 1 }; /* test_cuda.c has the same numbers */
bool emu_inject(int kind);
/* Element i of an array of CUDA_R_32F / _16BF / _16F as a double, and
 * back (rounded to nearest even). */
double load_elem(const void *p, int type, uint64_t i);
void store_elem(void *p, int type, uint64_t i, double v);

#endif
