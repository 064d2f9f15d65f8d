// CPU emulation of the CUDA built-ins used by bmojo_core's kernels, for tests only
// (tests/test_cuda_emulated.py): the kernel sources are compiled as C++20 after this
// prelude and every block runs as blockDim.x OS threads, with real barriers for
// __syncthreads and the warp shuffles. Slow, but it executes the kernels' own code
// (indexing, scans, carries, synchronisation) on a machine without a GPU.
#include <math.h>
#include <string.h>

#include <barrier>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct bm_dim3 {
    unsigned x, y, z;
};
thread_local bm_dim3 threadIdx, blockIdx;
bm_dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(x) alignas(x)
#define __shared__ static  // one block at a time: function statics are block-shared

alignas(16) unsigned char bm_emu_dyn_smem[1 << 16];

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

// float <-> IEEE half (the kernels' PTX cvt instructions), through the compiler's _Float16.
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

static std::barrier<>* bm_emu_bar;
static std::barrier<>* bm_emu_wbar[32];
static double bm_emu_slot[32][32];

inline void __syncthreads() { bm_emu_bar->arrive_and_wait(); }

// Every lane of the warp must call (the kernels only shuffle in warp-uniform code).
template <class T> inline T bm_emu_xchg(T v, int src, bool use) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    bm_emu_slot[w][lane] = (double)v;
    bm_emu_wbar[w]->arrive_and_wait();
    T r = use ? (T)bm_emu_slot[w][src] : v;
    bm_emu_wbar[w]->arrive_and_wait();
    return r;
}
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) {
    int l = threadIdx.x & 31;
    return bm_emu_xchg(v, l - o, l >= o);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, int o) {
    int l = threadIdx.x & 31;
    return bm_emu_xchg(v, l + o, l + o < 32);
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) {
    int l = threadIdx.x & 31;
    return bm_emu_xchg(v, l ^ o, true);
}

template <class... A, size_t... I>
static void bm_emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// Runs grid (gx, gy) of blocks of bx threads (a multiple of 32), one block at a time.
template <class... A> static void bm_emu_launch(void (*k)(A...), void** args, int gx, int gy, int bx) {
    blockDim = {(unsigned)bx, 1, 1};
    gridDim = {(unsigned)gx, (unsigned)gy, 1};
    for (int by = 0; by < gy; by++)
        for (int bi = 0; bi < gx; bi++) {
            std::barrier<> bar(bx);
            std::vector<std::barrier<>*> wb;
            for (int w = 0; w < bx / 32; w++) {
                wb.push_back(new std::barrier<>(32));
                bm_emu_wbar[w] = wb.back();
            }
            bm_emu_bar = &bar;
            memset(bm_emu_dyn_smem, 0xff, sizeof bm_emu_dyn_smem);  // NaN until written
            std::vector<std::thread> th;
            for (int t = 0; t < bx; t++)
                th.emplace_back([&, t] {
                    threadIdx = {(unsigned)t, 0, 0};
                    blockIdx = {(unsigned)bi, (unsigned)by, 0};
                    bm_emu_call(k, args, std::index_sequence_for<A...>{});
                });
            for (auto& x : th) x.join();
            for (auto* p : wb) delete p;
        }
}
