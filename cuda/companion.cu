// bmojo_core CUDA kernels: companion (canonical-form) scan, design §4, forward and backward,
// with the semantics of rust/kernels/src/companion.rs.
//
//   s_t = Σ_{i=1..n} α_{t,i} s_{t-i} + β_t u_t        y_t = Σ_{i=0..n-1} c_{t,i} s_{t-i} + D u_t
//
// The recurrence is all-pole (each s_t needs the n previous values), so it is run as one
// thread per lane (lane = batch·dim + channel), sequential in time, with the last n values
// in a 64-entry ring in thread-local memory; the lanes give the parallelism. A lane's row
// is contiguous in time, so the (lanes, L) arrays (u, y, s, per-step beta, dy, du, dbeta)
// go through shared-memory tiles of COMP_TT steps × COMP_LN lanes, loaded and stored along
// time (coalesced), read across lanes by the sequential loop. The backward
// is the adjoint recurrence in reverse, written as a scatter into a ring of accumulators
// (g_{t-i} += α_{t,i} g_t), as on the CPU. Gradients of time-invariant coefficients are
// per-lane partials (time order) summed over the batch in order by a second kernel.
//
// Positions: p = 1..L is s_p (array index p-1); p = 0, -1, …, 1-n is the initial state
// (s_0, s_{-1}, …, s_{1-n}) = initial_state[0..n].
#include "common.cuh"

#define COMP_RING 64  // >= the largest order (MAX_ORDER = 64)
#define COMP_LN 32    // lanes per block (one warp; the launch's block size)
#define COMP_TT 32    // time steps per staged tile

__device__ __forceinline__ float bmc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double bmc_fma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ int comp_slot(long long p) { return (int)((unsigned long long)p & 63ull); }

// tile[tt][l] = src[(lane0 + l)·L + t0 + tt] for the valid lanes and steps.
template <typename S>
__device__ __forceinline__ void comp_tile_load(typename bm_io<S>::C (*tile)[COMP_LN + 1],
                                               const S* src, long long lane0, long long lanes,
                                               int L, int t0, int tl) {
    for (int idx = threadIdx.x; idx < COMP_LN * COMP_TT; idx += COMP_LN) {
        const int l = idx / COMP_TT, tt = idx % COMP_TT;
        if (lane0 + l < lanes && tt < tl) tile[tt][l] = bm_io<S>::load(src + (lane0 + l) * L + t0 + tt);
    }
}

template <typename S>
__device__ __forceinline__ void comp_tile_store(S* dst, typename bm_io<S>::C (*tile)[COMP_LN + 1],
                                                long long lane0, long long lanes, int L, int t0,
                                                int tl) {
    for (int idx = threadIdx.x; idx < COMP_LN * COMP_TT; idx += COMP_LN) {
        const int l = idx / COMP_TT, tt = idx % COMP_TT;
        if (lane0 + l < lanes && tt < tl) bm_io<S>::store(dst + (lane0 + l) * L + t0 + tt, tile[tt][l]);
    }
}

// ---- forward ------------------------------------------------------------------------------
// alpha / c: per step (lane, L, n) when *_var, else (D, n); beta: (lane, L) or (D,).
// s_out may be null (y = s: neither c nor D); last (lane, n) = (s_L, …, s_{L-n+1}).
template <typename S>
__device__ void comp_fwd(const S* u, const S* alpha, int a_var, const S* beta, int b_var,
                         const S* c, int c_var, const S* Dv, const S* s0, S* y, S* s_out,
                         S* last, int B, int Dm, int L, int n) {
    typedef typename bm_io<S>::C C;
    __shared__ C tu[COMP_TT][COMP_LN + 1];
    __shared__ C tb[COMP_TT][COMP_LN + 1];
    __shared__ C ty[COMP_TT][COMP_LN + 1];
    __shared__ C ts[COMP_TT][COMP_LN + 1];
    const long long lanes = (long long)B * Dm;
    const long long lane0 = (long long)blockIdx.x * COMP_LN;
    const int x = threadIdx.x;
    const long long lane = lane0 + x;
    // Every thread takes part in the tile transfers; only valid lanes compute.
    const bool active = lane < lanes;
    const int d = active ? (int)(lane % Dm) : 0;
    const bool bt_tile = beta != nullptr && b_var;
    C h[COMP_RING];
    for (int j = 0; j < n; ++j) {
        h[comp_slot(-j)] = active && s0 != nullptr ? bm_io<S>::load(s0 + lane * n + j) : C(0);
    }
    const C dval = active && Dv != nullptr ? bm_io<S>::load(Dv + d) : C(0);
    const C bconst = active && beta != nullptr && !b_var ? bm_io<S>::load(beta + d) : C(1);
    for (int t0 = 0; t0 < L; t0 += COMP_TT) {
        const int tl = L - t0 < COMP_TT ? L - t0 : COMP_TT;
        comp_tile_load<S>(tu, u, lane0, lanes, L, t0, tl);
        if (bt_tile) comp_tile_load<S>(tb, beta, lane0, lanes, L, t0, tl);
        __syncthreads();
        if (active) {
            for (int tt = 0; tt < tl; ++tt) {
                const int t = t0 + tt;
                const long long p = (long long)t + 1;
                const C ut = tu[tt][x];
                const C bt = bt_tile ? tb[tt][x] : bconst;
                const S* ar = a_var ? alpha + (lane * L + t) * n : alpha + (long long)d * n;
                C acc = bt * ut;
                // Oldest taps first, as the CPU.
                for (int j = n - 1; j >= 0; --j) {
                    acc = bmc_fma(bm_io<S>::load(ar + j), h[comp_slot(p - 1 - j)], acc);
                }
                h[comp_slot(p)] = acc;
                C yt;
                if (c != nullptr) {
                    const S* cr = c_var ? c + (lane * L + t) * n : c + (long long)d * n;
                    yt = Dv != nullptr ? dval * ut : C(0);
                    for (int j = n - 1; j >= 0; --j) {
                        yt = bmc_fma(bm_io<S>::load(cr + j), h[comp_slot(p - j)], yt);
                    }
                } else {
                    yt = Dv != nullptr ? bmc_fma(dval, ut, acc) : acc;
                }
                ty[tt][x] = yt;
                ts[tt][x] = acc;
            }
        }
        __syncthreads();
        comp_tile_store<S>(y, ty, lane0, lanes, L, t0, tl);
        if (s_out != nullptr) comp_tile_store<S>(s_out, ts, lane0, lanes, L, t0, tl);
        __syncthreads();
    }
    if (active) {
        for (int k = 0; k < n; ++k) bm_io<S>::store(last + lane * n + k, h[comp_slot((long long)L - k)]);
    }
}

// ---- backward -----------------------------------------------------------------------------
// s: the forward's s (its y when y = s). Gradients of per-step inputs are written in place;
// those of time-invariant alpha / beta / c and of D go to per-lane partials
// pa (lane, n), pb (lane,), pc (lane, n), pd (lane,) in the compute type.
template <typename S>
__device__ __forceinline__ typename bm_io<S>::C comp_s(const S* sr, const S* s0r, long long p) {
    typedef typename bm_io<S>::C C;
    if (p >= 1) return bm_io<S>::load(sr + (p - 1));
    return s0r != nullptr ? bm_io<S>::load(s0r + (-p)) : C(0);
}

template <typename S>
__device__ void comp_bwd(const S* u, const S* alpha, int a_var, const S* beta, int b_var,
                         const S* c, int c_var, const S* Dv, const S* s0, const S* s,
                         const S* dy, const S* dlast, S* du, S* dalpha, S* dbeta, S* dc, S* ds0,
                         typename bm_io<S>::C* pa, typename bm_io<S>::C* pb,
                         typename bm_io<S>::C* pc, typename bm_io<S>::C* pd, int B, int Dm,
                         int L, int n) {
    typedef typename bm_io<S>::C C;
    __shared__ C tu[COMP_TT][COMP_LN + 1];
    __shared__ C tdy[COMP_TT][COMP_LN + 1];
    __shared__ C tb[COMP_TT][COMP_LN + 1];
    __shared__ C tdu[COMP_TT][COMP_LN + 1];
    __shared__ C tdb[COMP_TT][COMP_LN + 1];
    const long long lanes = (long long)B * Dm;
    const long long lane0 = (long long)blockIdx.x * COMP_LN;
    const int x = threadIdx.x;
    const long long lane = lane0 + x;
    const bool active = lane < lanes;  // every thread takes part in the tile transfers
    const int d = active ? (int)(lane % Dm) : 0;
    const bool b_tile = beta != nullptr && b_var;
    C g[COMP_RING];
    C qa[COMP_RING];
    C qc[COMP_RING];
    for (int j = 0; j < COMP_RING; ++j) g[j] = C(0);
    for (int j = 0; j < n; ++j) {
        qa[j] = C(0);
        qc[j] = C(0);
    }
    C qb = C(0), qd = C(0);
    // The final state's adjoint seeds s_{L-k} (which may lie in the initial state).
    if (active && dlast != nullptr) {
        for (int k = 0; k < n; ++k) g[comp_slot((long long)L - k)] = bm_io<S>::load(dlast + lane * n + k);
    }
    const S* sr = s + lane * L;
    const S* s0r = active && s0 != nullptr ? s0 + lane * n : nullptr;
    const C dval = active && Dv != nullptr ? bm_io<S>::load(Dv + d) : C(0);
    const C bconst = active && beta != nullptr && !b_var ? bm_io<S>::load(beta + d) : C(1);
    for (int t0 = L > 0 ? (L - 1) / COMP_TT * COMP_TT : -1; t0 >= 0; t0 -= COMP_TT) {
        const int tl = L - t0 < COMP_TT ? L - t0 : COMP_TT;
        comp_tile_load<S>(tu, u, lane0, lanes, L, t0, tl);
        comp_tile_load<S>(tdy, dy, lane0, lanes, L, t0, tl);
        if (b_tile) comp_tile_load<S>(tb, beta, lane0, lanes, L, t0, tl);
        __syncthreads();
        for (int tt = active ? tl - 1 : -1; tt >= 0; --tt) {
            const int t = t0 + tt;
            const long long p = (long long)t + 1;
            const C dyt = tdy[tt][x];
            const C ut = tu[tt][x];
            const C accp = g[comp_slot(p)];
            g[comp_slot(p)] = C(0);
            const S* cr = c == nullptr ? nullptr : (c_var ? c + (lane * L + t) * n : c + (long long)d * n);
            // Total adjoint of s_p: the accumulated later taps plus its direct read-out.
            const C gt = cr != nullptr ? bmc_fma(bm_io<S>::load(cr), dyt, accp) : accp + dyt;
            const S* ar = a_var ? alpha + (lane * L + t) * n : alpha + (long long)d * n;
            for (int j = 0; j < n; ++j) {
                const int q = comp_slot(p - 1 - j);
                g[q] = bmc_fma(bm_io<S>::load(ar + j), gt, g[q]);
            }
            if (cr != nullptr) {
                for (int j = 1; j < n; ++j) {
                    const int q = comp_slot(p - j);
                    g[q] = bmc_fma(bm_io<S>::load(cr + j), dyt, g[q]);
                }
            }
            const C bt = b_tile ? tb[tt][x] : bconst;
            C dut = bt * gt;
            if (Dv != nullptr) {
                dut = bmc_fma(dval, dyt, dut);
                qd = bmc_fma(dyt, ut, qd);
            }
            tdu[tt][x] = dut;
            if (beta != nullptr) {
                if (b_var) tdb[tt][x] = ut * gt;
                else qb = bmc_fma(ut, gt, qb);
            }
            // dα_{t,i} = g_t s_{t-i}, dc_{t,i} = dy_t s_{t-i}.
            if (a_var) {
                S* da = dalpha + (lane * L + t) * n;
                for (int j = 0; j < n; ++j) bm_io<S>::store(da + j, gt * comp_s<S>(sr, s0r, p - 1 - j));
            } else {
                for (int j = 0; j < n; ++j) qa[j] = bmc_fma(gt, comp_s<S>(sr, s0r, p - 1 - j), qa[j]);
            }
            if (cr != nullptr) {
                if (c_var) {
                    S* dcr = dc + (lane * L + t) * n;
                    for (int j = 0; j < n; ++j) bm_io<S>::store(dcr + j, dyt * comp_s<S>(sr, s0r, p - j));
                } else {
                    for (int j = 0; j < n; ++j) qc[j] = bmc_fma(dyt, comp_s<S>(sr, s0r, p - j), qc[j]);
                }
            }
        }
        __syncthreads();
        comp_tile_store<S>(du, tdu, lane0, lanes, L, t0, tl);
        if (b_tile) comp_tile_store<S>(dbeta, tdb, lane0, lanes, L, t0, tl);
        __syncthreads();
    }
    if (!active) return;
    // The ring now holds the adjoints of s_0, s_{-1}, …
    for (int j = 0; j < n; ++j) bm_io<S>::store(ds0 + lane * n + j, g[comp_slot(-j)]);
    if (!a_var) {
        for (int j = 0; j < n; ++j) pa[lane * n + j] = qa[j];
    }
    if (c != nullptr && !c_var) {
        for (int j = 0; j < n; ++j) pc[lane * n + j] = qc[j];
    }
    if (beta != nullptr && !b_var) pb[lane] = qb;
    if (Dv != nullptr) pd[lane] = qd;
}

// ---- entry points ---------------------------------------------------------------------------
#define COMP_ENTRIES(sfx, S)                                                                     \
    extern "C" __global__ void __launch_bounds__(COMP_LN) companion_scan_fwd_##sfx(                                         \
        const S* u, const S* alpha, int a_var, const S* beta, int b_var, const S* c, int c_var,  \
        const S* Dv, const S* s0, S* y, S* s_out, S* last, int B, int Dm, int L, int n) {        \
        comp_fwd<S>(u, alpha, a_var, beta, b_var, c, c_var, Dv, s0, y, s_out, last, B, Dm, L,   \
                    n);                                                                          \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(COMP_LN) companion_scan_bwd_##sfx(                                         \
        const S* u, const S* alpha, int a_var, const S* beta, int b_var, const S* c, int c_var,  \
        const S* Dv, const S* s0, const S* s, const S* dy, const S* dlast, S* du, S* dalpha,     \
        S* dbeta, S* dc, S* ds0, typename bm_io<S>::C* pa, typename bm_io<S>::C* pb,             \
        typename bm_io<S>::C* pc, typename bm_io<S>::C* pd, int B, int Dm, int L, int n) {       \
        comp_bwd<S>(u, alpha, a_var, beta, b_var, c, c_var, Dv, s0, s, dy, dlast, du, dalpha,    \
                    dbeta, dc, ds0, pa, pb, pc, pd, B, Dm, L, n);                                \
    }                                                                                            \
    extern "C" __global__ void companion_reduce_##sfx(const typename bm_io<S>::C* part, S* out,  \
                                                      int B, long long per) {                    \
        bm_batch_reduce<S>(part, out, B, per, 0, per);                                           \
    }

BM_DTYPES(COMP_ENTRIES)
