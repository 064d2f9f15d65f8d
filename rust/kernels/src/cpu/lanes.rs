//! Portable lanes: plain arrays. With N = 1 this is the scalar level; with 16 bytes of
//! lanes it is what the compiler turns into SSE2 (x86-64 baseline) or NEON (aarch64
//! baseline) code.

use super::vector::{Elem, Vector};

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
