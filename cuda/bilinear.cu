// bmojo_core CUDA kernels: bilinear / time-varying dense scan, SPEC §5, with the semantics
// of rust/kernels/src/bilinear.rs.
//
//   X_t = A_t X_{t-1} + b_t,   A_t = A0 + Σ_j v_{t,j} N_j  (modulated)  or  A (batch, L, n, n)
//
// One block of BIL_THREADS (= 64 >= n) threads per batch row, sequential in time: thread i
// owns state component i (the row i of the n×n mat-vec), the state lives in shared memory.
// The backward runs the adjoint λ_t = dX_t + A_{t+1}^T λ_{t+1} in reverse (thread k forms
// column k of A_t^T λ). dv_{t,j} = λ_t^T N_j X_{t-1} is a fixed-order block reduction; the
// modulated form's dA0 / dN are per-row partials (each entry owned by one thread, summed in
// time order) reduced over the batch in order by a second kernel: deterministic.
#include "common.cuh"

#define BMC_DTYPES(M) M(f32, float) M(f64, double) M(f16, bm_half) M(bf16, bm_bf16)
#define BIL_THREADS 64  // = MAX_STATE
#define BIL_JB 256      // dv entries reduced per round

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
// Outputs: db (batch, L, n), dh0 (batch, n); per step: dA (batch, L, n, n); modulated:
// dv (batch, L, m) and part (batch, m+1, n, n) = this row's [dA0; dN] partials.
template <typename S>
__device__ void bil_bwd(const S* A, int per_step, const S* N, const S* v, const S* h0,
                        const S* xs, const S* dxs, const S* dlast, S* db, S* dA, S* dv,
                        typename bm_io<S>::C* part, S* dh0, int L, int n, int m) {
    typedef typename bm_io<S>::C C;
    __shared__ C g[BIL_THREADS];
    __shared__ C lam[BIL_THREADS];
    __shared__ C xp[BIL_THREADS];
    __shared__ C red[BIL_THREADS / 32][BIL_JB];
    const long long row = blockIdx.x;
    const int i = threadIdx.x;
    const int lane = i & 31, warp = i >> 5;
    const long long nn = (long long)n * n;
    C* pr = per_step ? nullptr : part + row * (m + 1) * nn;
    if (i < n) {
        g[i] = dlast != nullptr ? bm_io<S>::load(dlast + row * n + i) : C(0);
        if (pr != nullptr) {
            for (int j = 0; j <= m; ++j)
                for (int k = 0; k < n; ++k) pr[j * nn + (long long)i * n + k] = C(0);
        }
    }
    __syncthreads();
    for (int t = L - 1; t >= 0; --t) {
        const long long rt = row * L + t;
        if (i < n) {
            const C l = bm_io<S>::load(dxs + rt * n + i) + g[i];
            lam[i] = l;
            bm_io<S>::store(db + rt * n + i, l);
            xp[i] = t > 0 ? bm_io<S>::load(xs + (rt - 1) * n + i)
                          : (h0 != nullptr ? bm_io<S>::load(h0 + row * n + i) : C(0));
        }
        __syncthreads();
        const S* at = per_step ? A + rt * nn : nullptr;
        const S* vt = per_step ? nullptr : v + rt * m;
        // g_k = Σ_i A_t[i, k] λ_i (thread k: column k).
        C gk = C(0);
        if (i < n) {
            for (int r = 0; r < n; ++r) gk = bmc_fma(bil_a<S>(at, A, N, vt, m, n, r, i), lam[r], gk);
            const C li = lam[i];
            if (per_step) {
                S* dar = dA + rt * nn + (long long)i * n;
                for (int k = 0; k < n; ++k) bm_io<S>::store(dar + k, li * xp[k]);
            } else {
                // part_j += (s_j λ_i) x_prev^T, s_0 = 1, s_j = v_{t,j}.
                C* p0 = pr + (long long)i * n;
                for (int k = 0; k < n; ++k) p0[k] = bmc_fma(li, xp[k], p0[k]);
                for (int j = 0; j < m; ++j) {
                    const C sl = bm_io<S>::load(vt + j) * li;
                    C* pj = pr + (j + 1) * nn + (long long)i * n;
                    for (int k = 0; k < n; ++k) pj[k] = bmc_fma(sl, xp[k], pj[k]);
                }
            }
        }
        if (!per_step) {
            // dv_{t,j} = Σ_i λ_i (N_j x_prev)_i: warp sums, then warp 0 + warp 1.
            for (int j0 = 0; j0 < m; j0 += BIL_JB) {
                const int jn = m - j0 < BIL_JB ? m - j0 : BIL_JB;
                for (int jj = 0; jj < jn; ++jj) {
                    C r = C(0);
                    if (i < n) {
                        const S* nr = N + (long long)(j0 + jj) * nn + (long long)i * n;
                        for (int k = 0; k < n; ++k) r = bmc_fma(bm_io<S>::load(nr + k), xp[k], r);
                        r *= lam[i];
                    }
                    r = bm_warp_sum(r);
                    if (lane == 0) red[warp][jj] = r;
                }
                __syncthreads();
                for (int jj = i; jj < jn; jj += BIL_THREADS) {
                    C s = red[0][jj];
                    for (int w = 1; w < BIL_THREADS / 32; ++w) s += red[w][jj];
                    bm_io<S>::store(dv + rt * m + j0 + jj, s);
                }
                __syncthreads();
            }
        }
        __syncthreads();
        if (i < n) g[i] = gk;
        __syncthreads();
    }
    if (i < n) bm_io<S>::store(dh0 + row * n + i, g[i]);
}

// out[i] = Σ_b part[b·stride + off + i] for i < per, batch in order.
template <typename S>
__device__ void bil_reduce(const typename bm_io<S>::C* part, S* out, int B, long long stride,
                           long long off, long long per) {
    typedef typename bm_io<S>::C C;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < per;
         e += (long long)gridDim.x * blockDim.x) {
        C acc = C(0);
        for (int b = 0; b < B; ++b) acc += part[b * stride + off + e];
        bm_io<S>::store(out + e, acc);
    }
}

// ---- entry points ---------------------------------------------------------------------------
#define BIL_ENTRIES(sfx, S)                                                                      \
    extern "C" __global__ void __launch_bounds__(BIL_THREADS) bilinear_scan_fwd_##sfx(           \
        const S* b, const S* A, int per_step, const S* N, const S* v, const S* h0, S* xs,         \
        S* last, int L, int n, int m) {                                                          \
        bil_fwd<S>(b, A, per_step, N, v, h0, xs, last, L, n, m);                                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BIL_THREADS) bilinear_scan_bwd_##sfx(           \
        const S* A, int per_step, const S* N, const S* v, const S* h0, const S* xs,              \
        const S* dxs, const S* dlast, S* db, S* dA, S* dv, typename bm_io<S>::C* part, S* dh0,   \
        int L, int n, int m) {                                                                   \
        bil_bwd<S>(A, per_step, N, v, h0, xs, dxs, dlast, db, dA, dv, part, dh0, L, n, m);       \
    }                                                                                            \
    extern "C" __global__ void bilinear_reduce_##sfx(const typename bm_io<S>::C* part, S* out,   \
                                                     int B, long long stride, long long off,     \
                                                     long long per) {                            \
        bil_reduce<S>(part, out, B, stride, off, per);                                           \
    }

BMC_DTYPES(BIL_ENTRIES)
