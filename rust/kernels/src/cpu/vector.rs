//! The SIMD vocabulary every kernel is written in: [`Elem`] (the scalar types and the
//! constants of the math functions) and [`Vector`] (a register of lanes).
//!
//! A kernel is written once, generic over [`Vector`] (a register of `W` lanes of `f32` or
//! `f64`), and instantiated per instruction-set level inside a function compiled with that
//! level's `#[target_feature]`s (see [`super::dispatch`]). The lane types are *tokens*:
//! a value of an AVX2/AVX-512 vector type can only exist after run-time detection proved
//! the CPU supports it, which is what makes the `unsafe` intrinsic calls below sound.
//!
//! Semantics shared by all levels (so kernels behave the same whatever the level):
//! * `max(a, b)` / `min(a, b)` return `b` unless `a > b` (resp. `a < b`): a NaN in `b`
//!   passes through, which the transcendental functions rely on to propagate NaN;
//! * `fma(a, b, c) = a * b + c`, fused where the level has FMA (results may then differ
//!   from the scalar level in the last bits, never beyond the documented tolerances);
//! * `hsum` adds lanes in a fixed order, so reductions are deterministic per level.

use core::fmt::Debug;
use core::ops::{Add, Mul, Sub};

use super::math::exp_portable;

/// Scalar element type (`f32` or `f64`) with the constants the math functions need.
pub trait Elem:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const INF: Self;
    /// Adding then subtracting this rounds to the nearest integer (|x| < 2^(mantissa-1)),
    /// and the low bits of `x + MAGIC` hold that integer.
    const MAGIC: Self;
    const LOG2E: Self;
    const LN2_HI: Self;
    const LN2_LO: Self;
    /// exp(x) is 0 below and +inf above these (flushing denormal results to zero).
    const EXP_LO: Self;
    const EXP_HI: Self;
    /// exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2/2, P in Horner order (highest first).
    const EXP_POLY: &'static [Self];
    /// Terms of log1p's atanh series 2s(1 + s^2/3 + s^4/5 + ...), highest first.
    const LOG1P_POLY: &'static [Self];
    /// Mamba's softplus threshold: softplus(x) = x above it.
    const SOFTPLUS_THRESHOLD: Self;
    fn from_f64(x: f64) -> Self;
    fn is_nan(self) -> bool;
}

/// 1/(2k+1) for k = n-1 .. 1, used as the series of atanh.
macro_rules! log1p_series {
    ($t:ty; $($k:literal),*) => { &[$((1.0 / (2.0 * $k as f64 + 1.0)) as $t),*] };
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INF: Self = f32::INFINITY;
    const MAGIC: Self = 12582912.0; // 1.5 * 2^23
    const LOG2E: Self = core::f32::consts::LOG2_E;
    const LN2_HI: Self = 0.693_359_4;
    const LN2_LO: Self = -2.121_944_4e-4;
    const EXP_LO: Self = -87.336_54;
    const EXP_HI: Self = 88.722_83;
    // Minimax coefficients of the classic single-precision exp (Cephes expf).
    const EXP_POLY: &'static [Self] = &[
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    // s <= 1/3, so s^2k/(2k+1) < 2^-26 once k >= 8.
    const LOG1P_POLY: &'static [Self] = log1p_series!(f32; 8, 7, 6, 5, 4, 3, 2, 1);
    const SOFTPLUS_THRESHOLD: Self = 20.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Elem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const INF: Self = f64::INFINITY;
    const MAGIC: Self = 6755399441055744.0; // 1.5 * 2^52
    const LOG2E: Self = core::f64::consts::LOG2_E;
    const LN2_HI: Self = 6.931_471_803_691_238e-1;
    const LN2_LO: Self = 1.908_214_929_270_587_7e-10;
    const EXP_LO: Self = -708.396_418_532_264;
    const EXP_HI: Self = 709.782_712_893_384;
    // Taylor terms 1/k! for k = 13 .. 2, divided by r^2 so that P starts at 1/2:
    // the truncation error |r|^14/14! < 2^-60 for |r| <= ln2/2.
    const EXP_POLY: &'static [Self] = &[
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        1.0 / 2.0,
    ];
    // s <= 1/3: s^2k/(2k+1) < 2^-55 once k >= 18.
    const LOG1P_POLY: &'static [Self] = log1p_series!(
        f64; 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1
    );
    const SOFTPLUS_THRESHOLD: Self = 20.0;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// A register of `W` lanes. All methods are `#[inline(always)]` so that they are compiled
/// inside the `#[target_feature]` entry point of their level.
pub trait Vector: Copy + Send + Sync + 'static {
    type E: Elem;
    type Mask: Copy;
    const W: usize;
    fn splat(x: Self::E) -> Self;
    /// Loads `W` elements from the front of `s` (panics if `s` is shorter).
    fn load(s: &[Self::E]) -> Self;
    /// Stores `W` elements to the front of `s` (panics if `s` is shorter).
    fn store(self, s: &mut [Self::E]);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// `self * b + c`.
    fn fma(self, b: Self, c: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn gt(self, o: Self) -> Self::Mask;
    fn lt(self, o: Self) -> Self::Mask;
    fn is_nan(self) -> Self::Mask;
    /// Lane-wise `if m { a } else { b }`.
    fn select(m: Self::Mask, a: Self, b: Self) -> Self;
    /// `p * 2^k` where `t = k + MAGIC` (k integral), done on the exponent bits.
    fn scale_by_magic(p: Self, t: Self) -> Self;
    fn hsum(self) -> Self::E;
    /// Pairwise sums of two vectors: lane `i < W/2` is `a[2i] + a[2i+1]`, lane `W/2 + i`
    /// is `b[2i] + b[2i+1]` (only called with `W >= 2`).
    fn fold2(a: Self, b: Self) -> Self;
    /// Interleaves two vectors: `(a0 b0 a1 b1 ..., a_{W/2} b_{W/2} ...)`.
    fn zip(a: Self, b: Self) -> (Self, Self);
    /// `1 / self`; levels with a fast reciprocal estimate override it.
    #[inline(always)]
    fn recip(self) -> Self {
        Self::splat(Self::E::ONE).div(self)
    }
    /// `e^x` (see [`exp`](super::math::exp)); the default is [`exp_portable`].
    #[inline(always)]
    fn exp(self) -> Self {
        exp_portable(self)
    }

    #[inline(always)]
    fn zero() -> Self {
        Self::splat(Self::E::ZERO)
    }
}
