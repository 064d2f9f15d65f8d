// CPU emulation of the CUDA built-ins used by bmojo_core's kernels, for tests only
// (tests/cuda_emu/harness.py builds every cuda/*.cu with g++ -std=c++20 after this file).
// A launch runs its blocks one at a time, in one of two modes:
// - threaded (kernels whose threads cooperate): every CUDA thread is an OS thread; real
//   barriers for __syncthreads and the warp shuffles; a thread that returns leaves the
//   barriers (as an exited GPU thread does), so an early return cannot hang the test;
// - sequential (kernels without cooperation): the threads are called one after another,
//   much faster; a barrier or shuffle there is an error reported to Python (the harness's
//   list of cooperative kernels is then wrong), never a silent wrong answer.
// Function-scope __shared__ variables are statics (one block runs at a time); dynamic
// shared memory is one buffer, poisoned with NaN bytes before each block. float16 goes
// through the compiler's _Float16 (the harness rewrites common.cuh's PTX conversions).
#pragma once
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x) alignas(x)
#define __shared__ static  // one block at a time: function statics are block-shared

struct bm_emu_dim3 {
    unsigned x, y, z;
};
inline thread_local bm_emu_dim3 threadIdx, blockIdx;
inline bm_emu_dim3 blockDim, gridDim;

#define BM_EMU_SMEM (64 * 1024)
alignas(16) inline unsigned char bm_emu_dyn_smem[BM_EMU_SMEM];

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

// float <-> IEEE half (the kernels' PTX cvt instructions), through _Float16.
inline float bm_emu_h2f(unsigned short bits) {
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
}
inline unsigned short bm_emu_f2h(float f) {
    _Float16 h = (_Float16)f;  // round to nearest even
    unsigned short bits;
    memcpy(&bits, &h, 2);
    return bits;
}

// ---- block cooperation ----
struct bm_emu_not_cooperative {
    const char* what;
};
inline bool bm_emu_threaded = false;  // the running launch's mode
inline std::barrier<>* bm_emu_bar;
inline std::barrier<>* bm_emu_wbar[32];
alignas(8) inline unsigned char bm_emu_slot[32][32][8];

inline unsigned bm_emu_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

inline void __syncthreads() {
    if (!bm_emu_threaded) throw bm_emu_not_cooperative{"__syncthreads"};
    bm_emu_bar->arrive_and_wait();
}

// Every lane of the warp must call (the kernels only shuffle in warp-uniform code).
template <class T> inline T bm_emu_xchg(T v, int src, bool use) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    if (!bm_emu_threaded) throw bm_emu_not_cooperative{"a warp shuffle"};
    const unsigned t = bm_emu_tid(), w = t >> 5, lane = t & 31;
    memcpy(bm_emu_slot[w][lane], &v, sizeof(T));
    bm_emu_wbar[w]->arrive_and_wait();
    T r = v;
    if (use) memcpy(&r, bm_emu_slot[w][src], sizeof(T));
    bm_emu_wbar[w]->arrive_and_wait();
    return r;
}
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) {
    const int l = bm_emu_tid() & 31;
    return bm_emu_xchg(v, l - o, l >= o);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, int o) {
    const int l = bm_emu_tid() & 31;
    return bm_emu_xchg(v, l + o, l + o < 32);
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) {
    const int l = bm_emu_tid() & 31;
    return bm_emu_xchg(v, l ^ o, true);
}

// ---- launch ----
struct bm_emu_cfg {
    unsigned grid[3], block[3];
    int shared_mem, threaded;
};

template <class... A, size_t... I>
inline void bm_emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <class... A> inline void bm_emu_call(void (*k)(A...), void** args) {
    bm_emu_call(k, args, std::index_sequence_for<A...>{});
}

// Runs one launch; `call(args)` runs the kernel as the current thread. Not a template:
// compiled once per library, not once per entry point.
inline void bm_emu_launch(void (*call)(void**), void** args, const bm_emu_cfg& c) {
    gridDim = {c.grid[0], c.grid[1], c.grid[2]};
    blockDim = {c.block[0], c.block[1], c.block[2]};
    const unsigned nt = c.block[0] * c.block[1] * c.block[2], nw = (nt + 31) / 32;
    bm_emu_threaded = c.threaded;
    for (unsigned bz = 0; bz < c.grid[2]; bz++)
        for (unsigned by = 0; by < c.grid[1]; by++)
            for (unsigned bx = 0; bx < c.grid[0]; bx++) {
                memset(bm_emu_dyn_smem, 0xff, (size_t)c.shared_mem);  // NaN until written
                const bm_emu_dim3 b = {bx, by, bz};
                if (!c.threaded) {
                    blockIdx = b;
                    for (unsigned t = 0; t < nt; t++) {
                        threadIdx = {t % c.block[0], t / c.block[0] % c.block[1],
                                     t / (c.block[0] * c.block[1])};
                        call(args);
                    }
                    continue;
                }
                std::barrier<> bar(nt);
                std::vector<std::unique_ptr<std::barrier<>>> wb;
                for (unsigned w = 0; w < nw; w++) {
                    wb.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
                    bm_emu_wbar[w] = wb.back().get();
                }
                bm_emu_bar = &bar;
                std::vector<std::thread> th;
                th.reserve(nt);
                for (unsigned t = 0; t < nt; t++)
                    th.emplace_back([&, t] {
                        threadIdx = {t % c.block[0], t / c.block[0] % c.block[1],
                                     t / (c.block[0] * c.block[1])};
                        blockIdx = b;
                        call(args);
                        // An exited thread no longer takes part in the barriers.
                        bar.arrive_and_drop();
                        bm_emu_wbar[t / 32]->arrive_and_drop();
                    });
                for (auto& x : th) x.join();
            }
}

struct bm_half;  // defined by common.cuh
struct bm_bf16;

// ---- signatures: what the harness checks a launch's fmt and pointer dtypes against ----
template <class T> inline constexpr bool bm_emu_false = false;
template <class T> inline std::string bm_emu_code() {
    if constexpr (std::is_pointer_v<T>) {
        using P = std::remove_cv_t<std::remove_pointer_t<T>>;
        if constexpr (std::is_same_v<P, float>) return "p:float32";
        else if constexpr (std::is_same_v<P, double>) return "p:float64";
        else if constexpr (std::is_same_v<P, bm_half>) return "p:float16";
        else if constexpr (std::is_same_v<P, bm_bf16>) return "p:bfloat16";
        else if constexpr (std::is_same_v<P, int>) return "p:int32";
        else if constexpr (std::is_same_v<P, long long>) return "p:int64";
        else if constexpr (std::is_same_v<P, void>) return "p:";  // dtype chosen at run time
        else static_assert(bm_emu_false<P>, "a kernel pointer type the emulator does not know");
    } else if constexpr (std::is_same_v<T, int>) return "i";
    else if constexpr (std::is_same_v<T, long long>) return "l";
    else if constexpr (std::is_same_v<T, float>) return "f";
    else if constexpr (std::is_same_v<T, double>) return "d";
    else static_assert(bm_emu_false<T>, "a kernel argument type the emulator does not know");
}
template <class... A> inline std::string bm_emu_sig(void (*)(A...)) {
    std::string s;
    ((s += bm_emu_code<A>() + " "), ...);
    return s;
}

struct bm_emu_entry {
    const char* name;
    std::string (*sig)();
    void (*call)(void**);
};
// One table row per entry point (the harness generates the table after the source).
#define BM_EMU_ENTRY(k)                                                             \
    {#k, +[]() { return bm_emu_sig(&k); },                                          \
     +[](void** a) { bm_emu_call(&k, a); }}

#define BM_EMU_API extern "C" __attribute__((visibility("default"), used))
#define BM_EMU_EXPORTS(table)                                                       \
    BM_EMU_API int bm_emu_count() { return (int)(sizeof(table) / sizeof(table[0])); } \
    BM_EMU_API const char* bm_emu_name(int i) { return table[i].name; }             \
    BM_EMU_API const char* bm_emu_signature(int i) {                                \
        static std::string s[sizeof(table) / sizeof(table[0])];                     \
        s[i] = table[i].sig();                                                      \
        return s[i].c_str();                                                        \
    }                                                                               \
    /* 0: done; 1: a barrier or shuffle in a sequential launch (what: err). */      \
    BM_EMU_API int bm_emu_run(int i, void** args, const unsigned* dims, int smem,   \
                              int threaded, char* err, int errlen) {                \
        bm_emu_cfg c = {{dims[0], dims[1], dims[2]}, {dims[3], dims[4], dims[5]},   \
                        smem, threaded};                                            \
        try {                                                                       \
            bm_emu_launch(table[i].call, args, c);                                                  \
        } catch (const bm_emu_not_cooperative& e) {                                 \
            snprintf(err, (size_t)errlen, "%s", e.what);                            \
            return 1;                                                               \
        }                                                                           \
        return 0;                                                                   \
    }
