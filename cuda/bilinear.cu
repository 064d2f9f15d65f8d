// bmojo_core CUDA kernels: bilinear / time-varying dense scan, design §5, with the semantics
// of rust/kernels/src/bilinear.rs.
//
//   X_t = A_t X_{t-1} + b_t,   A_t = A0 + Σ_j v_{t,j} N_j  (modulated)  or  A (batch, L, n, n)
//
// One block of BIL_THREADS (= 64 >= n) threads per batch row, sequential in time: thread i
// owns state component i (the row i of the n×n mat-vec), the state lives in shared memory.
// The backward runs only the adjoint λ_t = dX_t + A_{t+1}^T λ_{t+1} in reverse (thread k
// forms column k of A_t^T λ); the gradients that follow from (λ_t, X_{t-1}) — dA_t, dv, and
// the modulated form's dA0 / dN — are parallel kernels afterwards: dA0 / dN as partials over
// fixed chunks of (batch, time), each entry one thread summing in time order, then summed
// over the chunks in order. No atomics: deterministic.
#include "common.cuh"

#define BIL_THREADS 64  // = MAX_STATE

__device__ __forceinline__ float bmc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double bmc_fma(double a, double b, double c) { return fma(a, b, c); }

// Entry (i, k) of A_t: per step (at != null) or A0 + Σ_j v_j N_j.
template <typename S>
__device__ __forceinline__ typename bm_io<S>::C bil_a(const S* at, const S* A0, const S* N,
                                                      const S* vt, int m, int n, int i, int k) {
    typedef typename bm_io<S>::C C;
    const long long e = (long long)i * n + k;
    if (at != nullptr) return bm_io<S>::load(at + e);
    C a = bm_io<S>::load(A0 + e);
    for (int j = 0; j < m; ++j) {
        a = bmc_fma(bm_io<S>::load(vt + j), bm_io<S>::load(N + (long long)j * n * n + e), a);
    }
    return a;
}

// ---- forward ------------------------------------------------------------------------------
// A: (batch, L, n, n) when per_step, else A0 (n, n) with N (m, n, n), v (batch, L, m).
template <typename S>
__device__ void bil_fwd(const S* b, const S* A, int per_step, const S* N, const S* v,
                        const S* h0, S* xs, S* last, int L, int n, int m) {
    typedef typename bm_io<S>::C C;
    __shared__ C x[BIL_THREADS];
    const long long row = blockIdx.x;
    const int i = threadIdx.x;
    if (i < n) x[i] = h0 != nullptr ? bm_io<S>::load(h0 + row * n + i) : C(0);
    __syncthreads();
    for (int t = 0; t < L; ++t) {
        const long long rt = row * L + t;
        const S* at = per_step ? A + rt * n * n : nullptr;
        const S* vt = per_step ? nullptr : v + rt * m;
        C acc = C(0);
        if (i < n) {
            acc = bm_io<S>::load(b + rt * n + i);
            for (int k = 0; k < n; ++k) acc = bmc_fma(bil_a<S>(at, A, N, vt, m, n, i, k), x[k], acc);
        }
        __syncthreads();
        if (i < n) {
            x[i] = acc;
            bm_io<S>::store(xs + rt * n + i, acc);
        }
        __syncthreads();
    }
    if (i < n) bm_io<S>::store(last + row * n + i, x[i]);
}

// ---- backward -----------------------------------------------------------------------------
// The sequential part only: λ_t = dX_t + A_{t+1}^T λ_{t+1} (written as db, it is ∂L/∂b_t)
// and dh0 = A_1^T λ_1. The matrix gradients and dv are functions of (λ_t, X_{t-1}) alone, so
// they are computed afterwards by fully parallel kernels (below), off the serial chain.
template <typename S>
__device__ void bil_bwd(const S* A, int per_step, const S* N, const S* v, const S* dxs,
                        const S* dlast, S* db, S* dh0, int L, int n, int m) {
    typedef typename bm_io<S>::C C;
    __shared__ C g[BIL_THREADS];
    __shared__ C lam[BIL_THREADS];
    const long long row = blockIdx.x;
    const int i = threadIdx.x;
    const long long nn = (long long)n * n;
    if (i < n) g[i] = dlast != nullptr ? bm_io<S>::load(dlast + row * n + i) : C(0);
    __syncthreads();
    for (int t = L - 1; t >= 0; --t) {
        const long long rt = row * L + t;
        if (i < n) {
            const C l = bm_io<S>::load(dxs + rt * n + i) + g[i];
            lam[i] = l;
            bm_io<S>::store(db + rt * n + i, l);
        }
        __syncthreads();
        const S* at = per_step ? A + rt * nn : nullptr;
        const S* vt = per_step ? nullptr : v + rt * m;
        // g_k = Σ_i A_t[i, k] λ_i (thread k: column k).
        C gk = C(0);
        if (i < n) {
            for (int r = 0; r < n; ++r) gk = bmc_fma(bil_a<S>(at, A, N, vt, m, n, r, i), lam[r], gk);
        }
        __syncthreads();
        if (i < n) g[i] = gk;
        __syncthreads();
    }
    if (i < n) bm_io<S>::store(dh0 + row * n + i, g[i]);
}

// X_{t-1}[k] of row r (the initial state, or zero, before the first step).
template <typename S>
__device__ __forceinline__ typename bm_io<S>::C bil_xprev(const S* xs, const S* h0, long long r,
                                                          int t, int L, int n, int k) {
    typedef typename bm_io<S>::C C;
    if (t > 0) return bm_io<S>::load(xs + (r * L + t - 1) * n + k);
    return h0 != nullptr ? bm_io<S>::load(h0 + r * n + k) : C(0);
}

// Per-step form: dA[b, t, i, k] = λ_{t,i} X_{t-1}[k], one thread per element.
template <typename S>
__device__ void bil_dA_step(const S* xs, const S* h0, const S* lam, S* dA, int B, int L, int n) {
    const long long nn = (long long)n * n;
    const long long total = (long long)B * L * nn;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long rt = e / nn;
        const int i = (int)((e - rt * nn) / n), k = (int)(e - rt * nn - (long long)i * n);
        const long long r = rt / L;
        const int t = (int)(rt - r * L);
        bm_io<S>::store(dA + e, bm_io<S>::load(lam + rt * n + i) * bil_xprev<S>(xs, h0, r, t, L, n, k));
    }
}

// Modulated form: dv[b, t, j] = Σ_i λ_{t,i} (N_j X_{t-1})_i, one thread per element.
template <typename S>
__device__ void bil_dv(const S* N, const S* xs, const S* h0, const S* lam, S* dv, int B, int L,
                       int n, int m) {
    typedef typename bm_io<S>::C C;
    const long long nn = (long long)n * n;
    const long long total = (long long)B * L * m;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long rt = e / m;
        const int j = (int)(e - rt * m);
        const long long r = rt / L;
        const int t = (int)(rt - r * L);
        const S* nj = N + j * nn;
        C acc = C(0);
        for (int i = 0; i < n; ++i) {
            C w = C(0);
            for (int k = 0; k < n; ++k)
                w = bmc_fma(bm_io<S>::load(nj + (long long)i * n + k), bil_xprev<S>(xs, h0, r, t, L, n, k), w);
            acc = bmc_fma(bm_io<S>::load(lam + rt * n + i), w, acc);
        }
        bm_io<S>::store(dv + e, acc);
    }
}

// Modulated form: partials of [dA0; dN] over chunk c of the flattened (batch, time) index:
// part[c, j, i, k] = Σ_{(b,t) in chunk} s_j λ_{b,t,i} X_{b,t-1}[k], s_0 = 1, s_j = v_{b,t,j}.
// One thread per entry (consecutive threads: consecutive k), time order within the chunk.
template <typename S>
__device__ void bil_dmat_part(const S* v, const S* xs, const S* h0, const S* lam,
                              typename bm_io<S>::C* part, int B, int L, int n, int m,
                              long long chunk) {
    typedef typename bm_io<S>::C C;
    const long long nn = (long long)n * n;
    const long long per = (long long)(m + 1) * nn;
    const long long e = bm_grid_start();
    if (e >= per) return;
    const int j = (int)(e / nn);
    const int i = (int)((e - j * nn) / n), k = (int)(e - j * nn - (long long)i * n);
    const long long c = blockIdx.y;
    const long long total = (long long)B * L;
    const long long q1 = (c + 1) * chunk < total ? (c + 1) * chunk : total;
    C acc = C(0);
    for (long long q = c * chunk; q < q1; ++q) {
        const long long r = q / L;
        const int t = (int)(q - r * L);
        C sl = bm_io<S>::load(lam + q * n + i);
        if (j > 0) sl = bm_io<S>::load(v + q * m + (j - 1)) * sl;
        acc = bmc_fma(sl, bil_xprev<S>(xs, h0, r, t, L, n, k), acc);
    }
    part[c * per + e] = acc;
}

// ---- entry points ---------------------------------------------------------------------------
#define BIL_ENTRIES(sfx, S)                                                                      \
    extern "C" __global__ void __launch_bounds__(BIL_THREADS) bilinear_scan_fwd_##sfx(           \
        const S* b, const S* A, int per_step, const S* N, const S* v, const S* h0, S* xs,         \
        S* last, int L, int n, int m) {                                                          \
        bil_fwd<S>(b, A, per_step, N, v, h0, xs, last, L, n, m);                                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BIL_THREADS) bilinear_scan_bwd_##sfx(           \
        const S* A, int per_step, const S* N, const S* v, const S* dxs, const S* dlast, S* db,   \
        S* dh0, int L, int n, int m) {                                                           \
        bil_bwd<S>(A, per_step, N, v, dxs, dlast, db, dh0, L, n, m);                             \
    }                                                                                            \
    extern "C" __global__ void bilinear_dA_step_##sfx(const S* xs, const S* h0, const S* lam,    \
                                                      S* dA, int B, int L, int n) {              \
        bil_dA_step<S>(xs, h0, lam, dA, B, L, n);                                                \
    }                                                                                            \
    extern "C" __global__ void bilinear_dv_##sfx(const S* N, const S* xs, const S* h0,           \
                                                 const S* lam, S* dv, int B, int L, int n,       \
                                                 int m) {                                        \
        bil_dv<S>(N, xs, h0, lam, dv, B, L, n, m);                                               \
    }                                                                                            \
    extern "C" __global__ void bilinear_dmat_part_##sfx(const S* v, const S* xs, const S* h0,    \
                                                        const S* lam, typename bm_io<S>::C* part, \
                                                        int B, int L, int n, int m,              \
                                                        long long chunk) {                       \
        bil_dmat_part<S>(v, xs, h0, lam, part, B, L, n, m, chunk);                               \
    }                                                                                            \
    extern "C" __global__ void bilinear_reduce_##sfx(const typename bm_io<S>::C* part, S* out,   \
                                                     int B, long long stride, long long off,     \
                                                     long long per) {                            \
        bm_batch_reduce<S>(part, out, B, stride, off, per);                                      \
    }

BM_DTYPES(BIL_ENTRIES)
