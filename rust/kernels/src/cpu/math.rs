//! Vector math written once for any [`Vector`]: `exp`, `softplus`, `sigmoid` and the
//! softplus derivative (all NaN-propagating, see the semantics in [`super::vector`]),
//! transposes of W×W blocks and lane sums in a fixed order.

use super::vector::{Elem, Vector};

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
pub(crate) fn exp_poly<V: Vector>(r: V) -> V {
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
