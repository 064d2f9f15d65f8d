// bmojo_core CUDA kernels: Mamba-2's multi-head SSD scan, forward and backward (design
// §2.4), with the semantics of the CPU ops bmojo::ssd_fwd / bmojo::ssd_bwd (ssd.py).
//
// Layout (mamba_ssm's, contiguous): x, z (batch, L, H, P); dt (batch, L, H); A, dt_bias
// (H,); B, C (batch, L, G, N); D (H,) or (H, P); states (batch, H, P, N); seq (batch, L)
// int64. Outputs are head-major: out, dx, dz (batch, H, L, P). Every float in the compute
// type S (float or double).
//
// Recurrence per (batch row, head), with one scalar decay per step:
//   Δ_t = dt_t + dt_bias (softplus, identity above 20, if `softplus`; clamped to [lo, hi]
//   if `limit`), a_t = exp(Δ_t A), S_t = a_t S_{t-1} + (Δ_t x_t) ⊗ B_t (S is (P, N); the
//   state before t is zero where seq changes, t > 0), y_t = S_t C_t + D x_t,
//   out = y · silu(z) with a gate.
//
// Launch shape (both directions): grid (ceil(P / nw), H, batch), block nw warps (nw <= 8).
// Warp w of block x owns state row p = x·nw + w; lane l owns the columns n = l + 32 j,
// j < NJ, held in registers (one entry point per NJ = 1, 2, 4, 8, for N <= 32·NJ, so
// that each gets the registers of its own NJ; N <= 256). The sums over n (y, dx, the
// decay's gradient) are warp reductions, batched over several steps with a
// reduce-scatter (K steps reduced in K - 1 + log2(32 / K) shuffles instead of 5 K).
// Sums over rows (dB, dC, dΔ) go through shared memory in a fixed order; sums over the
// blocks of a head, the heads of a group and the batch are per-block partials that the
// Python wrapper reduces in a fixed order (no atomics: reproducible results).
#include "common.cuh"

#define BM_SSD_CHUNK 64  // steps per checkpoint (ssd.CHECKPOINT_CHUNK)
#define BM_SSD_GROUP 32  // forward steps per reduce-scatter (one step per lane)
#define BM_SSD_SB 8      // backward steps recomputed in registers at a time
#define BM_SSD_NSUB (BM_SSD_CHUNK / BM_SSD_SB)
#define BM_SSD_MAXW 8    // most warps (state rows) per block
#define BM_SSD_FULL 0xffffffffu

extern __shared__ __align__(16) unsigned char bm_dyn_smem[];

struct bm_ssd_dims {
    int L, H, P, G, N;
    int dpp;       // D is (H, P)
    int softplus;  // Δ = softplus(dt + dt_bias)
    int limit;     // Δ clamped to [lo, hi]
    double lo, hi;
};

// Δ of one step from dt + dt_bias; `gate` (if not null) gets dΔ/d(dt): softplus' times the
// clamp's pass-through (torch.clamp: the gradient passes where lo <= Δ <= hi).
template <typename C>
__device__ __forceinline__ C bm_ssd_delta(C pre, const bm_ssd_dims& s, C* gate) {
    C d = s.softplus ? bm_softplus(pre) : pre;
    C pass = C(1);
    if (s.limit) {
        const C lo = C(s.lo), hi = C(s.hi);
        if (d < lo || d > hi) pass = C(0);
        d = d < lo ? lo : (d > hi ? hi : d);
    }
    if (gate) *gate = pass * ((s.softplus && pre <= C(20)) ? bm_sigmoid(pre) : C(1));
    return d;
}

// A new sequence starts at t (t > 0): the state before t is zero.
__device__ __forceinline__ bool bm_ssd_reset(const bm_i64* seq, long long b, long long t, int L) {
    return seq != nullptr && t > 0 && seq[b * L + t] != seq[b * L + t - 1];
}

// Reduce-scatter of K values per lane (K a power of two <= 32) over the warp: afterwards
// v[0] of lane l is the sum over all 32 lanes of their v[l % K]. Every lane must call.
template <typename C, int K> __device__ __forceinline__ void bm_ssd_reduce_scatter(C (&v)[K],
                                                                                 int lane) {
#pragma unroll
    for (int o = K / 2; o >= 1; o >>= 1) {
        const bool up = (lane & o) != 0;
#pragma unroll
        for (int i = 0; i < o; i++) {
            const C send = up ? v[i] : v[i + o];
            const C keep = up ? v[i + o] : v[i];
            v[i] = keep + __shfl_xor_sync(BM_SSD_FULL, send, o);
        }
    }
#pragma unroll
    for (int o = K; o < 32; o <<= 1) v[0] += __shfl_xor_sync(BM_SSD_FULL, v[0], o);
}

// ------------------------------------------------------------------------------- forward
//
// Time in groups of 32 steps: Δ, the decay and the resets of the group are computed once
// (one step per lane of warp 0) and x staged in shared memory; each step updates the
// lane's state columns and keeps its partial of y; one reduce-scatter per group leaves
// y_t in lane t - t0, which applies D, the gate and stores. `ckpt` (may be null) gets the
// state before every BM_SSD_CHUNK steps: (batch, H, ceil(L / CHUNK), P, N).
template <typename C, int NJ>
__device__ __forceinline__ void ssd_fwd_impl(const C* x, const C* dt, const C* A, const C* Bm,
                                             const C* Cm, const C* Dv, const C* z,
                                             const C* bias, const C* h0, const bm_i64* seq,
                                             C* out, C* last, C* ckpt, const bm_ssd_dims s) {
    __shared__ C sdelta[BM_SSD_GROUP], sdecay[BM_SSD_GROUP];
    __shared__ int srst[BM_SSD_GROUP];
    __shared__ C sx[BM_SSD_MAXW][BM_SSD_GROUP];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int nw = blockDim.x >> 5;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int L = s.L, H = s.H, P = s.P, N = s.N;
    const int p = blockIdx.x * nw + w;
    const bool row = p < P;
    const long long bh = b * H + h;
    const int grp = h / (H / s.G);
    const C a_h = A[h];
    const C bias_h = bias ? bias[h] : C(0);
    const C d_p = (Dv && row) ? (s.dpp ? Dv[(long long)h * P + p] : Dv[h]) : C(0);
    const long long nck = (L + BM_SSD_CHUNK - 1) / BM_SSD_CHUNK;
    C st[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        const int n = lane + 32 * j;
        st[j] = (h0 && row && n < N) ? h0[(bh * P + p) * N + n] : C(0);
    }
    for (int t0 = 0; t0 < L; t0 += BM_SSD_GROUP) {
        __syncthreads();  // the previous group is done with the staged values
        {
            const long long t = (long long)t0 + lane;
            if (w == 0) {
                C dl = C(0), dc = C(1);
                int r = 0;
                if (t < L) {
                    dl = bm_ssd_delta(dt[(b * L + t) * H + h] + bias_h, s, (C*)nullptr);
                    dc = bm_exp(dl * a_h);
                    r = bm_ssd_reset(seq, b, t, L);
                }
                sdelta[lane] = dl;
                sdecay[lane] = dc;
                srst[lane] = r;
            }
            sx[w][lane] = (row && t < L) ? x[((b * L + t) * H + h) * P + p] : C(0);
        }
        __syncthreads();
        if (ckpt && row && t0 % BM_SSD_CHUNK == 0) {
            C* ck = ckpt + ((bh * nck + t0 / BM_SSD_CHUNK) * P + p) * N;
#pragma unroll
            for (int j = 0; j < NJ; j++)
                if (lane + 32 * j < N) ck[lane + 32 * j] = st[j];
        }
        const int steps = L - t0 < BM_SSD_GROUP ? L - t0 : BM_SSD_GROUP;
        C yp[BM_SSD_GROUP];
#pragma unroll
        for (int k = 0; k < BM_SSD_GROUP; k++) {
            C acc = C(0);
            if (k < steps) {
                const long long t = (long long)t0 + k;
                const long long bc = ((b * L + t) * s.G + grp) * N;
                const C dx = sdelta[k] * sx[w][k];
                const C dc = sdecay[k];
                const bool rs = srst[k] != 0;
#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    const int n = lane + 32 * j;
                    const C bv = n < N ? Bm[bc + n] : C(0);
                    const C cv = n < N ? Cm[bc + n] : C(0);
                    st[j] = (rs ? C(0) : dc * st[j]) + dx * bv;
                    acc += st[j] * cv;
                }
            }
            yp[k] = acc;
        }
        bm_ssd_reduce_scatter<C, BM_SSD_GROUP>(yp, lane);
        const long long t = (long long)t0 + lane;
        if (row && lane < steps) {
            C v = yp[0] + d_p * sx[w][lane];
            if (z) v *= bm_silu(z[((b * L + t) * H + h) * P + p]);
            out[(bh * L + t) * P + p] = v;
        }
    }
    if (row) {
#pragma unroll
        for (int j = 0; j < NJ; j++)
            if (lane + 32 * j < N) last[(bh * P + p) * N + lane + 32 * j] = st[j];
    }
}

// Entry points ssd_fwd_n<32·NJ>_<dtype> (the wrapper picks the smallest that holds N).
#define BM_SSD_FWD(NMAX, NJ, SUF, S)                                                           \
    extern "C" __global__ void __launch_bounds__(256) ssd_fwd_n##NMAX##_##SUF(                 \
        const S* x, const S* dt, const S* A, const S* Bm, const S* Cm, const S* Dv,            \
        const S* z, const S* bias, const S* h0, const bm_i64* seq, S* out, S* last, S* ckpt,   \
        int L, int H, int P, int G, int N, int dpp, int softplus, int limit, double lo,        \
        double hi) {                                                                           \
        const bm_ssd_dims s = {L, H, P, G, N, dpp, softplus, limit, lo, hi};                    \
        ssd_fwd_impl<S, NJ>(x, dt, A, Bm, Cm, Dv, z, bias, h0, seq, out, last, ckpt, s);        \
    }
#define BM_SSD_FWD_ALL(SUF, S)                                                                 \
    BM_SSD_FWD(32, 1, SUF, S)                                                                  \
    BM_SSD_FWD(64, 2, SUF, S)                                                                  \
    BM_SSD_FWD(128, 4, SUF, S)                                                                 \
    BM_SSD_FWD(256, 8, SUF, S)
BM_SSD_FWD_ALL(f32, float)
BM_SSD_FWD_ALL(f64, double)

// ------------------------------------------------------------------------------ backward
//
// One launch covers the time window [t_lo, t_hi) (t_lo a multiple of BM_SSD_CHUNK; the
// wrapper walks the windows from the end, so that the dB/dC partials are bounded). Per
// chunk, from the end: the checkpoint is advanced through the chunk once, leaving the
// state before every BM_SSD_SB steps in shared memory; then per sub-block, from the end,
// its BM_SSD_SB states are recomputed in registers and the adjoint G (the gradient of
// the state after the step, one row per warp) runs backwards:
//   g_t = dy_t C_t + G,  G <- a_t g_t (0 at a reset),
//   dx_t = Δ_t (g_t·B_t) + D dy_t,  dB_t += Δ_t x_t g_t,  dC_t += dy_t S_t,
//   dΔ_t = x_t·(g_t B_t) + (g_t·S_{t-1}) a_t A,  dA += (g_t·S_{t-1}) a_t Δ_t
// with dy = dout · silu(z) and dz = dout · (S_t C_t + D x_t) · silu'(z) under a gate.
//
// In/out: `gcar` (batch, H, P, N), the adjoint entering the window from the right
// (dlast for the last window), replaced by the one leaving it (dinitial_states after the
// first window); `pD` (batch, H, P) accumulates Σ_t dy x over the windows.
// Out: dx, dz (batch, H, L, P); per block (x of the grid, `ntile` of them): pB, pC
// (batch, H, ntile, W, N) at t - t_lo, the rows' sums of dB and dC; pxg, pgs (batch, H,
// ntile, L): Σ_rows x (g·B) and Σ_rows (g·S_{t-1}) a_t, finished by ssd_bwd_dt.
// Dynamic shared memory: (BM_SSD_NSUB + 2) · nw · N · sizeof(C).
template <typename C, int NJ>
__device__ __forceinline__ void ssd_bwd_impl(
    const C* x, const C* dt, const C* A, const C* Bm, const C* Cm, const C* Dv, const C* z,
    const C* bias, const bm_i64* seq, const C* ckpt, const C* dout, C* gcar, C* dx, C* dz,
    C* pB, C* pC, C* pxg, C* pgs, C* pD, const bm_ssd_dims s, int t_lo, int t_hi, int W) {
    constexpr int SB = BM_SSD_SB;
    __shared__ C sdelta[BM_SSD_CHUNK], sdecay[BM_SSD_CHUNK];
    __shared__ int srst[BM_SSD_CHUNK];
    __shared__ C sx[BM_SSD_MAXW][BM_SSD_CHUNK];
    __shared__ C sdy[BM_SSD_MAXW][SB], sxg[BM_SSD_MAXW][SB], sgs[BM_SSD_MAXW][SB];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int nw = blockDim.x >> 5, nt = blockDim.x;
    const int h = blockIdx.y;
    const long long b = blockIdx.z;
    const int L = s.L, H = s.H, P = s.P, N = s.N;
    const int tile = blockIdx.x, ntile = gridDim.x;
    const int p = tile * nw + w;
    const bool row = p < P;
    const long long bh = b * H + h;
    const int grp = h / (H / s.G);
    const C a_h = A[h];
    const C bias_h = bias ? bias[h] : C(0);
    const C d_p = (Dv && row) ? (s.dpp ? Dv[(long long)h * P + p] : Dv[h]) : C(0);
    const long long nck = (L + BM_SSD_CHUNK - 1) / BM_SSD_CHUNK;
    C* subck = reinterpret_cast<C*>(bm_dyn_smem);  // (NSUB, nw, N): this thread's columns
    C* red = subck + BM_SSD_NSUB * nw * N;          // (2, nw, N): dB, dC rows of one step
    C G[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        const int n = lane + 32 * j;
        G[j] = (row && n < N) ? gcar[(bh * P + p) * N + n] : C(0);
    }
    C accD = C(0);
    for (int c = (t_hi - 1) / BM_SSD_CHUNK; c >= t_lo / BM_SSD_CHUNK; c--) {
        const int t0 = c * BM_SSD_CHUNK;
        const int tl = L - t0 < BM_SSD_CHUNK ? L - t0 : BM_SSD_CHUNK;
        __syncthreads();  // the previous chunk is done with the staged values
        for (int i = tid; i < BM_SSD_CHUNK; i += nt) {
            const long long t = (long long)t0 + i;
            C dl = C(0), dc = C(1);
            int r = 0;
            if (i < tl) {
                dl = bm_ssd_delta(dt[(b * L + t) * H + h] + bias_h, s, (C*)nullptr);
                dc = bm_exp(dl * a_h);
                r = bm_ssd_reset(seq, b, t, L);
            }
            sdelta[i] = dl;
            sdecay[i] = dc;
            srst[i] = r;
        }
        for (int i = lane; i < BM_SSD_CHUNK; i += 32)
            sx[w][i] = (row && i < tl) ? x[((b * L + t0 + i) * H + h) * P + p] : C(0);
        __syncthreads();
        // The chunk's states every SB steps, from its checkpoint.
        const int nsub = (tl + SB - 1) / SB;
        {
            C st[NJ];
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                const int n = lane + 32 * j;
                st[j] = (row && n < N) ? ckpt[((bh * nck + c) * P + p) * N + n] : C(0);
            }
            for (int sb = 0; sb < nsub; sb++) {
#pragma unroll
                for (int j = 0; j < NJ; j++)
                    if (lane + 32 * j < N) subck[(sb * nw + w) * N + lane + 32 * j] = st[j];
                if (sb == nsub - 1) break;
#pragma unroll
                for (int k = 0; k < SB; k++) {  // a full sub-block (not the last)
                    const int i = sb * SB + k;
                    const long long bc = ((b * L + t0 + i) * s.G + grp) * N;
                    const C dxv = sdelta[i] * sx[w][i];
                    const C dc = sdecay[i];
                    const bool rs = srst[i] != 0;
#pragma unroll
                    for (int j = 0; j < NJ; j++) {
                        const int n = lane + 32 * j;
                        const C bv = n < N ? Bm[bc + n] : C(0);
                        st[j] = (rs ? C(0) : dc * st[j]) + dxv * bv;
                    }
                }
            }
        }
        for (int sb = nsub - 1; sb >= 0; sb--) {
            const int ks = sb * SB;
            const int sl = tl - ks < SB ? tl - ks : SB;
            // hs[k]: the state before step ks + k of the chunk (hs[k + 1] after it).
            C hs[SB + 1][NJ];
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                const int n = lane + 32 * j;
                hs[0][j] = n < N ? subck[(sb * nw + w) * N + n] : C(0);
            }
#pragma unroll
            for (int k = 0; k < SB; k++) {
                if (k < sl) {
                    const int i = ks + k;
                    const long long bc = ((b * L + t0 + i) * s.G + grp) * N;
                    const C dxv = sdelta[i] * sx[w][i];
                    const C dc = sdecay[i];
                    const bool rs = srst[i] != 0;
#pragma unroll
                    for (int j = 0; j < NJ; j++) {
                        const int n = lane + 32 * j;
                        const C bv = n < N ? Bm[bc + n] : C(0);
                        hs[k + 1][j] = (rs ? C(0) : dc * hs[k][j]) + dxv * bv;
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < NJ; j++) hs[k + 1][j] = hs[k][j];
                }
            }
            __syncthreads();  // the previous sub-block is done with sdy, sxg, sgs
            // dy per step of the sub-block (lane k), through the gate if any.
            if (z) {
                C yp[SB];
#pragma unroll
                for (int k = 0; k < SB; k++) {
                    C acc = C(0);
                    if (k < sl) {
                        const long long bc = ((b * L + t0 + ks + k) * s.G + grp) * N;
#pragma unroll
                        for (int j = 0; j < NJ; j++) {
                            const int n = lane + 32 * j;
                            if (n < N) acc += hs[k + 1][j] * Cm[bc + n];
                        }
                    }
                    yp[k] = acc;
                }
                bm_ssd_reduce_scatter<C, SB>(yp, lane);
                if (lane < SB) {
                    const int k = lane;
                    C dyv = C(0);
                    if (row && k < sl) {
                        const long long t = (long long)t0 + ks + k;
                        const C go = dout[(bh * L + t) * P + p];
                        const C zv = z[((b * L + t) * H + h) * P + p];
                        const C y = yp[0] + d_p * sx[w][ks + k];
                        const C sg = bm_sigmoid(zv);
                        dz[(bh * L + t) * P + p] = go * y * sg * (C(1) + zv * (C(1) - sg));
                        dyv = go * zv * sg;
                    }
                    sdy[w][k] = dyv;
                }
            } else if (lane < SB) {
                const int k = lane;
                sdy[w][k] = (row && k < sl) ? dout[(bh * L + t0 + ks + k) * P + p] : C(0);
            }
            __syncthreads();
            // The adjoint, backwards through the sub-block.
            C px[SB], pg[SB];
#pragma unroll
            for (int k = SB - 1; k >= 0; k--) {
                px[k] = C(0);
                pg[k] = C(0);
                if (k < sl) {
                    const int i = ks + k;
                    const long long t = (long long)t0 + i;
                    const long long bc = ((b * L + t) * s.G + grp) * N;
                    const C dxb = sdelta[i] * sx[w][i];
                    const C dc = sdecay[i];
                    const bool rs = srst[i] != 0;
                    const C dyv = sdy[w][k];
                    C gb = C(0), gs = C(0);
#pragma unroll
                    for (int j = 0; j < NJ; j++) {
                        const int n = lane + 32 * j;
                        const bool in = n < N;
                        const C bv = in ? Bm[bc + n] : C(0);
                        const C cv = in ? Cm[bc + n] : C(0);
                        const C g = dyv * cv + G[j];
                        if (in) {
                            red[w * N + n] = dxb * g;
                            red[(nw + w) * N + n] = dyv * hs[k + 1][j];
                        }
                        gb += g * bv;
                        gs += g * hs[k][j];
                        G[j] = rs ? C(0) : dc * g;
                    }
                    px[k] = gb;
                    pg[k] = rs ? C(0) : gs;
                    __syncthreads();
                    // dB, dC of the step: the block's rows summed in row order.
                    const long long off = ((bh * ntile + tile) * W + (t - t_lo)) * N;
                    for (int e = tid; e < 2 * N; e += nt) {
                        const int q = e >= N, n = e - q * N;
                        C acc = C(0);
                        for (int v = 0; v < nw; v++) acc += red[(q * nw + v) * N + n];
                        (q ? pC : pB)[off + n] = acc;
                    }
                    __syncthreads();
                }
            }
            // g·B (lanes 0..SB-1) and g·S_{t-1} (lanes SB..2SB-1) of each step.
            C v2[2 * SB];
#pragma unroll
            for (int k = 0; k < SB; k++) {
                v2[k] = px[k];
                v2[SB + k] = pg[k];
            }
            bm_ssd_reduce_scatter<C, 2 * SB>(v2, lane);
            if (lane < 2 * SB) {
                const int k = lane & (SB - 1);
                if (k < sl) {
                    const int i = ks + k;
                    if (lane < SB) {
                        const C dyv = sdy[w][k];
                        if (row) dx[(bh * L + t0 + i) * P + p] = sdelta[i] * v2[0] + d_p * dyv;
                        accD += dyv * sx[w][i];
                        sxg[w][k] = sx[w][i] * v2[0];
                    } else {
                        sgs[w][k] = v2[0] * sdecay[i];
                    }
                }
            }
            __syncthreads();
            if (tid < sl) {
                C a1 = C(0), a2 = C(0);
                for (int v = 0; v < nw; v++) {
                    a1 += sxg[v][tid];
                    a2 += sgs[v][tid];
                }
                const long long o = (bh * ntile + tile) * (long long)L + t0 + ks + tid;
                pxg[o] = a1;
                pgs[o] = a2;
            }
        }
    }
    if (row) {
#pragma unroll
        for (int j = 0; j < NJ; j++)
            if (lane + 32 * j < N) gcar[(bh * P + p) * N + lane + 32 * j] = G[j];
    }
    accD = bm_warp_sum(accD);
    if (row && lane == 0) pD[bh * P + p] += accD;
}

#define BM_SSD_BWD_ARGS                                                                        \
    x, dt, A, Bm, Cm, Dv, z, bias, seq, ckpt, dout, gcar, dx, dz, pB, pC, pxg, pgs, pD, s,     \
        t_lo, t_hi, W
// Entry points ssd_bwd_n<32·NJ>_<dtype>. float asks for two blocks of 256 threads per SM
// (at most 128 registers: Mamba-2's N = 128 spills a few bytes, 64 none); double keeps
// up to 255 registers.
#define BM_SSD_BWD(NMAX, NJ, SUF, S, MINB)                                                     \
    extern "C" __global__ void __launch_bounds__(256, MINB) ssd_bwd_n##NMAX##_##SUF(           \
        const S* x, const S* dt, const S* A, const S* Bm, const S* Cm, const S* Dv,            \
        const S* z, const S* bias, const bm_i64* seq, const S* ckpt, const S* dout, S* gcar,   \
        S* dx, S* dz, S* pB, S* pC, S* pxg, S* pgs, S* pD, int L, int H, int P, int G, int N,  \
        int dpp, int softplus, int limit, double lo, double hi, int t_lo, int t_hi, int W) {   \
        const bm_ssd_dims s = {L, H, P, G, N, dpp, softplus, limit, lo, hi};                    \
        ssd_bwd_impl<S, NJ>(BM_SSD_BWD_ARGS);                                                  \
    }
#define BM_SSD_BWD_ALL(SUF, S, MINB)                                                           \
    BM_SSD_BWD(32, 1, SUF, S, MINB)                                                            \
    BM_SSD_BWD(64, 2, SUF, S, MINB)                                                            \
    BM_SSD_BWD(128, 4, SUF, S, MINB)                                                           \
    BM_SSD_BWD(256, 8, SUF, S, MINB)
BM_SSD_BWD_ALL(f32, float, 2)
BM_SSD_BWD_ALL(f64, double, 1)

// The gradient of dt per (batch row, head, step), one thread each (grid-stride): the
// blocks' partials summed in block order, dΔ = Σ x (g·B) + Σ (g·S_{t-1}) a A, ddt = dΔ ·
// gate; pdA (batch, H, L) gets Σ (g·S_{t-1}) a Δ (the wrapper sums it and ddt over batch
// and time for dA and ddt_bias).
template <typename C>
__device__ __forceinline__ void ssd_bwd_dt_impl(const C* dt, const C* A, const C* bias,
                                                const C* pxg, const C* pgs, C* ddt, C* pdA,
                                                const bm_ssd_dims s, int batch, int ntile) {
    const long long total = (long long)batch * s.H * s.L;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long t = e % s.L, bh = e / s.L;
        const int h = (int)(bh % s.H);
        const long long b = bh / s.H;
        C xg = C(0), gs = C(0);
        for (int i = 0; i < ntile; i++) {
            xg += pxg[(bh * ntile + i) * s.L + t];
            gs += pgs[(bh * ntile + i) * s.L + t];
        }
        C gate;
        const C pre = dt[(b * s.L + t) * s.H + h] + (bias ? bias[h] : C(0));
        const C d = bm_ssd_delta(pre, s, &gate);
        ddt[e] = (xg + gs * A[h]) * gate;
        pdA[e] = gs * d;
    }
}

#define BM_SSD_DT(SUF, S)                                                                      \
    extern "C" __global__ void ssd_bwd_dt_##SUF(                                               \
        const S* dt, const S* A, const S* bias, const S* pxg, const S* pgs, S* ddt, S* pdA,    \
        int L, int H, int P, int G, int N, int dpp, int softplus, int limit, double lo,        \
        double hi, int batch, int ntile) {                                                     \
        const bm_ssd_dims s = {L, H, P, G, N, dpp, softplus, limit, lo, hi};                    \
        ssd_bwd_dt_impl<S>(dt, A, bias, pxg, pgs, ddt, pdA, s, batch, ntile);                   \
    }
BM_SSD_DT(f32, float)
BM_SSD_DT(f64, double)
