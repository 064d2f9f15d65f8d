// bmojo_core CUDA kernels: the first-order diagonal scan and the Mamba-1 selective scan,
// forward and backward (design §2.1-2.2), with the semantics of the CPU ops in scan.py.
//
// Design: one thread block per (batch row, channel) walks time in tiles of NT * IT steps.
// Each thread owns IT consecutive steps of a tile: it composes them into one affine map
// h -> a*h + b (the recurrence h_t = a_t h_{t-1} + b_t composes as (a2*a1, a2*b1 + b2)),
// the warp scans those maps with shuffles, the warps' totals go through shared memory,
// and the tile's carry (the state entering the tile, one value per state dimension n) is
// kept in shared memory; every thread then replays its steps from its exact entry state
// (the fix-up). The state dimensions are processed one after the other, so the state
// lives in registers and any N works.
//
// Storage type S (u, delta, z, out, variable B/C and their gradients) and compute type C
// (float for f32/f16/bf16, double for f64; A, D, delta_bias, states, constant B/C and
// every parameter-gradient partial). Parameter gradients are written as per-block partials
// that the Python wrapper sums in a fixed order: no float atomics, reproducible results.
#include "common.cuh"

#define BM_NT 128                // threads per block
#define BM_NW (BM_NT / 32)       // warps per block
#define BM_FULL 0xffffffffu

extern __shared__ __align__(16) unsigned char bm_dyn_smem[];

// exp(dt * A): float goes through exp2 with A pre-scaled by log2(e) (cheaper, 2 ulp);
// double keeps exp.
struct bm_decay_f {
    static __device__ __forceinline__ float scale(float a) { return a * 1.4426950408889634f; }
    static __device__ __forceinline__ float eval(float x) { return exp2f(x); }
};
struct bm_decay_d {
    static __device__ __forceinline__ double scale(double a) { return a; }
    static __device__ __forceinline__ double eval(double x) { return exp(x); }
};
template <typename C> struct bm_decay;
template <> struct bm_decay<float> : bm_decay_f {};
template <> struct bm_decay<double> : bm_decay_d {};

// Padded shared-memory index: one spare word per 32 keeps strided reads conflict-free.
__device__ __forceinline__ int bm_pidx(int i) { return i + (i >> 5); }

// Inclusive warp scan of affine maps in time order (lane 0 first).
template <typename C> __device__ __forceinline__ void bm_scan_up(C& a, C& b, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        C pa = __shfl_up_sync(BM_FULL, a, o);
        C pb = __shfl_up_sync(BM_FULL, b, o);
        if (lane >= o) {
            b = a * pb + b;
            a = a * pa;
        }
    }
}
// Inclusive warp scan in reverse order (lane 31 first): for reverse-time recurrences.
template <typename C> __device__ __forceinline__ void bm_scan_down(C& a, C& b, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        C na = __shfl_down_sync(BM_FULL, a, o);
        C nb = __shfl_down_sync(BM_FULL, b, o);
        if (lane + o < 32) {
            b = a * nb + b;
            a = a * na;
        }
    }
}

// The state before this thread's first step of a tile: `la`, `lb` are the affine map of
// its own steps; the maps of the earlier lanes and warps (exchanged through the shared
// `wa`, `wb`) are composed onto the state `*h0` entering the tile, read after the barrier
// (so it may be written just before the call). Contains one __syncthreads.
template <typename C>
__device__ __forceinline__ C bm_block_enter(C la, C lb, int lane, int warp, C* wa, C* wb,
                                            const C* h0) {
    bm_scan_up(la, lb, lane);
    C ea = __shfl_up_sync(BM_FULL, la, 1), eb = __shfl_up_sync(BM_FULL, lb, 1);
    if (lane == 0) {
        ea = C(1);
        eb = C(0);
    }
    if (lane == 31) {
        wa[warp] = la;
        wb[warp] = lb;
    }
    __syncthreads();
    C h = *h0;
    for (int j = 0; j < warp; j++) h = wa[j] * h + wb[j];
    return ea * h + eb;
}

// Coalesced load of one tile (times t0 + j, j < NT*IT, through `map`) into registers:
// thread `tid` gets the IT consecutive positions tid*IT + k. Positions past L get `fill`.
template <typename S, int IT, typename C>
__device__ __forceinline__ void bm_stage_load(const S* src, long long t0, long long L, int rev,
                                              C* sm, C (&v)[IT], C fill) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int k = 0; k < IT; k++) {
        int j = k * BM_NT + tid;
        long long t = t0 + j;
        C x = fill;
        if (t < L) x = bm_io<S>::load(src + (rev ? L - 1 - t : t));
        sm[bm_pidx(j)] = x;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < IT; k++) v[k] = sm[bm_pidx(tid * IT + k)];
    __syncthreads();
}

template <typename S, int IT, typename C>
__device__ __forceinline__ void bm_stage_store(S* dst, long long t0, long long L, int rev, C* sm,
                                               const C (&v)[IT]) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int k = 0; k < IT; k++) sm[bm_pidx(tid * IT + k)] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < IT; k++) {
        int j = k * BM_NT + tid;
        long long t = t0 + j;
        if (t < L) bm_io<S>::store(dst + (rev ? L - 1 - t : t), sm[bm_pidx(j)]);
    }
    __syncthreads();
}

// Direct (L1-served) load of a thread's IT consecutive steps.
template <typename S, int IT, typename C>
__device__ __forceinline__ void bm_direct_load(const S* src, long long tb, long long L, C (&v)[IT],
                                               C fill) {
#pragma unroll
    for (int k = 0; k < IT; k++) v[k] = (tb + k < L) ? C(bm_io<S>::load(src + tb + k)) : fill;
}
template <typename S, int IT, typename C>
__device__ __forceinline__ void bm_direct_store(S* dst, long long tb, long long L, const C (&v)[IT]) {
#pragma unroll
    for (int k = 0; k < IT; k++)
        if (tb + k < L) bm_io<S>::store(dst + tb + k, v[k]);
}

// ====================================================================== diagonal scan
// h_t = a_t h_{t-1} + b_t over lanes of a (lanes, L) pair, or from the end if `rev`.
// Grid (lanes), block BM_NT. h0 (lanes,) may be null; last (lanes,).
template <typename S, int IT>
__device__ __forceinline__ void diag_scan_impl(const S* a, const S* b, const typename bm_io<S>::C* h0,
                                               S* h, typename bm_io<S>::C* last, long long L,
                                               int rev) {
    typedef typename bm_io<S>::C C;
    constexpr int TILE = BM_NT * IT;
    __shared__ C sm[TILE + TILE / 32];
    __shared__ C wa[BM_NW], wb[BM_NW];
    __shared__ C carry;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long lanei = blockIdx.x;
    const S* ar = a + lanei * L;
    const S* br = b + lanei * L;
    S* hr = h + lanei * L;
    if (tid == 0) carry = h0 ? h0[lanei] : C(0);
    for (long long t0 = 0; t0 < L; t0 += TILE) {
        C pa[IT], pb[IT];
        bm_stage_load<S, IT, C>(ar, t0, L, rev, sm, pa, C(1));  // identity past the end
        bm_stage_load<S, IT, C>(br, t0, L, rev, sm, pb, C(0));
        C la = C(1), lb = C(0);
#pragma unroll
        for (int k = 0; k < IT; k++) {
            lb = pa[k] * lb + pb[k];
            la = pa[k] * la;
        }
        C x = bm_block_enter(la, lb, lane, warp, wa, wb, &carry);
        C hv[IT];
#pragma unroll
        for (int k = 0; k < IT; k++) {
            x = pa[k] * x + pb[k];
            hv[k] = x;
        }
        __syncthreads();  // everyone has read `carry`
        if (tid == BM_NT - 1) carry = x;
        bm_stage_store<S, IT, C>(hr, t0, L, rev, sm, hv);
    }
    __syncthreads();
    if (tid == 0) last[lanei] = carry;
}

#define BM_DIAG(SUF, S, IT)                                                                    \
    extern "C" __global__ void __launch_bounds__(BM_NT)                                        \
        diag_scan_##SUF(const S* a, const S* b, const bm_io<S>::C* h0, S* h,                   \
                        bm_io<S>::C* last, long long L, int rev) {                             \
        diag_scan_impl<S, IT>(a, b, h0, h, last, L, rev);                                      \
    }
BM_DIAG(f32, float, 8)
BM_DIAG(f64, double, 4)
BM_DIAG(f16, bm_half, 8)
BM_DIAG(bf16, bm_bf16, 8)

// ====================================================================== selective scan
// Shared shape arguments. b_groups / c_groups: 0 for a constant (dim, N) matrix in the
// compute type, else G of a (batch, G, N, L) matrix in the storage type.
struct bm_sel_dims {
    int dim, L, N, b_groups, c_groups, softplus, chunk, nck;
};

template <typename C> __device__ __forceinline__ C bm_delta(C x, C bias, int softplus) {
    x += bias;
    return softplus ? bm_softplus(x) : x;
}

template <typename S>
__device__ __forceinline__ bool bm_reset(const bm_i64* seq, long long b, long long t, long long L) {
    return seq != nullptr && t > 0 && t < L && seq[b * L + t] != seq[b * L + t - 1];
}

// Forward. Grid (dim, batch), block BM_NT, dynamic shared memory N * sizeof(C).
// Outputs: out (batch, dim, L) in S; last (batch, dim, N); ckpt (batch, dim, nck, N): the
// state before every `chunk` steps (the backward restarts from these).
template <typename S, int IT>
__device__ __forceinline__ void sel_fwd_impl(const S* u, const S* delta, const typename bm_io<S>::C* A,
                                             const void* Bp, const void* Cp,
                                             const typename bm_io<S>::C* Dv, const S* z,
                                             const typename bm_io<S>::C* bias,
                                             const typename bm_io<S>::C* h0, const bm_i64* seq,
                                             S* out, typename bm_io<S>::C* last,
                                             typename bm_io<S>::C* ckpt, bm_sel_dims s) {
    typedef typename bm_io<S>::C C;
    typedef bm_decay<C> E;
    constexpr int TILE = BM_NT * IT;
    __shared__ C sm[TILE + TILE / 32];
    __shared__ C sb[TILE + TILE / 32];
    __shared__ C sc[TILE + TILE / 32];
    __shared__ C wa[BM_NW], wb[BM_NW];
    C* carry = reinterpret_cast<C*>(bm_dyn_smem);  // (N,) state entering the tile
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int d = blockIdx.x;
    const long long b = blockIdx.y;
    const int N = s.N;
    const long long L = s.L;
    const long long bd = b * s.dim + d;
    const long long row = bd * L;
    for (int n = tid; n < N; n += BM_NT) carry[n] = h0 ? h0[bd * N + n] : C(0);
    const C Dd = Dv ? Dv[d] : C(0);
    const C bias_d = bias ? bias[d] : C(0);
    const C* Bc = static_cast<const C*>(Bp);
    const C* Cc = static_cast<const C*>(Cp);
    const S* Bv = nullptr;
    const S* Cv = nullptr;
    if (s.b_groups) Bv = static_cast<const S*>(Bp) + ((b * s.b_groups + d / (s.dim / s.b_groups)) * N) * L;
    if (s.c_groups) Cv = static_cast<const S*>(Cp) + ((b * s.c_groups + d / (s.dim / s.c_groups)) * N) * L;
    for (long long t0 = 0; t0 < L; t0 += TILE) {
        const long long tb = t0 + (long long)tid * IT;  // this thread's first step
        C uu[IT], dt[IT], dtu[IT], y[IT];
        bool rs[IT];
        bm_stage_load<S, IT, C>(u + row, t0, L, 0, sm, uu, C(0));
        bm_stage_load<S, IT, C>(delta + row, t0, L, 0, sm, dt, C(0));
#pragma unroll
        for (int k = 0; k < IT; k++) {
            dt[k] = bm_delta(dt[k], bias_d, s.softplus);
            dtu[k] = dt[k] * uu[k];
            y[k] = Dd * uu[k];
            rs[k] = bm_reset<S>(seq, b, tb + k, L);
        }
        for (int n = 0; n < N; n++) {
            const C an = E::scale(A[(long long)d * N + n]);
            C bv[IT], cv[IT];
            if (Bv || Cv) {
#pragma unroll
                for (int k = 0; k < IT; k++) {
                    int j = k * BM_NT + tid;
                    long long t = t0 + j;
                    if (Bv) sb[bm_pidx(j)] = t < L ? C(bm_io<S>::load(Bv + (long long)n * L + t)) : C(0);
                    if (Cv) sc[bm_pidx(j)] = t < L ? C(bm_io<S>::load(Cv + (long long)n * L + t)) : C(0);
                }
                __syncthreads();
            }
            const C bconst = Bv ? C(0) : Bc[(long long)d * N + n];
            const C cconst = Cv ? C(0) : Cc[(long long)d * N + n];
            C pa[IT], pb[IT];
            C la = C(1), lb = C(0);
#pragma unroll
            for (int k = 0; k < IT; k++) {
                bv[k] = Bv ? sb[bm_pidx(tid * IT + k)] : bconst;
                cv[k] = Cv ? sc[bm_pidx(tid * IT + k)] : cconst;
                const bool valid = tb + k < L;
                pa[k] = valid ? (rs[k] ? C(0) : E::eval(dt[k] * an)) : C(1);
                pb[k] = valid ? dtu[k] * bv[k] : C(0);
                lb = pa[k] * lb + pb[k];
                la = pa[k] * la;
            }
            // The state before this thread's first step.
            C h = bm_block_enter(la, lb, lane, warp, wa, wb, carry + n);
            if (tb < L && tb % s.chunk == 0) ckpt[(bd * s.nck + tb / s.chunk) * N + n] = h;
#pragma unroll
            for (int k = 0; k < IT; k++) {
                h = pa[k] * h + pb[k];
                y[k] += cv[k] * h;
            }
            __syncthreads();  // carry, wa/wb, sb/sc are free again
            if (tid == BM_NT - 1) carry[n] = h;
        }
        if (z) {
            C zz[IT];
            bm_stage_load<S, IT, C>(z + row, t0, L, 0, sm, zz, C(0));
#pragma unroll
            for (int k = 0; k < IT; k++) y[k] *= bm_silu(zz[k]);
        }
        bm_stage_store<S, IT, C>(out + row, t0, L, 0, sm, y);
    }
    __syncthreads();
    for (int n = tid; n < N; n += BM_NT) last[bd * N + n] = carry[n];
}

#define BM_SEL_FWD(SUF, S, IT)                                                                 \
    extern "C" __global__ void __launch_bounds__(BM_NT) selective_scan_fwd_##SUF(              \
        const S* u, const S* delta, const bm_io<S>::C* A, const void* Bp, const void* Cp,      \
        const bm_io<S>::C* Dv, const S* z, const bm_io<S>::C* bias, const bm_io<S>::C* h0,     \
        const bm_i64* seq, S* out, bm_io<S>::C* last, bm_io<S>::C* ckpt, int dim, int L,       \
        int N, int b_groups, int c_groups, int softplus, int chunk, int nck) {                 \
        bm_sel_dims s = {dim, L, N, b_groups, c_groups, softplus, chunk, nck};                  \
        sel_fwd_impl<S, IT>(u, delta, A, Bp, Cp, Dv, z, bias, h0, seq, out, last, ckpt, s);     \
    }
BM_SEL_FWD(f32, float, 8)
BM_SEL_FWD(f64, double, 4)
BM_SEL_FWD(f16, bm_half, 8)
BM_SEL_FWD(bf16, bm_bf16, 8)

// Backward. Grid (dim / cb, batch), block BM_NT: a block handles `cb` consecutive channels
// (never straddling a group of a variable B/C) one after the other, tiles in reverse time
// order. Per tile, channel and state dimension it recomputes the forward states from the
// checkpoint (a forward block scan) and runs the adjoint as a reverse block scan:
//   o_t = a_t (C_t dy_t + o_{t+1}),  o_L = dlast,  g_t = C_t dy_t + o_{t+1},
// a_t = 0 at a reset (nothing flows into the previous sequence); dh0 = o_0.
// Outputs: du, ddelta, dz (storage type); dh0 (batch, dim, N); partials in C:
//   pA (batch, dim, N); pD, pbias (batch, dim); pB/pC (batch, dim, N) for a constant
//   matrix, or (batch, dim / cb, N, L) (sums over the block's channels) for a variable one.
// Dynamic shared memory: (4 * N + 2) * cb * sizeof(C).
template <typename S, int IT>
__device__ __forceinline__ void sel_bwd_impl(
    const S* u, const S* delta, const typename bm_io<S>::C* A, const void* Bp, const void* Cp,
    const typename bm_io<S>::C* Dv, const S* z, const typename bm_io<S>::C* bias,
    const bm_i64* seq, const typename bm_io<S>::C* ckpt, const S* dout,
    const typename bm_io<S>::C* dlast, S* du, S* ddelta, S* dz, typename bm_io<S>::C* dh0,
    typename bm_io<S>::C* pA, typename bm_io<S>::C* pB, typename bm_io<S>::C* pC,
    typename bm_io<S>::C* pD, typename bm_io<S>::C* pbias, bm_sel_dims s, int cb) {
    typedef typename bm_io<S>::C C;
    typedef bm_decay<C> E;
    constexpr int TILE = BM_NT * IT;
    __shared__ C wa[BM_NW], wb[BM_NW], ra[BM_NW], rb[BM_NW];
    __shared__ C red[3][BM_NW];
    const int N = s.N;
    C* ocarry = reinterpret_cast<C*>(bm_dyn_smem);  // (cb, N) adjoint entering from the right
    C* accA = ocarry + cb * N;                      // (cb, N)
    C* accB = accA + cb * N;                        // (cb, N) constant B only
    C* accC = accB + cb * N;                        // (cb, N) constant C only
    C* accD = accC + cb * N;                        // (cb,)
    C* accBias = accD + cb;                         // (cb,)
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long b = blockIdx.y;
    const int d0 = blockIdx.x * cb;
    const long long L = s.L;
    for (int i = tid; i < cb * N; i += BM_NT) {
        const long long bd = b * s.dim + d0 + i / N;
        ocarry[i] = dlast ? dlast[bd * N + i % N] : C(0);
        accA[i] = accB[i] = accC[i] = C(0);
    }
    for (int i = tid; i < cb; i += BM_NT) accD[i] = accBias[i] = C(0);
    __syncthreads();
    const C* Bc = static_cast<const C*>(Bp);
    const C* Cc = static_cast<const C*>(Cp);
    const bool bvar = s.b_groups != 0, cvar = s.c_groups != 0;
    const long long nblk = s.dim / cb;
    const long long ntiles = (L + TILE - 1) / TILE;
    for (long long tile = ntiles - 1; tile >= 0; tile--) {
        const long long t0 = tile * TILE;
        const long long tb = t0 + (long long)tid * IT;
        for (int c = 0; c < cb; c++) {
            const int d = d0 + c;
            const long long bd = b * s.dim + d;
            const long long row = bd * L;
            const S* Bv = bvar ? static_cast<const S*>(Bp) + ((b * s.b_groups + d / (s.dim / s.b_groups)) * N) * L : nullptr;
            const S* Cv = cvar ? static_cast<const S*>(Cp) + ((b * s.c_groups + d / (s.dim / s.c_groups)) * N) * L : nullptr;
            const C Dd = Dv ? Dv[d] : C(0);
            const C bias_d = bias ? bias[d] : C(0);
            C uu[IT], pre[IT], dt[IT], dy[IT], y[IT], gdu[IT], gdt[IT];
            bool rs[IT];
            bm_direct_load<S, IT, C>(u + row, tb, L, uu, C(0));
            bm_direct_load<S, IT, C>(delta + row, tb, L, pre, C(0));
            bm_direct_load<S, IT, C>(dout + row, tb, L, dy, C(0));
#pragma unroll
            for (int k = 0; k < IT; k++) {
                pre[k] += bias_d;
                dt[k] = s.softplus ? bm_softplus(pre[k]) : pre[k];
                rs[k] = bm_reset<S>(seq, b, tb + k, L);
                y[k] = Dd * uu[k];
            }
            const C* ck = ckpt + (bd * s.nck + t0 / s.chunk) * N;
            // Pass 1 (only with a gate): the pre-gate output y, needed by dz and dy.
            if (z) {
                for (int n = 0; n < N; n++) {
                    const C an = E::scale(A[(long long)d * N + n]);
                    C pa[IT], pb[IT], la = C(1), lb = C(0);
#pragma unroll
                    for (int k = 0; k < IT; k++) {
                        const bool valid = tb + k < L;
                        const C bvk = Bv ? (valid ? C(bm_io<S>::load(Bv + (long long)n * L + tb + k)) : C(0))
                                         : Bc[(long long)d * N + n];
                        pa[k] = valid ? (rs[k] ? C(0) : E::eval(dt[k] * an)) : C(1);
                        pb[k] = valid ? dt[k] * uu[k] * bvk : C(0);
                        lb = pa[k] * lb + pb[k];
                        la = pa[k] * la;
                    }
                    C h = bm_block_enter(la, lb, lane, warp, wa, wb, ck + n);
#pragma unroll
                    for (int k = 0; k < IT; k++) {
                        h = pa[k] * h + pb[k];
                        const bool valid = tb + k < L;
                        const C cvk = Cv ? (valid ? C(bm_io<S>::load(Cv + (long long)n * L + tb + k)) : C(0))
                                         : Cc[(long long)d * N + n];
                        y[k] += cvk * h;
                    }
                    __syncthreads();
                }
                C zz[IT], gz[IT];
                bm_direct_load<S, IT, C>(z + row, tb, L, zz, C(0));
#pragma unroll
                for (int k = 0; k < IT; k++) {
                    const C sg = bm_sigmoid(zz[k]);
                    gz[k] = dy[k] * y[k] * sg * (C(1) + zz[k] * (C(1) - sg));
                    dy[k] = dy[k] * zz[k] * sg;
                }
                bm_direct_store<S, IT, C>(dz + row, tb, L, gz);
            }
            C tD = C(0);
#pragma unroll
            for (int k = 0; k < IT; k++) {
                if (tb + k >= L) dy[k] = C(0);
                gdu[k] = Dd * dy[k];
                gdt[k] = C(0);
                tD += dy[k] * uu[k];
            }
            // Pass 2: per state dimension, forward states and the adjoint.
            for (int n = 0; n < N; n++) {
                const C a_raw = A[(long long)d * N + n];
                const C an = E::scale(a_raw);
                C pa[IT], pb[IT], bv[IT], cv[IT];
                C la = C(1), lb = C(0);
#pragma unroll
                for (int k = 0; k < IT; k++) {
                    const bool valid = tb + k < L;
                    bv[k] = Bv ? (valid ? C(bm_io<S>::load(Bv + (long long)n * L + tb + k)) : C(0))
                               : Bc[(long long)d * N + n];
                    cv[k] = Cv ? (valid ? C(bm_io<S>::load(Cv + (long long)n * L + tb + k)) : C(0))
                               : Cc[(long long)d * N + n];
                    pa[k] = valid ? (rs[k] ? C(0) : E::eval(dt[k] * an)) : C(1);
                    pb[k] = valid ? dt[k] * uu[k] * bv[k] : C(0);
                    lb = pa[k] * lb + pb[k];
                    la = pa[k] * la;
                }
                // Reverse maps o -> a_t o + a_t C_t dy_t, composed from the last step.
                C qa = C(1), qb = C(0);
#pragma unroll
                for (int k = IT - 1; k >= 0; k--) {
                    qb = pa[k] * qb + pa[k] * cv[k] * dy[k];
                    qa = pa[k] * qa;
                }
                bm_scan_down(qa, qb, lane);
                C xa = __shfl_down_sync(BM_FULL, qa, 1), xb = __shfl_down_sync(BM_FULL, qb, 1);
                if (lane == 31) {
                    xa = C(1);
                    xb = C(0);
                }
                if (lane == 0) {
                    ra[warp] = qa;
                    rb[warp] = qb;
                }
                // The barrier inside bm_block_enter also publishes ra/rb.
                C h = bm_block_enter(la, lb, lane, warp, wa, wb, ck + n);
                const C oc = ocarry[c * N + n];
                C o = oc;
                for (int j = BM_NW - 1; j > warp; j--) o = ra[j] * o + rb[j];
                o = xa * o + xb;  // the adjoint entering this thread's last step from the right
                C onew = oc;
                if (tid == 0)
                    for (int j = BM_NW - 1; j >= 0; j--) onew = ra[j] * onew + rb[j];
                C hp[IT], hs[IT];
#pragma unroll
                for (int k = 0; k < IT; k++) {
                    hp[k] = h;
                    h = pa[k] * h + pb[k];
                    hs[k] = h;
                }
                C tA = C(0), tB = C(0), tC = C(0);
#pragma unroll
                for (int k = IT - 1; k >= 0; k--) {
                    const C g = cv[k] * dy[k] + o;
                    o = pa[k] * g;
                    if (tb + k < L) {
                        const C gda = g * hp[k] * pa[k];  // pa = 0 after a reset
                        gdt[k] += gda * a_raw + g * bv[k] * uu[k];
                        gdu[k] += g * bv[k] * dt[k];
                        tA += gda * dt[k];
                        const C gb = g * dt[k] * uu[k];
                        const C gc = hs[k] * dy[k];
                        if (bvar) {
                            C* p = pB + ((b * nblk + blockIdx.x) * N + n) * L + tb + k;
                            *p = c == 0 ? gb : *p + gb;  // thread-owned: fixed order over c
                        } else {
                            tB += gb;
                        }
                        if (cvar) {
                            C* p = pC + ((b * nblk + blockIdx.x) * N + n) * L + tb + k;
                            *p = c == 0 ? gc : *p + gc;
                        } else {
                            tC += gc;
                        }
                    }
                }
                tA = bm_warp_sum(tA);
                tB = bm_warp_sum(tB);
                tC = bm_warp_sum(tC);
                if (lane == 0) {
                    red[0][warp] = tA;
                    red[1][warp] = tB;
                    red[2][warp] = tC;
                }
                __syncthreads();
                if (tid == 0) {
                    ocarry[c * N + n] = onew;
                    C sA = C(0), sB = C(0), sC = C(0);
                    for (int w = 0; w < BM_NW; w++) {
                        sA += red[0][w];
                        sB += red[1][w];
                        sC += red[2][w];
                    }
                    accA[c * N + n] += sA;
                    accB[c * N + n] += sB;
                    accC[c * N + n] += sC;
                }
            }
            C tBias = C(0);
#pragma unroll
            for (int k = 0; k < IT; k++) {
                if (s.softplus && pre[k] <= C(20)) gdt[k] *= bm_sigmoid(pre[k]);
                if (tb + k < L) tBias += gdt[k];
            }
            bm_direct_store<S, IT, C>(du + row, tb, L, gdu);
            bm_direct_store<S, IT, C>(ddelta + row, tb, L, gdt);
            __syncthreads();  // thread 0 has finished reading `red`
            tD = bm_warp_sum(tD);
            tBias = bm_warp_sum(tBias);
            if (lane == 0) {
                red[0][warp] = tD;
                red[1][warp] = tBias;
            }
            __syncthreads();
            if (tid == 0) {
                C s0 = C(0), s1 = C(0);
                for (int w = 0; w < BM_NW; w++) {
                    s0 += red[0][w];
                    s1 += red[1][w];
                }
                accD[c] += s0;
                accBias[c] += s1;
            }
            __syncthreads();
        }
    }
    __syncthreads();
    for (int i = tid; i < cb * N; i += BM_NT) {
        const long long bd = b * s.dim + d0 + i / N;
        const int n = i % N;
        dh0[bd * N + n] = ocarry[i];
        pA[bd * N + n] = accA[i];
        if (!bvar) pB[bd * N + n] = accB[i];
        if (!cvar) pC[bd * N + n] = accC[i];
    }
    for (int i = tid; i < cb; i += BM_NT) {
        pD[b * s.dim + d0 + i] = accD[i];
        pbias[b * s.dim + d0 + i] = accBias[i];
    }
}

#define BM_SEL_BWD(SUF, S, IT)                                                                 \
    extern "C" __global__ void __launch_bounds__(BM_NT) selective_scan_bwd_##SUF(              \
        const S* u, const S* delta, const bm_io<S>::C* A, const void* Bp, const void* Cp,      \
        const bm_io<S>::C* Dv, const S* z, const bm_io<S>::C* bias, const bm_i64* seq,         \
        const bm_io<S>::C* ckpt, const S* dout, const bm_io<S>::C* dlast, S* du, S* ddelta,    \
        S* dz, bm_io<S>::C* dh0, bm_io<S>::C* pA, bm_io<S>::C* pB, bm_io<S>::C* pC,            \
        bm_io<S>::C* pD, bm_io<S>::C* pbias, int dim, int L, int N, int b_groups,              \
        int c_groups, int softplus, int chunk, int nck, int cb) {                              \
        bm_sel_dims s = {dim, L, N, b_groups, c_groups, softplus, chunk, nck};                  \
        sel_bwd_impl<S, IT>(u, delta, A, Bp, Cp, Dv, z, bias, seq, ckpt, dout, dlast, du,       \
                            ddelta, dz, dh0, pA, pB, pC, pD, pbias, s, cb);                     \
    }
BM_SEL_BWD(f32, float, 4)
BM_SEL_BWD(f64, double, 2)
BM_SEL_BWD(f16, bm_half, 4)
BM_SEL_BWD(bf16, bm_bf16, 4)
