// bmojo_core CUDA kernels: the streaming step of the selective SSM (design §2.3), the
// semantics of the CPU op bmojo::selective_state_update (step.py).
//
// Layout: state (slots, dim, N); x, dt, z, out (batch, T, dim); B, C (batch, T, G, N);
// A (dim, N); D, dt_bias (dim,); slots (batch,) int64, may be null (row i uses slot i);
// snaps (batch, T, dim, N) may be null. Every tensor in the storage type S.
//
// One thread per (row, channel) runs the T tokens in order over its N state values, in
// groups of BM_STEP_G: a group's loads are all issued before its stores (restrict
// pointers), so the decode step costs ceil(N / BM_STEP_G) memory round trips, not N.
// A negative slot is a padding row: zero output, nothing written. A slot past the pool
// (which the Python wrapper rejects when it may synchronise) is never dereferenced: the
// row's output is NaN so that the error cannot pass silently.
#include "common.cuh"

#define BM_STEP_G 8

template <typename S>
__device__ __forceinline__ void sel_step_impl(S* __restrict__ state, const S* __restrict__ x,
                                              const S* __restrict__ dt, const S* __restrict__ A,
                                              const S* __restrict__ B, const S* __restrict__ C_,
                                              const S* __restrict__ Dv, const S* __restrict__ z,
                                              const S* __restrict__ bias,
                                              const bm_i64* __restrict__ slots,
                                              S* __restrict__ out, S* __restrict__ snaps,
                                              int batch, int ntok, int dim, int N, int groups,
                                              int softplus, long long nslots) {
    typedef typename bm_io<S>::C C;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const long long b = blockIdx.y;
    if (d >= dim || b >= batch) return;
    const long long slot = slots ? slots[b] : b;
    if (slot < 0 || slot >= nslots) {
        const C fill = slot < 0 ? C(0) : C(0) / C(0);
        for (int t = 0; t < ntok; t++) bm_io<S>::store(out + (b * ntok + t) * dim + d, fill);
        return;
    }
    S* h = state + (slot * dim + d) * N;
    const S* a = A + (long long)d * N;
    const long long g = d / (dim / groups);
    const C Dd = Dv ? C(bm_io<S>::load(Dv + d)) : C(0);
    const C bias_d = bias ? C(bm_io<S>::load(bias + d)) : C(0);
    for (int t = 0; t < ntok; t++) {
        const long long bt = b * ntok + t;
        const C xv = bm_io<S>::load(x + bt * dim + d);
        C dv = C(bm_io<S>::load(dt + bt * dim + d)) + bias_d;
        if (softplus) dv = bm_softplus(dv);
        const C dx = dv * xv;
        const S* bb = B + (bt * groups + g) * N;
        const S* cc = C_ + (bt * groups + g) * N;
        S* sn = snaps ? snaps + (bt * dim + d) * N : nullptr;
        C y = C(0);
        for (int n0 = 0; n0 < N; n0 += BM_STEP_G) {
            C hv[BM_STEP_G], av[BM_STEP_G], bv[BM_STEP_G], cv[BM_STEP_G];
#pragma unroll
            for (int k = 0; k < BM_STEP_G; k++) {
                const bool in = n0 + k < N;
                hv[k] = in ? C(bm_io<S>::load(h + n0 + k)) : C(0);
                av[k] = in ? C(bm_io<S>::load(a + n0 + k)) : C(0);
                bv[k] = in ? C(bm_io<S>::load(bb + n0 + k)) : C(0);
                cv[k] = in ? C(bm_io<S>::load(cc + n0 + k)) : C(0);
            }
#pragma unroll
            for (int k = 0; k < BM_STEP_G; k++) {
                if (n0 + k >= N) break;
                const C hn = bm_exp(dv * av[k]) * hv[k] + dx * bv[k];
                bm_io<S>::store(h + n0 + k, hn);
                if (sn) bm_io<S>::store(sn + n0 + k, hn);
                y += cv[k] * hn;
            }
        }
        y += Dd * xv;
        if (z) y *= bm_silu(C(bm_io<S>::load(z + bt * dim + d)));
        bm_io<S>::store(out + bt * dim + d, y);
    }
}

#define BM_STEP(SUF, S)                                                                        \
    extern "C" __global__ void selective_state_update_##SUF(                                   \
        S* state, const S* x, const S* dt, const S* A, const S* B, const S* C_, const S* Dv,   \
        const S* z, const S* bias, const bm_i64* slots, S* out, S* snaps, int batch, int ntok, \
        int dim, int N, int groups, int softplus, long long nslots) {                          \
        sel_step_impl<S>(state, x, dt, A, B, C_, Dv, z, bias, slots, out, snaps, batch, ntok,  \
                         dim, N, groups, softplus, nslots);                                    \
    }
BM_STEP(f32, float)
BM_STEP(f64, double)
BM_STEP(f16, bm_half)
BM_STEP(bf16, bm_bf16)
