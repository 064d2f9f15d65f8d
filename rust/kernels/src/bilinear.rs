//! Bilinear / time-varying dense affine recurrence, design §5.
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
//! Parallel path (forward only), vectorised across time chunks: time is cut into chunks
//! of [`PAR_CHUNK`] steps and `W` consecutive chunks of a row (the level's lanes) run in
//! lockstep, chunk `c0 + j` in lane `j`: state components are lane vectors, `A0`/`N_j`
//! entries are splatted, `v_t`, `b_t` (and per-step `A_t`) are gathered per lane with
//! register-tile transposes (`selective::load_t`), states are written back through the
//! inverse transpose. One step of `W` chunks is then `(m + 1) n²` vector FMAs with
//! `n (m + 1)` independent chains: throughput-bound, where the sequential scan is a
//! latency-bound chain per step. Pass 1 (parallel over lane groups): every chunk but the
//! last computes its affine map `(P, s)` from zero, `[P | s] <- A_t [P | s] + [0 | b_t]`,
//! the `n + 1` columns as lane states (`A_t` formed per lane first; entries below 1e-30
//! (f32) / 1e-290 (f64) are flushed to zero every `TBLK` steps so a contracting product
//! stays out of slow subnormals); pass 2 (sequential, scalar): the true start state of
//! every chunk; pass 3 (parallel over lane groups): every chunk reruns from its true
//! start, a partial last chunk on the sequential code. Groups are fixed by the shape and
//! level, so results do not depend on the thread count. States up to `n = 8` get code
//! with `n` known at compile time (unrolled, register-resident). Per `W` steps the path
//! costs about `(n + 1 + m) n²` (pass 1) plus `(m + 1) n²` (pass 3) vector FMAs, against
//! `(m + 1) n²` latency-chained ones per step sequentially: it wins at small `n` (see
//! `use_parallel` in the Python module for the measured rule). The backward is always
//! sequential over time (parallel over the batch).

use crate::cpu::pool;
use crate::cpu::{dispatch, sum_vectors, Elem, Kernel, Level, SimdElem, Vector};
use crate::error::{check_lens, Error, Result};
use crate::selective::{load_t, store_t};

/// Largest supported state size.
pub const MAX_STATE: usize = 64;
/// Time steps per chunk of the parallel forward (short, so that even moderate lengths fill
/// the lanes; pass 2 costs about `n² / PAR_CHUNK` scalar FMAs per step).
pub const PAR_CHUNK: usize = 32;
/// Steps a lane task transposes at once (divides [`PAR_CHUNK`]).
const TBLK: usize = 8;
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
    pub fn check(&self) -> Result<()> {
        let (bt, l, n) = (self.batch, self.len, self.n);
        if n == 0 || n > MAX_STATE {
            return Err(Error::value(
                "A",
                format!("a state size in 1..={MAX_STATE}"),
                n,
            ));
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
        }
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
) -> Result<()> {
    s.check()?;
    let (bt, l, n, m) = (s.batch, s.len, s.n, s.m());
    check_lens(&[
        ("out", xs.len(), bt * l * n),
        ("last_state", last.len(), bt * n),
    ])?;
    // A step costs at least a latency-bound chain (~STEP_OVERHEAD operations), whatever n.
    let work = bt * l * (n * n * (m + 1) + STEP_OVERHEAD);
    let ch = PAR_CHUNK;
    let nch = l.div_ceil(ch);
    if !parallel || nch < 2 {
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
    // Chunks of every row in groups of W (the level's lanes), fixed for a given level and
    // shape: the tasks, and so the results, do not depend on the thread count.
    let w = dispatch::<T, _>(level, Width);
    let (nfull, tail) = (l / ch, l % ch);
    let nmap = nch - 1; // chunks whose end state starts another
    let groups = |nc: usize| (0..nc.div_ceil(w)).map(move |g| (g * w, w.min(nc - g * w)));
    let mapn = (n + 1) * n;
    // Pass 1: the maps (P, s) of chunks 0 .. nmap.
    let mut maps = vec![T::ZERO; bt * nmap * mapn];
    {
        let lens: Vec<usize> = (0..bt)
            .flat_map(|_| groups(nmap).map(|(_, v)| v * mapn))
            .collect();
        let mut parts = pool::split_lengths(&mut maps, &lens).into_iter();
        let mut items = Vec::new();
        for row in 0..bt {
            for (c0, valid) in groups(nmap) {
                let p = parts.next().unwrap_or_default();
                items.push(LaneTask {
                    s,
                    row,
                    c0,
                    valid,
                    job: LaneJob::Map { p },
                });
            }
        }
        let work1 = bt * l * n * n * (n + m + 1);
        pool::for_each(items, work1, |_, t| dispatch(level, t));
    }
    // Pass 2: start of chunk c + 1 = P_c start_c + s_c.
    let mut starts = vec![T::ZERO; bt * nch * n];
    for row in 0..bt {
        let st = &mut starts[row * nch * n..(row + 1) * nch * n];
        if let Some(h) = s.h0 {
            st[..n].copy_from_slice(&h[row * n..(row + 1) * n]);
        }
        for c in 0..nmap {
            let p = &maps[(row * nmap + c) * mapn..(row * nmap + c + 1) * mapn];
            let (prev, next) = st[c * n..(c + 2) * n].split_at_mut(n);
            // Element loops, not copy_from_slice: a memmove call per chunk costs more
            // than the arithmetic at small n.
            for (i, o) in next.iter_mut().enumerate() {
                let mut acc = p[n * n + i];
                for (k, &xk) in prev.iter().enumerate() {
                    acc = acc + p[k * n + i] * xk;
                }
                *o = acc;
            }
        }
    }
    // Pass 3: every chunk from its true start (full chunks in lane groups, a partial last
    // chunk on its own); end states into `ends` slot c.
    let mut ends = vec![T::ZERO; bt * nch * n];
    {
        let mut xl = Vec::new();
        let mut el = Vec::new();
        for _ in 0..bt {
            for (_, v) in groups(nfull) {
                xl.push(v * ch * n);
                el.push(v * n);
            }
            if tail > 0 {
                xl.push(tail * n);
                el.push(n);
            }
        }
        let mut xsp = pool::split_lengths(xs, &xl).into_iter();
        let mut esp = pool::split_lengths(&mut ends, &el).into_iter();
        let mut items = Vec::new();
        for row in 0..bt {
            let st = &starts[row * nch * n..(row + 1) * nch * n];
            for (c0, valid) in groups(nfull) {
                let (xs, end) = (
                    xsp.next().unwrap_or_default(),
                    esp.next().unwrap_or_default(),
                );
                let x0 = &st[c0 * n..(c0 + valid) * n];
                items.push(Pass3::Lanes(LaneTask {
                    s,
                    row,
                    c0,
                    valid,
                    job: LaneJob::Run { x0, xs, end },
                }));
            }
            if tail > 0 {
                let (xs, end) = (
                    xsp.next().unwrap_or_default(),
                    esp.next().unwrap_or_default(),
                );
                let x0 = Some(&st[nfull * n..(nfull + 1) * n]);
                items.push(Pass3::Tail(FwdTask {
                    s,
                    row,
                    t0: nfull * ch,
                    len: tail,
                    job: Job::Run { x0, xs, end },
                }));
            }
        }
        pool::for_each(items, work, |_, it| match it {
            Pass3::Lanes(t) => dispatch(level, t),
            Pass3::Tail(t) => dispatch(level, t),
        });
    }
    for row in 0..bt {
        let src = (row * nch + nch - 1) * n;
        last[row * n..(row + 1) * n].copy_from_slice(&ends[src..src + n]);
    }
    Ok(())
}

/// A pass-3 task: a lane group of full chunks or a row's partial last chunk.
enum Pass3<'s, 'a, T> {
    Lanes(LaneTask<'s, 'a, T>),
    Tail(FwdTask<'s, 'a, T>),
}

// ------------------------------------------------------------------ lane-layout parallel path

/// Reports the vector width of a level (chunks per lane group).
struct Width;

impl<T: SimdElem> Kernel<T> for Width {
    type Out = usize;
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) -> usize {
        V::W
    }
}

/// What a lane task computes for its chunks.
enum LaneJob<'s, T> {
    /// Each chunk's affine map, `p[(c (n + 1) + q) n + i] = P_c[i, q]` (`q = n`: `s_c`).
    Map { p: &'s mut [T] },
    /// Each chunk from its true start `x0[c n..]`: writes `xs` (the chunks' rows, one
    /// after the other) and the end states `end[c n..]`.
    Run {
        x0: &'s [T],
        xs: &'s mut [T],
        end: &'s mut [T],
    },
}

/// `valid <= W` consecutive full chunks `c0 ..` of one batch row, run in lockstep with
/// chunk `c` in lane `c - c0`.
struct LaneTask<'s, 'a, T> {
    s: &'s BilinearArgs<'a, T>,
    row: usize,
    c0: usize,
    valid: usize,
    job: LaneJob<'s, T>,
}

impl<T: SimdElem> Kernel<T> for LaneTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        // Small states get a copy with n known at compile time: the loops unroll and the
        // lane states live in registers (this is what makes the path latency-free).
        match self.s.n {
            1 => lane_task::<V, 1>(self),
            2 => lane_task::<V, 2>(self),
            3 => lane_task::<V, 3>(self),
            4 => lane_task::<V, 4>(self),
            5 => lane_task::<V, 5>(self),
            6 => lane_task::<V, 6>(self),
            7 => lane_task::<V, 7>(self),
            8 => lane_task::<V, 8>(self),
            _ => lane_task::<V, 0>(self),
        }
    }
}

/// States up to this size get compile-time sizes in [`lane_task`].
const SMALL_N: usize = 8;

/// The body of a [`LaneTask`]; `N > 0` is the state size as a constant, `N = 0` reads it
/// at run time.
#[inline(always)]
fn lane_task<V: Vector, const N: usize>(t: LaneTask<'_, '_, V::E>) {
    let LaneTask {
        s,
        row,
        c0,
        valid,
        job,
    } = t;
    let n = if N > 0 { N } else { s.n };
    let (m, w, ch) = (s.m(), V::W, PAR_CHUNK);
    let nn = n * n;
    // Per-lane transition data per step: `v_t` (m values) or `A_t` (n n values).
    let (tsrc, q) = match s.trans {
        Trans::Modulated { v, .. } => (v, m),
        Trans::PerStep { a } => (a, nn),
    };
    // Steps transposed at once (even); per-step matrices of large states two at a time.
    let tb = if q > 64 { 2 } else { TBLK };
    let g0 = row * s.len + c0 * ch; // global index of the group's first step
    let g1 = g0 + valid * ch;
    let bsrc = &s.b[g0 * n..g1 * n];
    let tsrc = &tsrc[g0 * q..g1 * q];
    let mut mats = Vec::with_capacity((m + 1) * nn);
    for j in 0..=m {
        mats.extend_from_slice(s.mat(j));
    }
    let mut bbuf = vec![V::E::ZERO; tb * n * w];
    let mut tbuf = vec![V::E::ZERO; tb * q * w];
    let mut lane = [V::E::ZERO; 16];
    // x, y (n), at (n n), cur, nxt ((n + 1) n): separate stack arrays for small n (so
    // the compiler can keep them in registers), heap vectors otherwise.
    let mut xa = [V::zero(); N];
    let mut ya = [V::zero(); N];
    let mut ata = [[V::zero(); N]; N];
    let mut ca = [[V::zero(); N]; SMALL_N + 1];
    let mut na = [[V::zero(); N]; SMALL_N + 1];
    let (mut xv, mut yv, mut atv, mut cv, mut nv) = Default::default();
    let x = lane_buf::<V, N>(&mut xa, &mut xv, n);
    let y = lane_buf::<V, N>(&mut ya, &mut yv, n);
    let at = lane_buf::<V, N>(ata.as_flattened_mut(), &mut atv, nn);
    let cur = lane_buf::<V, N>(ca.as_flattened_mut(), &mut cv, (n + 1) * n);
    let nxt = lane_buf::<V, N>(na.as_flattened_mut(), &mut nv, (n + 1) * n);
    let trans = s.trans;
    match job {
        LaneJob::Run { x0, xs, end } => {
            for (i, xi) in x.iter_mut().enumerate() {
                for (c, l) in lane[..valid].iter_mut().enumerate() {
                    *l = x0[c * n + i];
                }
                *xi = V::load(&lane);
            }
            let mut xbuf = vec![V::E::ZERO; tb * n * w];
            for t0 in (0..ch).step_by(tb) {
                load_t::<V>(bsrc, 0, valid, ch * n, t0 * n, tb * n, &mut bbuf);
                load_t::<V>(tsrc, 0, valid, ch * q, t0 * q, tb * q, &mut tbuf);
                // Two steps per turn, x -> y -> x: no copies.
                for k in (0..tb).step_by(2) {
                    let (b2, t2) = (&bbuf[k * n * w..], &tbuf[k * q * w..]);
                    let o2 = &mut xbuf[k * n * w..];
                    lane_run_step::<V>(trans, &mats, n, m, q, t2, b2, at, x, y, o2);
                    let (b2, t2, o2) = (&b2[n * w..], &t2[q * w..], &mut o2[n * w..]);
                    lane_run_step::<V>(trans, &mats, n, m, q, t2, b2, at, y, x, o2);
                }
                store_t::<V>(xs, valid, ch * n, t0 * n, tb * n, &xbuf);
            }
            for (i, xi) in x.iter().enumerate() {
                xi.store(&mut lane);
                for (c, &l) in lane[..valid].iter().enumerate() {
                    end[c * n + i] = l;
                }
            }
        }
        LaneJob::Map { p } => {
            // Columns of [P | s] as lane-vector states: col_q <- A_t col_q (+ b_t for
            // q = n), P from the identity. (n + 1) n independent FMA chains per step.
            for i in 0..n {
                cur[i * n + i] = V::splat(V::E::ONE);
            }
            for t0 in (0..ch).step_by(tb) {
                load_t::<V>(bsrc, 0, valid, ch * n, t0 * n, tb * n, &mut bbuf);
                load_t::<V>(tsrc, 0, valid, ch * q, t0 * q, tb * q, &mut tbuf);
                for k in (0..tb).step_by(2) {
                    let (b2, t2) = (&bbuf[k * n * w..], &tbuf[k * q * w..]);
                    lane_map_full::<V>(trans, &mats, n, m, q, t2, b2, at, cur, nxt);
                    let (b2, t2) = (&b2[n * w..], &t2[q * w..]);
                    lane_map_full::<V>(trans, &mats, n, m, q, t2, b2, at, nxt, cur);
                }
                lane_flush::<V>(cur);
            }
            for (qi, col) in cur.chunks_exact(n).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    v.store(&mut lane);
                    for (c, &l) in lane[..valid].iter().enumerate() {
                        p[(c * (n + 1) + qi) * n + i] = l;
                    }
                }
            }
        }
    }
}

/// `&mut arr[..len]` when `N > 0` (compile-time sizes), else `v` resized to `len`.
#[inline(always)]
fn lane_buf<'b, V: Vector, const N: usize>(
    arr: &'b mut [V],
    v: &'b mut Vec<V>,
    len: usize,
) -> &'b mut [V] {
    if N > 0 {
        &mut arr[..len]
    } else {
        v.resize(len, V::zero());
        v
    }
}

/// One pass-3 step `y = A_t x + b_t` of either form, also stored to `out[i W..]`; `tk`
/// and `bk` start at the step's transposed data.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lane_run_step<V: Vector>(
    trans: Trans<'_, V::E>,
    mats: &[V::E],
    n: usize,
    m: usize,
    q: usize,
    tk: &[V::E],
    bk: &[V::E],
    at: &mut [V],
    x: &[V],
    y: &mut [V],
    out: &mut [V::E],
) {
    let w = V::W;
    let (tk, bk) = (&tk[..q * w], &bk[..n * w]);
    match trans {
        Trans::Modulated { .. } => lane_step_mod::<V>(mats, n, m, tk, bk, x, y),
        Trans::PerStep { .. } => {
            lane_load::<V>(tk, at);
            lane_step_dense::<V>(at, n, bk, x, y)
        }
    }
    for (i, yi) in y.iter().enumerate() {
        yi.store(&mut out[i * w..]);
    }
}

/// One pass-1 step of either form: forms `A_t` in `at`, then `nxt = A_t cur (+ b_t)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lane_map_full<V: Vector>(
    trans: Trans<'_, V::E>,
    mats: &[V::E],
    n: usize,
    m: usize,
    q: usize,
    tk: &[V::E],
    bk: &[V::E],
    at: &mut [V],
    cur: &[V],
    nxt: &mut [V],
) {
    let w = V::W;
    let (tk, bk) = (&tk[..q * w], &bk[..n * w]);
    match trans {
        Trans::Modulated { .. } => lane_form::<V>(mats, n * n, m, tk, at),
        Trans::PerStep { .. } => lane_load::<V>(tk, at),
    }
    lane_map_step::<V>(at, n, bk, cur, nxt);
}

/// `y = (A0 + Σ_j v_j N_j) x + b` on lane vectors: `mats` is `[A0; N]` row-major, `vk`
/// and `bk` the step's transposed `v` (`m W`) and `b` (`n W`). One accumulator per
/// matrix keeps the dependent chain at `n + m` FMAs.
#[inline(always)]
fn lane_step_mod<V: Vector>(
    mats: &[V::E],
    n: usize,
    m: usize,
    vk: &[V::E],
    bk: &[V::E],
    x: &[V],
    y: &mut [V],
) {
    // Matrix loop outside, state loops (compile-time n) inside: they unroll and `y`
    // stays in registers across the run-time loop over m.
    let (w, nn) = (V::W, n * n);
    for (i, yi) in y.iter_mut().enumerate() {
        let mut acc = V::load(&bk[i * w..]);
        for k in 0..n {
            acc = V::splat(mats[i * n + k]).fma(x[k], acc);
        }
        *yi = acc;
    }
    for j in 1..=m {
        let vj = V::load(&vk[(j - 1) * w..]);
        let mj = &mats[j * nn..(j + 1) * nn];
        for (i, yi) in y.iter_mut().enumerate() {
            let mut aj = V::zero();
            for k in 0..n {
                aj = V::splat(mj[i * n + k]).fma(x[k], aj);
            }
            *yi = aj.fma(vj, *yi);
        }
    }
}

/// `y = A x + b` with per-lane matrix entries `at[i n + k]`.
#[inline(always)]
fn lane_step_dense<V: Vector>(at: &[V], n: usize, bk: &[V::E], x: &[V], y: &mut [V]) {
    let w = V::W;
    for (i, yi) in y.iter_mut().enumerate() {
        let mut acc = V::load(&bk[i * w..]);
        for (&a, &xk) in at[i * n..(i + 1) * n].iter().zip(x) {
            acc = a.fma(xk, acc);
        }
        *yi = acc;
    }
}

/// `at[e] = A0[e] + Σ_j v_j N_j[e]` per lane.
#[inline(always)]
fn lane_form<V: Vector>(mats: &[V::E], nn: usize, m: usize, vk: &[V::E], at: &mut [V]) {
    let w = V::W;
    for (a, &m0) in at.iter_mut().zip(&mats[..nn]) {
        *a = V::splat(m0);
    }
    for j in 1..=m {
        let vj = V::load(&vk[(j - 1) * w..]);
        for (a, &mj) in at.iter_mut().zip(&mats[j * nn..(j + 1) * nn]) {
            *a = V::splat(mj).fma(vj, *a);
        }
    }
}

/// `at[e]` from the transposed per-step matrix entries `tk[e W..]`.
#[inline(always)]
fn lane_load<V: Vector>(tk: &[V::E], at: &mut [V]) {
    for (e, a) in at.iter_mut().enumerate() {
        *a = V::load(&tk[e * V::W..]);
    }
}

/// `nxt_q = A cur_q` for the `n + 1` columns of `[P | s]` (`+ b` for the last).
#[inline(always)]
fn lane_map_step<V: Vector>(at: &[V], n: usize, bk: &[V::E], cur: &[V], nxt: &mut [V]) {
    // Index loops: zips of chunk iterators are not always inlined (a call per step).
    let w = V::W;
    for qi in 0..=n {
        for i in 0..n {
            let mut acc = if qi == n {
                V::load(&bk[i * w..])
            } else {
                V::zero()
            };
            for k in 0..n {
                acc = at[i * n + k].fma(cur[qi * n + k], acc);
            }
            nxt[qi * n + i] = acc;
        }
    }
}

/// The transition product of a contracting system decays geometrically over a chunk;
/// flushing what falls below 1e-30 (f32) / 1e-290 (f64) every few steps keeps it out of
/// the (very slow) subnormal range. The flushed terms are negligible relative to the
/// chunk's start state.
#[inline(always)]
fn lane_flush<V: Vector>(cur: &mut [V]) {
    let tiny = V::splat(V::E::from_f64(if V::E::from_f64(1e-300) == V::E::ZERO {
        1e-30
    } else {
        1e-290
    }));
    for v in cur.iter_mut() {
        let mag = v.max(V::zero().sub(*v));
        *v = V::select(mag.lt(tiny), V::zero(), *v);
    }
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
) -> Result<()> {
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
