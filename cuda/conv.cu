// bmojo_core CUDA kernels: causal depthwise convolution (design §3), forward, backward and
// the streaming update, with the semantics of rust/kernels/src/conv.rs.
//
// Layout: x, out, dx (batch, dim, L); weight (dim, K); bias (dim,); initial / final states
// (batch, dim, K-1), oldest first; seq_idx (batch, L) int64. Output t reads the inputs
// t-K+1 .. t; taps before 0 read the initial state (or zero), taps across a change of
// seq_idx are zero. Every output element is one thread (no shared state); the weight and
// bias gradients are per-block partials over fixed chunks of (batch, time), summed in chunk
// order by a second kernel: no float atomics, results independent of the launch shape.
#include "common.cuh"


__device__ __forceinline__ float bmc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double bmc_fma(double a, double b, double c) { return fma(a, b, c); }

// Lowest input index whose tap output t may read (>= t-km; negative: initial state).
// With seq_idx, taps stop at the start of t's run of equal ids (as the CPU's seg_starts).
__device__ __forceinline__ long long conv_lo(const long long* seq, long long t, int km) {
    long long lo = t - km;
    if (seq == nullptr) return lo;
    long long j = t;
    if (lo < 0) lo = 0;
    while (j > lo && seq[j - 1] == seq[j]) --j;
    return j;
}

// Input j as read by a tap whose lowest valid index is lo.
template <typename S>
__device__ __forceinline__ typename bm_io<S>::C conv_tap(const S* xr, const S* initr, long long j,
                                                         long long lo, int km) {
    typedef typename bm_io<S>::C C;
    if (j < lo) return C(0);
    if (j >= 0) return bm_io<S>::load(xr + j);
    return initr != nullptr ? bm_io<S>::load(initr + (km + j)) : C(0);
}

// Pre-activation of output t of row r (bias + Σ_k w[k] x_{t-K+1+k}, k ascending); seq is
// the row's seq_idx (or null).
template <typename S>
__device__ __forceinline__ typename bm_io<S>::C conv_pre(const S* x, const S* w, const S* bias,
                                                         const long long* seq, const S* init,
                                                         long long r, int d, long long t, int L,
                                                         int K) {
    typedef typename bm_io<S>::C C;
    const int km = K - 1;
    const S* xr = x + r * L;
    const S* ir = init != nullptr ? init + r * km : nullptr;
    const long long lo = conv_lo(seq, t, km);
    const S* wr = w + (long long)d * K;
    C acc = bias != nullptr ? bm_io<S>::load(bias + d) : C(0);
    for (int k = 0; k < K; ++k) {
        acc = bmc_fma(bm_io<S>::load(wr + k), conv_tap<S>(xr, ir, t - km + k, lo, km), acc);
    }
    return acc;
}

template <typename C> __device__ __forceinline__ C conv_dsilu(C p) {
    C s = bm_sigmoid(p);
    return s * (p * (C(1) - s) + C(1));
}

// ---- forward: out (B, D, L), one thread per element -------------------------------------
template <typename S>
__device__ void conv_fwd(const S* x, const S* w, const S* bias, const long long* seq,
                         const S* init, S* out, int B, int D, int L, int K, int silu) {
    typedef typename bm_io<S>::C C;
    const long long total = (long long)B * D * L;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long r = e / L, t = e - r * L;
        const int d = (int)(r % D);
        const long long* sr = seq != nullptr ? seq + (r / D) * L : nullptr;
        C v = conv_pre<S>(x, w, bias, sr, init, r, d, t, L, K);
        if (silu) v = bm_silu(v);
        bm_io<S>::store(out + e, v);
    }
}

// ---- final states: the last K-1 inputs (initial ones when L < K-1) ----------------------
template <typename S>
__device__ void conv_final(const S* x, const S* init, S* fin, int B, int D, int L, int K) {
    typedef typename bm_io<S>::C C;
    const int km = K - 1;
    const long long total = (long long)B * D * km;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long r = e / km;
        const int i = (int)(e - r * km);
        const long long j = (long long)L - km + i;
        C v = j >= 0 ? bm_io<S>::load(x + r * L + j)
                     : (init != nullptr ? bm_io<S>::load(init + r * km + (km + j)) : C(0));
        bm_io<S>::store(fin + e, v);
    }
}

// ---- backward 1: dpre = dout · silu'(pre) (only launched with SiLU) ---------------------
template <typename S>
__device__ void conv_dpre(const S* x, const S* w, const S* bias, const long long* seq,
                          const S* init, const S* dout, S* dpre, int B, int D, int L, int K) {
    typedef typename bm_io<S>::C C;
    const long long total = (long long)B * D * L;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long r = e / L, t = e - r * L;
        const int d = (int)(r % D);
        const long long* sr = seq != nullptr ? seq + (r / D) * L : nullptr;
        C p = conv_pre<S>(x, w, bias, sr, init, r, d, t, L, K);
        bm_io<S>::store(dpre + e, bm_io<S>::load(dout + e) * conv_dsilu(p));
    }
}

// ---- backward 2: dx_j = Σ_k w[k] dpre_{j+K-1-k} (same-sequence outputs) + dfinal --------
template <typename S>
__device__ void conv_dx(const S* w, const long long* seq, const S* dpre, const S* dfinal, S* dx,
                        int B, int D, int L, int K) {
    typedef typename bm_io<S>::C C;
    const int km = K - 1;
    const long long total = (long long)B * D * L;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long r = e / L, j = e - r * L;
        const int d = (int)(r % D);
        // Highest output reading input j: j+km, cut at L-1 and at the end of j's run.
        long long hi = j + km < L - 1 ? j + km : (long long)L - 1;
        if (seq != nullptr) {
            const long long* sr = seq + (r / D) * L;
            long long t = j;
            while (t < hi && sr[t + 1] == sr[t]) ++t;
            hi = t;
        }
        const S* wr = w + (long long)d * K;
        const S* dr = dpre + r * L;
        C acc = C(0);
        for (int k = 0; k < K; ++k) {
            const long long t = j + km - k;
            if (t <= hi) acc = bmc_fma(bm_io<S>::load(wr + k), bm_io<S>::load(dr + t), acc);
        }
        if (dfinal != nullptr && j >= (long long)L - km) {
            acc += bm_io<S>::load(dfinal + r * km + (j - ((long long)L - km)));
        }
        bm_io<S>::store(dx + e, acc);
    }
}

// ---- backward 3: dinitial_states[q] = Σ_{k<=q, q-k<L} w[k] dpre_{q-k} (+ dfinal[q-L]) ----
template <typename S>
__device__ void conv_dinit(const S* w, const S* dpre, const S* dfinal, S* dinit, int B, int D,
                           int L, int K) {
    typedef typename bm_io<S>::C C;
    const int km = K - 1;
    const long long total = (long long)B * D * km;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long r = e / km;
        const int q = (int)(e - r * km);
        const int d = (int)(r % D);
        const S* wr = w + (long long)d * K;
        C acc = C(0);
        for (int k = 0; k <= q; ++k) {
            const int t = q - k;
            if (t < L) acc = bmc_fma(bm_io<S>::load(wr + k), bm_io<S>::load(dpre + r * L + t), acc);
        }
        if (dfinal != nullptr && q >= L) acc += bm_io<S>::load(dfinal + r * km + (q - L));
        bm_io<S>::store(dinit + e, acc);
    }
}

// ---- backward 4: weight / bias partials ---------------------------------------------------
// Block (d, c) sums chunk c (elements [c·chunk, (c+1)·chunk) of the flattened (batch, time)
// index) for channel d: part[(c·D + d)·(K+1) + k] = Σ dpre_t · tap_k(t), k = K: Σ dpre_t.
// Each thread sums its strided elements in order, then a fixed tree over the block.
#define CONV_DW_THREADS 256
template <typename S>
__device__ void conv_dw_part(const S* x, const long long* seq, const S* init, const S* dpre,
                             typename bm_io<S>::C* part, int B, int D, int L, int K,
                             long long chunk) {
    typedef typename bm_io<S>::C C;
    __shared__ C red[CONV_DW_THREADS / 32];
    const int d = blockIdx.x;
    const long long c = blockIdx.y;
    const int km = K - 1;
    const long long n = (long long)B * L;
    const long long e0 = c * chunk;
    const long long e1 = e0 + chunk < n ? e0 + chunk : n;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int k = 0; k <= K; ++k) {
        C acc = C(0);
        for (long long e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
            const long long b = e / L, t = e - b * L;
            const long long r = b * D + d;
            const C g = bm_io<S>::load(dpre + r * L + t);
            if (k == K) {
                acc += g;
            } else {
                const long long* sr = seq != nullptr ? seq + b * L : nullptr;
                const long long lo = conv_lo(sr, t, km);
                const S* ir = init != nullptr ? init + r * km : nullptr;
                acc = bmc_fma(g, conv_tap<S>(x + r * L, ir, t - km + k, lo, km), acc);
            }
        }
        acc = bm_warp_sum(acc);
        if (lane == 0) red[warp] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            C s = red[0];
            for (int i = 1; i < (int)(blockDim.x >> 5); ++i) s += red[i];
            part[(c * D + d) * (K + 1) + k] = s;
        }
        __syncthreads();
    }
}

// out[d, k] (k < K: dweight, k = K: dbias) = Σ_c part[c, d, k], chunks in order.
template <typename S>
__device__ void conv_dw_reduce(const typename bm_io<S>::C* part, S* dw, S* db, int D, int K,
                               int nchunks) {
    typedef typename bm_io<S>::C C;
    const long long total = (long long)D * (K + 1);
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long d = e / (K + 1);
        const int k = (int)(e - d * (K + 1));
        C s = C(0);
        for (int c = 0; c < nchunks; ++c) s += part[(long long)c * total + e];
        if (k < K) bm_io<S>::store(dw + d * K + k, s);
        else bm_io<S>::store(db + d, s);
    }
}

// ---- streaming update: one thread per (row, channel) ---------------------------------------
// state (slots, D, S_len): a shift buffer (newest last) or, with cache_seqlens, a ring whose
// next write index is cache_seqlens[b] mod S_len. slots[b] < 0 (or out of range): padding
// row, output zero, nothing written.
template <typename S>
__device__ void conv_update(const S* x, S* state, const S* w, const S* bias, int silu,
                            const long long* cache, const long long* slots, S* out, int B, int D,
                            int T, int K, int SL, int nslots) {
    typedef typename bm_io<S>::C C;
    const long long total = (long long)B * D;
    const int km = K - 1;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long b = e / D;
        const int d = (int)(e - b * D);
        const long long slot = slots != nullptr ? slots[b] : b;
        S* o = out + e * T;
        if (slot < 0 || slot >= nslots) {
            for (int t = 0; t < T; ++t) bm_io<S>::store(o + t, C(0));
            continue;
        }
        S* sr = state + (slot * D + d) * SL;
        const S* xr = x + e * T;
        const S* wr = w + (long long)d * K;
        long long c0 = -1;
        if (cache != nullptr) {
            const long long m = SL > 0 ? SL : 1;
            c0 = cache[b] % m;
            if (c0 < 0) c0 += m;
        }
        const C bv = bias != nullptr ? bm_io<S>::load(bias + d) : C(0);
        // Window index q: q < km reads the state's K-1 newest entries, q >= km token q-km.
        for (int t = 0; t < T; ++t) {
            C acc = bv;
            for (int k = 0; k < K; ++k) {
                const int q = t + k;
                C v;
                if (q >= km) v = bm_io<S>::load(xr + (q - km));
                else if (c0 < 0) v = bm_io<S>::load(sr + (SL - km + q));
                else v = bm_io<S>::load(sr + (c0 + SL - km + q) % SL);
                acc = bmc_fma(bm_io<S>::load(wr + k), v, acc);
            }
            if (silu) acc = bm_silu(acc);
            bm_io<S>::store(o + t, acc);
        }
        if (SL == 0) continue;
        if (c0 < 0) {
            if (T >= SL) {
                for (int i = 0; i < SL; ++i) sr[i] = xr[T - SL + i];
            } else {
                for (int i = 0; i < SL - T; ++i) sr[i] = sr[i + T];
                for (int i = 0; i < T; ++i) sr[SL - T + i] = xr[i];
            }
        } else {
            for (int t = 0; t < T; ++t) sr[(c0 + t) % SL] = xr[t];
        }
    }
}

// ---- entry points ---------------------------------------------------------------------------
#define CONV_ENTRIES(sfx, S)                                                                     \
    extern "C" __global__ void causal_conv1d_fwd_##sfx(const S* x, const S* w, const S* bias,    \
                                                       const long long* seq, const S* init,      \
                                                       S* out, int B, int D, int L, int K,       \
                                                       int silu) {                               \
        conv_fwd<S>(x, w, bias, seq, init, out, B, D, L, K, silu);                               \
    }                                                                                            \
    extern "C" __global__ void causal_conv1d_final_##sfx(const S* x, const S* init, S* fin,      \
                                                         int B, int D, int L, int K) {           \
        conv_final<S>(x, init, fin, B, D, L, K);                                                 \
    }                                                                                            \
    extern "C" __global__ void causal_conv1d_dpre_##sfx(                                         \
        const S* x, const S* w, const S* bias, const long long* seq, const S* init,              \
        const S* dout, S* dpre, int B, int D, int L, int K) {                                    \
        conv_dpre<S>(x, w, bias, seq, init, dout, dpre, B, D, L, K);                             \
    }                                                                                            \
    extern "C" __global__ void causal_conv1d_dx_##sfx(const S* w, const long long* seq,          \
                                                      const S* dpre, const S* dfinal, S* dx,     \
                                                      int B, int D, int L, int K) {              \
        conv_dx<S>(w, seq, dpre, dfinal, dx, B, D, L, K);                                        \
    }                                                                                            \
    extern "C" __global__ void causal_conv1d_dinit_##sfx(const S* w, const S* dpre,              \
                                                         const S* dfinal, S* dinit, int B,       \
                                                         int D, int L, int K) {                  \
        conv_dinit<S>(w, dpre, dfinal, dinit, B, D, L, K);                                       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(CONV_DW_THREADS) causal_conv1d_dw_part_##sfx(   \
        const S* x, const long long* seq, const S* init, const S* dpre,                          \
        typename bm_io<S>::C* part, int B, int D, int L, int K, long long chunk) {               \
        conv_dw_part<S>(x, seq, init, dpre, part, B, D, L, K, chunk);                            \
    }                                                                                            \
    extern "C" __global__ void causal_conv1d_dw_reduce_##sfx(                                    \
        const typename bm_io<S>::C* part, S* dw, S* db, int D, int K, int nchunks) {             \
        conv_dw_reduce<S>(part, dw, db, D, K, nchunks);                                          \
    }                                                                                            \
    extern "C" __global__ void causal_conv1d_update_##sfx(                                       \
        const S* x, S* state, const S* w, const S* bias, int silu, const long long* cache,       \
        const long long* slots, S* out, int B, int D, int T, int K, int SL, int nslots) {        \
        conv_update<S>(x, state, w, bias, silu, cache, slots, out, B, D, T, K, SL, nslots);      \
    }

BM_DTYPES(CONV_ENTRIES)
