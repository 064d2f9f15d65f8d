//! x86-64 vectors: AVX2+FMA (8 x f32, 4 x f64) and AVX-512F (16 x f32, 8 x f64).

use super::vector::{Elem, Vector};
use core::arch::x86_64::*;

// SAFETY (whole module): every intrinsic below requires AVX2+FMA (resp. AVX-512F).
// Values of these vector types are only created through `Vector` methods, and the
// kernels are only instantiated with them inside functions carrying
// `#[target_feature(enable = ...)]` for that level, which `dispatch` calls only after
// `is_x86_feature_detected!` confirmed the features at run time. Loads and stores
// index a slice of at least `W` elements first (bounds-checked), so they never touch
// memory outside the slice.

macro_rules! avx_common {
    ($v:ident, $e:ty, $w:expr, $reg:ty,
     set1 = $set1:ident, loadu = $loadu:ident, storeu = $storeu:ident,
     add = $add:ident, sub = $sub:ident, mul = $mul:ident, div = $div:ident,
     fmadd = $fmadd:ident, max = $max:ident, min = $min:ident) => {
        #[derive(Clone, Copy, Debug)]
        pub struct $v(pub $reg);
        impl $v {
            #[inline(always)]
            fn raw_splat(x: $e) -> $reg {
                unsafe { $set1(x) }
            }
        }
        impl $v {
            #[inline(always)]
            pub fn load_impl(s: &[$e]) -> Self {
                let s = &s[..$w];
                $v(unsafe { $loadu(s.as_ptr()) })
            }
            #[inline(always)]
            pub fn store_impl(self, s: &mut [$e]) {
                let s = &mut s[..$w];
                unsafe { $storeu(s.as_mut_ptr(), self.0) }
            }
            #[inline(always)]
            pub fn bin_add(self, o: Self) -> Self {
                $v(unsafe { $add(self.0, o.0) })
            }
            #[inline(always)]
            pub fn bin_sub(self, o: Self) -> Self {
                $v(unsafe { $sub(self.0, o.0) })
            }
            #[inline(always)]
            pub fn bin_mul(self, o: Self) -> Self {
                $v(unsafe { $mul(self.0, o.0) })
            }
            #[inline(always)]
            pub fn bin_div(self, o: Self) -> Self {
                $v(unsafe { $div(self.0, o.0) })
            }
            #[inline(always)]
            pub fn tri_fma(self, b: Self, c: Self) -> Self {
                $v(unsafe { $fmadd(self.0, b.0, c.0) })
            }
            // x86 max/min return the second operand when either is NaN or they are
            // equal, i.e. exactly "a > b ? a : b" -- the semantics `Vector` documents.
            #[inline(always)]
            pub fn bin_max(self, o: Self) -> Self {
                $v(unsafe { $max(self.0, o.0) })
            }
            #[inline(always)]
            pub fn bin_min(self, o: Self) -> Self {
                $v(unsafe { $min(self.0, o.0) })
            }
        }
        const _: () = assert!(core::mem::size_of::<$reg>() == $w * core::mem::size_of::<$e>());
    };
}

avx_common!(
    F32x8,
    f32,
    8,
    __m256,
    set1 = _mm256_set1_ps,
    loadu = _mm256_loadu_ps,
    storeu = _mm256_storeu_ps,
    add = _mm256_add_ps,
    sub = _mm256_sub_ps,
    mul = _mm256_mul_ps,
    div = _mm256_div_ps,
    fmadd = _mm256_fmadd_ps,
    max = _mm256_max_ps,
    min = _mm256_min_ps
);
avx_common!(
    F64x4,
    f64,
    4,
    __m256d,
    set1 = _mm256_set1_pd,
    loadu = _mm256_loadu_pd,
    storeu = _mm256_storeu_pd,
    add = _mm256_add_pd,
    sub = _mm256_sub_pd,
    mul = _mm256_mul_pd,
    div = _mm256_div_pd,
    fmadd = _mm256_fmadd_pd,
    max = _mm256_max_pd,
    min = _mm256_min_pd
);
avx_common!(
    F32x16,
    f32,
    16,
    __m512,
    set1 = _mm512_set1_ps,
    loadu = _mm512_loadu_ps,
    storeu = _mm512_storeu_ps,
    add = _mm512_add_ps,
    sub = _mm512_sub_ps,
    mul = _mm512_mul_ps,
    div = _mm512_div_ps,
    fmadd = _mm512_fmadd_ps,
    max = _mm512_max_ps,
    min = _mm512_min_ps
);
avx_common!(
    F64x8,
    f64,
    8,
    __m512d,
    set1 = _mm512_set1_pd,
    loadu = _mm512_loadu_pd,
    storeu = _mm512_storeu_pd,
    add = _mm512_add_pd,
    sub = _mm512_sub_pd,
    mul = _mm512_mul_pd,
    div = _mm512_div_pd,
    fmadd = _mm512_fmadd_pd,
    max = _mm512_max_pd,
    min = _mm512_min_pd
);

macro_rules! vector_forward {
    () => {
        #[inline(always)]
        fn splat(x: Self::E) -> Self {
            Self(Self::raw_splat(x))
        }
        #[inline(always)]
        fn load(s: &[Self::E]) -> Self {
            Self::load_impl(s)
        }
        #[inline(always)]
        fn store(self, s: &mut [Self::E]) {
            self.store_impl(s)
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            self.bin_add(o)
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            self.bin_sub(o)
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            self.bin_mul(o)
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            self.bin_div(o)
        }
        #[inline(always)]
        fn fma(self, b: Self, c: Self) -> Self {
            self.tri_fma(b, c)
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            self.bin_max(o)
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            self.bin_min(o)
        }
    };
}

impl Vector for F32x8 {
    type E = f32;
    type Mask = __m256;
    const W: usize = 8;
    vector_forward!();
    #[inline(always)]
    fn gt(self, o: Self) -> __m256 {
        unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __m256 {
        unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn is_nan(self) -> __m256 {
        unsafe { _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0) }
    }
    #[inline(always)]
    fn select(m: __m256, a: Self, b: Self) -> Self {
        F32x8(unsafe { _mm256_blendv_ps(b.0, a.0, m) })
    }
    #[inline(always)]
    fn scale_by_magic(p: Self, t: Self) -> Self {
        unsafe {
            let k = _mm256_sub_epi32(
                _mm256_castps_si256(t.0),
                _mm256_castps_si256(_mm256_set1_ps(f32::MAGIC)),
            );
            let bits = _mm256_add_epi32(_mm256_castps_si256(p.0), _mm256_slli_epi32::<23>(k));
            F32x8(_mm256_castsi256_ps(bits))
        }
    }
    #[inline(always)]
    fn zip(a: Self, b: Self) -> (Self, Self) {
        // unpack works within 128-bit halves; recombine the halves.
        unsafe {
            let (lo, hi) = (_mm256_unpacklo_ps(a.0, b.0), _mm256_unpackhi_ps(a.0, b.0));
            (
                F32x8(_mm256_permute2f128_ps::<0x20>(lo, hi)),
                F32x8(_mm256_permute2f128_ps::<0x31>(lo, hi)),
            )
        }
    }
    #[inline(always)]
    fn fold2(a: Self, b: Self) -> Self {
        // hadd gives [a01 a23 b01 b23 | a45 a67 b45 b67]; swap the middle 64-bit pairs.
        unsafe {
            let h = _mm256_castps_pd(_mm256_hadd_ps(a.0, b.0));
            F32x8(_mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(h)))
        }
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        unsafe {
            let lo = _mm256_castps256_ps128(self.0);
            let hi = _mm256_extractf128_ps::<1>(self.0);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
}

impl Vector for F64x4 {
    type E = f64;
    type Mask = __m256d;
    const W: usize = 4;
    vector_forward!();
    #[inline(always)]
    fn gt(self, o: Self) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_GT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn is_nan(self) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_UNORD_Q>(self.0, self.0) }
    }
    #[inline(always)]
    fn select(m: __m256d, a: Self, b: Self) -> Self {
        F64x4(unsafe { _mm256_blendv_pd(b.0, a.0, m) })
    }
    #[inline(always)]
    fn scale_by_magic(p: Self, t: Self) -> Self {
        unsafe {
            let k = _mm256_sub_epi64(
                _mm256_castpd_si256(t.0),
                _mm256_castpd_si256(_mm256_set1_pd(f64::MAGIC)),
            );
            let bits = _mm256_add_epi64(_mm256_castpd_si256(p.0), _mm256_slli_epi64::<52>(k));
            F64x4(_mm256_castsi256_pd(bits))
        }
    }
    #[inline(always)]
    fn zip(a: Self, b: Self) -> (Self, Self) {
        unsafe {
            let (lo, hi) = (_mm256_unpacklo_pd(a.0, b.0), _mm256_unpackhi_pd(a.0, b.0));
            (
                F64x4(_mm256_permute2f128_pd::<0x20>(lo, hi)),
                F64x4(_mm256_permute2f128_pd::<0x31>(lo, hi)),
            )
        }
    }
    #[inline(always)]
    fn fold2(a: Self, b: Self) -> Self {
        // hadd gives [a01 b01 | a23 b23]; swap the middle lanes.
        unsafe {
            F64x4(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_hadd_pd(
                a.0, b.0,
            )))
        }
    }
    #[inline(always)]
    fn hsum(self) -> f64 {
        unsafe {
            let lo = _mm256_castpd256_pd128(self.0);
            let hi = _mm256_extractf128_pd::<1>(self.0);
            let s = _mm_add_pd(lo, hi);
            let s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
            _mm_cvtsd_f64(s)
        }
    }
}

impl Vector for F32x16 {
    type E = f32;
    type Mask = __mmask16;
    const W: usize = 16;
    vector_forward!();
    #[inline(always)]
    fn gt(self, o: Self) -> __mmask16 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __mmask16 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn is_nan(self) -> __mmask16 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0) }
    }
    #[inline(always)]
    fn select(m: __mmask16, a: Self, b: Self) -> Self {
        F32x16(unsafe { _mm512_mask_blend_ps(m, b.0, a.0) })
    }
    #[inline(always)]
    fn scale_by_magic(p: Self, t: Self) -> Self {
        unsafe {
            let k = _mm512_sub_epi32(
                _mm512_castps_si512(t.0),
                _mm512_castps_si512(_mm512_set1_ps(f32::MAGIC)),
            );
            let bits = _mm512_add_epi32(_mm512_castps_si512(p.0), _mm512_slli_epi32::<23>(k));
            F32x16(_mm512_castsi512_ps(bits))
        }
    }
    // 14-bit estimate, then Newton steps r' = r (2 - x r), each doubling the bits:
    // one reaches f32 precision (two for f64), far cheaper than a division. For x = 0
    // or ±inf the step gives NaN (0 * inf) where the estimate is already exact.
    #[inline(always)]
    fn recip(self) -> Self {
        unsafe {
            let r0 = _mm512_rcp14_ps(self.0);
            let r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(self.0, r0, _mm512_set1_ps(2.0)));
            let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(r, r);
            F32x16(_mm512_mask_blend_ps(bad, r, r0))
        }
    }
    // vscalefps applies 2^k with IEEE overflow/underflow and NaN handling, and
    // vrndscaleps rounds: no magic numbers, integer exponent or special-case selects.
    #[inline(always)]
    fn exp(self) -> Self {
        unsafe {
            let x = self.0;
            // NaN passes both clamps (it is the second operand of each).
            let xc = _mm512_min_ps(
                _mm512_set1_ps(104.0),
                _mm512_max_ps(_mm512_set1_ps(-104.0), x),
            );
            let k = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(xc, _mm512_set1_ps(f32::LOG2E)));
            let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(f32::LN2_HI), xc);
            let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(f32::LN2_LO), r);
            let y = _mm512_scalef_ps(super::math::exp_poly(F32x16(r)).0, k);
            let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(f32::EXP_LO));
            F32x16(_mm512_maskz_mov_ps(!tiny, y))
        }
    }
    #[inline(always)]
    fn zip(a: Self, b: Self) -> (Self, Self) {
        unsafe {
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            (
                F32x16(_mm512_permutex2var_ps(a.0, lo, b.0)),
                F32x16(_mm512_permutex2var_ps(a.0, hi, b.0)),
            )
        }
    }
    #[inline(always)]
    fn fold2(a: Self, b: Self) -> Self {
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            F32x16(_mm512_add_ps(
                _mm512_permutex2var_ps(a.0, even, b.0),
                _mm512_permutex2var_ps(a.0, odd, b.0),
            ))
        }
    }
    #[inline(always)]
    fn hsum(self) -> f32 {
        unsafe {
            let lo = _mm512_castps512_ps256(self.0);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            F32x8(_mm256_add_ps(lo, hi)).hsum()
        }
    }
}

impl Vector for F64x8 {
    type E = f64;
    type Mask = __mmask8;
    const W: usize = 8;
    vector_forward!();
    #[inline(always)]
    fn gt(self, o: Self) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_GT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn is_nan(self) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(self.0, self.0) }
    }
    #[inline(always)]
    fn select(m: __mmask8, a: Self, b: Self) -> Self {
        F64x8(unsafe { _mm512_mask_blend_pd(m, b.0, a.0) })
    }
    #[inline(always)]
    fn scale_by_magic(p: Self, t: Self) -> Self {
        unsafe {
            let k = _mm512_sub_epi64(
                _mm512_castpd_si512(t.0),
                _mm512_castpd_si512(_mm512_set1_pd(f64::MAGIC)),
            );
            let bits = _mm512_add_epi64(_mm512_castpd_si512(p.0), _mm512_slli_epi64::<52>(k));
            F64x8(_mm512_castsi512_pd(bits))
        }
    }
    #[inline(always)]
    fn recip(self) -> Self {
        unsafe {
            let two = _mm512_set1_pd(2.0);
            let r0 = _mm512_rcp14_pd(self.0);
            let r = _mm512_mul_pd(r0, _mm512_fnmadd_pd(self.0, r0, two));
            let r = _mm512_mul_pd(r, _mm512_fnmadd_pd(self.0, r, two));
            let bad = _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(r, r);
            F64x8(_mm512_mask_blend_pd(bad, r, r0))
        }
    }
    // vscalefpd applies 2^k with IEEE overflow/underflow and NaN handling, and
    // vrndscalepd rounds: no magic numbers, integer exponent or special-case selects.
    #[inline(always)]
    fn exp(self) -> Self {
        unsafe {
            let x = self.0;
            // NaN passes both clamps (it is the second operand of each).
            let xc = _mm512_min_pd(
                _mm512_set1_pd(750.0),
                _mm512_max_pd(_mm512_set1_pd(-750.0), x),
            );
            let k = _mm512_roundscale_pd::<0x08>(_mm512_mul_pd(xc, _mm512_set1_pd(f64::LOG2E)));
            let r = _mm512_fnmadd_pd(k, _mm512_set1_pd(f64::LN2_HI), xc);
            let r = _mm512_fnmadd_pd(k, _mm512_set1_pd(f64::LN2_LO), r);
            let y = _mm512_scalef_pd(super::math::exp_poly(F64x8(r)).0, k);
            let tiny = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(x, _mm512_set1_pd(f64::EXP_LO));
            F64x8(_mm512_maskz_mov_pd(!tiny, y))
        }
    }
    #[inline(always)]
    fn zip(a: Self, b: Self) -> (Self, Self) {
        unsafe {
            let lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
            let hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
            (
                F64x8(_mm512_permutex2var_pd(a.0, lo, b.0)),
                F64x8(_mm512_permutex2var_pd(a.0, hi, b.0)),
            )
        }
    }
    #[inline(always)]
    fn fold2(a: Self, b: Self) -> Self {
        unsafe {
            let even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
            let odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
            F64x8(_mm512_add_pd(
                _mm512_permutex2var_pd(a.0, even, b.0),
                _mm512_permutex2var_pd(a.0, odd, b.0),
            ))
        }
    }
    #[inline(always)]
    fn hsum(self) -> f64 {
        unsafe {
            let lo = _mm512_castpd512_pd256(self.0);
            let hi = _mm512_extractf64x4_pd::<1>(self.0);
            F64x4(_mm256_add_pd(lo, hi)).hsum()
        }
    }
}
