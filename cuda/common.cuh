// Shared device helpers of bmojo_core's CUDA kernels. Compiled by NVRTC with no system
// headers (no <cuda_fp16.h>, no CUB): half and bfloat16 are carried as raw 16-bit words
// and converted here, so the same sources compile with any NVRTC >= 12.
#pragma once

// Distinct wrapper types (two typedefs of unsigned short would make bm_io<bm_half> and
// bm_io<bm_bf16> the same specialisation); same size and layout as torch's 16-bit floats.
struct bm_half { unsigned short bits; };  // IEEE binary16 bits
struct bm_bf16 { unsigned short bits; };  // bfloat16 bits
typedef long long bm_i64;

// Instantiates M(suffix, storage type) for every dtype of the entry points.
#define BM_DTYPES(M) M(f32, float) M(f64, double) M(f16, bm_half) M(bf16, bm_bf16)

// ---- conversions: load any storage type as the compute type, store back rounded ----
__device__ __forceinline__ float bm_to_float(float x) { return x; }
__device__ __forceinline__ double bm_to_double(double x) { return x; }
__device__ __forceinline__ float bm_half_to_float(bm_half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
}
__device__ __forceinline__ bm_half bm_float_to_half(float f) {
    bm_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
__device__ __forceinline__ float bm_bf16_to_float(bm_bf16 b) {
    return __uint_as_float(((unsigned int)b.bits) << 16);
}
__device__ __forceinline__ bm_bf16 bm_float_to_bf16(float f) {
    // Round to nearest even; NaN stays NaN (quiet bit set).
    unsigned int u = __float_as_uint(f);
    bm_bf16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x40u);
        return b;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = (unsigned short)(u >> 16);
    return b;
}

// Storage type S, compute type C (float for f32/f16/bf16, double for f64).
template <typename S> struct bm_io;
template <> struct bm_io<float> {
    typedef float C;
    static __device__ __forceinline__ float load(const float* p) { return *p; }
    static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};
template <> struct bm_io<double> {
    typedef double C;
    static __device__ __forceinline__ double load(const double* p) { return *p; }
    static __device__ __forceinline__ void store(double* p, double v) { *p = v; }
};
template <> struct bm_io<bm_half> {
    typedef float C;
    static __device__ __forceinline__ float load(const bm_half* p) { return bm_half_to_float(*p); }
    static __device__ __forceinline__ void store(bm_half* p, float v) { *p = bm_float_to_half(v); }
};
template <> struct bm_io<bm_bf16> {
    typedef float C;
    static __device__ __forceinline__ float load(const bm_bf16* p) { return bm_bf16_to_float(*p); }
    static __device__ __forceinline__ void store(bm_bf16* p, float v) { *p = bm_float_to_bf16(v); }
};

// ---- math in the compute type ----
__device__ __forceinline__ float bm_exp(float x) { return expf(x); }
__device__ __forceinline__ double bm_exp(double x) { return exp(x); }
__device__ __forceinline__ float bm_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double bm_log1p(double x) { return log1p(x); }
// softplus(x) = log(1 + e^x), linear above 20 as torch.nn.functional.softplus.
template <typename C> __device__ __forceinline__ C bm_softplus(C x) {
    return x > C(20) ? x : bm_log1p(bm_exp(x));
}
template <typename C> __device__ __forceinline__ C bm_sigmoid(C x) {
    return C(1) / (C(1) + bm_exp(-x));
}
template <typename C> __device__ __forceinline__ C bm_silu(C x) { return x * bm_sigmoid(x); }

// ---- warp collectives (full 32-lane warps) ----
template <typename C> __device__ __forceinline__ C bm_warp_sum(C v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---- grid-stride loops over a flat index: for (e = bm_grid_start(); e < n; e += bm_grid_step())
__device__ __forceinline__ long long bm_grid_start() {
    return blockIdx.x * (long long)blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long bm_grid_step() { return (long long)gridDim.x * blockDim.x; }

// out[i] = sum over b < B of part[b * stride + off + i] (i < per), summed in batch order so
// that the result does not depend on the launch (the per-batch partials of a weight gradient).
template <typename S>
__device__ void bm_batch_reduce(const typename bm_io<S>::C* part, S* out, int B, long long stride,
                                long long off, long long per) {
    typedef typename bm_io<S>::C C;
    for (long long i = bm_grid_start(); i < per; i += bm_grid_step()) {
        C acc = C(0);
        for (int b = 0; b < B; ++b) acc += part[b * stride + off + i];
        bm_io<S>::store(out + i, acc);
    }
}
