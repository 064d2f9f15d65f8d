// Host emulation of the CUDA built-ins used by the op kernels (conv, companion, bilinear,
// eidetic), so that their sources compile as plain C++ (g++ -std=c++20 -include this file)
// into a shared library driven through ctypes by tests/test_cuda_emulated_ops.py (the scan
// kernels have their own harness, prelude.hpp): the kernels' logic and their launch
// arguments are checked against the CPU ops on machines without a GPU. One block runs at a
// time: its threads are
// either called one after another (kernels without block cooperation) or run as OS threads
// (kernels with __shared__ / __syncthreads / warp shuffles), synchronised by a barrier.
// Only the f32 / f64 instantiations are exercised (the 16-bit conversions use PTX).
// Include it into exactly one translation unit (it defines the emu_* entry points).
#pragma once
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define asm(...) ((void)0)

struct emu_dim3 {
    unsigned x, y, z;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline pthread_barrier_t emu_barrier;
inline int emu_coop = 0;

#define EMU_API extern "C" __attribute__((visibility("default"), used))

inline void __syncthreads() {
    if (!emu_coop) {
        // A kernel that cooperates must be listed in COOP of the test (run as threads).
        fprintf(stderr, "cuda_emu: __syncthreads in a launch not run as cooperative threads\n");
        abort();
    }
    pthread_barrier_wait(&emu_barrier);
}

template <typename T> inline T __shfl_xor_sync(unsigned, T v, int o) {
    static T buf[1024];
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    buf[tid] = v;
    __syncthreads();
    const T r = buf[tid ^ (unsigned)o];
    __syncthreads();
    return r;
}

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
// Compiled with -ffp-contract=off: these stay single IEEE operations.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

EMU_API void emu_dims(int gx, int gy, int gz, int bx, int by, int bz) {
    gridDim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
    blockDim = {(unsigned)bx, (unsigned)by, (unsigned)bz};
}
EMU_API void emu_set(int tx, int ty, int tz, int bx, int by, int bz) {
    threadIdx = {(unsigned)tx, (unsigned)ty, (unsigned)tz};
    blockIdx = {(unsigned)bx, (unsigned)by, (unsigned)bz};
}
EMU_API void emu_block_begin(int nthreads) {
    pthread_barrier_init(&emu_barrier, nullptr, (unsigned)nthreads);
    emu_coop = 1;
}
EMU_API void emu_block_end() {
    emu_coop = 0;
    pthread_barrier_destroy(&emu_barrier);
}
