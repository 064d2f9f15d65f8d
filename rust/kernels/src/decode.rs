//! Fused streaming decode step of a B'MOJO language model (SPEC §6.4): one call consumes
//! one token for every row of the batch through the whole model (embedding, blocks of
//! LN → B'MOJO layer → residual, LN → MLP → residual, final LN, tied head) and updates the
//! stream state in place. It computes exactly what `Stream._run` does for one token
//! (`BMojoLayer._step1`), in fewer, larger pieces.
//!
//! **Bandwidth.** Decode at small batch is bound by reading the weights (19 MB for the
//! 4-layer d=256 model), so every weight matrix is read once per token for the whole batch
//! (GEMV batched over rows) and the rows of each matrix are split over the threads.
//!
//! **Team protocol.** The pool's per-region cost (waking threads, joining) is several µs,
//! and a token needs ~25 dependent steps, so a token runs as *one* team region
//! ([`team::team`]): `nt` threads run the same program and meet at a spin [`Barrier`]
//! between phases. In every phase the work is cut into fixed tasks (blocks of
//! [`ROWS`] weight rows, blocks of channels, batch rows) whose results do not depend on
//! which thread runs them, so the output is bitwise independent of the thread count.
//! Buffers shared by the team are [`TeamBuf`]s: within one phase (between two barriers)
//! a buffer is either only read, or written in parts that belong to exactly one thread
//! (and read by that thread only); the barrier's acquire/release orders the phases. Tiny
//! sequential pieces (embedding, LayerNorms, residual adds) are computed redundantly by
//! every thread into private buffers, which saves barriers.

use std::ops::Range;
use std::sync::Mutex;

use crate::cpu::pool;
use crate::cpu::team::{self, share, Barrier, TeamBuf};
use crate::cpu::{dispatch, sigmoid, softplus, Elem, Kernel, Level, SimdElem, Vector};
use crate::eidetic::{self, InnovArgs, InnovOut, Policy};
use crate::error::{check_lens, Error, Result};

/// `map_buf!(V, buf, |v| expr)`: replaces every element of `buf` by `expr`, a vector at a
/// time (the tail padded). A macro rather than a function taking a closure: a closure (or
/// a fn item called through `Fn`) is compiled without the level's target features, which
/// leaves the intrinsics as out-of-line calls (see `dispatch`).
macro_rules! map_buf {
    ($V:ty, $buf:expr, |$v:ident| $body:expr) => {{
        let buf = $buf;
        let w = <$V as Vector>::W;
        let mut chunks = buf.chunks_exact_mut(w);
        for c in &mut chunks {
            let $v = <$V as Vector>::load(c);
            ($body).store(c);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            let mut tmp = [<<$V as Vector>::E as Elem>::ZERO; 16];
            tmp[..n].copy_from_slice(rest);
            let $v = <$V as Vector>::load(&tmp);
            ($body).store(&mut tmp);
            rest.copy_from_slice(&tmp[..n]);
        }
    }};
}

/// Weight rows per GEMV task.
pub const ROWS: usize = 16;
/// Channels per SSM task.
const CHANNELS: usize = 64;

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
fn silu<V: Vector>(v: V) -> V {
    v.mul(sigmoid(v))
}

/// `Σ a_i b_i` (vectors, then a scalar tail; fixed order per level).
#[inline(always)]
fn dot<V: Vector>(a: &[V::E], b: &[V::E]) -> V::E {
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
fn axpy<V: Vector>(alpha: V::E, x: &[V::E], y: &mut [V::E]) {
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
fn add_into<V: Vector>(x: &[V::E], y: &mut [V::E]) {
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
fn layer_norm<V: Vector>(x: &[V::E], g: &[V::E], b: &[V::E], eps: V::E, out: &mut [V::E])
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

// ------------------------------------------------------------------------ GEMV

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Act {
    None,
    Gelu,
}

/// `out[b, o] = act(Σ_i w[o, i] x[b, i] + bias[o])` for `nx` input rows.
struct Job<'s, 'a, T> {
    w: &'s [T],
    bias: Option<&'s [T]>,
    n_out: usize,
    n_in: usize,
    x: &'s [T],
    nx: usize,
    out: &'s TeamBuf<'a, T>,
    act: Act,
}

/// Bias and activation of one finished output slice (rows `r0..` of one input row).
#[inline(always)]
fn finish_rows<V: Vector>(out: &mut [V::E], bias: Option<&[V::E]>, r0: usize, act: Act)
where
    V::E: DecodeElem,
{
    if let Some(bias) = bias {
        for (o, &bb) in out.iter_mut().zip(&bias[r0..]) {
            *o = *o + bb;
        }
    }
    if act == Act::Gelu {
        V::E::gelu::<V>(out);
    }
}

/// Sums of 4 weight rows times `x`: vector accumulators, horizontal sums, scalar tail.
/// Every output is accumulated in the same order whatever the grouping below, so results
/// do not depend on how rows and inputs are paired.
#[inline(always)]
fn tail4<T: Elem>(w: [&[T]; 4], x: &[T], from: usize, s: &mut [T; 4]) {
    for (i, &xi) in x.iter().enumerate().skip(from) {
        for (sk, wk) in s.iter_mut().zip(w) {
            *sk = wk[i] * xi + *sk;
        }
    }
}

/// Rows `r0..r0 + rows` of a job for every input row: 4 weight rows × 2 input rows per
/// register block, all input rows while the weight rows are in L1 (each weight is read
/// from memory once per call).
#[inline(always)]
fn gemv_block<V: Vector>(j: &Job<'_, '_, V::E>, r0: usize, rows: usize)
where
    V::E: DecodeElem,
{
    let (n, w) = (j.n_in, V::W);
    let t0 = n / w * w;
    let mut b = 0;
    while b + 2 <= j.nx {
        let x0 = &j.x[b * n..(b + 1) * n];
        let x1 = &j.x[(b + 1) * n..(b + 2) * n];
        let (o0, o1) = (b * j.n_out + r0, (b + 1) * j.n_out + r0);
        // SAFETY: team protocol: rows r0..r0+rows of this job's output belong to this
        // task, run by exactly one thread in this phase; the two ranges are disjoint.
        let (out0, out1) = unsafe { (j.out.part(o0..o0 + rows), j.out.part(o1..o1 + rows)) };
        let mut r = 0;
        while r + 4 <= rows {
            let base = (r0 + r) * n;
            let wr = [
                &j.w[base..base + n],
                &j.w[base + n..base + 2 * n],
                &j.w[base + 2 * n..base + 3 * n],
                &j.w[base + 3 * n..base + 4 * n],
            ];
            let mut a = [V::zero(); 8];
            let it = wr[0]
                .chunks_exact(w)
                .zip(wr[1].chunks_exact(w))
                .zip(wr[2].chunks_exact(w))
                .zip(wr[3].chunks_exact(w))
                .zip(x0.chunks_exact(w).zip(x1.chunks_exact(w)));
            for ((((c0, c1), c2), c3), (xa, xb)) in it {
                let (xa, xb) = (V::load(xa), V::load(xb));
                let (v0, v1, v2, v3) = (V::load(c0), V::load(c1), V::load(c2), V::load(c3));
                a[0] = v0.fma(xa, a[0]);
                a[1] = v1.fma(xa, a[1]);
                a[2] = v2.fma(xa, a[2]);
                a[3] = v3.fma(xa, a[3]);
                a[4] = v0.fma(xb, a[4]);
                a[5] = v1.fma(xb, a[5]);
                a[6] = v2.fma(xb, a[6]);
                a[7] = v3.fma(xb, a[7]);
            }
            let mut s0 = [a[0].hsum(), a[1].hsum(), a[2].hsum(), a[3].hsum()];
            let mut s1 = [a[4].hsum(), a[5].hsum(), a[6].hsum(), a[7].hsum()];
            tail4(wr, x0, t0, &mut s0);
            tail4(wr, x1, t0, &mut s1);
            out0[r..r + 4].copy_from_slice(&s0);
            out1[r..r + 4].copy_from_slice(&s1);
            r += 4;
        }
        while r < rows {
            let base = (r0 + r) * n;
            out0[r] = dot::<V>(&j.w[base..base + n], x0);
            out1[r] = dot::<V>(&j.w[base..base + n], x1);
            r += 1;
        }
        finish_rows::<V>(out0, j.bias, r0, j.act);
        finish_rows::<V>(out1, j.bias, r0, j.act);
        b += 2;
    }
    if b < j.nx {
        let x = &j.x[b * n..(b + 1) * n];
        let o0 = b * j.n_out + r0;
        // SAFETY: as above.
        let out = unsafe { j.out.part(o0..o0 + rows) };
        let mut r = 0;
        while r + 4 <= rows {
            let base = (r0 + r) * n;
            let wr = [
                &j.w[base..base + n],
                &j.w[base + n..base + 2 * n],
                &j.w[base + 2 * n..base + 3 * n],
                &j.w[base + 3 * n..base + 4 * n],
            ];
            let (mut a0, mut a1, mut a2, mut a3) = (V::zero(), V::zero(), V::zero(), V::zero());
            let it = wr[0]
                .chunks_exact(w)
                .zip(wr[1].chunks_exact(w))
                .zip(wr[2].chunks_exact(w))
                .zip(wr[3].chunks_exact(w))
                .zip(x.chunks_exact(w));
            for ((((c0, c1), c2), c3), xc) in it {
                let xv = V::load(xc);
                a0 = V::load(c0).fma(xv, a0);
                a1 = V::load(c1).fma(xv, a1);
                a2 = V::load(c2).fma(xv, a2);
                a3 = V::load(c3).fma(xv, a3);
            }
            let mut s = [a0.hsum(), a1.hsum(), a2.hsum(), a3.hsum()];
            tail4(wr, x, t0, &mut s);
            out[r..r + 4].copy_from_slice(&s);
            r += 4;
        }
        while r < rows {
            let base = (r0 + r) * n;
            out[r] = dot::<V>(&j.w[base..base + n], x);
            r += 1;
        }
        finish_rows::<V>(out, j.bias, r0, j.act);
    }
}

/// Cost of a task, in multiply-adds (weight rows × inputs × input rows).
#[inline]
fn job_cost<T>(j: &Job<'_, '_, T>, rows: usize) -> usize {
    rows * j.n_in * j.nx.max(1) + 1
}

/// Runs this thread's share of the tasks of `jobs` (blocks of [`ROWS`] rows of every job,
/// cut by cost), plus `extra` more tasks of cost `extra_cost` each (returned as indices
/// for the caller to run).
#[inline(always)]
fn gemv_phase<V: Vector>(
    jobs: &[Job<'_, '_, V::E>],
    extra: usize,
    extra_cost: usize,
    tid: usize,
    nt: usize,
) -> Range<usize>
where
    V::E: DecodeElem,
{
    let mut total = extra * extra_cost;
    for j in jobs {
        for r0 in (0..j.n_out).step_by(ROWS) {
            total += job_cost(j, ROWS.min(j.n_out - r0));
        }
    }
    let (lo, hi) = (total * tid / nt, total * (tid + 1) / nt);
    // A task belongs to the thread whose share holds the task's first unit of cost.
    let mut acc = 0;
    for j in jobs {
        for r0 in (0..j.n_out).step_by(ROWS) {
            let rows = ROWS.min(j.n_out - r0);
            if acc >= lo && acc < hi {
                gemv_block::<V>(j, r0, rows);
            }
            acc += job_cost(j, rows);
        }
    }
    let mut first = extra;
    let mut last = extra;
    for e in 0..extra {
        if acc >= lo && acc < hi {
            first = first.min(e);
            last = e + 1;
        }
        acc += extra_cost;
    }
    if first >= last {
        extra..extra
    } else {
        first..last
    }
}

// ------------------------------------------------------------------------ model

/// A linear map `(n_out, n_in)` row-major (torch's `Linear.weight`) with optional bias.
pub struct Linear<T> {
    pub w: Vec<T>,
    pub b: Option<Vec<T>>,
    pub n_out: usize,
    pub n_in: usize,
}

impl<T: Copy> Linear<T> {
    pub fn new(name: &str, w: &[T], b: Option<&[T]>, n_out: usize, n_in: usize) -> Result<Self> {
        if w.len() != n_out * n_in {
            return Err(Error::value(
                name,
                format!("a ({n_out}, {n_in}) weight"),
                format!("{} elements", w.len()),
            ));
        }
        if let Some(b) = b {
            if b.len() != n_out {
                return Err(Error::value(name, format!("a bias of {n_out}"), b.len()));
            }
        }
        Ok(Linear {
            w: w.to_vec(),
            b: b.map(<[T]>::to_vec),
            n_out,
            n_in,
        })
    }
}

pub struct Norm<T> {
    pub w: Vec<T>,
    pub b: Vec<T>,
    pub eps: T,
}

/// The Mamba mixer's parameters (A given as `-exp(A_log)`).
pub struct Ssm<T> {
    pub d_inner: usize,
    pub d_state: usize,
    pub dt_rank: usize,
    pub d_conv: usize,
    pub in_proj: Linear<T>,
    /// `(d_inner, d_conv)`.
    pub conv_w: Vec<T>,
    pub conv_b: Option<Vec<T>>,
    pub x_proj: Linear<T>,
    /// `(d_inner, dt_rank)` with its bias (the Δ bias).
    pub dt_proj: Linear<T>,
    /// `(d_inner, d_state)`.
    pub a: Vec<T>,
    pub d: Vec<T>,
    pub out_proj: Linear<T>,
}

pub struct Attn<T> {
    pub n_heads: usize,
    pub qkv: Linear<T>,
    pub out_proj: Linear<T>,
}

pub struct Layer<T> {
    pub norm1: Norm<T>,
    pub ssm: Option<Ssm<T>>,
    pub attn: Option<Attn<T>>,
    pub window: usize,
    pub n_fading: usize,
    pub n_eidetic: usize,
    /// Innovation predictor taps (`innovation_taps` of `1/k`).
    pub taps: Vec<T>,
    pub chi2: bool,
    pub rate: T,
    pub floor: T,
    pub policy: Policy,
    pub norm2: Norm<T>,
    pub fc1: Linear<T>,
    pub fc2: Linear<T>,
}

pub struct Model<T> {
    pub vocab: usize,
    pub d_model: usize,
    /// `(vocab, d_model)`, also the head.
    pub embedding: Vec<T>,
    pub layers: Vec<Layer<T>>,
    pub norm_f: Norm<T>,
}

impl<T: DecodeElem> Model<T> {
    /// Checks that every piece fits together (the binding builds models from arrays).
    pub fn check(&self) -> Result<()> {
        let d = self.d_model;
        if d == 0 || self.vocab == 0 {
            return Err(Error::expected("d_model and vocab_size", ">= 1"));
        }
        if self.embedding.len() != self.vocab * d {
            return Err(Error::expected(
                "embedding",
                format!("({}, {d})", self.vocab),
            ));
        }
        check_norm("norm_f", &self.norm_f, d)?;
        for (i, l) in self.layers.iter().enumerate() {
            l.check(d).map_err(|e| e.context(format!("layers.{i}.")))?;
        }
        Ok(())
    }
}

/// A LayerNorm of `d` features.
fn check_norm<T>(name: &str, n: &Norm<T>, d: usize) -> Result<()> {
    if n.w.len() != d || n.b.len() != d {
        return Err(Error::expected(name, format!("weight and bias of {d}")));
    }
    Ok(())
}

impl<T> Linear<T> {
    /// An `(o, i)` map (with a bias of `o` if any).
    fn check(&self, name: &str, o: usize, i: usize) -> Result<()> {
        if self.n_out != o || self.n_in != i || self.w.len() != o * i {
            return Err(Error::expected(name, format!("a ({o}, {i}) weight")));
        }
        if self.b.as_ref().is_some_and(|b| b.len() != o) {
            return Err(Error::expected(name, format!("a bias of {o}")));
        }
        Ok(())
    }
}

impl<T: DecodeElem> Layer<T> {
    /// Checks the pieces of one block of a `d`-wide model (names relative to the block).
    fn check(&self, d: usize) -> Result<()> {
        check_norm("norm1", &self.norm1, d)?;
        check_norm("norm2", &self.norm2, d)?;
        let ff = self.fc1.n_out;
        self.fc1.check("fc1", ff, d)?;
        self.fc2.check("fc2", d, ff)?;
        let (w, mf, me) = (self.window, self.n_fading, self.n_eidetic);
        if (w == 0) != self.attn.is_none() {
            return Err(Error::invalid("attn", "present exactly when window > 0"));
        }
        if (w == 0 || mf > 0 || me > 0) != self.ssm.is_some() {
            return Err(Error::invalid(
                "ssm",
                "present exactly when window == 0 or memory tokens are used",
            ));
        }
        if w == 0 && (mf > 0 || me > 0) {
            return Err(Error::invalid("window", "memory tokens need a window > 0"));
        }
        if me > 0 && self.taps.is_empty() {
            return Err(Error::expected("taps", "at least one innovation tap"));
        }
        if me > 0 && !(self.rate > T::ZERO && self.rate <= T::ONE && self.floor > T::ZERO) {
            return Err(Error::expected(
                "rate and floor",
                "an innovation rate in (0, 1] and a floor > 0",
            ));
        }
        if let Some(a) = &self.attn {
            if a.n_heads == 0 || !d.is_multiple_of(a.n_heads) {
                return Err(Error::invalid("attn", "n_heads must divide d_model"));
            }
            a.qkv.check("attn.qkv", 3 * d, d)?;
            a.out_proj.check("attn.out_proj", d, d)?;
        }
        if let Some(s) = &self.ssm {
            let (di, n, r, k) = (s.d_inner, s.d_state, s.dt_rank, s.d_conv);
            if di == 0 || n == 0 || r == 0 || k == 0 {
                return Err(Error::invalid("ssm", "sizes must be >= 1"));
            }
            s.in_proj.check("ssm.in_proj", 2 * di, d)?;
            s.x_proj.check("ssm.x_proj", r + 2 * n, di)?;
            s.dt_proj.check("ssm.dt_proj", di, r)?;
            s.out_proj.check("ssm.out_proj", d, di)?;
            if s.dt_proj.b.is_none() {
                return Err(Error::expected("ssm.dt_proj", "a bias"));
            }
            if s.conv_w.len() != di * k || s.conv_b.as_ref().is_some_and(|b| b.len() != di) {
                return Err(Error::expected(
                    "ssm.conv",
                    "a (d_inner, d_conv) weight and (d_inner,) bias",
                ));
            }
            if s.a.len() != di * n || s.d.len() != di {
                return Err(Error::expected(
                    "ssm",
                    "A (d_inner, d_state) and D (d_inner,)",
                ));
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------ state

/// One layer's stream state (the tensors of `BMojoLayer.init_state`, flattened; absent
/// pieces are empty slices).
pub struct LayerState<'a, T> {
    pub conv: &'a mut [T],
    pub ssm: &'a mut [T],
    pub innov_history: &'a mut [T],
    pub innov_count: &'a mut [i64],
    pub innov_ema: &'a mut [T],
    pub store_positions: &'a mut [i64],
    pub store_scores: &'a mut [f64],
    pub store_count: &'a mut [i64],
    pub mem_positions: &'a mut [i64],
    pub ring_k: &'a mut [T],
    pub ring_v: &'a mut [T],
    pub mem_k: &'a mut [T],
    pub mem_v: &'a mut [T],
    pub mem_mask: &'a mut [bool],
    pub fading_y: &'a mut [T],
}

pub struct State<'a, T> {
    pub position: &'a mut [i64],
    pub logits: &'a mut [T],
    pub has_logits: &'a mut [bool],
    pub layers: Vec<LayerState<'a, T>>,
}

/// Expected element counts of a layer's state pieces for `b` rows.
fn layer_sizes<T>(l: &Layer<T>, d: usize, b: usize) -> [(&'static str, usize); 15] {
    let (w, mf, me) = (l.window, l.n_fading, l.n_eidetic);
    let (conv, ssm) = l.ssm.as_ref().map_or((0, 0), |s| {
        (b * s.d_inner * (s.d_conv - 1), b * s.d_inner * s.d_state)
    });
    let e = |x: usize| if me > 0 { x } else { 0 };
    let a = |x: usize| if w > 0 { x } else { 0 };
    [
        ("conv", conv),
        ("ssm", ssm),
        ("innov_history", e(b * l.taps.len() * d)),
        ("innov_count", e(b)),
        ("innov_ema", e(2 * b)),
        ("store_positions", e(b * me)),
        ("store_scores", e(b * me)),
        ("store_count", e(b)),
        ("mem_positions", e(b * me)),
        ("ring_k", a(b * w * d)),
        ("ring_v", a(b * w * d)),
        ("mem_k", a(b * (me + mf) * d)),
        ("mem_v", a(b * (me + mf) * d)),
        ("mem_mask", a(b * (me + mf))),
        ("fading_y", b * mf * d),
    ]
}

fn layer_lens<T>(s: &LayerState<'_, T>) -> [usize; 15] {
    [
        s.conv.len(),
        s.ssm.len(),
        s.innov_history.len(),
        s.innov_count.len(),
        s.innov_ema.len(),
        s.store_positions.len(),
        s.store_scores.len(),
        s.store_count.len(),
        s.mem_positions.len(),
        s.ring_k.len(),
        s.ring_v.len(),
        s.mem_k.len(),
        s.mem_v.len(),
        s.mem_mask.len(),
        s.fading_y.len(),
    ]
}

impl<T> State<'_, T> {
    /// Checks the state of `tokens.len()` rows against the model and the token ids and
    /// positions against their ranges.
    fn check(&self, m: &Model<T>, tokens: &[i64]) -> Result<()> {
        let bsz = tokens.len();
        let d = m.d_model;
        check_lens(&[
            ("position", self.position.len(), bsz),
            ("has_logits", self.has_logits.len(), bsz),
            ("logits", self.logits.len(), bsz * m.vocab),
        ])?;
        if self.layers.len() != m.layers.len() {
            return Err(Error::value(
                "state",
                format!("{} layers", m.layers.len()),
                self.layers.len(),
            ));
        }
        if let Some(t) = tokens
            .iter()
            .find(|&&t| t < 0 || t as u64 >= m.vocab as u64)
        {
            return Err(Error::invalid(
                "tokens",
                format!("token id {t} is outside the vocabulary [0, {})", m.vocab),
            ));
        }
        if let Some(p) = self
            .position
            .iter()
            .find(|&&p| !(0..i64::MAX - 1).contains(&p))
        {
            return Err(Error::value("position", "values in [0, 2^63 - 2)", p));
        }
        for (i, (l, ls)) in m.layers.iter().zip(&self.layers).enumerate() {
            let at = |e: Error| e.context(format!("layers.{i}."));
            let sizes = layer_sizes(l, d, bsz);
            let lens = layer_lens(ls);
            let items: Vec<(&str, usize, usize)> = sizes
                .iter()
                .zip(lens)
                .map(|(&(name, want), got)| (name, got, want))
                .collect();
            check_lens(&items).map_err(at)?;
            if l.n_eidetic > 0 {
                eidetic::check_store(
                    l.policy,
                    bsz,
                    l.n_eidetic,
                    ls.store_positions,
                    ls.store_scores,
                    ls.store_count,
                )
                .map_err(|e| e.context(format!("layers.{i}: invalid eidetic store: ")))?;
                if let Some(c) = ls
                    .innov_count
                    .iter()
                    .find(|&&c| !(0..i64::MAX - 1).contains(&c))
                {
                    return Err(at(Error::value("innov_count", "a valid count", c)));
                }
                if let Some(p) = ls.mem_positions.iter().find(|&&p| p < -1) {
                    return Err(at(Error::value("mem_positions", "a valid position", p)));
                }
            }
        }
        Ok(())
    }
}

/// Shared views of one layer's state.
struct LayerBufs<'a, T> {
    conv: TeamBuf<'a, T>,
    ssm: TeamBuf<'a, T>,
    innov_history: TeamBuf<'a, T>,
    innov_count: TeamBuf<'a, i64>,
    innov_ema: TeamBuf<'a, T>,
    store_positions: TeamBuf<'a, i64>,
    store_scores: TeamBuf<'a, f64>,
    store_count: TeamBuf<'a, i64>,
    mem_positions: TeamBuf<'a, i64>,
    ring_k: TeamBuf<'a, T>,
    ring_v: TeamBuf<'a, T>,
    mem_k: TeamBuf<'a, T>,
    mem_v: TeamBuf<'a, T>,
    mem_mask: TeamBuf<'a, bool>,
    fading_y: TeamBuf<'a, T>,
}

impl<'a, T> LayerBufs<'a, T> {
    fn new(s: LayerState<'a, T>) -> Self {
        LayerBufs {
            conv: TeamBuf::new(s.conv),
            ssm: TeamBuf::new(s.ssm),
            innov_history: TeamBuf::new(s.innov_history),
            innov_count: TeamBuf::new(s.innov_count),
            innov_ema: TeamBuf::new(s.innov_ema),
            store_positions: TeamBuf::new(s.store_positions),
            store_scores: TeamBuf::new(s.store_scores),
            store_count: TeamBuf::new(s.store_count),
            mem_positions: TeamBuf::new(s.mem_positions),
            ring_k: TeamBuf::new(s.ring_k),
            ring_v: TeamBuf::new(s.ring_v),
            mem_k: TeamBuf::new(s.mem_k),
            mem_v: TeamBuf::new(s.mem_v),
            mem_mask: TeamBuf::new(s.mem_mask),
            fading_y: TeamBuf::new(s.fading_y),
        }
    }
}

/// Scratch buffers of one token shared by the team.
struct Scratch<'a, T> {
    xz: TeamBuf<'a, T>,
    qkv: TeamBuf<'a, T>,
    fkv: TeamBuf<'a, T>,
    xc: TeamBuf<'a, T>,
    ao: TeamBuf<'a, T>,
    dbc: TeamBuf<'a, T>,
    ho: TeamBuf<'a, T>,
    yi: TeamBuf<'a, T>,
    y: TeamBuf<'a, T>,
    f1: TeamBuf<'a, T>,
    f2: TeamBuf<'a, T>,
    logits: TeamBuf<'a, T>,
}

// ------------------------------------------------------------------------ the step

/// Everything one team member needs.
struct Member<'s, 'a, T> {
    m: &'s Model<T>,
    tokens: &'s [i64],
    pos: &'s [i64],
    /// Rows at a chunk boundary (memory refresh), ascending.
    brows: &'s [usize],
    layers: &'s [LayerBufs<'a, T>],
    sc: &'s Scratch<'a, T>,
    bar: &'s Barrier,
    err: &'s Mutex<Option<Error>>,
    level: Level,
    tid: usize,
    nt: usize,
}

impl<T: DecodeElem> Kernel<T> for Member<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        member::<V>(&self);
    }
}

#[inline(always)]
fn member<V: Vector>(mb: &Member<'_, '_, V::E>)
where
    V::E: DecodeElem,
{
    let (m, tid, nt, sc) = (mb.m, mb.tid, mb.nt, mb.sc);
    let d = m.d_model;
    let bsz = mb.tokens.len();
    let nb = mb.brows.len();
    // Private copies of the residual stream and the normalised inputs.
    let mut h = vec![V::E::ZERO; bsz * d];
    for (b, &t) in mb.tokens.iter().enumerate() {
        let t = t as usize;
        h[b * d..(b + 1) * d].copy_from_slice(&m.embedding[t * d..(t + 1) * d]);
    }
    let mut xn = vec![V::E::ZERO; bsz * d];
    let mut fin = Vec::new();
    for (l, st) in m.layers.iter().zip(mb.layers) {
        layer_norm::<V>(&h, &l.norm1.w, &l.norm1.b, l.norm1.eps, &mut xn);
        let (w, mf, me) = (l.window, l.n_fading, l.n_eidetic);
        // Fading tokens of the rows at a chunk boundary: their K/V are computed below.
        let fading_refresh = w > 0 && mf > 0 && nb > 0;
        if fading_refresh {
            fin.clear();
            for &b in mb.brows {
                // SAFETY: team protocol: fading_y is only read in this phase.
                fin.extend_from_slice(unsafe { st.fading_y.view(b * mf * d..(b + 1) * mf * d) });
            }
        }
        // Phase A: in_proj and qkv (the same input), and the fading K/V.
        {
            let mut jobs = Vec::with_capacity(3);
            if let Some(s) = &l.ssm {
                jobs.push(Job {
                    w: &s.in_proj.w,
                    bias: s.in_proj.b.as_deref(),
                    n_out: s.in_proj.n_out,
                    n_in: d,
                    x: &xn,
                    nx: bsz,
                    out: &sc.xz,
                    act: Act::None,
                });
            }
            if let Some(a) = &l.attn {
                jobs.push(Job {
                    w: &a.qkv.w,
                    bias: a.qkv.b.as_deref(),
                    n_out: 3 * d,
                    n_in: d,
                    x: &xn,
                    nx: bsz,
                    out: &sc.qkv,
                    act: Act::None,
                });
                if fading_refresh {
                    jobs.push(Job {
                        w: &a.qkv.w[d * d..],
                        bias: a.qkv.b.as_deref().map(|b| &b[d..]),
                        n_out: 2 * d,
                        n_in: d,
                        x: &fin,
                        nx: nb * mf,
                        out: &sc.fkv,
                        act: Act::None,
                    });
                }
            }
            gemv_phase::<V>(&jobs, 0, 0, tid, nt);
        }
        mb.bar.wait();
        // Phase B: conv (channel blocks) and attention (rows).
        {
            let (nchan, ccost) = match &l.ssm {
                Some(s) => (s.d_inner.div_ceil(CHANNELS), CHANNELS * s.d_conv * bsz * 4),
                None => (0, 0),
            };
            let acost = (l.n_eidetic + l.n_fading + w) * d * 2 + 1;
            let rows_att = if l.attn.is_some() { bsz } else { 0 };
            let total = nchan * ccost + rows_att * acost;
            let (lo, hi) = (total * tid / nt, total * (tid + 1) / nt);
            let mut acc = 0;
            if let Some(s) = &l.ssm {
                for c in 0..nchan {
                    if acc >= lo && acc < hi {
                        conv_block::<V>(
                            s,
                            sc,
                            st,
                            bsz,
                            c * CHANNELS,
                            CHANNELS.min(s.d_inner - c * CHANNELS),
                        );
                    }
                    acc += ccost;
                }
            }
            if let Some(a) = &l.attn {
                for b in 0..bsz {
                    if acc >= lo && acc < hi {
                        attention_row::<V>(l, a, mb, st, b);
                    }
                    acc += acost;
                }
            }
        }
        mb.bar.wait();
        // Phase C: x_proj and the attention's out_proj.
        {
            let mut jobs = Vec::with_capacity(2);
            // SAFETY: team protocol: xc and ao were written in phase B and are only read
            // until the end of this phase.
            let (xc, ao) = unsafe { (sc.xc.all(), sc.ao.all()) };
            if let Some(s) = &l.ssm {
                jobs.push(Job {
                    w: &s.x_proj.w,
                    bias: s.x_proj.b.as_deref(),
                    n_out: s.x_proj.n_out,
                    n_in: s.d_inner,
                    x: &xc[..bsz * s.d_inner],
                    nx: bsz,
                    out: &sc.dbc,
                    act: Act::None,
                });
            }
            if let Some(a) = &l.attn {
                jobs.push(Job {
                    w: &a.out_proj.w,
                    bias: a.out_proj.b.as_deref(),
                    n_out: d,
                    n_in: d,
                    x: &ao[..bsz * d],
                    nx: bsz,
                    out: &sc.ho,
                    act: Act::None,
                });
            }
            gemv_phase::<V>(&jobs, 0, 0, tid, nt);
        }
        mb.bar.wait();
        if l.attn.is_some() {
            // SAFETY: ho was written in phase C; read-only until the end of the layer.
            add_into::<V>(unsafe { &sc.ho.all()[..bsz * d] }, &mut h);
            layer_norm::<V>(&h, &l.norm2.w, &l.norm2.b, l.norm2.eps, &mut xn);
        }
        if let Some(s) = &l.ssm {
            // Phase D: Δ, the state update and the gate (channel blocks).
            let nchan = s.d_inner.div_ceil(CHANNELS);
            for c in share(nchan, tid, nt) {
                ssm_block::<V>(
                    s,
                    sc,
                    st,
                    bsz,
                    c * CHANNELS,
                    CHANNELS.min(s.d_inner - c * CHANNELS),
                );
            }
            mb.bar.wait();
        }
        // Phase E: the SSM's out_proj, and fc1 when the layer output is the attention's.
        {
            let mut jobs = Vec::with_capacity(2);
            // SAFETY: yi was written in phase D; read-only in this phase.
            let yi = unsafe { sc.yi.all() };
            if let Some(s) = &l.ssm {
                jobs.push(Job {
                    w: &s.out_proj.w,
                    bias: s.out_proj.b.as_deref(),
                    n_out: d,
                    n_in: s.d_inner,
                    x: &yi[..bsz * s.d_inner],
                    nx: bsz,
                    out: &sc.y,
                    act: Act::None,
                });
            }
            if l.attn.is_some() {
                jobs.push(fc1_job(l, &xn, bsz, sc));
            }
            gemv_phase::<V>(&jobs, 0, 0, tid, nt);
        }
        mb.bar.wait();
        if l.attn.is_none() {
            // Pure SSM: the layer output is y.
            // SAFETY: y was written in phase E; read-only until the end of the layer.
            add_into::<V>(unsafe { &sc.y.all()[..bsz * d] }, &mut h);
            layer_norm::<V>(&h, &l.norm2.w, &l.norm2.b, l.norm2.eps, &mut xn);
            gemv_phase::<V>(&[fc1_job(l, &xn, bsz, sc)], 0, 0, tid, nt);
            mb.bar.wait();
        }
        // Phase H: fc2, and per row the innovation score, store push and fading ring.
        {
            // SAFETY: f1 was written in the previous phase; read-only in this one.
            let f1 = unsafe { sc.f1.all() };
            let ff = l.fc1.n_out;
            let jobs = [Job {
                w: &l.fc2.w,
                bias: l.fc2.b.as_deref(),
                n_out: d,
                n_in: ff,
                x: &f1[..bsz * ff],
                nx: bsz,
                out: &sc.f2,
                act: Act::None,
            }];
            let rows = if l.attn.is_some() && (me > 0 || mf > 0) {
                bsz
            } else {
                0
            };
            for b in gemv_phase::<V>(&jobs, rows, d * (l.taps.len() + 2) + 64, tid, nt) {
                memory_row::<V>(l, mb, st, b);
            }
        }
        mb.bar.wait();
        // SAFETY: f2 was written in phase H; read-only until the next layer's phase H.
        add_into::<V>(unsafe { &sc.f2.all()[..bsz * d] }, &mut h);
    }
    // Final norm and the tied head, straight into the logits.
    layer_norm::<V>(&h, &m.norm_f.w, &m.norm_f.b, m.norm_f.eps, &mut xn);
    let jobs = [Job {
        w: &m.embedding,
        bias: None,
        n_out: m.vocab,
        n_in: d,
        x: &xn,
        nx: bsz,
        out: &sc.logits,
        act: Act::None,
    }];
    gemv_phase::<V>(&jobs, 0, 0, tid, nt);
}

fn fc1_job<'s, 'a, T>(
    l: &'s Layer<T>,
    xn: &'s [T],
    bsz: usize,
    sc: &'s Scratch<'a, T>,
) -> Job<'s, 'a, T> {
    Job {
        w: &l.fc1.w,
        bias: l.fc1.b.as_deref(),
        n_out: l.fc1.n_out,
        n_in: l.fc1.n_in,
        x: xn,
        nx: bsz,
        out: &sc.f1,
        act: Act::Gelu,
    }
}

/// Conv update + SiLU of channels `c0..c0+n` for every row.
#[inline(always)]
fn conv_block<V: Vector>(
    s: &Ssm<V::E>,
    sc: &Scratch<'_, V::E>,
    st: &LayerBufs<'_, V::E>,
    bsz: usize,
    c0: usize,
    n: usize,
) where
    V::E: DecodeElem,
{
    let (di, k) = (s.d_inner, s.d_conv);
    let km = k - 1;
    for b in 0..bsz {
        // SAFETY: team protocol: xz is read-only in this phase; channels c0..c0+n of row
        // b of the conv state and of xc belong to this task.
        let (xz, state, out) = unsafe {
            (
                sc.xz.view(b * 2 * di + c0..b * 2 * di + c0 + n),
                st.conv.part((b * di + c0) * km..(b * di + c0 + n) * km),
                sc.xc.part(b * di + c0..b * di + c0 + n),
            )
        };
        for (i, (o, &x)) in out.iter_mut().zip(xz).enumerate() {
            let c = c0 + i;
            let wr = &s.conv_w[c * k..(c + 1) * k];
            let srow = &mut state[i * km..(i + 1) * km];
            let mut acc = s.conv_b.as_ref().map_or(V::E::ZERO, |bb| bb[c]);
            for (&wk, &v) in wr.iter().zip(srow.iter()) {
                acc = wk * v + acc;
            }
            acc = wr[km] * x + acc;
            // A manual shift: `copy_within` is a memmove call per channel.
            for q in 1..km {
                srow[q - 1] = srow[q];
            }
            if km > 0 {
                srow[km - 1] = x;
            }
            *o = acc;
        }
        map_buf!(V, &mut *out, |v| silu::<V>(v));
    }
}

/// Δ = softplus(dt_proj(dbc) + bias), the selective state update, D skip and z gate for
/// channels `c0..c0+n` of every row.
#[inline(always)]
fn ssm_block<V: Vector>(
    s: &Ssm<V::E>,
    sc: &Scratch<'_, V::E>,
    st: &LayerBufs<'_, V::E>,
    bsz: usize,
    c0: usize,
    n: usize,
) where
    V::E: DecodeElem,
{
    let (di, ns, r) = (s.d_inner, s.d_state, s.dt_rank);
    let nd = r + 2 * ns;
    let w = V::W;
    let mut dt = vec![V::E::ZERO; n];
    let mut tmp = [V::E::ZERO; 16];
    let mut tb = [V::E::ZERO; 16];
    let mut tc = [V::E::ZERO; 16];
    let dtb = s.dt_proj.b.as_deref().unwrap_or(&[]);
    for b in 0..bsz {
        // SAFETY: team protocol: dbc, xz, xc are read-only in this phase; channels
        // c0..c0+n of row b of the SSM state and of yi belong to this task.
        let (dbc, xz, xc, state, out) = unsafe {
            (
                sc.dbc.view(b * nd..(b + 1) * nd),
                sc.xz.view(b * 2 * di..(b + 1) * 2 * di),
                sc.xc.view(b * di..(b + 1) * di),
                st.ssm.part((b * di + c0) * ns..(b * di + c0 + n) * ns),
                sc.yi.part(b * di + c0..b * di + c0 + n),
            )
        };
        let (dtr, bv, cv) = (&dbc[..r], &dbc[r..r + ns], &dbc[r + ns..]);
        for (i, o) in dt.iter_mut().enumerate() {
            let c = c0 + i;
            *o = dot::<V>(&s.dt_proj.w[c * r..(c + 1) * r], dtr) + dtb[c];
        }
        map_buf!(V, &mut dt[..], |v| softplus::<V>(v));
        for i in 0..n {
            let c = c0 + i;
            let x = xc[c];
            let (dtv, dtx) = (V::splat(dt[i]), V::splat(dt[i] * x));
            let arow = &s.a[c * ns..(c + 1) * ns];
            let srow = &mut state[i * ns..(i + 1) * ns];
            let mut acc = V::zero();
            let mut j = 0;
            while j < ns {
                let m = w.min(ns - j);
                let (av, hv, bb, cc) = if m == w {
                    (
                        V::load(&arow[j..]),
                        V::load(&srow[j..]),
                        V::load(&bv[j..]),
                        V::load(&cv[j..]),
                    )
                } else {
                    let mut ta = [V::E::ZERO; 16];
                    ta[..m].copy_from_slice(&arow[j..j + m]);
                    tmp[..w].fill(V::E::ZERO);
                    tmp[..m].copy_from_slice(&srow[j..j + m]);
                    tb[..w].fill(V::E::ZERO);
                    tb[..m].copy_from_slice(&bv[j..j + m]);
                    tc[..w].fill(V::E::ZERO);
                    tc[..m].copy_from_slice(&cv[j..j + m]);
                    (V::load(&ta), V::load(&tmp), V::load(&tb), V::load(&tc))
                };
                let hn = hv.fma(dtv.mul(av).exp(), dtx.mul(bb));
                acc = hn.fma(cc, acc);
                if m == w {
                    hn.store(&mut srow[j..]);
                } else {
                    hn.store(&mut tmp);
                    srow[j..j + m].copy_from_slice(&tmp[..m]);
                }
                j += m;
            }
            let y = acc.hsum() + s.d[c] * x;
            let z = xz[di + c];
            out[i] = y * z;
        }
        // out = y * z so far; multiply by sigmoid(z) (vectorised).
        let zs = &xz[di + c0..di + c0 + n];
        let mut oc = out.chunks_exact_mut(w);
        let mut zc = zs.chunks_exact(w);
        for (o, z) in (&mut oc).zip(&mut zc) {
            V::load(o).mul(sigmoid(V::load(z))).store(o);
        }
        let (or, zr) = (oc.into_remainder(), zc.remainder());
        if !or.is_empty() {
            let k = or.len();
            tmp[..w].fill(V::E::ZERO);
            tmp[..k].copy_from_slice(zr);
            let g = sigmoid(V::load(&tmp));
            g.store(&mut tmp);
            for (o, &gg) in or.iter_mut().zip(&tmp[..k]) {
                *o = *o * gg;
            }
        }
    }
}

/// Memory refresh (at a chunk boundary), ring write and attention of row `b`.
#[inline(always)]
fn attention_row<V: Vector>(
    l: &Layer<V::E>,
    a: &Attn<V::E>,
    mb: &Member<'_, '_, V::E>,
    st: &LayerBufs<'_, V::E>,
    b: usize,
) where
    V::E: DecodeElem,
{
    let d = mb.m.d_model;
    let (w, mf, me) = (l.window, l.n_fading, l.n_eidetic);
    let mm = me + mf;
    let pos = mb.pos[b];
    // SAFETY: team protocol: row b of the attention state and of ao belong to this task;
    // qkv, fkv and the store are read-only in this phase.
    let (qkv, ring_k, ring_v, mem_k, mem_v, mem_mask, ao) = unsafe {
        (
            mb.sc.qkv.view(b * 3 * d..(b + 1) * 3 * d),
            st.ring_k.part(b * w * d..(b + 1) * w * d),
            st.ring_v.part(b * w * d..(b + 1) * w * d),
            st.mem_k.part(b * mm * d..(b + 1) * mm * d),
            st.mem_v.part(b * mm * d..(b + 1) * mm * d),
            st.mem_mask.part(b * mm..(b + 1) * mm),
            mb.sc.ao.part(b * d..(b + 1) * d),
        )
    };
    if mm > 0 && pos % w as i64 == 0 {
        if me > 0 {
            // SAFETY: as above (row b of the store is read, its mem positions written).
            let (sp, mp) = unsafe {
                (
                    st.store_positions.view(b * me..(b + 1) * me),
                    st.mem_positions.part(b * me..(b + 1) * me),
                )
            };
            let mut held: Vec<i64> = sp.iter().copied().filter(|&p| p >= 0).collect();
            held.sort_unstable();
            held.resize(me, -1);
            let old_k = mem_k[..me * d].to_vec();
            let old_v = mem_v[..me * d].to_vec();
            for (i, &p) in held.iter().enumerate() {
                let (dk, dv) = (
                    &mut mem_k[i * d..(i + 1) * d],
                    &mut mem_v[i * d..(i + 1) * d],
                );
                if p < 0 {
                    dk.fill(V::E::ZERO);
                    dv.fill(V::E::ZERO);
                } else if p >= pos - w as i64 {
                    let r = (p as usize) % w;
                    dk.copy_from_slice(&ring_k[r * d..(r + 1) * d]);
                    dv.copy_from_slice(&ring_v[r * d..(r + 1) * d]);
                } else {
                    // Held at the previous boundary too (first match, as the Python path).
                    let j = mp.iter().position(|&q| q == p).unwrap_or(0);
                    dk.copy_from_slice(&old_k[j * d..(j + 1) * d]);
                    dv.copy_from_slice(&old_v[j * d..(j + 1) * d]);
                }
                mem_mask[i] = p >= 0;
            }
            mp.copy_from_slice(&held);
        }
        if mf > 0 {
            let bi = mb.brows.iter().position(|&x| x == b).unwrap_or(0);
            // SAFETY: fkv was written in phase A; read-only in this phase.
            let fkv = unsafe { mb.sc.fkv.view(bi * mf * 2 * d..(bi + 1) * mf * 2 * d) };
            let last = pos - 1;
            for j in 0..mf {
                let pf = last - (last - j as i64).rem_euclid(mf as i64);
                let ok = pf >= 0;
                let (dk, dv) = (
                    &mut mem_k[(me + j) * d..(me + j + 1) * d],
                    &mut mem_v[(me + j) * d..(me + j + 1) * d],
                );
                if ok {
                    dk.copy_from_slice(&fkv[j * 2 * d..j * 2 * d + d]);
                    dv.copy_from_slice(&fkv[j * 2 * d + d..(j + 1) * 2 * d]);
                } else {
                    dk.fill(V::E::ZERO);
                    dv.fill(V::E::ZERO);
                }
                mem_mask[me + j] = ok;
            }
        }
    }
    let slot = (pos as usize) % w;
    ring_k[slot * d..(slot + 1) * d].copy_from_slice(&qkv[d..2 * d]);
    ring_v[slot * d..(slot + 1) * d].copy_from_slice(&qkv[2 * d..3 * d]);
    attend::<V>(
        &qkv[..d],
        mem_k,
        mem_v,
        mem_mask,
        ring_k,
        ring_v,
        (pos as usize).min(w - 1) + 1,
        a.n_heads,
        ao,
    );
}

/// Softmax attention of one query `q (d)` over memory keys (masked) and the first
/// `nring` ring slots, per head.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend<V: Vector>(
    q: &[V::E],
    mem_k: &[V::E],
    mem_v: &[V::E],
    mem_mask: &[bool],
    ring_k: &[V::E],
    ring_v: &[V::E],
    nring: usize,
    heads: usize,
    out: &mut [V::E],
) where
    V::E: DecodeElem,
{
    let d = q.len();
    let hd = d / heads;
    let mm = mem_mask.len();
    let scale = V::E::ONE / V::E::from_f64(hd as f64).sqrt();
    let mut s = vec![V::E::ZERO; mm + nring];
    let neg = V::E::ZERO - V::E::INF;
    for h in 0..heads {
        let (lo, hi) = (h * hd, (h + 1) * hd);
        let qh = &q[lo..hi];
        let mut mx = neg;
        for (j, sj) in s.iter_mut().enumerate() {
            let (ok, k) = if j < mm {
                (mem_mask[j], &mem_k[j * d + lo..j * d + hi])
            } else {
                let r = j - mm;
                (true, &ring_k[r * d + lo..r * d + hi])
            };
            *sj = if ok { dot::<V>(qh, k) * scale } else { neg };
            if *sj > mx {
                mx = *sj;
            }
        }
        let mv = V::splat(mx);
        map_buf!(V, &mut s[..], |x| x.sub(mv).exp());
        let mut tot = V::E::ZERO;
        for &p in &s {
            tot = tot + p;
        }
        let o = &mut out[lo..hi];
        o.fill(V::E::ZERO);
        for (j, &p) in s.iter().enumerate() {
            if p == V::E::ZERO {
                continue;
            }
            let v = if j < mm {
                &mem_v[j * d + lo..j * d + hi]
            } else {
                let r = j - mm;
                &ring_v[r * d + lo..r * d + hi]
            };
            axpy::<V>(p, v, o);
        }
        let inv = V::E::ONE / tot;
        for x in o.iter_mut() {
            *x = *x * inv;
        }
    }
}

/// Innovation score, store push and fading ring write of row `b` (after the attention
/// read this token's memory).
#[inline(always)]
fn memory_row<V: Vector>(
    l: &Layer<V::E>,
    mb: &Member<'_, '_, V::E>,
    st: &LayerBufs<'_, V::E>,
    b: usize,
) where
    V::E: DecodeElem,
{
    let d = mb.m.d_model;
    let (mf, me) = (l.n_fading, l.n_eidetic);
    let pos = mb.pos[b];
    // SAFETY: team protocol: y is read-only in this phase; row b of the innovation state,
    // the store and the fading ring belong to this task.
    let y = unsafe { mb.sc.y.view(b * d..(b + 1) * d) };
    if me > 0 {
        let k = l.taps.len();
        // SAFETY: as above.
        let (hist, cnt, ema, sp, ss, scnt) = unsafe {
            (
                st.innov_history.part(b * k * d..(b + 1) * k * d),
                st.innov_count.part(b..b + 1),
                st.innov_ema.part(2 * b..2 * b + 2),
                st.store_positions.part(b * me..(b + 1) * me),
                st.store_scores.part(b * me..(b + 1) * me),
                st.store_count.part(b..b + 1),
            )
        };
        let (h0, c0, e0) = (hist.to_vec(), [cnt[0]], [ema[0], ema[1]]);
        let mut score = [V::E::ZERO];
        let r = eidetic::innovation(
            mb.level,
            &InnovArgs {
                batch: 1,
                len: 1,
                dim: d,
                weights: &l.taps,
                y,
                history: &h0,
                count: &c0,
                ema: &e0,
                chi2: l.chi2,
                rate: l.rate,
                floor: l.floor,
            },
            InnovOut {
                scores: &mut score,
                history: hist,
                count: cnt,
                ema,
            },
        )
        .and_then(|_| eidetic::push(l.policy, 1, me, sp, ss, scnt, &[score[0].to_f64()]));
        if let Err(e) = r {
            let mut g = mb.err.lock().unwrap_or_else(|e| e.into_inner());
            g.get_or_insert(e.context(format!("row {b}: ")));
        }
    }
    if mf > 0 {
        let slot = (pos as usize) % mf;
        // SAFETY: as above.
        let f = unsafe {
            st.fading_y
                .part((b * mf + slot) * d..(b * mf + slot + 1) * d)
        };
        f.copy_from_slice(y);
    }
}

/// One decode step: consumes `tokens (batch,)` at the rows' positions, writes the logits
/// and advances the state. Everything is checked before anything is written; an error
/// found while running (a NaN innovation score) is returned after the step.
pub fn decode_step<T: DecodeElem>(
    level: Level,
    m: &Model<T>,
    tokens: &[i64],
    st: State<'_, T>,
) -> Result<()> {
    m.check()?;
    st.check(m, tokens)?;
    let bsz = tokens.len();
    let d = m.d_model;
    let pos: Vec<i64> = st.position.to_vec();
    let max_mem = m.layers.iter().map(|l| l.n_fading).max().unwrap_or(0);
    // Rows at a chunk boundary: the same for every layer with memory tokens (one window).
    let brows_for = |w: usize| -> Vec<usize> {
        (0..bsz)
            .filter(|&b| w > 0 && pos[b] % w as i64 == 0)
            .collect()
    };
    // Windows may differ per layer only through the model config, which is shared.
    let win = m
        .layers
        .iter()
        .map(|l| l.window)
        .find(|&w| w > 0)
        .unwrap_or(0);
    if m.layers.iter().any(|l| l.window != 0 && l.window != win) {
        return Err(Error::invalid(
            "layers",
            "every layer must have the same window",
        ));
    }
    let brows = brows_for(win);
    let max_di = m
        .layers
        .iter()
        .filter_map(|l| l.ssm.as_ref().map(|s| s.d_inner))
        .max()
        .unwrap_or(0);
    let max_nd = m
        .layers
        .iter()
        .filter_map(|l| l.ssm.as_ref().map(|s| s.dt_rank + 2 * s.d_state))
        .max()
        .unwrap_or(0);
    let max_ff = m.layers.iter().map(|l| l.fc1.n_out).max().unwrap_or(0);
    let z = T::ZERO;
    let (mut xz, mut qkv, mut fkv) = (
        vec![z; bsz * 2 * max_di],
        vec![z; bsz * 3 * d],
        vec![z; brows.len() * max_mem * 2 * d],
    );
    let (mut xc, mut ao, mut dbc, mut ho) = (
        vec![z; bsz * max_di],
        vec![z; bsz * d],
        vec![z; bsz * max_nd],
        vec![z; bsz * d],
    );
    let (mut yi, mut y, mut f1, mut f2) = (
        vec![z; bsz * max_di],
        vec![z; bsz * d],
        vec![z; bsz * max_ff],
        vec![z; bsz * d],
    );
    let State {
        position,
        logits,
        has_logits,
        layers,
    } = st;
    let sc = Scratch {
        xz: TeamBuf::new(&mut xz),
        qkv: TeamBuf::new(&mut qkv),
        fkv: TeamBuf::new(&mut fkv),
        xc: TeamBuf::new(&mut xc),
        ao: TeamBuf::new(&mut ao),
        dbc: TeamBuf::new(&mut dbc),
        ho: TeamBuf::new(&mut ho),
        yi: TeamBuf::new(&mut yi),
        y: TeamBuf::new(&mut y),
        f1: TeamBuf::new(&mut f1),
        f2: TeamBuf::new(&mut f2),
        logits: TeamBuf::new(logits),
    };
    let lbufs: Vec<LayerBufs<'_, T>> = layers.into_iter().map(LayerBufs::new).collect();
    let err = Mutex::new(None);
    let work = m.layers.iter().map(|l| l.fc1.w.len() * 3).sum::<usize>() * bsz;
    let nt = if work >= 1 << 16 {
        pool::num_threads()
    } else {
        1
    };
    team::team(nt, |tid, nt, bar| {
        dispatch(
            level,
            Member {
                m,
                tokens,
                pos: &pos,
                brows: &brows,
                layers: &lbufs,
                sc: &sc,
                bar,
                err: &err,
                level,
                tid,
                nt,
            },
        )
    });
    for p in position.iter_mut() {
        *p += 1;
    }
    has_logits.fill(true);
    match err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------------ building blocks

/// Batched GEMV `out (nx, n_out) = act(x (nx, n_in) @ w^T + bias)` with the decode step's
/// kernel and task split (exposed for the tests).
#[allow(clippy::too_many_arguments)]
pub fn gemv<T: DecodeElem>(
    level: Level,
    w: &[T],
    bias: Option<&[T]>,
    n_out: usize,
    n_in: usize,
    x: &[T],
    gelu: bool,
    out: &mut [T],
) -> Result<()> {
    if n_in == 0 || w.len() != n_out * n_in || !x.len().is_multiple_of(n_in) {
        return Err(Error::invalid("gemv", "inconsistent sizes"));
    }
    let nx = x.len() / n_in;
    if out.len() != nx * n_out || bias.is_some_and(|b| b.len() != n_out) {
        return Err(Error::invalid("gemv", "inconsistent output or bias size"));
    }
    let ob = TeamBuf::new(out);
    let nt = pool::num_threads();
    struct G<'s, 'a, T> {
        j: Job<'s, 'a, T>,
        tid: usize,
        nt: usize,
        bar: &'s Barrier,
    }
    impl<T: DecodeElem> Kernel<T> for G<'_, '_, T> {
        type Out = ();
        #[inline(always)]
        fn run<V: Vector<E = T>>(self) {
            gemv_phase::<V>(std::slice::from_ref(&self.j), 0, 0, self.tid, self.nt);
            self.bar.wait();
        }
    }
    team::team(nt, |tid, nt, bar| {
        dispatch(
            level,
            G {
                j: Job {
                    w,
                    bias,
                    n_out,
                    n_in,
                    x,
                    nx,
                    out: &ob,
                    act: if gelu { Act::Gelu } else { Act::None },
                },
                tid,
                nt,
                bar,
            },
        )
    });
    Ok(())
}

struct LnK<'s, T> {
    x: &'s [T],
    g: &'s [T],
    b: &'s [T],
    eps: T,
    out: &'s mut [T],
}
impl<T: DecodeElem> Kernel<T> for LnK<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        layer_norm::<V>(self.x, self.g, self.b, self.eps, self.out);
    }
}

/// LayerNorm of the rows of `x (rows, d)` (exposed for the tests).
pub fn layer_norm_rows<T: DecodeElem>(
    level: Level,
    x: &[T],
    g: &[T],
    b: &[T],
    eps: T,
    out: &mut [T],
) -> Result<()> {
    let d = g.len();
    if d == 0 || b.len() != d || !x.len().is_multiple_of(d) || out.len() != x.len() {
        return Err(Error::invalid("layer_norm", "inconsistent sizes"));
    }
    dispatch(level, LnK { x, g, b, eps, out });
    Ok(())
}

struct GeluK<'s, T> {
    buf: &'s mut [T],
}
impl<T: DecodeElem> Kernel<T> for GeluK<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        T::gelu::<V>(self.buf);
    }
}

/// Exact GELU in place (exposed for the tests).
pub fn gelu<T: DecodeElem>(level: Level, buf: &mut [T]) {
    dispatch(level, GeluK { buf });
}

struct AttnK<'s, T> {
    q: &'s [T],
    mem_k: &'s [T],
    mem_v: &'s [T],
    mem_mask: &'s [bool],
    ring_k: &'s [T],
    ring_v: &'s [T],
    nring: usize,
    heads: usize,
    out: &'s mut [T],
}
impl<T: DecodeElem> Kernel<T> for AttnK<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        attend::<V>(
            self.q,
            self.mem_k,
            self.mem_v,
            self.mem_mask,
            self.ring_k,
            self.ring_v,
            self.nring,
            self.heads,
            self.out,
        );
    }
}

/// One query's attention over `[memory (masked), ring[..nring]]` per head (exposed for the
/// tests): `q, out (d)`, `mem_k/v (m, d)`, `ring_k/v (>= nring, d)`.
#[allow(clippy::too_many_arguments)]
pub fn attention<T: DecodeElem>(
    level: Level,
    q: &[T],
    mem_k: &[T],
    mem_v: &[T],
    mem_mask: &[bool],
    ring_k: &[T],
    ring_v: &[T],
    nring: usize,
    heads: usize,
    out: &mut [T],
) -> Result<()> {
    let d = q.len();
    let m = mem_mask.len();
    if heads == 0
        || !d.is_multiple_of(heads)
        || out.len() != d
        || mem_k.len() != m * d
        || mem_v.len() != m * d
        || ring_k.len() < nring * d
        || ring_v.len() < nring * d
    {
        return Err(Error::invalid("attention", "inconsistent sizes"));
    }
    dispatch(
        level,
        AttnK {
            q,
            mem_k,
            mem_v,
            mem_mask,
            ring_k,
            ring_v,
            nring,
            heads,
            out,
        },
    );
    Ok(())
}
