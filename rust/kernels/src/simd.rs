//! Portable SIMD vocabulary used by every kernel.
//!
//! A kernel is written once, generic over [`Vector`] (a register of `W` lanes of `f32` or
//! `f64`), and instantiated per instruction-set level inside a function compiled with that
//! level's `#[target_feature]`s (see [`crate::dispatch`]). The lane types are *tokens*:
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
    /// `e^x` (see [`exp`]); the default is [`exp_portable`].
    #[inline(always)]
    fn exp(self) -> Self {
        exp_portable(self)
    }

    #[inline(always)]
    fn zero() -> Self {
        Self::splat(Self::E::ZERO)
    }
}

/// Horner evaluation of `poly` (highest coefficient first) at `x`.
#[inline(always)]
fn horner<V: Vector>(poly: &'static [V::E], x: V) -> V {
    let mut acc = V::splat(poly[0]);
    for &c in &poly[1..] {
        acc = acc.fma(x, V::splat(c));
    }
    acc
}

/// Estrin evaluation of `poly` (highest coefficient first, at most 16 terms): the same
/// polynomial as [`horner`] with a dependency chain of depth log2(len) instead of len,
/// which matters where one `exp` per iteration is on the critical path.
#[inline(always)]
fn estrin<V: Vector>(poly: &'static [V::E], x: V) -> V {
    let len = poly.len();
    let mut terms = [V::zero(); 8];
    let mut m = 0;
    // Pairs (c_2i + c_2i+1 x), lowest degree first.
    let mut i = 0;
    while i < len {
        let lo = V::splat(poly[len - 1 - i]);
        terms[m] = if i + 1 < len {
            V::splat(poly[len - 2 - i]).fma(x, lo)
        } else {
            lo
        };
        m += 1;
        i += 2;
    }
    let mut p = x.mul(x);
    while m > 1 {
        let mut k = 0;
        let mut j = 0;
        while j < m {
            terms[k] = if j + 1 < m {
                terms[j + 1].fma(p, terms[j])
            } else {
                terms[j]
            };
            k += 1;
            j += 2;
        }
        m = k;
        p = p.mul(p);
    }
    terms[0]
}

/// Vectorised `exp`, accurate to ~1 ulp; NaN propagates, overflow gives +inf, results
/// below the smallest normal flush to zero (denormal decays would slow every later
/// multiply). Levels with better instructions override [`Vector::exp`].
#[inline(always)]
pub fn exp<V: Vector>(x: V) -> V {
    V::exp(x)
}

/// `e^r` on `|r| <= ln2/2`: `1 + r + r^2 P(r)`.
#[inline(always)]
fn exp_poly<V: Vector>(r: V) -> V {
    estrin::<V>(V::E::EXP_POLY, r)
        .fma(r.mul(r), r)
        .add(V::splat(V::E::ONE))
}

/// The portable `exp`: range reduction by the magic-number trick, the exponent added as an
/// integer, and selects for the special cases.
#[inline(always)]
pub fn exp_portable<V: Vector>(x: V) -> V {
    let lo = V::splat(V::E::EXP_LO);
    let hi = V::splat(V::E::EXP_HI);
    let xc = lo.max(x).min(hi); // NaN in x survives (operand order, see module docs)
    let magic = V::splat(V::E::MAGIC);
    let t = xc.fma(V::splat(V::E::LOG2E), magic);
    let k = t.sub(magic);
    let r = k
        .fma(V::splat(V::E::ZERO).sub(V::splat(V::E::LN2_HI)), xc)
        .sub(k.mul(V::splat(V::E::LN2_LO)));
    let p = exp_poly(r);
    let y = V::scale_by_magic(p, t);
    let y = V::select(x.lt(lo), V::zero(), y);
    let y = V::select(x.gt(hi), V::splat(V::E::INF), y);
    V::select(x.is_nan(), x, y)
}

/// `log(1 + t)` for `t` in `[0, 1]` via `2 atanh(t / (2 + t))`.
#[inline(always)]
fn log1p_unit<V: Vector>(t: V) -> V {
    let two = V::splat(V::E::from_f64(2.0));
    let s = t.mul(two.add(t).recip());
    let s2 = s.mul(s);
    horner::<V>(V::E::LOG1P_POLY, s2)
        .fma(s2, V::splat(V::E::ONE))
        .mul(two.mul(s))
}

/// Mamba's softplus: `x` above 20, else `log(1 + e^x)`, computed stably as
/// `max(x, 0) + log1p(e^-|x|)`.
#[inline(always)]
pub fn softplus<V: Vector>(x: V) -> V {
    let zero = V::zero();
    let neg_abs = zero.sub(x.max(zero.sub(x))); // -|x|, NaN-preserving
    let sp = zero.max(x).add(log1p_unit(exp(neg_abs)));
    V::select(x.gt(V::splat(V::E::SOFTPLUS_THRESHOLD)), x, sp)
}

/// Logistic sigmoid `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid<V: Vector>(x: V) -> V {
    let one = V::splat(V::E::ONE);
    one.add(exp(V::zero().sub(x))).recip()
}

/// Derivative of Mamba's softplus with respect to its input.
#[inline(always)]
pub fn softplus_grad<V: Vector>(x: V) -> V {
    V::select(
        x.gt(V::splat(V::E::SOFTPLUS_THRESHOLD)),
        V::splat(V::E::ONE),
        sigmoid(x),
    )
}

/// Transposes the W×W block held in `m[..W]` (row j in vector j) in place: log2(W)
/// rounds of `row'[2i], row'[2i+1] = zip(row[i], row[i + W/2])`.
#[inline(always)]
pub fn transpose<V: Vector>(m: &mut [V]) {
    let w = V::W;
    let mut rounds = w.trailing_zeros();
    let mut old = [V::zero(); 16];
    while rounds > 0 {
        old[..w].copy_from_slice(&m[..w]);
        for i in 0..w / 2 {
            let (lo, hi) = V::zip(old[i], old[i + w / 2]);
            m[2 * i] = lo;
            m[2 * i + 1] = hi;
        }
        rounds -= 1;
    }
}

/// Finishes a reduction tree whose first level (W/2 vectors) is in `level`: folds in place
/// and stores the W sums, in row order, to `out`.
#[inline(always)]
fn fold_rest<V: Vector>(level: &mut [V; 8], out: &mut [V::E]) {
    let mut m = V::W / 2;
    while m > 1 {
        for j in 0..m / 2 {
            level[j] = V::fold2(level[2 * j], level[2 * j + 1]);
        }
        m /= 2;
    }
    level[0].store(out);
}

/// `out[r] = sum of the W lanes of vs[r]`: W vectors at a time by a tree of
/// [`Vector::fold2`] (which keeps them in order), the rest one `hsum` each.
#[inline(always)]
pub fn sum_vectors<V: Vector>(vs: &[V], out: &mut [V::E]) {
    let w = V::W;
    let n = out.len();
    let mut r = 0;
    if w >= 2 {
        let mut level = [V::zero(); 8];
        while r + w <= n {
            for (j, l) in level[..w / 2].iter_mut().enumerate() {
                *l = V::fold2(vs[r + 2 * j], vs[r + 2 * j + 1]);
            }
            fold_rest(&mut level, &mut out[r..]);
            r += w;
        }
    }
    for (o, v) in out[r..].iter_mut().zip(&vs[r..n]) {
        *o = v.hsum();
    }
}

/// `out[r] = sum of the W lanes of rows[r * W..]` for every row, like [`sum_vectors`].
#[inline(always)]
pub fn sum_rows<V: Vector>(rows: &[V::E], out: &mut [V::E]) {
    let w = V::W;
    let n = out.len();
    let mut r = 0;
    if w >= 2 {
        let mut level = [V::zero(); 8];
        while r + w <= n {
            for (j, l) in level[..w / 2].iter_mut().enumerate() {
                let i = (r + 2 * j) * w;
                *l = V::fold2(V::load(&rows[i..i + w]), V::load(&rows[i + w..i + 2 * w]));
            }
            fold_rest(&mut level, &mut out[r..]);
            r += w;
        }
    }
    for (o, row) in out[r..].iter_mut().zip(rows[r * w..].chunks_exact(w)) {
        *o = V::load(row).hsum();
    }
}

// ---------------------------------------------------------------------------------------
// Portable lanes: plain arrays. With N = 1 this is the scalar level; with 16 bytes of
// lanes it is what the compiler turns into SSE2 (x86-64 baseline) or NEON (aarch64
// baseline) code.
// ---------------------------------------------------------------------------------------

/// `N` lanes of `T` as a plain array.
#[derive(Clone, Copy, Debug)]
pub struct Lanes<T, const N: usize>(pub [T; N]);

/// Integer view of an element, for the exponent trick of [`Vector::scale_by_magic`].
pub trait Bits: Elem {
    fn scale_by_magic(p: Self, t: Self) -> Self;
}
impl Bits for f32 {
    #[inline(always)]
    fn scale_by_magic(p: f32, t: f32) -> f32 {
        let k = t.to_bits().wrapping_sub(f32::MAGIC.to_bits());
        f32::from_bits(p.to_bits().wrapping_add(k << 23))
    }
}
impl Bits for f64 {
    #[inline(always)]
    fn scale_by_magic(p: f64, t: f64) -> f64 {
        let k = t.to_bits().wrapping_sub(f64::MAGIC.to_bits());
        f64::from_bits(p.to_bits().wrapping_add(k << 52))
    }
}

impl<T: Bits + core::ops::Div<Output = T>, const N: usize> Vector for Lanes<T, N> {
    type E = T;
    type Mask = [bool; N];
    const W: usize = N;
    #[inline(always)]
    fn splat(x: T) -> Self {
        Lanes([x; N])
    }
    #[inline(always)]
    fn load(s: &[T]) -> Self {
        let mut a = [T::ZERO; N];
        a.copy_from_slice(&s[..N]);
        Lanes(a)
    }
    #[inline(always)]
    fn store(self, s: &mut [T]) {
        s[..N].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Lanes(core::array::from_fn(|i| self.0[i] + o.0[i]))
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Lanes(core::array::from_fn(|i| self.0[i] - o.0[i]))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Lanes(core::array::from_fn(|i| self.0[i] * o.0[i]))
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        Lanes(core::array::from_fn(|i| self.0[i] / o.0[i]))
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        // Unfused on purpose: the baseline ISAs have no FMA and a libm call would be slow.
        Lanes(core::array::from_fn(|i| self.0[i] * b.0[i] + c.0[i]))
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        Lanes(core::array::from_fn(|i| {
            if self.0[i] > o.0[i] {
                self.0[i]
            } else {
                o.0[i]
            }
        }))
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        Lanes(core::array::from_fn(|i| {
            if self.0[i] < o.0[i] {
                self.0[i]
            } else {
                o.0[i]
            }
        }))
    }
    #[inline(always)]
    fn gt(self, o: Self) -> [bool; N] {
        core::array::from_fn(|i| self.0[i] > o.0[i])
    }
    #[inline(always)]
    fn lt(self, o: Self) -> [bool; N] {
        core::array::from_fn(|i| self.0[i] < o.0[i])
    }
    #[inline(always)]
    fn is_nan(self) -> [bool; N] {
        core::array::from_fn(|i| self.0[i].is_nan())
    }
    #[inline(always)]
    fn select(m: [bool; N], a: Self, b: Self) -> Self {
        Lanes(core::array::from_fn(|i| if m[i] { a.0[i] } else { b.0[i] }))
    }
    #[inline(always)]
    fn scale_by_magic(p: Self, t: Self) -> Self {
        Lanes(core::array::from_fn(|i| T::scale_by_magic(p.0[i], t.0[i])))
    }
    #[inline(always)]
    fn zip(a: Self, b: Self) -> (Self, Self) {
        let h = N / 2;
        // Even lanes from a, odd lanes from b.
        let pick = |i: usize, off: usize| [a.0, b.0][i & 1][off + i / 2];
        (
            Lanes(core::array::from_fn(|i| pick(i, 0))),
            Lanes(core::array::from_fn(|i| pick(i, h))),
        )
    }
    #[inline(always)]
    fn fold2(a: Self, b: Self) -> Self {
        let h = N / 2;
        Lanes(core::array::from_fn(|i| {
            let src = if i < h { &a.0 } else { &b.0 };
            let k = 2 * (i % h.max(1));
            src[k] + src[k + 1]
        }))
    }
    #[inline(always)]
    fn hsum(self) -> T {
        // Pairwise tree, fixed order.
        let mut v = self.0;
        let mut n = N;
        while n > 1 {
            let h = n / 2;
            for i in 0..h {
                v[i] = v[i] + v[i + h];
            }
            if n % 2 == 1 {
                v[0] = v[0] + v[n - 1];
            }
            n = h;
        }
        v[0]
    }
}

// ---------------------------------------------------------------------------------------
// x86-64: AVX2+FMA (8 x f32, 4 x f64) and AVX-512F (16 x f32, 8 x f64).
// ---------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{Elem, Vector};
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
                let y = _mm512_scalef_ps(super::exp_poly(F32x16(r)).0, k);
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
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odd =
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
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
                let y = _mm512_scalef_pd(super::exp_poly(F64x8(r)).0, k);
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
}
