//! The small math of the decode step: exact GELU (`erf`), SiLU, dot products, `axpy`,
//! residual adds and LayerNorm, written once for any [`Vector`].

use crate::cpu::{sigmoid, Elem, SimdElem, Vector};

/// Element types of the decode step: the [`SimdElem`]s with the few scalar functions the
/// step needs.
pub trait DecodeElem: SimdElem {
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    /// Exact GELU of a buffer (`0.5 x (1 + erf(x / √2))`, as `nn.GELU()`).
    fn gelu<V: Vector<E = Self>>(buf: &mut [Self]);
}

impl DecodeElem for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn gelu<V: Vector<E = Self>>(buf: &mut [Self]) {
        map_buf!(V, buf, |v| gelu_f32::<V>(v));
    }
}

impl DecodeElem for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn gelu<V: Vector<E = Self>>(buf: &mut [Self]) {
        // The vector form is accurate to ~1e-7 only: fp64 takes the exact scalar path.
        for x in buf {
            *x = 0.5 * *x * (1.0 + erf(*x * core::f64::consts::FRAC_1_SQRT_2));
        }
    }
}

/// `erf` accurate to a few ulp: a series of positive terms below 2.5 (no cancellation),
/// the continued fraction of `erfc` above.
pub fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax.is_nan() {
        return x;
    } else if ax < 2.5 {
        // erf(x) = 2/√π e^{-x²} Σ_n 2^n x^{2n+1} / (1·3·…·(2n+1))
        let x2 = 2.0 * ax * ax;
        let (mut term, mut sum) = (ax, ax);
        let mut k = 1.0;
        while term > sum * 1e-18 {
            k += 2.0;
            term *= x2 / k;
            sum += term;
        }
        core::f64::consts::FRAC_2_SQRT_PI * (-ax * ax).exp() * sum
    } else if ax < 6.0 {
        // erfc(x) = e^{-x²}/√π / (x + (1/2)/(x + 1/(x + (3/2)/(x + …)))), from the tail.
        let mut f = ax;
        for k in (1..=120).rev() {
            f = ax + (k as f64 * 0.5) / f;
        }
        1.0 - (-ax * ax).exp() / (f * core::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    r.copysign(x)
}

/// GELU of one f32 vector: `erfc` by the Numerical Recipes Chebyshev form (relative error
/// < 1.2e-7 everywhere).
#[inline(always)]
fn gelu_f32<V: Vector<E = f32>>(x: V) -> V {
    // The published coefficients, kept verbatim (rounded to f32 when compiled).
    #[allow(clippy::excessive_precision)]
    const P: [f32; 10] = [
        0.170_872_77,
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
        -1.265_512_23,
    ];
    let zero = V::zero();
    let z = x
        .max(zero.sub(x))
        .mul(V::splat(core::f32::consts::FRAC_1_SQRT_2));
    let t = V::splat(1.0).div(V::splat(0.5).fma(z, V::splat(1.0)));
    let mut p = V::splat(P[0]);
    for &c in &P[1..] {
        p = p.fma(t, V::splat(c));
    }
    let erfc = t.mul(zero.sub(z).fma(z, p).exp());
    // x ≥ 0: x (1 - erfc/2); x < 0: x erfc/2.
    let half = V::splat(0.5).mul(erfc);
    V::select(x.lt(zero), x.mul(half), x.sub(x.mul(half)))
}

#[inline(always)]
pub(super) fn silu<V: Vector>(v: V) -> V {
    v.mul(sigmoid(v))
}

/// `Σ a_i b_i` (vectors, then a scalar tail; fixed order per level).
#[inline(always)]
pub(super) fn dot<V: Vector>(a: &[V::E], b: &[V::E]) -> V::E {
    let w = V::W;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = V::zero();
    let (ac, bc) = (a.chunks_exact(w), b.chunks_exact(w));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        acc = V::load(x).fma(V::load(y), acc);
    }
    let mut s = acc.hsum();
    for (&x, &y) in ar.iter().zip(br) {
        s = x * y + s;
    }
    s
}

/// `y += alpha * x`.
#[inline(always)]
pub(super) fn axpy<V: Vector>(alpha: V::E, x: &[V::E], y: &mut [V::E]) {
    let w = V::W;
    let n = x.len().min(y.len());
    let al = V::splat(alpha);
    let mut yc = y[..n].chunks_exact_mut(w);
    let mut xc = x[..n].chunks_exact(w);
    for (yy, xx) in (&mut yc).zip(&mut xc) {
        al.fma(V::load(xx), V::load(yy)).store(yy);
    }
    for (yy, &xx) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *yy = alpha * xx + *yy;
    }
}

/// `y += x`.
#[inline(always)]
pub(super) fn add_into<V: Vector>(x: &[V::E], y: &mut [V::E]) {
    let w = V::W;
    let n = x.len().min(y.len());
    let mut yc = y[..n].chunks_exact_mut(w);
    let mut xc = x[..n].chunks_exact(w);
    for (yy, xx) in (&mut yc).zip(&mut xc) {
        V::load(yy).add(V::load(xx)).store(yy);
    }
    for (yy, &xx) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *yy = *yy + xx;
    }
}

/// LayerNorm of each row of `x (rows, d)` into `out` (biased variance, as torch).
#[inline(always)]
pub(super) fn layer_norm<V: Vector>(x: &[V::E], g: &[V::E], b: &[V::E], eps: V::E, out: &mut [V::E])
where
    V::E: DecodeElem,
{
    let d = g.len();
    if d == 0 {
        return;
    }
    let inv_d = V::E::ONE / V::E::from_f64(d as f64);
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut s = V::E::ZERO;
        let mut acc = V::zero();
        let mut xc = xr.chunks_exact(V::W);
        for c in &mut xc {
            acc = acc.add(V::load(c));
        }
        s = s + acc.hsum();
        for &v in xc.remainder() {
            s = s + v;
        }
        let mean = s * inv_d;
        let mv = V::splat(mean);
        let mut acc = V::zero();
        let mut xc = xr.chunks_exact(V::W);
        for c in &mut xc {
            let e = V::load(c).sub(mv);
            acc = e.fma(e, acc);
        }
        let mut q = acc.hsum();
        for &v in xc.remainder() {
            q = (v - mean) * (v - mean) + q;
        }
        let rstd = V::E::ONE / (q * inv_d + eps).sqrt();
        for (((o, &v), &gg), &bb) in or.iter_mut().zip(xr).zip(g).zip(b) {
            *o = (v - mean) * rstd * gg + bb;
        }
    }
}
