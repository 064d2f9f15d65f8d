//! Companion (canonical) recurrence, design §4, per lane (lane = batch·dim + channel):
//!
//! ```text
//! s_t = Σ_{i=1..n} α_{t,i} s_{t-i} + β_t u_t        y_t = Σ_{i=0..n-1} c_{t,i} s_{t-i} + D u_t
//! ```
//!
//! Same scheme as [`crate::diag`]: tasks of [`BLOCK`] lanes, vectors across lanes, time
//! chunks transposed to `[time][lane]`. The last n values of s sit in front of the chunk
//! (`[n + chunk][W]`), so s_{t-i} is a plain row index; the halo is copied forward between
//! chunks. Per-step rows of α / c (`n` values each) are transposed like a row of length
//! `len·n`. Time-invariant coefficients are one `[n][W]` block read with time stride 0.
//!
//! The backward is the adjoint recurrence run in reverse, written as a scatter: once the
//! total adjoint g_t = ∂L/∂s_t is known, α_{t,i} g_t is added to the accumulator of
//! g_{t-i} (and c_{t,i} dy_t likewise), so each step only reads its own coefficients.
//! Gradients of time-invariant parameters are per-lane partial sums (in time order within
//! a task) reduced over the batch in a fixed order: bitwise independent of the threads.

use crate::cpu::pool;
use crate::cpu::{dispatch, Elem, Kernel, Level, SimdElem, Vector};
use crate::error::{check_lens, Error, Result};
use crate::selective::{load_t, store_t, BLOCK};

/// Largest supported order.
pub const MAX_ORDER: usize = 64;

/// A coefficient that either varies per (lane, time) or is fixed per channel.
#[derive(Clone, Copy, Debug)]
pub enum Seq<'a, T> {
    /// `(batch, dim, len[, n])`.
    Var(&'a [T]),
    /// `(dim[, n])`.
    Const(&'a [T]),
}

impl<'a, T> Seq<'a, T> {
    pub fn data(&self) -> &'a [T] {
        match *self {
            Seq::Var(x) | Seq::Const(x) => x,
        }
    }
    pub fn is_var(&self) -> bool {
        matches!(self, Seq::Var(_))
    }
}

/// Inputs of a companion scan, all contiguous.
#[derive(Clone, Copy, Debug)]
pub struct CompanionArgs<'a, T> {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    /// n, 1 ..= [`MAX_ORDER`].
    pub order: usize,
    /// `(batch, dim, len)`.
    pub u: &'a [T],
    /// n values per step / channel; `alpha[.., i-1]` multiplies s_{t-i}.
    pub alpha: Seq<'a, T>,
    /// Default 1.
    pub beta: Option<Seq<'a, T>>,
    /// n values; `c[.., i]` multiplies s_{t-i}. Default: y_t = s_t.
    pub c: Option<Seq<'a, T>>,
    /// `(dim,)`.
    pub d: Option<&'a [T]>,
    /// `(batch, dim, n)`: (s_0, s_{-1}, …, s_{1-n}).
    pub s0: Option<&'a [T]>,
}

impl<T> CompanionArgs<'_, T> {
    fn lanes(&self) -> usize {
        self.batch * self.dim
    }

    /// Checks every input length; returns the number of lanes.
    fn check(&self) -> Result<usize> {
        let (m, l, n, dm) = (self.lanes(), self.len, self.order, self.dim);
        if n == 0 || n > MAX_ORDER {
            return Err(Error::value(
                "alpha",
                format!("an order n in 1..={MAX_ORDER}"),
                n,
            ));
        }
        let seq = |s: &Seq<'_, T>, per: usize| match s {
            Seq::Var(x) => (x.len(), m * l * per),
            Seq::Const(x) => (x.len(), dm * per),
        };
        let mut checks = vec![("u", self.u.len(), m * l)];
        let (g, w) = seq(&self.alpha, n);
        checks.push(("alpha", g, w));
        if let Some(b) = &self.beta {
            let (g, w) = seq(b, 1);
            checks.push(("beta", g, w));
        }
        if let Some(c) = &self.c {
            let (g, w) = seq(c, n);
            checks.push(("c", g, w));
        }
        if let Some(d) = self.d {
            checks.push(("D", d.len(), dm));
        }
        if let Some(h) = self.s0 {
            checks.push(("initial_state", h.len(), m * n));
        }
        check_lens(&checks)?;
        Ok(m)
    }
}

/// Steps per time chunk: long runs per lane row help the prefetchers (16+ concurrent
/// row streams); shorter for high orders so the `[chunk·n][W]` blocks stay in L2.
fn time_chunk(n: usize) -> usize {
    (2048 / n).clamp(16, 256)
}

/// Task starts and sizes: [`BLOCK`] lanes each, independent of the thread count.
fn tasks(m: usize) -> (Vec<usize>, Vec<usize>) {
    let starts: Vec<usize> = (0..m).step_by(BLOCK).collect();
    let rows = starts.iter().map(|&m0| BLOCK.min(m - m0)).collect();
    (starts, rows)
}

/// `buf[j*W + lane] = src[channel(lane)*per + j]` for the valid lanes (zero elsewhere).
#[inline(always)]
fn fill_const<T: Elem>(
    src: &[T],
    per: usize,
    base: usize,
    valid: usize,
    dim: usize,
    w: usize,
    buf: &mut [T],
) {
    for j in 0..per {
        for lane in 0..w {
            buf[j * w + lane] = if lane < valid {
                src[((base + lane) % dim) * per + j]
            } else {
                T::ZERO
            };
        }
    }
}

/// Time-invariant coefficients of the lane group starting at `base` (`valid` real lanes):
/// fills the α / β / c blocks that are per channel (β defaults to 1) and returns D as a
/// vector. Shared by the forward and the backward.
#[inline(always)]
fn fill_lane_group<V: Vector>(
    a: &CompanionArgs<'_, V::E>,
    base: usize,
    valid: usize,
    ab: &mut [V::E],
    bb: &mut [V::E],
    cb: &mut [V::E],
    tmp: &mut [V::E],
) -> Option<V> {
    let (n, dim, w) = (a.order, a.dim, V::W);
    if let Seq::Const(x) = a.alpha {
        fill_const(x, n, base, valid, dim, w, ab);
    }
    match a.beta {
        Some(Seq::Const(x)) => fill_const(x, 1, base, valid, dim, w, bb),
        None => bb.fill(V::E::ONE),
        _ => {}
    }
    if let Some(Seq::Const(x)) = a.c {
        fill_const(x, n, base, valid, dim, w, cb);
    }
    let d = a.d?;
    fill_const(d, 1, base, valid, dim, w, tmp);
    Some(V::load(tmp))
}

/// Coefficient block of a chunk: transposed per-step rows (stride `per·W` per step) or the
/// time-invariant block (stride 0). Returns the stride.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn load_seq<V: Vector>(
    s: &Seq<'_, V::E>,
    per: usize,
    base: usize,
    valid: usize,
    len: usize,
    t0: usize,
    tl: usize,
    buf: &mut [V::E],
) -> usize {
    match s {
        Seq::Var(x) => {
            load_t::<V>(x, base, valid, len * per, t0 * per, tl * per, buf);
            per * V::W
        }
        Seq::Const(_) => 0,
    }
}

fn seq_buf<T: Elem>(s: Option<&Seq<'_, T>>, per: usize, tc: usize, w: usize) -> Vec<T> {
    match s {
        Some(Seq::Var(_)) => vec![T::ZERO; tc * per * w],
        _ => vec![T::ZERO; per * w],
    }
}

// ------------------------------------------------------------------------------ forward

/// Outputs of the forward: `y`, `s (batch, dim, len)` (saved for the backward; may be
/// left out when y = s, i.e. without c and D) and `last (batch, dim, n)` = (s_L, …, s_{L-n+1}).
pub struct FwdOut<'a, T> {
    pub y: &'a mut [T],
    pub s: Option<&'a mut [T]>,
    pub last: &'a mut [T],
}

struct FwdTask<'s, 'a, T> {
    a: &'s CompanionArgs<'a, T>,
    m0: usize,
    rows: usize,
    y: &'s mut [T],
    s: Option<&'s mut [T]>,
    last: &'s mut [T],
}

/// One chunk of forward steps on W lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_steps<V: Vector>(
    n: usize,
    tl: usize,
    ub: &[V::E],
    (bb, b_st): (&[V::E], usize),
    (ab, a_st): (&[V::E], usize),
    c: Option<(&[V::E], usize)>,
    dv: Option<V>,
    sb: &mut [V::E],
    yb: &mut [V::E],
) {
    let w = V::W;
    for k in 0..tl {
        let uk = V::load(&ub[k * w..]);
        let mut acc = V::load(&bb[k * b_st..]).mul(uk);
        let a = &ab[k * a_st..];
        // Oldest taps first: only the last fma waits for s_{t-1}.
        for j in (0..n).rev() {
            acc = V::load(&a[j * w..]).fma(V::load(&sb[(n + k - 1 - j) * w..]), acc);
        }
        acc.store(&mut sb[(n + k) * w..]);
        let y = match c {
            Some((cb, c_st)) => {
                let cr = &cb[k * c_st..];
                let mut y = match dv {
                    Some(d) => d.mul(uk),
                    None => V::zero(),
                };
                for j in (0..n).rev() {
                    y = V::load(&cr[j * w..]).fma(V::load(&sb[(n + k - j) * w..]), y);
                }
                y
            }
            None => match dv {
                Some(d) => d.fma(uk, acc),
                None => acc,
            },
        };
        y.store(&mut yb[k * w..]);
    }
}

impl<T: SimdElem> Kernel<T> for FwdTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let FwdTask {
            a,
            m0,
            rows,
            y,
            mut s,
            last,
        } = self;
        let (w, l, n) = (V::W, a.len, a.order);
        let tc = time_chunk(n);
        let mut sb = vec![T::ZERO; (n + tc) * w];
        let mut ab = seq_buf(Some(&a.alpha), n, tc, w);
        let mut bb = seq_buf(a.beta.as_ref(), 1, tc, w);
        let mut cb = seq_buf(a.c.as_ref(), n, tc, w);
        let mut ub = vec![T::ZERO; tc * w];
        let mut yb = vec![T::ZERO; tc * w];
        let mut tmp = vec![T::ZERO; w];
        for r0 in (0..rows).step_by(w) {
            let valid = w.min(rows - r0);
            let base = m0 + r0;
            // Halo: row n-1-j holds s_{-j}.
            sb[..n * w].fill(T::ZERO);
            if let Some(h0) = a.s0 {
                for j in 0..n {
                    for lane in 0..valid {
                        sb[(n - 1 - j) * w + lane] = h0[(base + lane) * n + j];
                    }
                }
            }
            let dv = fill_lane_group::<V>(a, base, valid, &mut ab, &mut bb, &mut cb, &mut tmp);
            for t0 in (0..l).step_by(tc) {
                let tl = tc.min(l - t0);
                load_t::<V>(a.u, base, valid, l, t0, tl, &mut ub);
                let a_st = load_seq::<V>(&a.alpha, n, base, valid, l, t0, tl, &mut ab);
                let b_st = match &a.beta {
                    Some(b) => load_seq::<V>(b, 1, base, valid, l, t0, tl, &mut bb),
                    None => 0,
                };
                #[allow(clippy::manual_map)] // a closure would lose the target features
                let c = match &a.c {
                    Some(c) => Some(load_seq::<V>(c, n, base, valid, l, t0, tl, &mut cb)),
                    None => None,
                };
                fwd_steps::<V>(
                    n,
                    tl,
                    &ub,
                    (&bb, b_st),
                    (&ab, a_st),
                    c.map(|st| (&cb[..], st)),
                    dv,
                    &mut sb,
                    &mut yb,
                );
                store_t::<V>(&mut y[r0 * l..], valid, l, t0, tl, &yb);
                if let Some(s) = s.as_deref_mut() {
                    store_t::<V>(&mut s[r0 * l..], valid, l, t0, tl, &sb[n * w..]);
                }
                sb.copy_within(tl * w..(tl + n) * w, 0);
            }
            for k in 0..n {
                for lane in 0..valid {
                    last[(r0 + lane) * n + k] = sb[(n - 1 - k) * w + lane];
                }
            }
        }
    }
}

/// Forward scan.
pub fn companion_fwd<T: SimdElem>(
    level: Level,
    a: &CompanionArgs<'_, T>,
    out: FwdOut<'_, T>,
) -> Result<()> {
    let m = a.check()?;
    let (l, n) = (a.len, a.order);
    check_lens(&[
        ("y", out.y.len(), m * l),
        ("s", out.s.as_deref().map_or(m * l, <[T]>::len), m * l),
        ("last_state", out.last.len(), m * n),
    ])?;
    let (starts, rows) = tasks(m);
    let lens: Vec<usize> = rows.iter().map(|r| r * l).collect();
    let ys = pool::split_lengths(out.y, &lens);
    let ss: Vec<Option<&mut [T]>> = match out.s {
        Some(s) => pool::split_lengths(s, &lens)
            .into_iter()
            .map(Some)
            .collect(),
        None => lens.iter().map(|_| None).collect(),
    };
    let lasts = pool::split_lengths(out.last, &rows.iter().map(|r| r * n).collect::<Vec<_>>());
    let items: Vec<_> = starts
        .into_iter()
        .zip(rows)
        .zip(ys)
        .zip(ss)
        .zip(lasts)
        .collect();
    pool::for_each(items, m * l * n, |_, ((((m0, rows), y), s), last)| {
        dispatch(
            level,
            FwdTask {
                a,
                m0,
                rows,
                y,
                s,
                last,
            },
        )
    });
    Ok(())
}

// ------------------------------------------------------------------------------ backward

/// Gradients, each in the layout of its input (`dbeta`, `dc`, `dd` only when given).
pub struct BwdOut<'a, T> {
    pub du: &'a mut [T],
    pub dalpha: &'a mut [T],
    pub dbeta: Option<&'a mut [T]>,
    pub dc: Option<&'a mut [T]>,
    pub dd: Option<&'a mut [T]>,
    pub ds0: &'a mut [T],
}

/// Per task: gradients of per-step inputs, or per-lane partial sums of time-invariant ones.
struct BwdTask<'s, 'a, T> {
    a: &'s CompanionArgs<'a, T>,
    s: &'s [T],
    dy: &'s [T],
    dlast: Option<&'s [T]>,
    m0: usize,
    rows: usize,
    du: &'s mut [T],
    da: &'s mut [T],
    db: &'s mut [T],
    dc: &'s mut [T],
    dd: &'s mut [T],
    ds0: &'s mut [T],
}

/// Buffers of one backward chunk (all `[time(·n)][W]`).
struct BwdBufs<'b, T> {
    sb: &'b [T],
    ub: &'b [T],
    dyb: &'b [T],
    bb: (&'b [T], usize),
    ab: (&'b [T], usize),
    cb: Option<(&'b [T], usize)>,
}

/// Gradient outputs of a chunk: per-step blocks (`*_var`) or partial-sum vectors.
struct BwdAcc<'b, T> {
    gb: &'b mut [T],
    dub: &'b mut [T],
    dbb: &'b mut [T],
    dab: &'b mut [T],
    dcb: &'b mut [T],
    pb: &'b mut [T],
    pa: &'b mut [T],
    pc: &'b mut [T],
    pd: &'b mut [T],
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_steps<V: Vector>(
    n: usize,
    tl: usize,
    dv: Option<V>,
    (a_var, b_var, c_var): (bool, bool, bool),
    has_b: bool,
    i: &BwdBufs<'_, V::E>,
    o: &mut BwdAcc<'_, V::E>,
) {
    let w = V::W;
    let (bb, b_st) = i.bb;
    let (ab, a_st) = i.ab;
    for k in (0..tl).rev() {
        let dyk = V::load(&i.dyb[k * w..]);
        let uk = V::load(&i.ub[k * w..]);
        let acc = V::load(&o.gb[(n + k) * w..]);
        // Total adjoint of s_k: the accumulated later taps plus its direct read-out.
        let g = match i.cb {
            Some((cb, c_st)) => V::load(&cb[k * c_st..]).fma(dyk, acc),
            None => acc.add(dyk),
        };
        // Recurrence taps: s_k feeds s_{k+i}; so g_{k-i} += α_{k,i} g_k.
        let ar = &ab[k * a_st..];
        for j in 0..n {
            let r = (n + k - 1 - j) * w;
            V::load(&ar[j * w..])
                .fma(g, V::load(&o.gb[r..]))
                .store(&mut o.gb[r..]);
        }
        if let Some((cb, c_st)) = i.cb {
            let cr = &cb[k * c_st..];
            for j in 1..n {
                let r = (n + k - j) * w;
                V::load(&cr[j * w..])
                    .fma(dyk, V::load(&o.gb[r..]))
                    .store(&mut o.gb[r..]);
            }
        }
        let mut du = V::load(&bb[k * b_st..]).mul(g);
        if let Some(d) = dv {
            du = d.fma(dyk, du);
            dyk.fma(uk, V::load(o.pd)).store(o.pd);
        }
        du.store(&mut o.dub[k * w..]);
        if has_b {
            if b_var {
                uk.mul(g).store(&mut o.dbb[k * w..]);
            } else {
                uk.fma(g, V::load(o.pb)).store(o.pb);
            }
        }
        // dα_{k,i} = g_k s_{k-i}, dc_{k,i} = dy_k s_{k-i}.
        if a_var {
            let da = &mut o.dab[k * n * w..];
            for j in 0..n {
                g.mul(V::load(&i.sb[(n + k - 1 - j) * w..]))
                    .store(&mut da[j * w..]);
            }
        } else {
            for j in 0..n {
                let p = &mut o.pa[j * w..];
                g.fma(V::load(&i.sb[(n + k - 1 - j) * w..]), V::load(p))
                    .store(p);
            }
        }
        if i.cb.is_some() {
            if c_var {
                let dc = &mut o.dcb[k * n * w..];
                for j in 0..n {
                    dyk.mul(V::load(&i.sb[(n + k - j) * w..]))
                        .store(&mut dc[j * w..]);
                }
            } else {
                for j in 0..n {
                    let p = &mut o.pc[j * w..];
                    dyk.fma(V::load(&i.sb[(n + k - j) * w..]), V::load(p))
                        .store(p);
                }
            }
        }
    }
}

impl<T: SimdElem> Kernel<T> for BwdTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let BwdTask {
            a,
            s,
            dy,
            dlast,
            m0,
            rows,
            du,
            da,
            db,
            dc,
            dd,
            ds0,
        } = self;
        let (w, l, n) = (V::W, a.len, a.order);
        let tc = time_chunk(n);
        let (a_var, b_var) = (a.alpha.is_var(), a.beta.is_some_and(|b| b.is_var()));
        let c_var = a.c.is_some_and(|c| c.is_var());
        let mut sb = vec![T::ZERO; (n + tc) * w];
        let mut gb = vec![T::ZERO; (n + tc) * w];
        let mut ab = seq_buf(Some(&a.alpha), n, tc, w);
        let mut bb = seq_buf(a.beta.as_ref(), 1, tc, w);
        let mut cb = seq_buf(a.c.as_ref(), n, tc, w);
        let mut ub = vec![T::ZERO; tc * w];
        let mut dyb = vec![T::ZERO; tc * w];
        let mut dub = vec![T::ZERO; tc * w];
        let mut dbb = vec![T::ZERO; if b_var { tc * w } else { 0 }];
        let mut dab = vec![T::ZERO; if a_var { tc * n * w } else { 0 }];
        let mut dcb = vec![T::ZERO; if c_var { tc * n * w } else { 0 }];
        let (mut pa, mut pc) = (vec![T::ZERO; n * w], vec![T::ZERO; n * w]);
        let (mut pb, mut pd) = (vec![T::ZERO; w], vec![T::ZERO; w]);
        let mut tmp = vec![T::ZERO; w];
        let nck = l.div_ceil(tc);
        let t0_last = nck.saturating_sub(1) * tc;
        for r0 in (0..rows).step_by(w) {
            let valid = w.min(rows - r0);
            let base = m0 + r0;
            let dv = fill_lane_group::<V>(a, base, valid, &mut ab, &mut bb, &mut cb, &mut tmp);
            for p in [&mut pa, &mut pc, &mut pb, &mut pd] {
                p.fill(T::ZERO);
            }
            // Accumulators: row n + (t - t0) for time t of the chunk at t0; the final
            // state's adjoint seeds s_{L-1-k} (which may lie in the initial state).
            gb.fill(T::ZERO);
            if let Some(dl) = dlast {
                let top = n + l - t0_last;
                for k in 0..n {
                    for lane in 0..valid {
                        gb[(top - 1 - k) * w + lane] = dl[(base + lane) * n + k];
                    }
                }
            }
            for ci in (0..nck).rev() {
                let t0 = ci * tc;
                let tl = tc.min(l - t0);
                if ci + 1 != nck {
                    gb.copy_within(0..n * w, tc * w);
                    gb[..tc * w].fill(T::ZERO);
                }
                // s over [t0 - n, t0 + tl): rows before time 0 come from the initial state.
                let lo = t0.saturating_sub(n);
                let neg = n - (t0 - lo);
                for r in 0..neg {
                    let j = neg - 1 - r;
                    for lane in 0..w {
                        sb[r * w + lane] = match a.s0 {
                            Some(h0) if lane < valid => h0[(base + lane) * n + j],
                            _ => T::ZERO,
                        };
                    }
                }
                load_t::<V>(s, base, valid, l, lo, t0 + tl - lo, &mut sb[neg * w..]);
                load_t::<V>(a.u, base, valid, l, t0, tl, &mut ub);
                load_t::<V>(dy, base, valid, l, t0, tl, &mut dyb);
                let a_st = load_seq::<V>(&a.alpha, n, base, valid, l, t0, tl, &mut ab);
                let b_st = match &a.beta {
                    Some(b) => load_seq::<V>(b, 1, base, valid, l, t0, tl, &mut bb),
                    None => 0,
                };
                #[allow(clippy::manual_map)] // a closure would lose the target features
                let c_st = match &a.c {
                    Some(c) => Some(load_seq::<V>(c, n, base, valid, l, t0, tl, &mut cb)),
                    None => None,
                };
                let bufs = BwdBufs {
                    sb: &sb,
                    ub: &ub,
                    dyb: &dyb,
                    bb: (&bb, b_st),
                    ab: (&ab, a_st),
                    cb: c_st.map(|st| (&cb[..], st)),
                };
                let mut acc = BwdAcc {
                    gb: &mut gb,
                    dub: &mut dub,
                    dbb: &mut dbb,
                    dab: &mut dab,
                    dcb: &mut dcb,
                    pb: &mut pb,
                    pa: &mut pa,
                    pc: &mut pc,
                    pd: &mut pd,
                };
                bwd_steps::<V>(
                    n,
                    tl,
                    dv,
                    (a_var, b_var, c_var),
                    a.beta.is_some(),
                    &bufs,
                    &mut acc,
                );
                store_t::<V>(&mut du[r0 * l..], valid, l, t0, tl, &dub);
                if a_var {
                    store_t::<V>(&mut da[r0 * l * n..], valid, l * n, t0 * n, tl * n, &dab);
                }
                if b_var {
                    store_t::<V>(&mut db[r0 * l..], valid, l, t0, tl, &dbb);
                }
                if c_var {
                    store_t::<V>(&mut dc[r0 * l * n..], valid, l * n, t0 * n, tl * n, &dcb);
                }
            }
            // Rows 0..n now hold the adjoints of s_0, s_{-1}, …
            for j in 0..n {
                for lane in 0..valid {
                    ds0[(r0 + lane) * n + j] = gb[(n - 1 - j) * w + lane];
                }
            }
            let lanes = r0..r0 + valid;
            if !a_var {
                for j in 0..n {
                    for (lane, r) in lanes.clone().enumerate() {
                        da[r * n + j] = pa[j * w + lane];
                    }
                }
            }
            if a.c.is_some() && !c_var {
                for j in 0..n {
                    for (lane, r) in lanes.clone().enumerate() {
                        dc[r * n + j] = pc[j * w + lane];
                    }
                }
            }
            if a.beta.is_some() && !b_var {
                db[lanes.clone()].copy_from_slice(&pb[..valid]);
            }
            if a.d.is_some() {
                dd[lanes].copy_from_slice(&pd[..valid]);
            }
        }
    }
}

/// `out[d*per + j] = Σ_b part[(b*dim + d)*per + j]`, batch in order.
fn reduce_batch<T: Elem>(part: &[T], batch: usize, dim: usize, per: usize, out: &mut [T]) {
    out.fill(T::ZERO);
    for b in 0..batch {
        for (o, p) in out
            .iter_mut()
            .zip(&part[b * dim * per..(b + 1) * dim * per])
        {
            *o = *o + *p;
        }
    }
}

/// Backward scan: `s` is the forward's saved `s`, `dy` the gradient of `y`, `dlast` that
/// of the final state.
pub fn companion_bwd<T: SimdElem>(
    level: Level,
    a: &CompanionArgs<'_, T>,
    s: &[T],
    dy: &[T],
    dlast: Option<&[T]>,
    out: BwdOut<'_, T>,
) -> Result<()> {
    let m = a.check()?;
    let (l, n, dim) = (a.len, a.order, a.dim);
    let alen = |x: &Seq<'_, T>, per| if x.is_var() { m * l * per } else { dim * per };
    let mut checks = vec![
        ("s", s.len(), m * l),
        ("dy", dy.len(), m * l),
        ("dlast_state", dlast.map_or(m * n, <[T]>::len), m * n),
        ("du", out.du.len(), m * l),
        ("dalpha", out.dalpha.len(), alen(&a.alpha, n)),
        ("dinitial_state", out.ds0.len(), m * n),
    ];
    for (name, o, want, per) in [
        ("dbeta", out.dbeta.as_deref(), a.beta, 1),
        ("dc", out.dc.as_deref(), a.c, n),
    ] {
        match (o, want) {
            (Some(o), Some(x)) => checks.push((name, o.len(), alen(&x, per))),
            (None, None) => {}
            _ => return Err(Error::expected(name, "exactly when the input is given")),
        }
    }
    match (&out.dd, a.d) {
        (Some(o), Some(_)) => checks.push(("dD", o.len(), dim)),
        (None, None) => {}
        _ => return Err(Error::expected("dD", "exactly when D is given")),
    }
    check_lens(&checks)?;
    // Time-invariant gradients go through per-lane partials.
    let a_var = a.alpha.is_var();
    let b_var = a.beta.is_some_and(|b| b.is_var());
    let c_var = a.c.is_some_and(|c| c.is_var());
    let mut pa = vec![T::ZERO; if a_var { 0 } else { m * n }];
    let mut pb = vec![T::ZERO; if a.beta.is_some() && !b_var { m } else { 0 }];
    let mut pc = vec![T::ZERO; if a.c.is_some() && !c_var { m * n } else { 0 }];
    let mut pd = vec![T::ZERO; if a.d.is_some() { m } else { 0 }];
    let BwdOut {
        du,
        dalpha,
        mut dbeta,
        mut dc,
        dd,
        ds0,
    } = out;
    {
        let (starts, rows) = tasks(m);
        let per = |k: usize| rows.iter().map(|r| r * k).collect::<Vec<_>>();
        let dus = pool::split_lengths(du, &per(l));
        let das = if a_var {
            pool::split_lengths(dalpha, &per(l * n))
        } else {
            pool::split_lengths(&mut pa, &per(n))
        };
        let dbs = match dbeta.as_deref_mut() {
            Some(x) if b_var => pool::split_lengths(x, &per(l)),
            _ => pool::split_lengths(&mut pb, &per(usize::from(a.beta.is_some()))),
        };
        let dcs = match dc.as_deref_mut() {
            Some(x) if c_var => pool::split_lengths(x, &per(l * n)),
            _ => pool::split_lengths(&mut pc, &per(if a.c.is_some() { n } else { 0 })),
        };
        let dds = pool::split_lengths(&mut pd, &per(usize::from(a.d.is_some())));
        let ds0s = pool::split_lengths(ds0, &per(n));
        let items: Vec<_> = starts
            .into_iter()
            .zip(rows.iter().copied())
            .zip(dus)
            .zip(das)
            .zip(dbs)
            .zip(dcs)
            .zip(dds)
            .zip(ds0s)
            .collect();
        pool::for_each(
            items,
            2 * m * l * n,
            |_, (((((((m0, rows), du), da), db), dc), dd), ds0)| {
                dispatch(
                    level,
                    BwdTask {
                        a,
                        s,
                        dy,
                        dlast,
                        m0,
                        rows,
                        du,
                        da,
                        db,
                        dc,
                        dd,
                        ds0,
                    },
                )
            },
        );
    }
    let bt = a.batch;
    if !a_var {
        reduce_batch(&pa, bt, dim, n, dalpha);
    }
    if let (Some(o), false) = (dbeta, b_var) {
        reduce_batch(&pb, bt, dim, 1, o);
    }
    if let (Some(o), false) = (dc, c_var) {
        reduce_batch(&pc, bt, dim, n, o);
    }
    if let Some(o) = dd {
        reduce_batch(&pd, bt, dim, 1, o);
    }
    Ok(())
}
