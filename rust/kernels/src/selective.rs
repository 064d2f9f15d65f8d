//! Mamba-1 selective scan (design §2.2), forward and backward.
//!
//! Layout: `u`, `delta`, `z`, `out` are `(batch, dim, len)`; `A` is `(dim, N)`; `B`/`C`
//! are `(dim, N)` (constant) or `(batch, G, N, len)` (variable, `G = 1` for ungrouped);
//! states are `(batch, dim, N)`.
//!
//! Work is cut into tasks of at most [`BLOCK`] channels of one batch row (never crossing a
//! group boundary), independent of the thread count. Inside a task, `W` channels form the
//! lanes of a vector; time is the outer loop, processed in chunks of [`CHUNK`] steps that
//! are transposed into `[time][lane]` buffers so that every vector load is contiguous.
//! The forward writes the state before each chunk (`ckpt`, `(batch, dim, n_chunks, N)`);
//! the backward walks the chunks in reverse, recomputes each chunk's states from its
//! checkpoint and runs the adjoint recurrence, so memory is O(B·D·N·L/CHUNK).

use crate::cpu::pool;
use crate::cpu::{
    dispatch, exp, sigmoid, softplus, softplus_grad, sum_vectors, transpose, Elem, Kernel, Level,
    SimdElem, Vector,
};
use crate::error::{check_lens, Error, Result};

/// Time steps per checkpoint.
pub const CHUNK: usize = 64;
/// Channels per task.
pub const BLOCK: usize = 64;

/// `B` or `C`: constant per channel or varying over (batch, group, time).
#[derive(Clone, Copy, Debug)]
pub enum Mat<'a, T> {
    /// `(dim, N)`.
    Const(&'a [T]),
    /// `(batch, groups, N, len)`.
    Var { data: &'a [T], groups: usize },
}

impl<T> Mat<'_, T> {
    fn groups(&self) -> usize {
        match self {
            Mat::Const(_) => 1,
            Mat::Var { groups, .. } => *groups,
        }
    }
    fn is_var(&self) -> bool {
        matches!(self, Mat::Var { .. })
    }
}

/// Inputs of a selective scan, all contiguous.
#[derive(Clone, Copy, Debug)]
pub struct ScanArgs<'a, T> {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub dstate: usize,
    pub u: &'a [T],
    pub delta: &'a [T],
    pub a: &'a [T],
    pub b: Mat<'a, T>,
    pub c: Mat<'a, T>,
    pub d: Option<&'a [T]>,
    pub z: Option<&'a [T]>,
    pub delta_bias: Option<&'a [T]>,
    pub h0: Option<&'a [T]>,
    pub seq_idx: Option<&'a [i64]>,
    pub softplus: bool,
}

pub fn n_chunks(len: usize) -> usize {
    len.div_ceil(CHUNK)
}

impl<T> ScanArgs<'_, T> {
    /// Checks every buffer length against the declared sizes.
    pub fn validate(&self) -> Result<()> {
        let (bt, d, l, n) = (self.batch, self.dim, self.len, self.dstate);
        if n == 0 {
            return Err(Error::value("A", "a state size N >= 1", n));
        }
        for (name, m) in [("B", &self.b), ("C", &self.c)] {
            if let Mat::Var { groups, .. } = m {
                if *groups == 0 || d % groups != 0 {
                    return Err(Error::invalid(
                        name,
                        format!("{groups} groups do not divide dim {d}"),
                    ));
                }
            }
        }
        let mat_len = |m: &Mat<'_, T>| match m {
            Mat::Const(x) => (x.len(), d * n),
            Mat::Var { data, groups } => (data.len(), bt * groups * n * l),
        };
        let ((gb, wb), (gc, wc)) = (mat_len(&self.b), mat_len(&self.c));
        check_lens(&[
            ("u", self.u.len(), bt * d * l),
            ("delta", self.delta.len(), bt * d * l),
            ("A", self.a.len(), d * n),
            ("B", gb, wb),
            ("C", gc, wc),
            ("D", self.d.map_or(d, <[T]>::len), d),
            ("z", self.z.map_or(bt * d * l, <[T]>::len), bt * d * l),
            ("delta_bias", self.delta_bias.map_or(d, <[T]>::len), d),
            (
                "initial_state",
                self.h0.map_or(bt * d * n, <[T]>::len),
                bt * d * n,
            ),
            ("seq_idx", self.seq_idx.map_or(bt * l, <[i64]>::len), bt * l),
        ])
    }

    /// Channel ranges of the tasks of one batch row: at most BLOCK channels, never
    /// straddling a group of B or C.
    fn channel_ranges(&self) -> Vec<(usize, usize)> {
        let gb = self.dim / self.b.groups();
        let gc = self.dim / self.c.groups();
        let mut out = Vec::new();
        let mut d0 = 0;
        while d0 < self.dim {
            let next = |g: usize| (d0 / g + 1) * g;
            let d1 = (d0 + BLOCK).min(next(gb)).min(next(gc)).min(self.dim);
            out.push((d0, d1));
            d0 = d1;
        }
        out
    }

    fn tasks(&self) -> Vec<Task> {
        let ranges = self.channel_ranges();
        (0..self.batch)
            .flat_map(|b| ranges.iter().map(move |&(d0, d1)| Task { b, d0, d1 }))
            .collect()
    }

    #[inline(always)]
    fn reset(&self, b: usize, t: usize) -> bool {
        match self.seq_idx {
            Some(s) => t > 0 && s[b * self.len + t] != s[b * self.len + t - 1],
            None => false,
        }
    }

    /// Offset of row (b, group, n) of a variable matrix.
    #[inline(always)]
    fn var_row(&self, m: &Mat<'_, T>, b: usize, d: usize, n: usize) -> usize {
        let g = m.groups();
        let grp = d / (self.dim / g);
        ((b * g + grp) * self.dstate + n) * self.len
    }
}

#[derive(Clone, Copy, Debug)]
struct Task {
    b: usize,
    d0: usize,
    d1: usize,
}

impl Task {
    fn rows(&self) -> usize {
        self.d1 - self.d0
    }
}

/// Per-lane gather of `src[(d0 + sub*W + j) * stride + off]` into a vector; lanes past
/// `d1` get `fill`.
#[inline(always)]
fn gather<V: Vector>(
    src: &[V::E],
    lanes: core::ops::Range<usize>,
    stride: usize,
    off: usize,
    fill: V::E,
    tmp: &mut [V::E],
) -> V {
    for (j, slot) in tmp[..V::W].iter_mut().enumerate() {
        let d = lanes.start + j;
        *slot = if d < lanes.end {
            src[d * stride + off]
        } else {
            fill
        };
    }
    V::load(tmp)
}

/// Writes the valid lanes of `v` to `dst[(j) * stride + off]`, `j` counted from the first
/// lane of the sub-block relative to the task's first row.
#[inline(always)]
fn scatter<V: Vector>(
    v: V,
    dst: &mut [V::E],
    row0: usize,
    valid: usize,
    stride: usize,
    off: usize,
    tmp: &mut [V::E],
) {
    v.store(tmp);
    for (j, &x) in tmp[..valid].iter().enumerate() {
        dst[(row0 + j) * stride + off] = x;
    }
}

/// Copies `valid` rows of `src` (row r at `(base_row + r) * len + t0`, `tl` steps) into the
/// `[time][lane]` buffer `buf`; missing lanes are zero. Whole W×W tiles go through
/// registers ([`transpose`]); strided scalar stores would compile to slow scatters.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_t<V: Vector>(
    src: &[V::E],
    base_row: usize,
    valid: usize,
    len: usize,
    t0: usize,
    tl: usize,
    buf: &mut [V::E],
) {
    let w = V::W;
    let full = tl / w * w;
    let mut tile = [V::zero(); 16];
    for k0 in (0..full).step_by(w) {
        for (j, v) in tile[..w].iter_mut().enumerate() {
            *v = if j < valid {
                V::load(&src[(base_row + j) * len + t0 + k0..])
            } else {
                V::zero()
            };
        }
        transpose(&mut tile[..w]);
        for (k, v) in tile[..w].iter().enumerate() {
            v.store(&mut buf[(k0 + k) * w..]);
        }
    }
    for k in full..tl {
        for j in 0..w {
            buf[k * w + j] = if j < valid {
                src[(base_row + j) * len + t0 + k]
            } else {
                V::E::ZERO
            };
        }
    }
}

/// Inverse of [`load_t`] for the valid lanes; `dst` starts at the first row.
#[inline(always)]
pub(crate) fn store_t<V: Vector>(
    dst: &mut [V::E],
    valid: usize,
    len: usize,
    t0: usize,
    tl: usize,
    buf: &[V::E],
) {
    let w = V::W;
    let full = tl / w * w;
    let mut tile = [V::zero(); 16];
    let mut lane = [V::E::ZERO; 16];
    for k0 in (0..full).step_by(w) {
        for (k, v) in tile[..w].iter_mut().enumerate() {
            *v = V::load(&buf[(k0 + k) * w..]);
        }
        transpose(&mut tile[..w]);
        for (j, v) in tile[..valid].iter().enumerate() {
            let row = &mut dst[j * len + t0 + k0..][..w];
            if w == row.len() {
                v.store(row);
            } else {
                v.store(&mut lane);
                row.copy_from_slice(&lane[..w]);
            }
        }
    }
    for j in 0..valid {
        for k in full..tl {
            dst[j * len + t0 + k] = buf[k * w + j];
        }
    }
}

/// Transposes the chunk `[t0, t0+tl)` of a variable matrix into `buf[k * N + n]`.
#[inline(always)]
fn load_var<T: Elem>(
    s: &ScanArgs<'_, T>,
    m: &Mat<'_, T>,
    b: usize,
    d: usize,
    t0: usize,
    tl: usize,
    buf: &mut [T],
) {
    if let Mat::Var { data, .. } = m {
        let n = s.dstate;
        for nn in 0..n {
            let row = &data[s.var_row(m, b, d, nn) + t0..][..tl];
            for (k, &x) in row.iter().enumerate() {
                buf[k * n + nn] = x;
            }
        }
    }
}

/// Coefficient `i` of B or C at chunk step `k`: a broadcast of the transposed variable
/// matrix, or the channel vector of a constant one. (A function rather than a closure, so
/// that it is compiled with the level's target features.)
#[inline(always)]
fn coef<V: Vector>(is_var: bool, var: &[V::E], fixed: &[V], k: usize, n: usize, i: usize) -> V {
    if is_var {
        V::splat(var[k * n + i])
    } else {
        fixed[i]
    }
}

/// Per-task vectors that do not change over time: A, constant B/C, D and delta_bias.
struct Params<V> {
    a: Vec<V>,
    b: Vec<V>,
    c: Vec<V>,
    d: Vec<V>,
    bias: Vec<V>,
}

#[inline(always)]
fn params<V: Vector>(s: &ScanArgs<'_, V::E>, t: Task, nsub: usize, tmp: &mut [V::E]) -> Params<V> {
    let n = s.dstate;
    let mut p = Params {
        a: Vec::new(),
        b: Vec::new(),
        c: Vec::new(),
        d: Vec::new(),
        bias: Vec::new(),
    };
    for sb in 0..nsub {
        let lanes = t.d0 + sb * V::W..t.d1;
        for nn in 0..n {
            p.a.push(gather(s.a, lanes.clone(), n, nn, V::E::ZERO, tmp));
            if let Mat::Const(x) = s.b {
                p.b.push(gather(x, lanes.clone(), n, nn, V::E::ZERO, tmp));
            }
            if let Mat::Const(x) = s.c {
                p.c.push(gather(x, lanes.clone(), n, nn, V::E::ZERO, tmp));
            }
        }
        let opt = |o: Option<&[V::E]>, tmp: &mut [V::E]| match o {
            Some(x) => gather(x, lanes.clone(), 1, 0, V::E::ZERO, tmp),
            None => V::zero(),
        };
        p.d.push(opt(s.d, tmp));
        p.bias.push(opt(s.delta_bias, tmp));
    }
    p
}

/// Δ for a `[time][lane]` chunk: `softplus(delta + bias)` or `delta + bias`, in place.
/// Returns nothing; `pre` keeps `delta + bias` when the caller needs it (backward).
#[inline(always)]
fn make_dt<V: Vector>(buf: &mut [V::E], pre: Option<&mut [V::E]>, bias: V, tl: usize, sp: bool) {
    let w = V::W;
    let mut pre = pre;
    for k in 0..tl {
        let x = V::load(&buf[k * w..]).add(bias);
        if let Some(p) = pre.as_deref_mut() {
            x.store(&mut p[k * w..]);
        }
        let dt = if sp { softplus(x) } else { x };
        dt.store(&mut buf[k * w..]);
    }
}

// --------------------------------------------------------------------------------------
// Forward
// --------------------------------------------------------------------------------------

struct Fwd<'s, 'a, T> {
    s: &'s ScanArgs<'a, T>,
    t: Task,
    out: &'s mut [T],
    last: &'s mut [T],
    ckpt: &'s mut [T],
}

impl<T: SimdElem> Kernel<T> for Fwd<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let Fwd {
            s,
            t,
            out,
            last,
            ckpt,
        } = self;
        let (w, n, len) = (V::W, s.dstate, s.len);
        let nck = n_chunks(len);
        let nsub = t.rows().div_ceil(w);
        let mut tmp = vec![T::ZERO; w];
        let p = params::<V>(s, t, nsub, &mut tmp);
        let mut h = vec![V::zero(); nsub * n];
        if let Some(h0) = s.h0 {
            for sb in 0..nsub {
                let lanes = t.d0 + sb * w..t.d1;
                for nn in 0..n {
                    h[sb * n + nn] = gather(
                        &h0[t.b * s.dim * n..],
                        lanes.clone(),
                        n,
                        nn,
                        T::ZERO,
                        &mut tmp,
                    );
                }
            }
        }
        let (mut bu, mut bdt, mut bz, mut by) = (
            vec![T::ZERO; CHUNK * w],
            vec![T::ZERO; CHUNK * w],
            vec![T::ZERO; CHUNK * w],
            vec![T::ZERO; CHUNK * w],
        );
        let (mut vb, mut vc) = (vec![T::ZERO; CHUNK * n], vec![T::ZERO; CHUNK * n]);
        let row_base = t.b * s.dim;
        for c in 0..nck {
            let t0 = c * CHUNK;
            let tl = CHUNK.min(len - t0);
            load_var(s, &s.b, t.b, t.d0, t0, tl, &mut vb);
            load_var(s, &s.c, t.b, t.d0, t0, tl, &mut vc);
            for sb in 0..nsub {
                let r0 = sb * w;
                let valid = w.min(t.rows() - r0);
                let hs = &mut h[sb * n..(sb + 1) * n];
                for (nn, hv) in hs.iter().enumerate() {
                    scatter(*hv, ckpt, r0, valid, nck * n, c * n + nn, &mut tmp);
                }
                load_t::<V>(s.u, row_base + t.d0 + r0, valid, len, t0, tl, &mut bu);
                load_t::<V>(s.delta, row_base + t.d0 + r0, valid, len, t0, tl, &mut bdt);
                if let Some(z) = s.z {
                    load_t::<V>(z, row_base + t.d0 + r0, valid, len, t0, tl, &mut bz);
                }
                make_dt::<V>(&mut bdt, None, p.bias[sb], tl, s.softplus);
                let a = &p.a[sb * n..(sb + 1) * n];
                let dv = p.d[sb];
                // Locals, so the innermost loop does not re-read the enums from memory.
                let (b_var, c_var, has_z) = (s.b.is_var(), s.c.is_var(), s.z.is_some());
                let pb: &[V] = if b_var {
                    &[]
                } else {
                    &p.b[sb * n..(sb + 1) * n]
                };
                let pc: &[V] = if c_var {
                    &[]
                } else {
                    &p.c[sb * n..(sb + 1) * n]
                };
                for k in 0..tl {
                    if s.reset(t.b, t0 + k) {
                        hs.fill(V::zero());
                    }
                    let dt = V::load(&bdt[k * w..]);
                    let x = V::load(&bu[k * w..]);
                    let dtx = dt.mul(x);
                    let mut y = dv.mul(x);
                    for nn in 0..n {
                        let da = exp(dt.mul(a[nn]));
                        let bn = coef::<V>(b_var, &vb, pb, k, n, nn);
                        let cn = coef::<V>(c_var, &vc, pc, k, n, nn);
                        let hn = hs[nn].fma(da, dtx.mul(bn));
                        hs[nn] = hn;
                        y = hn.fma(cn, y);
                    }
                    if has_z {
                        let zz = V::load(&bz[k * w..]);
                        y = y.mul(zz.mul(sigmoid(zz)));
                    }
                    y.store(&mut by[k * w..]);
                }
                store_t::<V>(&mut out[r0 * len..], valid, len, t0, tl, &by);
            }
        }
        for sb in 0..nsub {
            let r0 = sb * w;
            let valid = w.min(t.rows() - r0);
            for nn in 0..n {
                scatter(h[sb * n + nn], last, r0, valid, n, nn, &mut tmp);
            }
        }
    }
}

/// Outputs of the forward: `out (batch, dim, len)`, `last (batch, dim, N)` and the
/// checkpoints `(batch, dim, n_chunks(len), N)`.
pub struct FwdOut<'a, T> {
    pub out: &'a mut [T],
    pub last: &'a mut [T],
    pub ckpt: &'a mut [T],
}

pub fn forward<T: SimdElem>(level: Level, s: &ScanArgs<'_, T>, o: FwdOut<'_, T>) -> Result<()> {
    s.validate()?;
    let (d, l, n) = (s.dim, s.len, s.dstate);
    check_lens(&[
        ("out", o.out.len(), s.batch * d * l),
        ("last_state", o.last.len(), s.batch * d * n),
        ("checkpoints", o.ckpt.len(), s.batch * d * n_chunks(l) * n),
    ])?;
    let tasks = s.tasks();
    let rows: Vec<usize> = tasks.iter().map(Task::rows).collect();
    let lens = |k: usize| rows.iter().map(|r| r * k).collect::<Vec<_>>();
    let outs = pool::split_lengths(o.out, &lens(l));
    let lasts = pool::split_lengths(o.last, &lens(n));
    let ckpts = pool::split_lengths(o.ckpt, &lens(n_chunks(l) * n));
    let items: Vec<_> = tasks.into_iter().zip(outs).zip(lasts).zip(ckpts).collect();
    pool::for_each(items, s.batch * d * l * n, |_, (((t, out), last), ckpt)| {
        dispatch(
            level,
            Fwd {
                s,
                t,
                out,
                last,
                ckpt,
            },
        )
    });
    Ok(())
}

// --------------------------------------------------------------------------------------
// Backward
// --------------------------------------------------------------------------------------

/// Gradients. `da`, `dd`, `ddelta_bias` and constant `db`/`dc` are summed over the batch;
/// variable `db`/`dc` have the layout of `B`/`C`.
pub struct BwdOut<'a, T> {
    pub du: &'a mut [T],
    pub ddelta: &'a mut [T],
    pub da: &'a mut [T],
    pub db: &'a mut [T],
    pub dc: &'a mut [T],
    pub dd: Option<&'a mut [T]>,
    pub dz: Option<&'a mut [T]>,
    pub ddelta_bias: Option<&'a mut [T]>,
    pub dh0: &'a mut [T],
}

/// Per-task outputs of the backward.
struct BwdTaskOut<'s, T> {
    du: &'s mut [T],
    ddelta: &'s mut [T],
    dz: &'s mut [T],
    dh0: &'s mut [T],
    /// `(rows, N)` partial sums over time of this batch row.
    da: &'s mut [T],
    /// Constant B/C: `(rows, N)`; variable: `(N, len)` summed over the task's channels.
    db: &'s mut [T],
    dc: &'s mut [T],
    /// `(rows,)` each.
    dd: &'s mut [T],
    dbias: &'s mut [T],
}

struct Bwd<'s, 'a, T> {
    s: &'s ScanArgs<'a, T>,
    t: Task,
    ckpt: &'s [T],
    dout: &'s [T],
    dlast: Option<&'s [T]>,
    o: BwdTaskOut<'s, T>,
}

impl<T: SimdElem> Kernel<T> for Bwd<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let Bwd {
            s,
            t,
            ckpt,
            dout,
            dlast,
            o,
        } = self;
        let (w, n, len) = (V::W, s.dstate, s.len);
        let nck = n_chunks(len);
        let nsub = t.rows().div_ceil(w);
        let mut tmp = vec![T::ZERO; w];
        let p = params::<V>(s, t, nsub, &mut tmp);
        let row_base = t.b * s.dim;
        // Adjoint of the state, seeded with the gradient of the final state.
        let mut g = vec![V::zero(); nsub * n];
        if let Some(dl) = dlast {
            for sb in 0..nsub {
                let lanes = t.d0 + sb * w..t.d1;
                for nn in 0..n {
                    g[sb * n + nn] = gather(
                        &dl[t.b * s.dim * n..],
                        lanes.clone(),
                        n,
                        nn,
                        T::ZERO,
                        &mut tmp,
                    );
                }
            }
        }
        let zeros = || vec![V::zero(); nsub * n];
        let (mut acc_a, mut acc_b, mut acc_c) = (zeros(), zeros(), zeros());
        let (mut acc_d, mut acc_bias) = (vec![V::zero(); nsub], vec![V::zero(); nsub]);
        let buf = || vec![T::ZERO; CHUNK * w];
        let (mut bu, mut bdt, mut bpre, mut bz, mut bgo) = (buf(), buf(), buf(), buf(), buf());
        let (mut bdu, mut bddt, mut bdz) = (buf(), buf(), buf());
        let (mut vb, mut vc) = (vec![T::ZERO; CHUNK * n], vec![T::ZERO; CHUNK * n]);
        // States after each step of the chunk, and the decays.
        let mut hbuf = vec![V::zero(); CHUNK * n];
        let mut dabuf = vec![V::zero(); CHUNK * n];
        let mut hstart = vec![V::zero(); n];
        let mut ybuf = [V::zero(); CHUNK];
        // Variable B/C: per-step gradient vectors summed over the task's sub-blocks, then
        // reduced across lanes once per step (deterministic order).
        let (b_var, c_var) = (s.b.is_var(), s.c.is_var());
        let mut acc_vb = vec![V::zero(); if b_var { CHUNK * n } else { 0 }];
        let mut acc_vc = vec![V::zero(); if c_var { CHUNK * n } else { 0 }];
        let mut sums = vec![T::ZERO; n];
        for c in (0..nck).rev() {
            let t0 = c * CHUNK;
            let tl = CHUNK.min(len - t0);
            load_var(s, &s.b, t.b, t.d0, t0, tl, &mut vb);
            load_var(s, &s.c, t.b, t.d0, t0, tl, &mut vc);
            acc_vb.fill(V::zero());
            acc_vc.fill(V::zero());
            for sb in 0..nsub {
                let r0 = sb * w;
                let valid = w.min(t.rows() - r0);
                let rows0 = row_base + t.d0 + r0;
                load_t::<V>(s.u, rows0, valid, len, t0, tl, &mut bu);
                load_t::<V>(s.delta, rows0, valid, len, t0, tl, &mut bdt);
                load_t::<V>(dout, rows0, valid, len, t0, tl, &mut bgo);
                if let Some(z) = s.z {
                    load_t::<V>(z, rows0, valid, len, t0, tl, &mut bz);
                }
                make_dt::<V>(&mut bdt, Some(&mut bpre), p.bias[sb], tl, s.softplus);
                let a = &p.a[sb * n..(sb + 1) * n];
                let pb: &[V] = if b_var {
                    &[]
                } else {
                    &p.b[sb * n..(sb + 1) * n]
                };
                let pc: &[V] = if c_var {
                    &[]
                } else {
                    &p.c[sb * n..(sb + 1) * n]
                };
                // Recompute the chunk from its checkpoint: the state after every step
                // (`hbuf`), the decays (`dabuf`) and the pre-gate outputs (`ybuf`).
                for (nn, hv) in hstart.iter_mut().enumerate() {
                    *hv = gather(
                        &ckpt[r0 * nck * n..],
                        0..valid,
                        nck * n,
                        c * n + nn,
                        T::ZERO,
                        &mut tmp,
                    );
                }
                let mut h = hstart.clone();
                let dv = p.d[sb];
                for k in 0..tl {
                    if s.reset(t.b, t0 + k) {
                        h.fill(V::zero());
                    }
                    let dt = V::load(&bdt[k * w..]);
                    let x = V::load(&bu[k * w..]);
                    let dtx = dt.mul(x);
                    let mut y = dv.mul(x);
                    for nn in 0..n {
                        let da = exp(dt.mul(a[nn]));
                        dabuf[k * n + nn] = da;
                        h[nn] = h[nn].fma(da, dtx.mul(coef::<V>(b_var, &vb, pb, k, n, nn)));
                        hbuf[k * n + nn] = h[nn];
                        y = h[nn].fma(coef::<V>(c_var, &vc, pc, k, n, nn), y);
                    }
                    ybuf[k] = y;
                }
                // Adjoint sweep.
                let gs = &mut g[sb * n..(sb + 1) * n];
                let zeros = vec![V::zero(); n];
                for k in (0..tl).rev() {
                    let tt = t0 + k;
                    let dt = V::load(&bdt[k * w..]);
                    let x = V::load(&bu[k * w..]);
                    let go = V::load(&bgo[k * w..]);
                    let dtx = dt.mul(x);
                    let y = ybuf[k];
                    let dy = if s.z.is_some() {
                        let zz = V::load(&bz[k * w..]);
                        let sg = sigmoid(zz);
                        let one = V::splat(T::ONE);
                        // d silu(z)/dz = sg * (1 + z * (1 - sg))
                        let dsilu = sg.mul(zz.mul(one.sub(sg)).add(one));
                        go.mul(y).mul(dsilu).store(&mut bdz[k * w..]);
                        go.mul(zz.mul(sg))
                    } else {
                        go
                    };
                    let mut du = dv.mul(dy);
                    acc_d[sb] = dy.fma(x, acc_d[sb]);
                    let mut ddt = V::zero();
                    let mut sum_gb = V::zero();
                    let reset = s.reset(t.b, tt);
                    // The state the step read: zero after a reset, else the previous one.
                    let hprev: &[V] = if reset {
                        &zeros
                    } else if k > 0 {
                        &hbuf[(k - 1) * n..k * n]
                    } else {
                        &hstart
                    };
                    let hcur = &hbuf[k * n..(k + 1) * n];
                    for nn in 0..n {
                        let cn = coef::<V>(c_var, &vc, pc, k, n, nn);
                        let bn = coef::<V>(b_var, &vb, pb, k, n, nn);
                        let gn = cn.fma(dy, gs[nn]);
                        let hp = hprev[nn];
                        let da = dabuf[k * n + nn];
                        let gda = gn.mul(hp).mul(da);
                        ddt = gda.fma(a[nn], ddt);
                        acc_a[sb * n + nn] = gda.fma(dt, acc_a[sb * n + nn]);
                        if c_var {
                            acc_vc[k * n + nn] = hcur[nn].fma(dy, acc_vc[k * n + nn]);
                        } else {
                            acc_c[sb * n + nn] = hcur[nn].fma(dy, acc_c[sb * n + nn]);
                        }
                        if b_var {
                            acc_vb[k * n + nn] = gn.fma(dtx, acc_vb[k * n + nn]);
                        } else {
                            acc_b[sb * n + nn] = gn.fma(dtx, acc_b[sb * n + nn]);
                        }
                        sum_gb = gn.fma(bn, sum_gb);
                        gs[nn] = if reset { V::zero() } else { gn.mul(da) };
                    }
                    ddt = sum_gb.fma(x, ddt);
                    du = sum_gb.fma(dt, du);
                    if s.softplus {
                        ddt = ddt.mul(softplus_grad(V::load(&bpre[k * w..])));
                    }
                    acc_bias[sb] = acc_bias[sb].add(ddt);
                    du.store(&mut bdu[k * w..]);
                    ddt.store(&mut bddt[k * w..]);
                }
                store_t::<V>(&mut o.du[r0 * len..], valid, len, t0, tl, &bdu);
                store_t::<V>(&mut o.ddelta[r0 * len..], valid, len, t0, tl, &bddt);
                if s.z.is_some() {
                    store_t::<V>(&mut o.dz[r0 * len..], valid, len, t0, tl, &bdz);
                }
            }
            // This chunk's steps of variable dB/dC: one lane reduction per step.
            for (acc, dst) in [(&acc_vb, &mut *o.db), (&acc_vc, &mut *o.dc)] {
                if acc.is_empty() {
                    continue;
                }
                for kk in 0..tl {
                    sum_vectors(&acc[kk * n..(kk + 1) * n], &mut sums);
                    for (nn, &v) in sums.iter().enumerate() {
                        dst[nn * len + t0 + kk] = v;
                    }
                }
            }
        }
        for sb in 0..nsub {
            let r0 = sb * w;
            let valid = w.min(t.rows() - r0);
            for nn in 0..n {
                scatter(g[sb * n + nn], o.dh0, r0, valid, n, nn, &mut tmp);
                scatter(acc_a[sb * n + nn], o.da, r0, valid, n, nn, &mut tmp);
                if !s.b.is_var() {
                    scatter(acc_b[sb * n + nn], o.db, r0, valid, n, nn, &mut tmp);
                }
                if !s.c.is_var() {
                    scatter(acc_c[sb * n + nn], o.dc, r0, valid, n, nn, &mut tmp);
                }
            }
            scatter(acc_d[sb], o.dd, r0, valid, 1, 0, &mut tmp);
            scatter(acc_bias[sb], o.dbias, r0, valid, 1, 0, &mut tmp);
        }
    }
}

/// Backward of [`forward`]: `ckpt` is the forward's checkpoints, `dout` the gradient of
/// `out`, `dlast` that of the final state. Deterministic: every sum runs in a fixed order.
pub fn backward<T: SimdElem>(
    level: Level,
    s: &ScanArgs<'_, T>,
    ckpt: &[T],
    dout: &[T],
    dlast: Option<&[T]>,
    o: BwdOut<'_, T>,
) -> Result<()> {
    s.validate()?;
    let (bt, d, l, n) = (s.batch, s.dim, s.len, s.dstate);
    let mat_len = |m: &Mat<'_, T>| match m {
        Mat::Const(_) => d * n,
        Mat::Var { groups, .. } => bt * groups * n * l,
    };
    let dz = match (&o.dz, s.z) {
        (Some(x), Some(_)) => x.len(),
        _ => bt * d * l,
    };
    check_lens(&[
        ("checkpoints", ckpt.len(), bt * d * n_chunks(l) * n),
        ("dout", dout.len(), bt * d * l),
        (
            "dlast_state",
            dlast.map_or(bt * d * n, <[T]>::len),
            bt * d * n,
        ),
        ("du", o.du.len(), bt * d * l),
        ("ddelta", o.ddelta.len(), bt * d * l),
        ("dA", o.da.len(), d * n),
        ("dB", o.db.len(), mat_len(&s.b)),
        ("dC", o.dc.len(), mat_len(&s.c)),
        ("dh0", o.dh0.len(), bt * d * n),
        ("dz", dz, bt * d * l),
        ("dD", o.dd.as_deref().map_or(d, <[T]>::len), d),
        (
            "ddelta_bias",
            o.ddelta_bias.as_deref().map_or(d, <[T]>::len),
            d,
        ),
    ])?;

    let tasks = s.tasks();
    let nt = tasks.len();
    let rows: Vec<usize> = tasks.iter().map(Task::rows).collect();
    let lens = |k: usize| rows.iter().map(|r| r * k).collect::<Vec<_>>();
    // Per-batch-row partials, reduced over the batch (in order) below.
    let mut pa = vec![T::ZERO; bt * d * n];
    let mut pd = vec![T::ZERO; bt * d];
    let mut pbias = vec![T::ZERO; bt * d];
    let mat_part = |m: &Mat<'_, T>| if m.is_var() { n * l } else { 0 };
    let mut pb = vec![T::ZERO; if s.b.is_var() { nt * n * l } else { bt * d * n }];
    let mut pc = vec![T::ZERO; if s.c.is_var() { nt * n * l } else { bt * d * n }];
    let mut dz_scratch = Vec::new();
    let dz_all: &mut [T] = match (o.dz, s.z) {
        (Some(x), Some(_)) => x,
        _ => {
            dz_scratch.resize(bt * d * l, T::ZERO);
            &mut dz_scratch
        }
    };
    let part_lens = |m: &Mat<'_, T>| {
        if m.is_var() {
            vec![mat_part(m); nt]
        } else {
            lens(n)
        }
    };
    let items: Vec<_> = tasks
        .iter()
        .copied()
        .zip(pool::split_lengths(o.du, &lens(l)))
        .zip(pool::split_lengths(o.ddelta, &lens(l)))
        .zip(pool::split_lengths(dz_all, &lens(l)))
        .zip(pool::split_lengths(o.dh0, &lens(n)))
        .zip(pool::split_lengths(&mut pa, &lens(n)))
        .zip(pool::split_lengths(&mut pb, &part_lens(&s.b)))
        .zip(pool::split_lengths(&mut pc, &part_lens(&s.c)))
        .zip(pool::split_lengths(&mut pd, &lens(1)))
        .zip(pool::split_lengths(&mut pbias, &lens(1)))
        .map(
            |(((((((((t, du), ddelta), dz), dh0), da), db), dc), dd), dbias)| {
                (
                    t,
                    BwdTaskOut {
                        du,
                        ddelta,
                        dz,
                        dh0,
                        da,
                        db,
                        dc,
                        dd,
                        dbias,
                    },
                )
            },
        )
        .collect();
    let ckpts: Vec<&[T]> = {
        let mut v = Vec::with_capacity(nt);
        let mut rest = ckpt;
        for r in &rows {
            let (h, tl) = rest.split_at(r * n_chunks(l) * n);
            v.push(h);
            rest = tl;
        }
        v
    };
    pool::for_each(items, 3 * bt * d * l * n, |i, (t, o)| {
        dispatch(
            level,
            Bwd {
                s,
                t,
                ckpt: ckpts[i],
                dout,
                dlast,
                o,
            },
        )
    });

    // Deterministic reductions over the batch.
    let sum_batch = |part: &[T], dst: &mut [T], per: usize| {
        dst.fill(T::ZERO);
        for b in 0..bt {
            for (x, &p) in dst.iter_mut().zip(&part[b * per..(b + 1) * per]) {
                *x = *x + p;
            }
        }
    };
    sum_batch(&pa, o.da, d * n);
    if let Some(x) = o.dd {
        sum_batch(&pd, x, d);
    }
    if let Some(x) = o.ddelta_bias {
        sum_batch(&pbias, x, d);
    }
    for (m, part, dst) in [(&s.b, &pb, o.db), (&s.c, &pc, o.dc)] {
        match m {
            Mat::Const(_) => sum_batch(part, dst, d * n),
            Mat::Var { groups, .. } => {
                dst.fill(T::ZERO);
                let gsize = d / groups;
                for (i, t) in tasks.iter().enumerate() {
                    let g = t.d0 / gsize;
                    let off = (t.b * groups + g) * n * l;
                    for (x, &p) in dst[off..off + n * l]
                        .iter_mut()
                        .zip(&part[i * n * l..(i + 1) * n * l])
                    {
                        *x = *x + p;
                    }
                }
            }
        }
    }
    Ok(())
}
