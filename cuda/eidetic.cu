// bmojo_core CUDA kernels: eidetic token retention (design §6.1, §6.2), with the semantics of
// rust/kernels/src/eidetic.rs.
//
// Innovation scores. One thread per (row, position) computes ε_t with the operation order of
// the CPU's scalar level (Level::Scalar: unfused multiply and add, taps j = 1..a in order,
// elements of d in order, explicit _rn intrinsics so that nothing is contracted into an
// FMA): the scores are bitwise equal to `set_simd_level("scalar")` on the CPU (the SIMD
// levels sum d in lanes, so they differ in the last bits). The χ² normalisation and the
// moving average are a sequential pass per row over the L scalars (one thread per row).
//
// Store. One thread per batch row runs the CPU's binary heap on the same f64 keys with the
// same sift order, so positions, scores and count are bitwise identical to the CPU. A check
// kernel first validates every row (the CPU's invariants, NaN scores, count overflow) into
// a per-row status; the push / select kernels write nothing at all if any row failed (as the
// CPU, which validates everything before writing), and the host raises from the status.
#include "common.cuh"


// Unfused arithmetic in the compute type.
__device__ __forceinline__ float ei_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double ei_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float ei_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double ei_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float ei_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double ei_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float ei_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double ei_div(double a, double b) { return __ddiv_rn(a, b); }

// ---- innovation: ε per (row, position) -------------------------------------------------------
// y (B, L, d), w (k,) = c_1..c_k, hist (B, k, d) oldest first, count (B,). eps (B, L).
template <typename S>
__device__ void innov_eps(const S* y, const S* w, const S* hist, const long long* count, S* eps,
                          int B, int L, int d, int k) {
    typedef typename bm_io<S>::C C;
    const long long total = (long long)B * L;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long b = e / L;
        const int t = (int)(e - b * L);
        const long long have = count[b] + t;
        const int a = have < k ? (int)have : k;
        // Warm-up taps: the first a, rescaled by S_k / S_a (as the CPU's warmup_table).
        C f = C(1);
        if (a < k) {
            C tot = C(0), part = C(0);
            for (int j = 0; j < k; ++j) tot = ei_add(tot, bm_io<S>::load(w + j));
            for (int j = 0; j < a; ++j) part = ei_add(part, bm_io<S>::load(w + j));
            if (part != C(0)) f = ei_div(tot, part);
        }
        const S* yt = y + e * d;
        const S* hb = hist + b * k * d;
        C acc = C(0);
        for (int i = 0; i < d; ++i) {
            C p = C(0);
            for (int j = 1; j <= a; ++j) {
                C c = bm_io<S>::load(w + (j - 1));
                if (a < k) c = ei_mul(c, f);
                const C src = t >= j ? bm_io<S>::load(y + (e - j) * d + i)
                                     : bm_io<S>::load(hb + (long long)(k + t - j) * d + i);
                p = ei_add(ei_mul(c, src), p);
            }
            const C r = ei_sub(bm_io<S>::load(yt + i), p);
            acc = ei_add(ei_mul(r, r), acc);
        }
        const C inv_d = d == 0 ? C(0) : ei_div(C(1), C((double)d));
        bm_io<S>::store(eps + e, ei_mul(acc, inv_d));
    }
}

// ---- innovation: χ² / moving average per row, count and ema out ------------------------------
// scores (B, L) holds ε on entry; with chi2 it is divided in place by max(v_{t-1}, floor).
template <typename S>
__device__ void innov_finish(S* scores, const long long* count, const S* ema, long long* count_out,
                             S* ema_out, int B, int L, int chi2, typename bm_io<S>::C rate,
                             typename bm_io<S>::C floor) {
    typedef typename bm_io<S>::C C;
    const long long b = bm_grid_start();
    if (b >= B) return;
    C m = bm_io<S>::load(ema + 2 * b), z = bm_io<S>::load(ema + 2 * b + 1);
    const C one_minus = ei_sub(C(1), rate);
    for (int t = 0; t < L; ++t) {
        S* st = scores + b * L + t;
        const C eps = bm_io<S>::load(st);
        if (chi2) {
            const C v = z > C(0) ? ei_div(m, z) : eps;
            const C den = v > floor ? v : floor;
            bm_io<S>::store(st, ei_div(eps, den));
        }
        m = ei_add(ei_mul(one_minus, m), ei_mul(rate, eps));
        z = ei_add(ei_mul(one_minus, z), rate);
    }
    count_out[b] = count[b] + L;
    bm_io<S>::store(ema_out + 2 * b, m);
    bm_io<S>::store(ema_out + 2 * b + 1, z);
}

// ---- innovation: the last k outputs of (history ++ y) ------------------------------------------
template <typename S>
__device__ void innov_history(const S* y, const S* hist, S* hist_out, int B, int L, int d, int k) {
    const long long total = (long long)B * k * d;
    for (long long e = bm_grid_start(); e < total; e += bm_grid_step()) {
        const long long r = e / d;
        const int i = (int)(e - r * d);
        const long long b = r / k;
        const int q = (int)(r - b * k);
        const long long n = (long long)L + q;
        hist_out[e] = n < k ? hist[(b * k + n) * d + i] : y[(b * L + (n - k)) * d + i];
    }
}

// ---- store ------------------------------------------------------------------------------------
// policy: 0 top-k, 1 threshold, 2 FIFO. Row status codes (0 = valid), as the CPU's checks:
enum {
    EI_OK = 0,
    EI_EMPTY_ORDER = 1,   // a held entry after an empty slot
    EI_COUNT_NEG = 2,     // count < 0
    EI_POS_COUNT = 3,     // a held position >= count
    EI_NONFINITE = 4,     // a held score not finite
    EI_HEAP = 5,          // heap order broken
    EI_DUP = 6,           // a position held twice
    EI_NAN = 7,           // a NaN among the new scores of the row
    EI_OVERFLOW = 8,      // count + new length overflows
};

__device__ __forceinline__ bool ei_below(int policy, double as, long long ap, double bs,
                                         long long bp) {
    if (policy == 2) return ap < bp;
    return as < bs || (as == bs && ap > bp);
}

__device__ __forceinline__ bool ei_finite(double x) { return x - x == 0.0; }

// Validates row b of the store (positions / scores (B, m), count (B,)) and its new scores
// (B, T); status[b] = code.
__device__ void ei_check(const long long* pos, const double* sc, const long long* count,
                         const double* news, int* status, int B, int m, long long T,
                         int policy) {
    const long long b = bm_grid_start();
    if (b >= B) return;
    const long long* p = pos + b * m;
    const double* s = sc + b * m;
    const long long c = count[b];
    int size = 0;
    while (size < m && p[size] >= 0) ++size;
    int code = EI_OK;
    for (int i = size; i < m && code == EI_OK; ++i)
        if (p[i] != -1) code = EI_EMPTY_ORDER;
    if (code == EI_OK && c < 0) code = EI_COUNT_NEG;
    for (int i = 0; i < size && code == EI_OK; ++i)
        if (p[i] >= c) code = EI_POS_COUNT;
    for (int i = 0; i < size && code == EI_OK; ++i)
        if (!ei_finite(s[i])) code = EI_NONFINITE;
    for (int i = 1; i < size && code == EI_OK; ++i) {
        const int q = (i - 1) / 2;
        if (ei_below(policy, s[i], p[i], s[q], p[q])) code = EI_HEAP;
    }
    for (int i = 0; i < size && code == EI_OK; ++i)
        for (int j = i + 1; j < size; ++j)
            if (p[i] == p[j]) {
                code = EI_DUP;
                break;
            }
    if (code == EI_OK) {
        for (long long t = 0; t < T; ++t)
            if (news[b * T + t] != news[b * T + t]) {
                code = EI_NAN;
                break;
            }
    }
    if (code == EI_OK && c > 0x7fffffffffffffffLL - T) code = EI_OVERFLOW;
    status[b] = code;
}

__device__ __forceinline__ bool ei_all_ok(const int* status, int B) {
    for (int i = 0; i < B; ++i)
        if (status[i] != EI_OK) return false;
    return true;
}

struct EiHeap {
    long long* pos;
    double* sc;
    int size, cap, policy;
    double tau;

    __device__ void swap(int i, int j) {
        const long long tp = pos[i];
        pos[i] = pos[j];
        pos[j] = tp;
        const double ts = sc[i];
        sc[i] = sc[j];
        sc[j] = ts;
    }
    __device__ bool below(int i, int j) const { return ei_below(policy, sc[i], pos[i], sc[j], pos[j]); }
    __device__ void sift_up(int i) {
        while (i > 0) {
            const int q = (i - 1) / 2;
            if (!below(i, q)) break;
            swap(i, q);
            i = q;
        }
    }
    __device__ void sift_down(int i) {
        for (;;) {
            const int l = 2 * i + 1, r = 2 * i + 2;
            int m = i;
            if (l < size && below(l, m)) m = l;
            if (r < size && below(r, m)) m = r;
            if (m == i) break;
            swap(i, m);
            i = m;
        }
    }
    // Offers the token at position p with score s (newer than every held one).
    __device__ void offer(double s, long long p) {
        if (policy != 0 && !(s > tau)) return;
        if (size < cap) {
            pos[size] = p;
            sc[size] = s;
            ++size;
            sift_up(size - 1);
            return;
        }
        if (policy == 2 || s > sc[0]) {
            pos[0] = p;
            sc[0] = s;
            sift_down(0);
        }
    }
    // Held positions sorted ascending, padded with -1 (insertion sort: distinct values).
    __device__ void held(long long* out) const {
        for (int i = 0; i < size; ++i) {
            const long long v = pos[i];
            int j = i;
            while (j > 0 && out[j - 1] > v) {
                out[j] = out[j - 1];
                --j;
            }
            out[j] = v;
        }
        for (int i = size; i < cap; ++i) out[i] = -1;
    }
};

__device__ __forceinline__ int ei_size(const long long* p, int m) {
    int size = 0;
    while (size < m && p[size] >= 0) ++size;
    return size;
}

// Streaming push of news (B, T) into the store in place (only when every row is valid).
__device__ void ei_push(long long* pos, double* sc, long long* count, const double* news,
                        const int* status, int B, int m, long long T, int policy, double tau) {
    const long long b = bm_grid_start();
    if (b >= B || !ei_all_ok(status, B)) return;
    EiHeap h{pos + b * m, sc + b * m, ei_size(pos + b * m, m), m, policy, tau};
    const long long c = count[b];
    for (long long t = 0; t < T; ++t) h.offer(news[b * T + t], c + t);
    count[b] = c + T;
}

// Chunked builder: held (B, nch, m) = the store at each chunk's start; pos_out / sc_out /
// count_out the store after the last position (the inputs are copied first).
__device__ void ei_select(const double* scores, const long long* pos0, const double* sc0,
                          const long long* start, const int* status, long long* held,
                          long long* pos_out, double* sc_out, long long* count_out, int B, int m,
                          long long L, long long chunk, int policy, double tau) {
    const long long b = bm_grid_start();
    if (b >= B || !ei_all_ok(status, B)) return;
    long long* p = pos_out + b * m;
    double* s = sc_out + b * m;
    for (int i = 0; i < m; ++i) {
        p[i] = pos0[b * m + i];
        s[i] = sc0[b * m + i];
    }
    EiHeap h{p, s, ei_size(p, m), m, policy, tau};
    const long long nch = (L + chunk - 1) / chunk;
    const long long p0 = start[b];
    for (long long t = 0; t < L; ++t) {
        if (t % chunk == 0) h.held(held + (b * nch + t / chunk) * m);
        h.offer(scores[b * L + t], p0 + t);
    }
    count_out[b] = p0 + L;
}

// ---- entry points ---------------------------------------------------------------------------
#define EI_ENTRIES(sfx, S)                                                                       \
    extern "C" __global__ void innovation_eps_##sfx(const S* y, const S* w, const S* hist,       \
                                                    const long long* count, S* eps, int B,       \
                                                    int L, int d, int k) {                       \
        innov_eps<S>(y, w, hist, count, eps, B, L, d, k);                                        \
    }                                                                                            \
    extern "C" __global__ void innovation_finish_##sfx(                                          \
        S* scores, const long long* count, const S* ema, long long* count_out, S* ema_out,       \
        int B, int L, int chi2, typename bm_io<S>::C rate, typename bm_io<S>::C floor) {         \
        innov_finish<S>(scores, count, ema, count_out, ema_out, B, L, chi2, rate, floor);        \
    }                                                                                            \
    extern "C" __global__ void innovation_history_##sfx(const S* y, const S* hist, S* hist_out,  \
                                                        int B, int L, int d, int k) {            \
        innov_history<S>(y, hist, hist_out, B, L, d, k);                                         \
    }

BM_DTYPES(EI_ENTRIES)

// The store is f64 scores / i64 positions only: entry points with the f64 suffix.
extern "C" __global__ void eidetic_check_f64(const long long* pos, const double* sc,
                                             const long long* count, const double* news,
                                             int* status, int B, int m, long long T, int policy) {
    ei_check(pos, sc, count, news, status, B, m, T, policy);
}
extern "C" __global__ void eidetic_push_f64(long long* pos, double* sc, long long* count,
                                            const double* news, const int* status, int B, int m,
                                            long long T, int policy, double tau) {
    ei_push(pos, sc, count, news, status, B, m, T, policy, tau);
}
extern "C" __global__ void eidetic_select_f64(const double* scores, const long long* pos0,
                                              const double* sc0, const long long* start,
                                              const int* status, long long* held,
                                              long long* pos_out, double* sc_out,
                                              long long* count_out, int B, int m, long long L,
                                              long long chunk, int policy, double tau) {
    ei_select(scores, pos0, sc0, start, status, held, pos_out, sc_out, count_out, B, m, L, chunk,
              policy, tau);
}
