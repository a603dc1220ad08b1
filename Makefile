# liblego -- build, test and install.
#
#   make                 library (lib/liblego.so.0.1.0, lib/liblego.a) and examples
#   make check           unit and golden tests (Check); reads ../shared when present;
#                        also check-python (bindings, lego-convert), check-pkgconfig
#                        (an outside program built via pkg-config), check-docs
#   make install PREFIX=/usr/local DESTDIR=
#   make deps            install the Debian packages the build and tests need
#   make CUDA=1          also compile the CUDA backend in cuda/ with nvcc
#                        (CUDA_HOME=/usr/local/cuda; docs/cuda.md)
#   make SANITIZE=1      build everything with ASan + UBSan
#   make tsan            the tests under ThreadSanitizer (clang, in build/tsan/)
#   make valgrind, fuzz, check-abi, cuda-emu-check, cuda-emu-quick: see their rules below
#
VERSION_MAJOR := 0
VERSION := 0.1.0
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DATADIR ?= $(PREFIX)/share/liblego
CUDA ?= 0
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc

CC ?= gcc
CFLAGS ?= -O2 -g
WARN := -Wall -Wextra -Werror
BASE_CFLAGS := -std=c11 $(WARN) -fPIC -fvisibility=hidden -fopenmp -Iinclude -Isrc \
               $(shell pkg-config --cflags openblas 2>/dev/null)
LDLIBS := $(shell pkg-config --libs openblas 2>/dev/null || echo -lopenblas) -lcjson -lpng -lz -lm
BASE_LDLIBS := $(LDLIBS)
ifeq ($(SANITIZE),1)
  CFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer
  LDFLAGS += -fsanitize=address,undefined
endif

SRC := $(filter-out src/lego_bench_stub.c,$(wildcard src/*.c))
OBJ := $(patsubst src/%.c,build/%.o,$(SRC))
CUDA_SRC := $(wildcard cuda/*.cu)
ifeq ($(CUDA),1)
  OBJ += $(patsubst cuda/%.cu,build/cuda_%.o,$(CUDA_SRC))
  BASE_CFLAGS += -DLEGO_HAVE_CUDA=1
  # The runtime path to the CUDA libraries is recorded in liblego (and the
  # test programs); libstdc++ for the C++ runtime of the nvcc objects; libdl
  # for cuDNN, which is loaded at run time when present (cuda/cudnn_attention.cu).
  LDLIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcudart -lstdc++ -ldl
endif
# A100 (sm_80) and H100 (sm_90) machine code, plus sm_90 PTX that newer GPUs
# compile when they load the library.
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
NVCCFLAGS ?= -O3
NVCC_WARN := -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror

# Objects depend on the build configuration: switching CUDA= or SANITIZE=
# rebuilds them rather than mixing objects of two configurations.
CONFIG := CUDA=$(CUDA) SANITIZE=$(SANITIZE)
CONFIG_STAMP := build/.config
$(shell mkdir -p build && { [ "$$(cat $(CONFIG_STAMP) 2>/dev/null)" = "$(CONFIG)" ] || \
  echo "$(CONFIG)" > $(CONFIG_STAMP); })

SHARED := lib/liblego.so.$(VERSION)
STATIC := lib/liblego.a
EXAMPLES := $(patsubst examples/%.c,bin/%,$(wildcard examples/*.c))
TESTS := $(patsubst tests/%.c,build/tests/%,$(wildcard tests/test_*.c))
MANPAGES := $(wildcard docs/man/*.1)
MODELS := $(wildcard models/*.safetensors)
CHECK_LIBS := $(shell pkg-config --libs check 2>/dev/null || echo -lcheck -lsubunit -lrt -lpthread)

.PHONY: all lib examples check check-header check-pkgconfig check-python check-docs valgrind install \
        uninstall clean deps cuda-emu-check cuda-emu-quick

all: lib examples

lib: $(SHARED) $(STATIC)

build/%.o: src/%.c $(wildcard src/*.h) include/lego.h $(CONFIG_STAMP) | build
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -c $< -o $@

# The hot kernels get -O3: vectorised inner loops matter there.
build/ops_cpu.o build/attention_cpu.o: build/%.o: src/%.c $(wildcard src/*.h) include/lego.h $(CONFIG_STAMP) | build
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -O3 -c $< -o $@

# No --use_fast_math: the kernels mirror the CPU's IEEE arithmetic.
build/cuda_%.o: cuda/%.cu $(wildcard cuda/*.h) $(wildcard src/*.h) include/lego.h $(CONFIG_STAMP) | build
	$(NVCC) -std=c++17 $(NVCCFLAGS) $(NVCC_WARN) -Xcompiler -fPIC,-fvisibility=hidden \
	  -DLEGO_HAVE_CUDA=1 -Iinclude -Isrc $(CUDA_ARCH) -c $< -o $@

build build/tests bin:
	mkdir -p $@

$(SHARED): $(OBJ) src/lego.map
	mkdir -p lib
	$(CC) -shared -fopenmp -Wl,-soname,liblego.so.$(VERSION_MAJOR) -Wl,--version-script=src/lego.map \
	  -Wl,--no-undefined $(LDFLAGS) -o $@ $(OBJ) $(LDLIBS)
	ln -sf liblego.so.$(VERSION) lib/liblego.so.$(VERSION_MAJOR)
	ln -sf liblego.so.$(VERSION_MAJOR) lib/liblego.so

$(STATIC): $(OBJ)
	mkdir -p lib
	rm -f $@
	ar rcs $@ $(OBJ)

examples: $(EXAMPLES)

bin/%: examples/%.c $(SHARED) | bin
	$(CC) -std=c11 $(WARN) $(CFLAGS) -Iinclude $< -o $@ -Llib -llego -Wl,-rpath,'$$ORIGIN/../lib' $(LDFLAGS) -lm

# Tests link the static library so they can reach internal modules too.
build/tests/%: tests/%.c tests/testutil.h $(STATIC) | build/tests
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -Itests $< -o $@ $(STATIC) $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS)

# The kernels' plain C versions, which an x86 machine with AVX2 never runs:
# test_ops again, with ops_cpu.c and attention_cpu.c built -DLEGO_NO_SIMD and
# linked ahead of the library's own objects.
PLAIN_OBJ := build/plain/ops_cpu.o build/plain/attention_cpu.o
build/plain/%.o: src/%.c $(wildcard src/*.h) include/lego.h $(CONFIG_STAMP)
	mkdir -p build/plain
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -O3 -DLEGO_NO_SIMD -c $< -o $@

build/tests/test_ops_plain: tests/test_ops.c tests/testutil.h $(PLAIN_OBJ) $(STATIC) | build/tests
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -Itests $< -o $@ $(PLAIN_OBJ) $(STATIC) $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS)

CHECK_PROGRAMS := $(TESTS) build/tests/test_ops_plain

check: $(CHECK_PROGRAMS) examples check-header check-python check-pkgconfig check-docs
	@status=0; for t in $(CHECK_PROGRAMS); do \
	  echo "== $$t"; ./$$t || status=1; \
	done; exit $$status

# Where a GPU evaluation spends its time (tools/cuda_profile.c; needs CUDA=1
# to measure anything).
build/tools/cuda_profile: tools/cuda_profile.c $(STATIC)
	mkdir -p build/tools
	$(CC) $(BASE_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(LDLIBS)

# Training throughput and where a step's time goes (tools/train_profile.c).
build/tools/train_profile: tools/train_profile.c $(STATIC)
	mkdir -p build/tools
	$(CC) $(BASE_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(LDLIBS)

# Whole lego_sample calls with the loop on the device and from the host
# (tools/cuda_sample_loop.c; CUDA=1).
build/tools/cuda_sample_loop: tools/cuda_sample_loop.c $(STATIC)
	mkdir -p build/tools
	$(CC) $(BASE_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(LDLIBS)

# A checkpoint's samples under the backend's internal options, as .npz
# (tools/cuda_samples.c; CUDA=1): the quality side of an A/B.
build/tools/cuda_samples: tools/cuda_samples.c $(STATIC)
	mkdir -p build/tools
	$(CC) $(BASE_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(LDLIBS)

# The CUDA backend without a GPU: cuda/*.cu compiled as host C++ against the
# emulated runtime and cuBLASLt of tests/cuda-emu/, with the library's C sources,
# into build/emu/test_cuda (ASan + UBSan by default).  Slow: run one part
# with e.g. CK_RUN_CASE=golden.  Independent of CUDA=; needs no CUDA toolkit.
EMU_SAN ?= -fsanitize=address,undefined -fno-omit-frame-pointer
EMU_OBJ := $(patsubst src/%.c,build/emu/%.o,$(SRC)) \
           $(patsubst cuda/%.cu,build/emu/cuda_%.o,$(CUDA_SRC)) build/emu/emu.o \
           build/emu/cudnn_emu.o
EMU_CFLAGS := -std=c11 $(WARN) -fopenmp -Iinclude -Isrc \
              $(shell pkg-config --cflags openblas 2>/dev/null) -DLEGO_HAVE_CUDA=1 -O2 -g $(EMU_SAN)
EMU_CXXFLAGS := -std=c++17 $(WARN) -Wno-unknown-pragmas -ffp-contract=off -O2 -g $(EMU_SAN) \
                -DLEGO_HAVE_CUDA=1 -Itests/cuda-emu -Iinclude -Isrc

build/emu:
	mkdir -p $@

build/emu/%.o: src/%.c $(wildcard src/*.h) include/lego.h | build/emu
	$(CC) $(EMU_CFLAGS) -c $< -o $@

build/emu/cuda_%.o: cuda/%.cu $(wildcard cuda/*.h) $(wildcard tests/cuda-emu/*.h) $(wildcard src/*.h) include/lego.h | build/emu
	$(CXX) $(EMU_CXXFLAGS) -x c++ -c $< -o $@

build/emu/emu.o: tests/cuda-emu/emu.cpp $(wildcard tests/cuda-emu/*.h) | build/emu
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

build/emu/cudnn_emu.o: tests/cuda-emu/cudnn_emu.cpp $(wildcard tests/cuda-emu/*.h) | build/emu
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

build/emu/test_cuda: tests/test_cuda.c tests/testutil.h $(EMU_OBJ)
	$(CC) $(EMU_CFLAGS) -DLEGO_TEST_EMULATION -Itests $< -o $@ $(EMU_OBJ) $(EMU_SAN) -lstdc++ \
	    $(CHECK_LIBS) $(BASE_LDLIBS)

# The example programs on the emulated backend, for dry runs of the GPU
# scripts' command lines (e.g. build/emu/lego-train --backend cuda).
build/emu/lego-%: examples/lego-%.c $(EMU_OBJ)
	$(CC) $(EMU_CFLAGS) $< -o $@ $(EMU_OBJ) $(EMU_SAN) -lstdc++ $(BASE_LDLIBS)

# The GPU tools on the emulated backend (e.g. build/emu/tools/cuda_samples).
build/emu/tools/%: tools/%.c $(EMU_OBJ)
	mkdir -p build/emu/tools
	$(CC) $(EMU_CFLAGS) $< -o $@ $(EMU_OBJ) $(EMU_SAN) -lstdc++ $(BASE_LDLIBS)

cuda-emu-check: build/emu/test_cuda
	ASAN_OPTIONS=detect_stack_use_after_return=0 ./build/emu/test_cuda

# The emulation's quick parts (about a minute once built), which CI runs:
# training on the device (golden gradients, steps, resume, two trainers),
# the device sampling loop, Philox, attention through cuDNN, the GELU
# epilogue's probe, and the sweep of injected CUDA failures.  The rest
# (golden and random networks in every precision, samplers) takes tens of
# minutes: cuda-emu-check.
EMU_QUICK_CASES := train train-golden devloop philox cudnn gemm faults
cuda-emu-quick: build/emu/test_cuda
	@status=0; for c in $(EMU_QUICK_CASES); do \
	  echo "== emulated CUDA backend: $$c"; \
	  CK_RUN_CASE=$$c ASAN_OPTIONS=detect_stack_use_after_return=0 ./build/emu/test_cuda || status=1; \
	done; exit $$status

# lego.h must compile as C11 and C++17 with every warning an error.
check-header:
	$(CC) -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude -fsyntax-only -x c include/lego.h
	g++ -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude -fsyntax-only -x c++ include/lego.h
	$(CC) -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude -fsyntax-only tests/test_header_c.c
	g++ -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude -fsyntax-only tests/test_header_cxx.cpp

# Every test program under valgrind memcheck (no fork, so valgrind sees the
# test bodies); any error or definite leak fails.  test_allocfail defines
# its own malloc: nouserintercepts leaves it in place (valgrind still sees
# the C library's underneath).
VALGRIND := valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
            --soname-synonyms=somalloc=nouserintercepts
# test_sample is left to the ASan run: the samplers' loops take too long under memcheck.
VALGRIND_TESTS := $(filter-out build/tests/test_sample,$(TESTS))
valgrind: $(TESTS)
	@status=0; for t in $(VALGRIND_TESTS); do \
	  echo "== valgrind $$t"; CK_FORK=no CK_VERBOSITY=minimal OMP_NUM_THREADS=2 LEGO_TEST_UNDER_VALGRIND=1 $(VALGRIND) ./$$t || status=1; \
	done; exit $$status

# ThreadSanitizer: the test programs built with clang and LLVM's OpenMP
# runtime into build/tsan/.  libomp tells TSan about its own barriers (GCC's
# libgomp does not, so every parallel region would be reported); what is
# left is the library's own threads: models used from separate threads
# (test_api) and the OpenMP worker loops.  tests/tsan.supp silences races
# inside libomp's own start-up.  test_allocfail replaces malloc, which TSan
# must own.
TSAN_CC ?= clang
TSAN_FLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=thread
TSAN_OBJ := $(patsubst src/%.c,build/tsan/%.o,$(SRC))
TSAN_TESTS := $(filter-out build/tsan/test_allocfail,\
                $(patsubst tests/%.c,build/tsan/%,$(wildcard tests/test_*.c)))
.PHONY: tsan
.SECONDARY: $(TSAN_OBJ)

build/tsan:
	mkdir -p $@

build/tsan/%.o: src/%.c $(wildcard src/*.h) include/lego.h | build/tsan
	$(TSAN_CC) $(BASE_CFLAGS) $(TSAN_FLAGS) -c $< -o $@

build/tsan/test_%: tests/test_%.c tests/testutil.h $(TSAN_OBJ)
	$(TSAN_CC) $(BASE_CFLAGS) $(TSAN_FLAGS) -Itests $< -o $@ $(TSAN_OBJ) $(CHECK_LIBS) $(BASE_LDLIBS)

tsan: $(TSAN_TESTS)
	@status=0; for t in $(TSAN_TESTS); do \
	  echo "== tsan $$t"; CK_VERBOSITY=minimal \
	  TSAN_OPTIONS="halt_on_error=1 exitcode=66 suppressions=$(CURDIR)/tests/tsan.supp" \
	  ./$$t || status=1; \
	done; exit $$status

# libFuzzer harnesses (tests/fuzz/fuzz_*.c): clang with ASan + UBSan, the
# library sources compiled in.  `make fuzz` runs each for FUZZ_SECONDS over
# its committed seeds (tests/fuzz/corpus/<harness>/) and past crashes
# (tests/fuzz/regress/<harness>/), both left untouched (new inputs go to
# build/fuzz/), and fails on any crash, sanitizer report, leak, timeout or
# oversized malloc; the input that did it is build/fuzz/crash-<harness>-*.
# `make fuzz-seeds` rebuilds the seeds (tests/fuzz/make_seeds.c);
# tests/test_fuzz.c replays all of them in `make check`.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 30
FUZZ_HARNESSES := $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_CFLAGS := -std=c11 $(WARN) -Wno-pass-failed -fopenmp -g -O1 -fno-omit-frame-pointer \
               -fsanitize=address,undefined -fno-sanitize-recover=all -Iinclude -Isrc \
               $(shell pkg-config --cflags openblas 2>/dev/null)
FUZZ_OBJ := $(patsubst src/%.c,build/fuzz/%.o,$(SRC))
FUZZ_ARGS := -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
.PHONY: fuzz fuzz-build fuzz-seeds
.SECONDARY: $(FUZZ_OBJ)

build/fuzz:
	mkdir -p $@

build/fuzz/%.o: src/%.c $(wildcard src/*.h) include/lego.h | build/fuzz
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_util.h $(FUZZ_OBJ)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $< -o $@ $(FUZZ_OBJ) $(BASE_LDLIBS)

fuzz-build: $(addprefix build/fuzz/fuzz_,$(FUZZ_HARNESSES))

fuzz: fuzz-build
	@status=0; for h in $(FUZZ_HARNESSES); do \
	  echo "== fuzz $$h ($(FUZZ_SECONDS) s)"; mkdir -p build/fuzz/corpus-$$h; \
	  dict=; [ -f tests/fuzz/$$h.dict ] && dict=-dict=tests/fuzz/$$h.dict; \
	  regress=; [ -d tests/fuzz/regress/$$h ] && regress=tests/fuzz/regress/$$h; \
	  OPENBLAS_NUM_THREADS=1 ./build/fuzz/fuzz_$$h $(FUZZ_ARGS) $$dict \
	    -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=build/fuzz/crash-$$h- \
	    build/fuzz/corpus-$$h tests/fuzz/corpus/$$h $$regress 2>build/fuzz/$$h.log || \
	    { status=1; tail -n 60 build/fuzz/$$h.log; }; \
	  grep -h "stat::number_of_executed_units\|stat::peak_rss_mb" build/fuzz/$$h.log; \
	done; exit $$status

build/fuzz/make_seeds: tests/fuzz/make_seeds.c $(STATIC) | build/fuzz
	$(CC) $(BASE_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(LDLIBS)

# The ABI of the release build against the committed baseline:
#   abi/liblego.symbols  exported symbols (nm -D), one per line, sorted
#   abi/liblego.abi      abidw's description of lib/liblego.so (types too)
# `make check-abi` fails when the exported symbols differ from the list in
# any way (new API is recorded on purpose with `make abi-update`), when
# abidiff reports an error (exit bits 1, 2) or an incompatible change (bit
# 8: a symbol removed or changed), and when a change (bit 4) is anything
# but added functions and members appended to structs
# (abi/liblego.abignore).  Needs abigail-tools and -g (the default CFLAGS).
ABI_CHECKED := $(if $(filter 1,$(CUDA) $(SANITIZE)),,yes)
ABIDIFF := abidiff --headers-dir1 include --headers-dir2 include
.PHONY: check-abi abi-update

build/abi:
	mkdir -p $@

build/abi/liblego.symbols: $(SHARED) | build/abi
	nm -D --defined-only $(SHARED) | awk '$$2 != "A" {print $$3}' | LC_ALL=C sort > $@

check-abi: build/abi/liblego.symbols
	@[ -n "$(ABI_CHECKED)" ] || { echo "check-abi: needs the release build (no CUDA=1, SANITIZE=1)"; exit 2; }
	@diff -u abi/liblego.symbols build/abi/liblego.symbols || { \
	  echo "check-abi: the exported symbols differ from abi/liblego.symbols (-: gone, +: new);"; \
	  echo "check-abi: removing one breaks programs; after adding API on purpose, make abi-update"; \
	  exit 1; }
	@$(ABIDIFF) abi/liblego.abi $(SHARED) > build/abi/report.txt; rc=$$?; \
	if [ $$((rc & 11)) -ne 0 ]; then \
	  cat build/abi/report.txt; echo "check-abi: abidiff exit status $$rc: error or incompatible change"; exit 1; \
	elif [ $$((rc & 4)) -ne 0 ]; then \
	  $(ABIDIFF) --no-added-syms --suppressions abi/liblego.abignore abi/liblego.abi $(SHARED) \
	    > build/abi/strict.txt || { cat build/abi/strict.txt; \
	    echo "check-abi: an ABI change other than added functions or appended struct members"; exit 1; }; \
	  echo "check-abi: compatible additions since the baseline (build/abi/report.txt)"; \
	else echo "check-abi: the ABI matches abi/liblego.abi"; fi

# Record the current release build as the baseline (after reviewing what
# check-abi reports).  comp-dir-path is dropped: the file does not depend
# on where the tree is checked out.
abi-update: build/abi/liblego.symbols
	@[ -n "$(ABI_CHECKED)" ] || { echo "abi-update: needs the release build (no CUDA=1, SANITIZE=1)"; exit 2; }
	cp build/abi/liblego.symbols abi/liblego.symbols
	abidw --no-corpus-path --headers-dir include $(SHARED) | sed "s| comp-dir-path='[^']*'||" \
	  > abi/liblego.abi

# test_fuzz includes the harnesses.
build/tests/test_fuzz: $(wildcard tests/fuzz/*.c tests/fuzz/*.h)

fuzz-seeds: build/fuzz/make_seeds
	rm -rf tests/fuzz/corpus
	./build/fuzz/make_seeds tests/fuzz/corpus

install: lib examples
	install -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(BINDIR) \
	  $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(DATADIR)
	install -m 644 include/lego.h $(DESTDIR)$(INCLUDEDIR)/
	install -m 755 $(SHARED) $(DESTDIR)$(LIBDIR)/
	ln -sf liblego.so.$(VERSION) $(DESTDIR)$(LIBDIR)/liblego.so.$(VERSION_MAJOR)
	ln -sf liblego.so.$(VERSION_MAJOR) $(DESTDIR)$(LIBDIR)/liblego.so
	install -m 644 $(STATIC) $(DESTDIR)$(LIBDIR)/
	sed -e 's|@PREFIX@|$(PREFIX)|; s|@LIBDIR@|$(LIBDIR)|; s|@INCLUDEDIR@|$(INCLUDEDIR)|; s|@VERSION@|$(VERSION)|' \
	  pkgconfig/lego.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/lego.pc
	install -m 755 $(EXAMPLES) $(DESTDIR)$(BINDIR)/
	install -m 644 $(MANPAGES) $(DESTDIR)$(MANDIR)/man1/
	install -m 644 $(MODELS) $(DESTDIR)$(DATADIR)/

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/lego.h $(DESTDIR)$(LIBDIR)/liblego.* $(DESTDIR)$(LIBDIR)/pkgconfig/lego.pc
	rm -f $(patsubst bin/%,$(DESTDIR)$(BINDIR)/%,$(EXAMPLES)) \
	  $(patsubst docs/man/%,$(DESTDIR)$(MANDIR)/man1/%,$(MANPAGES))
	rm -f $(patsubst models/%,$(DESTDIR)$(DATADIR)/%,$(MODELS))
	-rmdir $(DESTDIR)$(DATADIR) 2>/dev/null

# Python: the bindings (bindings/python) and tools/lego-convert, with the
# library just built.  Debian's python3 has numpy; the tests also run the
# bindings with numpy hidden.  An ASan build cannot be loaded by an
# uninstrumented python, so SANITIZE=1 skips this and check-pkgconfig.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
PY_ENV := LEGO_LIBRARY=$(CURDIR)/lib/liblego.so OPENBLAS_NUM_THREADS=1
check-python: lib examples
ifeq ($(SANITIZE),1)
	@echo "check-python: skipped (SANITIZE=1)"
else
	@echo "== python bindings"
	$(PY_ENV) $(PYTHON) -m unittest discover -s bindings/python/tests -t bindings/python/tests
	@echo "== tools/lego-convert"
	$(PY_ENV) $(PYTHON) -m unittest discover -s tools/tests -t tools/tests
endif

# The docs keep up: the man pages render without a warning (when groff is
# installed) and docs/api.md names every function lego.h declares.
check-docs:
	@if command -v groff >/dev/null; then \
	  for f in $(MANPAGES); do \
	    w=$$(groff -man -Tutf8 -ww -z $$f 2>&1); \
	    if [ -n "$$w" ]; then echo "$$f: $$w"; exit 1; fi; \
	  done; echo "check-docs: $(words $(MANPAGES)) man pages render cleanly"; \
	else echo "check-docs: groff absent, man pages not rendered"; fi
	@missing=$$(sed -n 's/^LEGO_API [^(]*[ *]\(lego_[a-z0-9_]*\)(.*/\1/p' include/lego.h | \
	  while read f; do grep -q "\`[^\`]*[ *]$$f(" docs/api.md || echo $$f; done); \
	if [ -n "$$missing" ]; then echo "docs/api.md lacks:" $$missing; exit 1; fi; \
	echo "check-docs: docs/api.md covers every function of lego.h"

# An outside program built against an installed liblego with nothing but
# pkg-config: install into a scratch prefix, compile tests/external/hello_lego.c
# with `pkg-config --cflags --libs lego` (shared) and with `--static` against
# liblego.a (which checks Libs.private), run both.
check-pkgconfig: lib examples
ifeq ($(SANITIZE),1)
	@echo "check-pkgconfig: skipped (SANITIZE=1)"
else
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(MAKE) --no-print-directory install PREFIX=$$tmp DESTDIR= >/dev/null && \
	pc="env PKG_CONFIG_PATH=$$tmp/lib/pkgconfig pkg-config" && \
	echo "== pkg-config: $$($$pc --cflags --libs lego)" && \
	$(CC) -std=c11 $(WARN) tests/external/hello_lego.c -o $$tmp/hello_shared \
	  $$($$pc --cflags --libs lego) -Wl,-rpath,$$tmp/lib && \
	$$tmp/hello_shared && \
	$(CC) -std=c11 $(WARN) tests/external/hello_lego.c -o $$tmp/hello_static \
	  $$($$pc --cflags lego) -Wl,-Bstatic -llego -Wl,-Bdynamic \
	  $$($$pc --static --libs lego | sed 's/-llego//') && \
	$$tmp/hello_static && \
	test -f $$tmp/share/man/man1/lego-sample.1 && test -x $$tmp/bin/lego-sample && \
	$$tmp/bin/lego-sample --help >/dev/null && \
	(cd $$tmp && bin/lego-sample --seeds 0 --steps 1 --quiet --threads 1 --npz one.npz) && \
	test -s $$tmp/one.npz && echo "check-pkgconfig: ok (lego-sample found the installed model)"
endif

# Debian packages for building (first line), testing (second line), and
# the ABI check and fuzzers (third line).
deps:
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential pkg-config \
	  libopenblas-dev libcjson-dev libpng-dev zlib1g-dev
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq check valgrind python3-numpy \
	  dataset-fashion-mnist
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq abigail-tools clang libclang-rt-14-dev \
	  libomp-14-dev

clean:
	rm -rf build bin lib/liblego*
