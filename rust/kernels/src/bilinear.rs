//! Bilinear / time-varying dense affine recurrence, SPEC §5.
//!
//! `X_t = A_t X_{t-1} + b_t` over `batch` independent rows, state size `n <= 64`, with
//! `A_t` either *modulated*, `A_t = A0 + Σ_j v_{t,j} N_j` (never materialised: the
//! kernel applies the `m + 1` constant matrices to the state and scales by `v`), or
//! given per step, `A (batch, len, n, n)`. Layouts are row-major: `b`, `xs (batch, len,
//! n)`, `v (batch, len, m)`, `A0 (n, n)`, `N (m, n, n)`, states `(batch, n)`.
//!
//! Sequential path: one task per batch row, vectors along the state. For the constant
//! matrices the task keeps padded column-major copies, so `A x = Σ_k col_k x_k` is a
//! chain of vector FMAs with no horizontal sums; per-step matrices are read in their
//! row-major form as row dot products (reduced `W` rows at a time by a transpose tree),
//! which measured faster than transposing `n²` elements every step.
//!
//! Parallel path (forward only): time is cut into chunks of [`PAR_CHUNK`] steps (a
//! constant, so results do not depend on the thread count). Pass 1, in parallel: the
//! first chunk of every row runs for real, every middle chunk computes its affine map
//! `(P, s)` (transition product and end state from zero) as `[P | s] <- A_t [P | s] +
//! [0 | b_t]`, rows of `[P | s]` as vectors (entries below 1e-30 (f32) / 1e-290 (f64)
//! are flushed to zero so a contracting product never reaches slow subnormals); pass 2,
//! sequential: the true start state of every chunk; pass 3, in parallel: every later
//! chunk reruns from its true start. Every step is thus processed twice, and the map
//! step costs about `n / (m + 1)` sequential steps: the parallel path needs several
//! threads per batch row to win (see `use_parallel` in the Python module). The backward
//! is always sequential over time (parallel over the batch).

use crate::dispatch::{dispatch, Kernel, Level, SimdElem};
use crate::pool;
use crate::simd::{sum_vectors, Elem, Vector};

/// Largest supported state size.
pub const MAX_STATE: usize = 64;
/// Time steps per chunk of the parallel forward.
pub const PAR_CHUNK: usize = 128;
/// Rough operation count of the fixed cost of one time step (for the pool's decision to
/// go parallel).
const STEP_OVERHEAD: usize = 64;
/// Vectors per padded state (W = 1 at the scalar level).
const MAXV: usize = MAX_STATE;

/// The transition matrices.
#[derive(Clone, Copy, Debug)]
pub enum Trans<'a, T> {
    /// `A_t = A0 + Σ_j v_{t,j} N_j`: `a0 (n, n)`, `nmat (m, n, n)`, `v (batch, len, m)`.
    Modulated {
        a0: &'a [T],
        nmat: &'a [T],
        v: &'a [T],
        m: usize,
    },
    /// `a (batch, len, n, n)`.
    PerStep { a: &'a [T] },
}

/// Inputs of a scan, all contiguous.
#[derive(Clone, Copy, Debug)]
pub struct BilinearArgs<'a, T> {
    pub batch: usize,
    pub len: usize,
    pub n: usize,
    pub trans: Trans<'a, T>,
    /// `b (batch, len, n)`.
    pub b: &'a [T],
    /// `(batch, n)`, zero when absent.
    pub h0: Option<&'a [T]>,
}

impl<T: Copy> BilinearArgs<'_, T> {
    /// Number of modulating inputs (0 for per-step matrices).
    pub fn m(&self) -> usize {
        match self.trans {
            Trans::Modulated { m, .. } => m,
            Trans::PerStep { .. } => 0,
        }
    }

    /// Matrix `j` of the modulated form (0 = `A0`, `j >= 1` = `N_j`).
    pub fn mat(&self, j: usize) -> &[T] {
        let nn = self.n * self.n;
        match self.trans {
            Trans::Modulated { a0, nmat, .. } => {
                if j == 0 {
                    a0
                } else {
                    &nmat[(j - 1) * nn..j * nn]
                }
            }
            Trans::PerStep { .. } => &[],
        }
    }

    /// Checks every input length.
    pub fn check(&self) -> Result<(), String> {
        let (bt, l, n) = (self.batch, self.len, self.n);
        if n == 0 || n > MAX_STATE {
            return Err(format!("A: state size must be in 1..={MAX_STATE}, got {n}"));
        }
        let mut want = vec![
            ("b", self.b.len(), bt * l * n),
            ("initial_state", self.h0.map_or(bt * n, <[T]>::len), bt * n),
        ];
        match self.trans {
            Trans::Modulated { a0, nmat, v, m } => {
                want.push(("A", a0.len(), n * n));
                want.push(("N", nmat.len(), m * n * n));
                want.push(("v", v.len(), bt * l * m));
            }
            Trans::PerStep { a } => want.push(("A", a.len(), bt * l * n * n)),
        }
        check_lens(&want)
    }
}

fn check_lens(want: &[(&str, usize, usize)]) -> Result<(), String> {
    for &(name, got, want) in want {
        if got != want {
            return Err(format!("{name}: expected {want} elements, got {got}"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ per-step helpers

/// Padded column-major copies of the `m + 1` constant matrices, stacked:
/// `out[(j n + k) np + i] = Mat_j[i, k]` (`cols`) or `Mat_j[k, i]` (`!cols`).
fn stacked<T: Elem>(s: &BilinearArgs<'_, T>, np: usize, cols: bool) -> Vec<T> {
    let n = s.n;
    let mut out = vec![T::ZERO; (s.m() + 1) * n * np];
    for j in 0..=s.m() {
        let mat = s.mat(j);
        for k in 0..n {
            let row = &mut out[(j * n + k) * np..][..n];
            for (i, o) in row.iter_mut().enumerate() {
                *o = if cols { mat[i * n + k] } else { mat[k * n + i] };
            }
        }
    }
    out
}

/// `out = Σ_j s_j Mat_j x + b` (`s_0 = 1`, `s_j = vt[j-1]`), from the stacked columns
/// `mc`; `x`, `b`, `out` padded to `np` (zero padding stays zero). Done in blocks of at
/// most 4 vectors whose accumulators are fixed-size arrays (so they live in registers).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_mod<V: Vector>(
    mc: &[V::E],
    np: usize,
    n: usize,
    vt: &[V::E],
    x: &[V::E],
    b: &[V::E],
    out: &mut [V::E],
) {
    let nv = np / V::W;
    let mut c0 = 0;
    while c0 + 4 <= nv {
        step_mod_blk::<V, 4>(mc, np, n, vt, x, b, out, c0);
        c0 += 4;
    }
    match nv - c0 {
        1 => step_mod_blk::<V, 1>(mc, np, n, vt, x, b, out, c0),
        2 => step_mod_blk::<V, 2>(mc, np, n, vt, x, b, out, c0),
        3 => step_mod_blk::<V, 3>(mc, np, n, vt, x, b, out, c0),
        _ => {}
    }
}

/// Vectors `c0 .. c0 + K` of [`step_mod`]; two accumulator sets halve the FMA chain.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_mod_blk<V: Vector, const K: usize>(
    mc: &[V::E],
    np: usize,
    n: usize,
    vt: &[V::E],
    x: &[V::E],
    b: &[V::E],
    out: &mut [V::E],
    c0: usize,
) {
    let w = V::W;
    let off = c0 * w;
    let mut a0 = [V::zero(); K];
    let mut a1 = [V::zero(); K];
    let bb = &b[off..off + K * w];
    for q in 0..K {
        a0[q] = V::load(&bb[q * w..]);
    }
    for j in 0..=vt.len() {
        let sj = if j == 0 { V::E::ONE } else { vt[j - 1] };
        let base = &mc[j * n * np..(j + 1) * n * np];
        let mut k = 0;
        while k + 1 < n {
            let r0 = &base[k * np + off..k * np + off + K * w];
            let r1 = &base[(k + 1) * np + off..(k + 1) * np + off + K * w];
            let (c0v, c1v) = (V::splat(sj * x[k]), V::splat(sj * x[k + 1]));
            for q in 0..K {
                a0[q] = V::load(&r0[q * w..]).fma(c0v, a0[q]);
                a1[q] = V::load(&r1[q * w..]).fma(c1v, a1[q]);
            }
            k += 2;
        }
        if k < n {
            let r0 = &base[k * np + off..k * np + off + K * w];
            let c0v = V::splat(sj * x[k]);
            for q in 0..K {
                a0[q] = V::load(&r0[q * w..]).fma(c0v, a0[q]);
            }
        }
    }
    let oo = &mut out[off..off + K * w];
    for q in 0..K {
        a0[q].add(a1[q]).store(&mut oo[q * w..]);
    }
}

/// `out[..n] = a x + b` for a row-major `a (n, n)`: row dot products over the full
/// vectors, reduced `W` rows at a time, plus the scalar tail. `x` padded to `np`; `b`
/// unpadded or `None` (zero).
#[inline(always)]
fn step_dense<V: Vector>(
    a: &[V::E],
    n: usize,
    x: &[V::E],
    b: Option<&[V::E]>,
    out: &mut [V::E],
    accs: &mut [V; 2 * MAXV],
) {
    let w = V::W;
    let nf = n / w;
    let xs = &x[..nf * w];
    for (acc, row) in accs[..n].iter_mut().zip(a.chunks_exact(n)) {
        let mut p = V::zero();
        for (r, xc) in row.chunks_exact(w).zip(xs.chunks_exact(w)) {
            p = V::load(r).fma(V::load(xc), p);
        }
        *acc = p;
    }
    sum_vectors(&accs[..n], &mut out[..n]);
    for (i, (o, row)) in out[..n].iter_mut().zip(a.chunks_exact(n)).enumerate() {
        let mut t = *o;
        for k in nf * w..n {
            t = t + row[k] * x[k];
        }
        *o = match b {
            Some(b) => t + b[i],
            None => t,
        };
    }
}

// ------------------------------------------------------------------ forward tasks

/// What a forward task computes over its time range.
enum Job<'s, T> {
    /// The true states from `x0` (zero if `None`): writes `xs` and the end state.
    Run {
        x0: Option<&'s [T]>,
        xs: &'s mut [T],
        end: &'s mut [T],
    },
    /// The chunk's affine map: `p[q n + i] = P[i, q]` for `q < n`, `p[n n + i] = s[i]`.
    Map { p: &'s mut [T] },
}

struct FwdTask<'s, 'a, T> {
    s: &'s BilinearArgs<'a, T>,
    row: usize,
    t0: usize,
    len: usize,
    job: Job<'s, T>,
}

impl<T: SimdElem> Kernel<T> for FwdTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let FwdTask {
            s,
            row,
            t0,
            len,
            job,
        } = self;
        let n = s.n;
        let np = n.div_ceil(V::W) * V::W;
        let mut acc = [V::zero(); 2 * MAXV];
        let mc = match s.trans {
            Trans::Modulated { .. } => stacked(s, np, true),
            Trans::PerStep { .. } => Vec::new(),
        };
        let m = s.m();
        let gt = row * s.len + t0; // global step index of the first step
        let bsl = &s.b[gt * n..(gt + len) * n];
        let mut bp = vec![T::ZERO; np];
        match job {
            Job::Run { x0, xs, end } => {
                let mut x = vec![T::ZERO; np];
                let mut y = vec![T::ZERO; np];
                if let Some(x0) = x0 {
                    x[..n].copy_from_slice(x0);
                }
                for (t, (bt, xo)) in bsl.chunks_exact(n).zip(xs.chunks_exact_mut(n)).enumerate() {
                    match s.trans {
                        Trans::Modulated { v, .. } => {
                            bp[..n].copy_from_slice(bt);
                            let vt = &v[(gt + t) * m..(gt + t + 1) * m];
                            step_mod::<V>(&mc, np, n, vt, &x, &bp, &mut y);
                        }
                        Trans::PerStep { a } => {
                            let at = &a[(gt + t) * n * n..(gt + t + 1) * n * n];
                            step_dense::<V>(at, n, &x, Some(bt), &mut y, &mut acc);
                        }
                    }
                    xo.copy_from_slice(&y[..n]);
                    std::mem::swap(&mut x, &mut y);
                }
                end.copy_from_slice(&x[..n]);
            }
            Job::Map { p } => {
                // Rows of [P | s] as vectors padded to ncp (P starts at the identity):
                // row_i <- Σ_k A_t[i, k] row_k (+ b_t[i] in column n). The n rows are
                // independent FMA chains, so this is throughput- rather than latency-bound.
                let ncp = (n + 1).div_ceil(V::W) * V::W;
                let mut cur = vec![T::ZERO; n * ncp];
                let mut nxt = vec![T::ZERO; n * ncp];
                for i in 0..n {
                    cur[i * ncp + i] = T::ONE;
                }
                let mr = match s.trans {
                    Trans::Modulated { .. } => stacked(s, np, false),
                    Trans::PerStep { .. } => Vec::new(),
                };
                let mut at = vec![T::ZERO; n * np];
                for (t, bt) in bsl.chunks_exact(n).enumerate() {
                    let (arows, ld) = match s.trans {
                        Trans::Modulated { v, .. } => {
                            let vt = &v[(gt + t) * m..(gt + t + 1) * m];
                            form_rows::<V>(&mr, np, n, vt, &mut at);
                            (&at[..], np)
                        }
                        Trans::PerStep { a } => (&a[(gt + t) * n * n..(gt + t + 1) * n * n], n),
                    };
                    map_step::<V>(arows, ld, n, ncp, &cur, &mut nxt, bt);
                    std::mem::swap(&mut cur, &mut nxt);
                }
                for (q, pc) in p.chunks_exact_mut(n).enumerate() {
                    for (i, o) in pc.iter_mut().enumerate() {
                        *o = cur[i * ncp + q];
                    }
                }
            }
        }
    }
}

/// `at[i, :] = A0[i, :] + Σ_j v_j N_j[i, :]` (rows padded to `np`) from the stacked rows
/// `mr` of [`stacked`] (`cols = false`).
#[inline(always)]
fn form_rows<V: Vector>(mr: &[V::E], np: usize, n: usize, vt: &[V::E], at: &mut [V::E]) {
    let w = V::W;
    let nn = n * np;
    at.copy_from_slice(&mr[..nn]);
    for (j, &vj) in vt.iter().enumerate() {
        let c = V::splat(vj);
        for (o, r) in at
            .chunks_exact_mut(w)
            .zip(mr[(j + 1) * nn..(j + 2) * nn].chunks_exact(w))
        {
            V::load(r).fma(c, V::load(o)).store(o);
        }
    }
}

/// `nxt = A cur` on rows padded to `ncp` (`A[i, k] = a[i ld + k]`), plus `b[i]` in column
/// `n` of row `i`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn map_step<V: Vector>(
    a: &[V::E],
    ld: usize,
    n: usize,
    ncp: usize,
    cur: &[V::E],
    nxt: &mut [V::E],
    b: &[V::E],
) {
    let ncv = ncp / V::W;
    for (i, orow) in nxt.chunks_exact_mut(ncp).enumerate() {
        let ai = &a[i * ld..i * ld + n];
        let mut c0 = 0;
        while c0 + 4 <= ncv {
            map_blk::<V, 4>(ai, ncp, cur, orow, c0);
            c0 += 4;
        }
        match ncv - c0 {
            1 => map_blk::<V, 1>(ai, ncp, cur, orow, c0),
            2 => map_blk::<V, 2>(ai, ncp, cur, orow, c0),
            3 => map_blk::<V, 3>(ai, ncp, cur, orow, c0),
            _ => {}
        }
        orow[n] = orow[n] + b[i];
    }
}

/// Vectors `c0 .. c0 + K` of one row of [`map_step`].
#[inline(always)]
fn map_blk<V: Vector, const K: usize>(
    ai: &[V::E],
    ncp: usize,
    cur: &[V::E],
    orow: &mut [V::E],
    c0: usize,
) {
    let w = V::W;
    let off = c0 * w;
    let mut acc = [V::zero(); K];
    for (&aik, crow) in ai.iter().zip(cur.chunks_exact(ncp)) {
        let c = V::splat(aik);
        let r = &crow[off..off + K * w];
        for q in 0..K {
            acc[q] = V::load(&r[q * w..]).fma(c, acc[q]);
        }
    }
    // The transition product of a contracting system decays geometrically over a chunk;
    // flushing what falls below TINY keeps it out of the (very slow) subnormal range. The
    // flushed terms are below 1e-30 (f32) relative to the chunk's start state.
    let tiny = V::splat(V::E::from_f64(if V::E::from_f64(1e-300) == V::E::ZERO {
        1e-30
    } else {
        1e-290
    }));
    let o = &mut orow[off..off + K * w];
    for q in 0..K {
        let v = acc[q];
        let mag = v.max(V::zero().sub(v));
        V::select(mag.lt(tiny), V::zero(), v).store(&mut o[q * w..]);
    }
}

/// Runs the recurrence into `xs (batch, len, n)` and `last (batch, n)`, sequentially over
/// time (`parallel == false`) or by the three-pass chunked scheme.
pub fn forward<T: SimdElem>(
    level: Level,
    s: &BilinearArgs<'_, T>,
    parallel: bool,
    xs: &mut [T],
    last: &mut [T],
) -> Result<(), String> {
    s.check()?;
    let (bt, l, n) = (s.batch, s.len, s.n);
    check_lens(&[
        ("out", xs.len(), bt * l * n),
        ("last_state", last.len(), bt * n),
    ])?;
    // A step costs at least a latency-bound chain (~STEP_OVERHEAD operations), whatever n.
    let work = bt * l * (n * n * (s.m() + 1) + STEP_OVERHEAD);
    let nch = l.div_ceil(PAR_CHUNK);
    if !parallel || nch < 3 {
        let outs = pool::split_lengths(xs, &vec![l * n; bt]);
        let ends = pool::split_lengths(last, &vec![n; bt]);
        let items: Vec<_> = outs.into_iter().zip(ends).collect();
        pool::for_each(items, work, |row, (xs, end)| {
            let x0 = s.h0.map(|h| &h[row * n..(row + 1) * n]);
            let job = Job::Run { x0, xs, end };
            dispatch(
                level,
                FwdTask {
                    s,
                    row,
                    t0: 0,
                    len: l,
                    job,
                },
            )
        });
        return Ok(());
    }
    let clen = |c: usize| PAR_CHUNK.min(l - c * PAR_CHUNK);
    let lens: Vec<usize> = (0..bt)
        .flat_map(|_| (0..nch).map(|c| clen(c) * n))
        .collect();
    let mut ends = vec![T::ZERO; bt * nch * n];
    let mut maps = vec![T::ZERO; bt * nch * (n + 1) * n];
    // Pass 1: chunk 0 for real, the middle chunks' maps (the last chunk needs none).
    {
        let outs = pool::split_lengths(xs, &lens);
        let ends_s = pool::split_lengths(&mut ends, &vec![n; bt * nch]);
        let maps_s = pool::split_lengths(&mut maps, &vec![(n + 1) * n; bt * nch]);
        let mut items = Vec::new();
        for (i, ((xs, end), p)) in outs.into_iter().zip(ends_s).zip(maps_s).enumerate() {
            let (row, c) = (i / nch, i % nch);
            if c == 0 {
                let x0 = s.h0.map(|h| &h[row * n..(row + 1) * n]);
                items.push((row, c, Job::Run { x0, xs, end }));
            } else if c + 1 < nch {
                items.push((row, c, Job::Map { p }));
            }
        }
        let work1 = bt * l * (n * n * (n + s.m() + 1) + STEP_OVERHEAD);
        pool::for_each(items, work1, |_, (row, c, job)| {
            dispatch(
                level,
                FwdTask {
                    s,
                    row,
                    t0: c * PAR_CHUNK,
                    len: clen(c),
                    job,
                },
            )
        });
    }
    // Pass 2: start of chunk c + 1 = P_c start_c + s_c (kept in `ends` slot c).
    let mut starts = vec![T::ZERO; bt * nch * n];
    for row in 0..bt {
        let base = row * nch;
        starts[(base + 1) * n..(base + 2) * n].copy_from_slice(&ends[base * n..(base + 1) * n]);
        for c in 1..nch - 1 {
            let p = &maps[(base + c) * (n + 1) * n..(base + c + 1) * (n + 1) * n];
            let (prev, next) = starts[(base + c) * n..(base + c + 2) * n].split_at_mut(n);
            next.copy_from_slice(&p[n * n..]);
            for (k, &xk) in prev.iter().enumerate() {
                for (o, &pik) in next.iter_mut().zip(&p[k * n..(k + 1) * n]) {
                    *o = *o + pik * xk;
                }
            }
        }
    }
    // Pass 3: every later chunk from its true start.
    {
        let outs = pool::split_lengths(xs, &lens);
        let ends_s = pool::split_lengths(&mut ends, &vec![n; bt * nch]);
        let mut items = Vec::new();
        for (i, (xs, end)) in outs.into_iter().zip(ends_s).enumerate() {
            let (row, c) = (i / nch, i % nch);
            if c > 0 {
                let x0 = Some(&starts[i * n..(i + 1) * n]);
                items.push((row, c, Job::Run { x0, xs, end }));
            }
        }
        pool::for_each(items, work, |_, (row, c, job)| {
            dispatch(
                level,
                FwdTask {
                    s,
                    row,
                    t0: c * PAR_CHUNK,
                    len: clen(c),
                    job,
                },
            )
        });
    }
    for row in 0..bt {
        let src = (row * nch + nch - 1) * n;
        last[row * n..(row + 1) * n].copy_from_slice(&ends[src..src + n]);
    }
    Ok(())
}

// ------------------------------------------------------------------ backward

/// Gradient outputs. `da` is `(n, n)` (dA0) for the modulated form, `(batch, len, n, n)`
/// for per-step matrices; `dn (m, n, n)` and `dv (batch, len, m)` are empty for the
/// latter.
pub struct BwdOut<'a, T> {
    pub db: &'a mut [T],
    pub da: &'a mut [T],
    pub dn: &'a mut [T],
    pub dv: &'a mut [T],
    pub dh0: &'a mut [T],
}

struct BwdTask<'s, 'a, T> {
    s: &'s BilinearArgs<'a, T>,
    row: usize,
    xs: &'s [T],
    dxs: &'s [T],
    dlast: Option<&'s [T]>,
    db: &'s mut [T],
    /// Modulated: this row's partial `[dA0; dN]` `((m + 1) n n)`; per-step: its `dA`.
    da: &'s mut [T],
    dv: &'s mut [T],
    dh0: &'s mut [T],
}

impl<T: SimdElem> Kernel<T> for BwdTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let BwdTask {
            s,
            row,
            xs,
            dxs,
            dlast,
            db,
            da,
            dv,
            dh0,
        } = self;
        let (l, n, m, w) = (s.len, s.n, s.m(), V::W);
        let np = n.div_ceil(w) * w;
        let nf = n / w;
        let modulated = matches!(s.trans, Trans::Modulated { .. });
        let mr = if modulated {
            stacked(s, np, false)
        } else {
            Vec::new()
        };
        let mut part = vec![T::ZERO; if modulated { (m + 1) * n * np } else { 0 }];
        // g = A_{t+1}^T λ_{t+1}, carried backwards; starts as dlast.
        let mut g = vec![T::ZERO; np];
        if let Some(d) = dlast {
            g[..n].copy_from_slice(d);
        }
        let mut lam = vec![T::ZERO; np];
        let mut xp = vec![T::ZERO; np];
        let mut dvv = vec![V::zero(); m];
        for t in (0..l).rev() {
            for k in 0..n {
                lam[k] = dxs[t * n + k] + g[k];
            }
            db[t * n..(t + 1) * n].copy_from_slice(&lam[..n]);
            if t == 0 {
                match s.h0 {
                    Some(h) => xp[..n].copy_from_slice(&h[row * n..(row + 1) * n]),
                    None => xp[..n].fill(T::ZERO),
                }
            } else {
                xp[..n].copy_from_slice(&xs[(t - 1) * n..t * n]);
            }
            match s.trans {
                Trans::Modulated { v, .. } => {
                    let vt = &v[(row * l + t) * m..(row * l + t + 1) * m];
                    let dvt = &mut dv[t * m..(t + 1) * m];
                    bstep_mod::<V>(&mr, np, n, vt, &lam, &xp, &mut g, dvt, &mut part, &mut dvv);
                }
                Trans::PerStep { a } => {
                    let at = &a[(row * l + t) * n * n..(row * l + t + 1) * n * n];
                    let dat = &mut da[t * n * n..(t + 1) * n * n];
                    bstep_dense::<V>(at, n, nf, &lam, &xp, &mut g, dat);
                }
            }
        }
        dh0.copy_from_slice(&g[..n]);
        if modulated {
            for (d, p) in da.chunks_exact_mut(n).zip(part.chunks_exact(np)) {
                d.copy_from_slice(&p[..n]);
            }
        }
    }
}

/// One backward step of the modulated form: with `w_j = Mat_j^T λ`,
/// `g = w_0 + Σ_j v_j w_j`, `dv_j = w_j · x_prev`, `part_j += (s_j λ) x_prev^T`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bstep_mod<V: Vector>(
    mr: &[V::E],
    np: usize,
    n: usize,
    vt: &[V::E],
    lam: &[V::E],
    xp: &[V::E],
    g: &mut [V::E],
    dv: &mut [V::E],
    part: &mut [V::E],
    dvv: &mut [V],
) {
    let w = V::W;
    let nv = np / w;
    for d in dvv.iter_mut() {
        *d = V::zero();
    }
    let mut c0 = 0;
    while c0 + 4 <= nv {
        bstep_mod_blk::<V, 4>(mr, np, n, vt, lam, xp, g, dvv, c0);
        c0 += 4;
    }
    match nv - c0 {
        1 => bstep_mod_blk::<V, 1>(mr, np, n, vt, lam, xp, g, dvv, c0),
        2 => bstep_mod_blk::<V, 2>(mr, np, n, vt, lam, xp, g, dvv, c0),
        3 => bstep_mod_blk::<V, 3>(mr, np, n, vt, lam, xp, g, dvv, c0),
        _ => {}
    }
    for (o, d) in dv.iter_mut().zip(dvv.iter()) {
        *o = d.hsum();
    }
    for j in 0..=vt.len() {
        let sj = if j == 0 { V::E::ONE } else { vt[j - 1] };
        let pj = &mut part[j * n * np..(j + 1) * n * np];
        for (li, prow) in lam[..n].iter().zip(pj.chunks_exact_mut(np)) {
            let c = V::splat(sj * *li);
            for (pc, xc) in prow.chunks_exact_mut(w).zip(xp.chunks_exact(w)) {
                V::load(xc).fma(c, V::load(pc)).store(pc);
            }
        }
    }
}

/// Vectors `c0 .. c0 + K` of `g` (and their share of every `dv_j`, added to `dvv`) in
/// [`bstep_mod`], with register accumulators.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bstep_mod_blk<V: Vector, const K: usize>(
    mr: &[V::E],
    np: usize,
    n: usize,
    vt: &[V::E],
    lam: &[V::E],
    xp: &[V::E],
    g: &mut [V::E],
    dvv: &mut [V],
    c0: usize,
) {
    let w = V::W;
    let off = c0 * w;
    let mut gb = [V::zero(); K];
    let mut xb = [V::zero(); K];
    let xs = &xp[off..off + K * w];
    for q in 0..K {
        xb[q] = V::load(&xs[q * w..]);
    }
    for j in 0..=vt.len() {
        let base = &mr[j * n * np..(j + 1) * n * np];
        let mut a0 = [V::zero(); K];
        let mut a1 = [V::zero(); K];
        let mut i = 0;
        while i + 1 < n {
            let r0 = &base[i * np + off..i * np + off + K * w];
            let r1 = &base[(i + 1) * np + off..(i + 1) * np + off + K * w];
            let (c0v, c1v) = (V::splat(lam[i]), V::splat(lam[i + 1]));
            for q in 0..K {
                a0[q] = V::load(&r0[q * w..]).fma(c0v, a0[q]);
                a1[q] = V::load(&r1[q * w..]).fma(c1v, a1[q]);
            }
            i += 2;
        }
        if i < n {
            let r0 = &base[i * np + off..i * np + off + K * w];
            let c0v = V::splat(lam[i]);
            for q in 0..K {
                a0[q] = V::load(&r0[q * w..]).fma(c0v, a0[q]);
            }
        }
        if j == 0 {
            for q in 0..K {
                gb[q] = a0[q].add(a1[q]);
            }
        } else {
            let sv = V::splat(vt[j - 1]);
            let mut d = dvv[j - 1];
            for q in 0..K {
                let wq = a0[q].add(a1[q]);
                d = wq.fma(xb[q], d);
                gb[q] = wq.fma(sv, gb[q]);
            }
            dvv[j - 1] = d;
        }
    }
    let go = &mut g[off..off + K * w];
    for q in 0..K {
        gb[q].store(&mut go[q * w..]);
    }
}

/// One backward step with a per-step matrix: `g = A_t^T λ` (rows of `A_t` scaled by
/// `λ_i`), `dA_t = λ x_prev^T`; full vectors in register blocks, the tail scalar.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bstep_dense<V: Vector>(
    a: &[V::E],
    n: usize,
    nf: usize,
    lam: &[V::E],
    xp: &[V::E],
    g: &mut [V::E],
    da: &mut [V::E],
) {
    let w = V::W;
    let mut c0 = 0;
    while c0 + 4 <= nf {
        bstep_dense_blk::<V, 4>(a, n, lam, xp, g, da, c0);
        c0 += 4;
    }
    match nf - c0 {
        1 => bstep_dense_blk::<V, 1>(a, n, lam, xp, g, da, c0),
        2 => bstep_dense_blk::<V, 2>(a, n, lam, xp, g, da, c0),
        3 => bstep_dense_blk::<V, 3>(a, n, lam, xp, g, da, c0),
        _ => {}
    }
    for k in nf * w..n {
        let mut t = V::E::ZERO;
        for (i, &li) in lam[..n].iter().enumerate() {
            t = t + a[i * n + k] * li;
            da[i * n + k] = li * xp[k];
        }
        g[k] = t;
    }
}

/// Columns `c0 W .. (c0 + K) W` of [`bstep_dense`].
#[inline(always)]
fn bstep_dense_blk<V: Vector, const K: usize>(
    a: &[V::E],
    n: usize,
    lam: &[V::E],
    xp: &[V::E],
    g: &mut [V::E],
    da: &mut [V::E],
    c0: usize,
) {
    let w = V::W;
    let off = c0 * w;
    let mut xb = [V::zero(); K];
    let xs = &xp[off..off + K * w];
    for q in 0..K {
        xb[q] = V::load(&xs[q * w..]);
    }
    // Two accumulator sets (even and odd rows) halve the FMA chain.
    let mut a0 = [V::zero(); K];
    let mut a1 = [V::zero(); K];
    let mut i = 0;
    while i < n {
        let r = &a[i * n + off..i * n + off + K * w];
        let c = V::splat(lam[i]);
        for q in 0..K {
            a0[q] = V::load(&r[q * w..]).fma(c, a0[q]);
        }
        let d = &mut da[i * n + off..i * n + off + K * w];
        for q in 0..K {
            c.mul(xb[q]).store(&mut d[q * w..]);
        }
        if i + 1 < n {
            let i1 = i + 1;
            let r = &a[i1 * n + off..i1 * n + off + K * w];
            let c = V::splat(lam[i1]);
            for q in 0..K {
                a1[q] = V::load(&r[q * w..]).fma(c, a1[q]);
            }
            let d = &mut da[i1 * n + off..i1 * n + off + K * w];
            for q in 0..K {
                c.mul(xb[q]).store(&mut d[q * w..]);
            }
        }
        i += 2;
    }
    let go = &mut g[off..off + K * w];
    for q in 0..K {
        a0[q].add(a1[q]).store(&mut go[q * w..]);
    }
}

/// Gradients of [`forward`] given the states `xs` it returned, the output gradient `dxs
/// (batch, len, n)` and optionally that of the final state. Sequential over time,
/// parallel over the batch; the modulated form's `dA0`/`dN` are summed over the batch
/// from per-row partials in row order (bitwise independent of the thread count).
pub fn backward<T: SimdElem>(
    level: Level,
    s: &BilinearArgs<'_, T>,
    xs: &[T],
    dxs: &[T],
    dlast: Option<&[T]>,
    o: BwdOut<'_, T>,
) -> Result<(), String> {
    s.check()?;
    let (bt, l, n, m) = (s.batch, s.len, s.n, s.m());
    let modulated = matches!(s.trans, Trans::Modulated { .. });
    let (da_len, dn_len, dv_len) = if modulated {
        (n * n, m * n * n, bt * l * m)
    } else {
        (bt * l * n * n, 0, 0)
    };
    check_lens(&[
        ("xs", xs.len(), bt * l * n),
        ("dxs", dxs.len(), bt * l * n),
        ("dlast_state", dlast.map_or(bt * n, <[T]>::len), bt * n),
        ("db", o.db.len(), bt * l * n),
        ("dA", o.da.len(), da_len),
        ("dN", o.dn.len(), dn_len),
        ("dv", o.dv.len(), dv_len),
        ("dinitial_state", o.dh0.len(), bt * n),
    ])?;
    let pn = (m + 1) * n * n;
    let mut partials = vec![T::ZERO; if modulated { bt * pn } else { 0 }];
    {
        let dbs = pool::split_lengths(o.db, &vec![l * n; bt]);
        let das = if modulated {
            pool::split_lengths(&mut partials, &vec![pn; bt])
        } else {
            pool::split_lengths(o.da, &vec![l * n * n; bt])
        };
        let dvs = pool::split_lengths(o.dv, &vec![l * m; bt]);
        let dh0s = pool::split_lengths(o.dh0, &vec![n; bt]);
        let items: Vec<_> = dbs.into_iter().zip(das).zip(dvs).zip(dh0s).collect();
        let work = bt * l * (n * n * (m + 1) * 2 + STEP_OVERHEAD);
        pool::for_each(items, work, |row, (((db, da), dv), dh0)| {
            dispatch(
                level,
                BwdTask {
                    s,
                    row,
                    xs: &xs[row * l * n..(row + 1) * l * n],
                    dxs: &dxs[row * l * n..(row + 1) * l * n],
                    dlast: dlast.map(|d| &d[row * n..(row + 1) * n]),
                    db,
                    da,
                    dv,
                    dh0,
                },
            )
        });
    }
    if modulated {
        o.da.fill(T::ZERO);
        o.dn.fill(T::ZERO);
        for p in partials.chunks_exact(pn) {
            let (pa, pnn) = p.split_at(n * n);
            for (d, &x) in o.da.iter_mut().zip(pa) {
                *d = *d + x;
            }
            for (d, &x) in o.dn.iter_mut().zip(pnn) {
                *d = *d + x;
            }
        }
    }
    Ok(())
}
