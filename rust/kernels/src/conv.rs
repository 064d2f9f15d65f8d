//! Nilpotent shift state: causal depthwise convolution and its ring-buffer update, design §3.
//!
//! `y_t[d] = bias[d] + Σ_k w[d, k] · x_{t-K+1+k}[d]` (inputs before the start come from the
//! initial state, or are zero), optionally followed by SiLU.
//!
//! Layout: `x`, `out` `(batch, dim, len)`; `weight (dim, K)`; `bias (dim,)`; initial and
//! final states `(batch, dim, K-1)`, oldest first; `seq_idx (batch, len)`.
//!
//! A row (batch, channel) is contiguous in time, so vectors run along time inside a row:
//! the output vector at `t..t+W` is `bias + Σ_k w[k] · x[t-K+1+k ..]`. Positions whose taps
//! reach before the row start or across a change of `seq_idx` are computed one at a time.
//! Tasks are fixed blocks of rows (independent of the thread count) and the weight and bias
//! gradients are summed from per-row partials in batch order, so results are bitwise
//! independent of the number of threads.

use crate::cpu::pool;
use crate::cpu::{dispatch, sigmoid, Elem, Kernel, Level, SimdElem, Vector};
use crate::error::{check_lens, Error, Result};
use crate::slots::slot_rows;

/// Elements of a task (rows × length): large enough to pay for a task, small enough to
/// balance.
const TASK_ELEMS: usize = 1 << 14;

pub struct ConvArgs<'a, T> {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub width: usize,
    pub x: &'a [T],
    pub weight: &'a [T],
    pub bias: Option<&'a [T]>,
    pub init: Option<&'a [T]>,
    pub seq_idx: Option<&'a [i64]>,
    pub silu: bool,
}

/// One row's read-only inputs. `st[t]` is the first position of t's sequence (from
/// `seq_idx`); without it every tap is valid and taps before 0 read `init` (or zero).
struct Row<'r, T> {
    x: &'r [T],
    w: &'r [T],
    bias: T,
    init: Option<&'r [T]>,
    st: Option<&'r [i64]>,
}

impl<T: Elem> Row<'_, T> {
    /// Input `j` as seen by output `t` (j ≤ t, j may be negative).
    #[inline(always)]
    fn tap(&self, t: usize, j: isize) -> T {
        if j >= 0 {
            match self.st {
                Some(st) if (j as i64) < st[t] => T::ZERO,
                _ => self.x[j as usize],
            }
        } else {
            match (self.st, self.init) {
                (None, Some(h)) => h[(h.len() as isize + j) as usize],
                _ => T::ZERO,
            }
        }
    }

    /// Pre-activation at `t`, one position.
    #[inline(always)]
    fn pre_at(&self, t: usize) -> T {
        let km = self.w.len() - 1;
        let mut acc = self.bias;
        for (k, &wk) in self.w.iter().enumerate() {
            acc = wk * self.tap(t, t as isize + k as isize - km as isize) + acc;
        }
        acc
    }

    /// Whether outputs `t..t+n` have all their taps inside the row and their sequence.
    #[inline(always)]
    fn fast(&self, t: usize, n: usize) -> bool {
        let km = self.w.len() - 1;
        t >= km
            && t + n <= self.x.len()
            && self.st.is_none_or(|st| st[t + n - 1] <= (t - km) as i64)
    }

    /// Whether inputs `j..j+n` reach only outputs of their own sequence (the gradient's
    /// taps `t ∈ [j, j+K-1]`).
    #[inline(always)]
    fn fast_adj(&self, j: usize, n: usize) -> bool {
        let l = self.x.len();
        j + n <= l
            && self
                .st
                .is_none_or(|st| st[(j + n - 1 + self.w.len() - 1).min(l - 1)] <= j as i64)
    }
}

/// Splats the row's weights into `wv`.
#[inline(always)]
fn splat_weights<V: Vector>(w: &[V::E], wv: &mut Vec<V>) {
    wv.clear();
    wv.extend(w.iter().map(|&x| V::splat(x)));
}

/// Calls `f::<V, K>(args)` with the width as a constant for K ≤ 8 (the tap loops unroll
/// and blocks overlap in the pipeline) and `K = 0` (run-time width) beyond.
macro_rules! by_width {
    ($k:expr, $f:ident::<$v:ty>($($a:expr),*)) => {
        match $k {
            1 => $f::<$v, 1>($($a),*),
            2 => $f::<$v, 2>($($a),*),
            3 => $f::<$v, 3>($($a),*),
            4 => $f::<$v, 4>($($a),*),
            5 => $f::<$v, 5>($($a),*),
            6 => $f::<$v, 6>($($a),*),
            7 => $f::<$v, 7>($($a),*),
            8 => $f::<$v, 8>($($a),*),
            _ => $f::<$v, 0>($($a),*),
        }
    };
}

/// `dx_j = Σ_k w[k] · dpre_{j+K-1-k}` over one row (anti-causal taps of the same
/// sequence); `dp` is zero-padded past the row's end.
#[inline(always)]
fn dx_row<V: Vector, const KC: usize>(r: &Row<'_, V::E>, wv: &[V], dp: &[V::E], dxr: &mut [V::E]) {
    let (l, w) = (r.x.len(), V::W);
    let wv = &wv[..if KC > 0 { KC } else { wv.len() }];
    let km = wv.len() - 1;
    let mut j = 0;
    while j < l {
        if r.fast_adj(j, w) {
            let win = &dp[j..j + km + w];
            let mut acc = V::zero();
            for (kk, wk) in wv.iter().enumerate() {
                acc = wk.fma(V::load(&win[km - kk..]), acc);
            }
            acc.store(&mut dxr[j..j + w]);
            j += w;
        } else {
            let mut a = V::E::ZERO;
            for (kk, &wk) in r.w.iter().enumerate() {
                let t = j + km - kk;
                if t < l && r.st.is_none_or(|st| st[t] <= j as i64) {
                    a = wk * dp[t] + a;
                }
            }
            dxr[j] = a;
            j += 1;
        }
    }
}

/// Pre-activations of one row into `out (len)`, with SiLU applied if `act` (fused into
/// the vector blocks; runs of single positions get it afterwards).
#[inline(always)]
fn pre_row<V: Vector, const KC: usize>(r: &Row<'_, V::E>, wv: &[V], out: &mut [V::E], act: bool) {
    let (l, w) = (r.x.len(), V::W);
    let wv = &wv[..if KC > 0 { KC } else { wv.len() }];
    let km = wv.len() - 1; // a constant when KC > 0: the bounds checks below fold
    let bias = V::splat(r.bias);
    let mut t = 0;
    let mut run = None; // start of the current run of single positions
    while t < l {
        if r.fast(t, w) {
            if let Some(t0) = run.take() {
                if act {
                    silu_inplace::<V>(&mut out[t0..t]);
                }
            }
            let win = &r.x[t - km..t + w];
            let mut acc = bias;
            for (k, wk) in wv.iter().enumerate() {
                acc = wk.fma(V::load(&win[k..]), acc);
            }
            if act {
                acc = acc.mul(sigmoid(acc));
            }
            acc.store(&mut out[t..t + w]);
            t += w;
        } else if r.st.is_none() && km + w <= 64 {
            // The row's first or last positions: one vector block over a window padded
            // with the initial state (or zeros) before the row and zeros after it.
            if let Some(t0) = run.take() {
                if act {
                    silu_inplace::<V>(&mut out[t0..t]);
                }
            }
            let mut win = [V::E::ZERO; 64];
            for (i, v) in win[..km + w].iter_mut().enumerate() {
                let j = t as isize - km as isize + i as isize;
                if j < l as isize {
                    *v = r.tap(t, j);
                }
            }
            let valid = w.min(l - t);
            let mut acc = bias;
            for (k, wk) in wv.iter().enumerate() {
                acc = wk.fma(V::load(&win[k..]), acc);
            }
            if act {
                acc = acc.mul(sigmoid(acc));
            }
            let mut lane = [V::E::ZERO; 16];
            acc.store(&mut lane);
            out[t..t + valid].copy_from_slice(&lane[..valid]);
            t += valid;
        } else {
            run.get_or_insert(t);
            out[t] = r.pre_at(t);
            t += 1;
        }
    }
    if let (Some(t0), true) = (run, act) {
        silu_inplace::<V>(&mut out[t0..]);
    }
}

/// SiLU in place, a vector at a time (the tail through a padded vector, so every element
/// sees the same arithmetic). A plain function, not a closure argument: closures miss the
/// level's target features (see `dispatch`).
#[inline(always)]
fn silu_inplace<V: Vector>(buf: &mut [V::E]) {
    let w = V::W;
    let mut chunks = buf.chunks_exact_mut(w);
    for c in &mut chunks {
        let v = V::load(c);
        v.mul(sigmoid(v)).store(c);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let n = rest.len();
        let mut tmp = [V::E::ZERO; 16];
        tmp[..n].copy_from_slice(rest);
        let v = V::load(&tmp);
        v.mul(sigmoid(v)).store(&mut tmp);
        rest.copy_from_slice(&tmp[..n]);
    }
}

/// `d silu(p) / dp = s (1 + p (1 - s))` with `s = sigmoid(p)`.
#[inline(always)]
fn dsilu<V: Vector>(p: V) -> V {
    let one = V::splat(V::E::ONE);
    let s = sigmoid(p);
    s.mul(p.mul(one.sub(s)).add(one))
}

/// The last K-1 inputs of a row (initial ones included when len < K-1), oldest first.
fn final_row<T: Elem>(x: &[T], init: Option<&[T]>, fin: &mut [T]) {
    let (l, km) = (x.len() as isize, fin.len() as isize);
    for (i, f) in fin.iter_mut().enumerate() {
        let j = l - km + i as isize;
        *f = if j >= 0 {
            x[j as usize]
        } else {
            init.map_or(T::ZERO, |h| h[(km + j) as usize])
        };
    }
}

/// First position of each position's sequence, `(batch, len)`.
fn seg_starts(seq: &[i64], len: usize) -> Vec<i64> {
    let mut st = vec![0i64; seq.len()];
    if len == 0 {
        return st;
    }
    for (srow, qrow) in st.chunks_mut(len).zip(seq.chunks(len)) {
        let mut s0 = 0;
        for t in 0..len {
            if t > 0 && qrow[t] != qrow[t - 1] {
                s0 = t;
            }
            srow[t] = s0 as i64;
        }
    }
    st
}

fn check_args<T>(s: &ConvArgs<'_, T>) -> Result<()> {
    let (b, d, l, k) = (s.batch, s.dim, s.len, s.width);
    if k == 0 {
        return Err(Error::value("weight", "a width K >= 1", k));
    }
    if s.seq_idx.is_some() && s.init.is_some() {
        return Err(Error::invalid(
            "seq_idx",
            "cannot be combined with initial_states",
        ));
    }
    check_lens(&[
        ("x", s.x.len(), b * d * l),
        ("weight", s.weight.len(), d * k),
        ("bias", s.bias.map_or(d, <[T]>::len), d),
        (
            "initial_states",
            s.init.map_or(b * d * (k - 1), <[T]>::len),
            b * d * (k - 1),
        ),
        ("seq_idx", s.seq_idx.map_or(b * l, <[i64]>::len), b * l),
    ])
}

/// Row blocks: `(first row, rows)` of a fixed size that depends only on the length.
fn row_blocks(rows: usize, len: usize) -> Vec<(usize, usize)> {
    let per = (TASK_ELEMS / len.max(1)).max(1);
    (0..rows)
        .step_by(per)
        .map(|r0| (r0, per.min(rows - r0)))
        .collect()
}

/// Splits `data` into the per-block pieces of `per_row` elements per row.
fn split_rows<'a, T>(
    data: &'a mut [T],
    blocks: &[(usize, usize)],
    per_row: usize,
) -> Vec<&'a mut [T]> {
    let lens: Vec<usize> = blocks.iter().map(|&(_, n)| n * per_row).collect();
    pool::split_lengths(data, &lens)
}

fn row<'r, T: Elem>(s: &'r ConvArgs<'_, T>, st: &'r Option<Vec<i64>>, r: usize) -> Row<'r, T> {
    let (d, l, k) = (s.dim, s.len, s.width);
    let (b, c) = (r / d, r % d);
    Row {
        x: &s.x[r * l..(r + 1) * l],
        w: &s.weight[c * k..(c + 1) * k],
        bias: s.bias.map_or(T::ZERO, |bb| bb[c]),
        init: s.init.map(|h| &h[r * (k - 1)..(r + 1) * (k - 1)]),
        st: st.as_ref().map(|v| &v[b * l..(b + 1) * l]),
    }
}

// ---------------------------------------------------------------------------- forward

struct FwdTask<'s, 'a, T> {
    s: &'s ConvArgs<'a, T>,
    st: &'s Option<Vec<i64>>,
    r0: usize,
    rows: usize,
    out: &'s mut [T],
    fin: Option<&'s mut [T]>,
}

impl<T: SimdElem> Kernel<T> for FwdTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let FwdTask {
            s,
            st,
            r0,
            rows,
            out,
            mut fin,
        } = self;
        let (l, km) = (s.len, s.width - 1);
        if l < km + V::W {
            // No row is long enough for a vector block: every position is computed one at
            // a time, and the SiLU runs once over the whole task (the same vector
            // arithmetic per element as the fused blocks) instead of once per short row.
            for i in 0..rows {
                let r = row(s, st, r0 + i);
                for (t, o) in out[i * l..(i + 1) * l].iter_mut().enumerate() {
                    *o = r.pre_at(t);
                }
                if let Some(f) = fin.as_deref_mut() {
                    final_row(r.x, r.init, &mut f[i * km..(i + 1) * km]);
                }
            }
            if s.silu {
                silu_inplace::<V>(out);
            }
            return;
        }
        let mut wv = Vec::with_capacity(s.width);
        for i in 0..rows {
            let r = row(s, st, r0 + i);
            let o = &mut out[i * l..(i + 1) * l];
            splat_weights::<V>(r.w, &mut wv);
            by_width!(s.width, pre_row::<V>(&r, &wv, o, s.silu));
            if let Some(f) = fin.as_deref_mut() {
                final_row(r.x, r.init, &mut f[i * km..(i + 1) * km]);
            }
        }
    }
}

/// Forward: writes `out (batch, dim, len)` and, if given, `final_states (batch, dim, K-1)`.
pub fn conv_fwd<T: SimdElem>(
    level: Level,
    s: &ConvArgs<'_, T>,
    out: &mut [T],
    final_states: Option<&mut [T]>,
) -> Result<()> {
    check_args(s)?;
    let (rows, l, km) = (s.batch * s.dim, s.len, s.width - 1);
    check_lens(&[
        ("out", out.len(), rows * l),
        (
            "final_states",
            final_states.as_deref().map_or(rows * km, <[T]>::len),
            rows * km,
        ),
    ])?;
    let st = s.seq_idx.map(|q| seg_starts(q, l));
    let blocks = row_blocks(rows, l);
    let outs = split_rows(out, &blocks, l);
    let fins: Vec<Option<&mut [T]>> = match final_states {
        Some(f) => split_rows(f, &blocks, km).into_iter().map(Some).collect(),
        None => blocks.iter().map(|_| None).collect(),
    };
    let items: Vec<_> = blocks.into_iter().zip(outs).zip(fins).collect();
    pool::for_each(items, rows * l * s.width, |_, (((r0, n), out), fin)| {
        dispatch(
            level,
            FwdTask {
                s,
                st: &st,
                r0,
                rows: n,
                out,
                fin,
            },
        )
    });
    Ok(())
}

// ---------------------------------------------------------------------------- backward

/// Outputs of the backward: `dx (batch, dim, len)`, `dweight (dim, K)`, `dbias (dim,)`,
/// `dinit (batch, dim, K-1)` (only when there is an initial state).
pub struct ConvGrads<'a, T> {
    pub dx: &'a mut [T],
    pub dweight: &'a mut [T],
    pub dbias: &'a mut [T],
    pub dinit: Option<&'a mut [T]>,
}

struct BwdTask<'s, 'a, T> {
    s: &'s ConvArgs<'a, T>,
    st: &'s Option<Vec<i64>>,
    dout: &'s [T],
    dfinal: Option<&'s [T]>,
    r0: usize,
    rows: usize,
    dx: &'s mut [T],
    dinit: Option<&'s mut [T]>,
    /// `(rows, K+1)`: per-row dweight then dbias.
    part: &'s mut [T],
}

impl<T: SimdElem> Kernel<T> for BwdTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let BwdTask {
            s,
            st,
            dout,
            dfinal,
            r0,
            rows,
            dx,
            mut dinit,
            part,
        } = self;
        let (l, k, w) = (s.len, s.width, V::W);
        let km = k - 1;
        let mut wv = Vec::with_capacity(k);
        // dpre of the row, zero-padded on the right so the adjoint taps may read past L.
        let mut dp = vec![T::ZERO; l + km + w];
        for i in 0..rows {
            let rr = r0 + i;
            let r = row(s, st, rr);
            splat_weights::<V>(r.w, &mut wv);
            let go = &dout[rr * l..(rr + 1) * l];
            let dpl = &mut dp[..l];
            if s.silu {
                // Recompute the pre-activation rather than storing it in the forward.
                by_width!(k, pre_row::<V>(&r, &wv, dpl, false));
                let mut chunks = dpl.chunks_exact_mut(w);
                let mut gch = go.chunks_exact(w);
                for (c, g) in (&mut chunks).zip(&mut gch) {
                    V::load(g).mul(dsilu(V::load(c))).store(c);
                }
                let rest = chunks.into_remainder();
                if !rest.is_empty() {
                    let n = rest.len();
                    let (mut tp, mut tg) = ([T::ZERO; 16], [T::ZERO; 16]);
                    tp[..n].copy_from_slice(rest);
                    tg[..n].copy_from_slice(gch.remainder());
                    V::load(&tg).mul(dsilu(V::load(&tp))).store(&mut tp);
                    rest.copy_from_slice(&tp[..n]);
                }
            } else {
                dpl.copy_from_slice(go);
            }
            let dp = &dp[..];
            let p = &mut part[i * (k + 1)..(i + 1) * (k + 1)];

            // dweight[k] = Σ_t dpre_t · tap(t, t-K+1+k) and dbias = Σ_t dpre_t, over the
            // forward's blocks; one pass with register accumulators for common widths.
            match k {
                1 => dw_pass::<V, 1>(&r, dp, p),
                2 => dw_pass::<V, 2>(&r, dp, p),
                3 => dw_pass::<V, 3>(&r, dp, p),
                4 => dw_pass::<V, 4>(&r, dp, p),
                5 => dw_pass::<V, 5>(&r, dp, p),
                6 => dw_pass::<V, 6>(&r, dp, p),
                7 => dw_pass::<V, 7>(&r, dp, p),
                8 => dw_pass::<V, 8>(&r, dp, p),
                _ => dw_pass_any::<V>(&r, dp, p),
            }

            // dx_j = Σ_k w[k] · dpre_{j+K-1-k} (anti-causal taps of the same sequence).
            let dxr = &mut dx[i * l..(i + 1) * l];
            by_width!(k, dx_row::<V>(&r, &wv, dp, dxr));
            // Initial-state taps: input i-(K-1) reaches outputs t = i-k ≥ 0.
            let mut di = dinit.as_deref_mut().map(|d| &mut d[i * km..(i + 1) * km]);
            if let Some(di) = di.as_deref_mut() {
                for (ii, o) in di.iter_mut().enumerate() {
                    let mut a = T::ZERO;
                    for (kk, &wk) in r.w.iter().enumerate().take(ii + 1) {
                        let t = ii - kk;
                        if t < l {
                            a = wk * dp[t] + a;
                        }
                    }
                    *o = a;
                }
            }
            // The final state is the last K-1 inputs (initial ones when len < K-1).
            if let Some(df) = dfinal {
                let df = &df[rr * km..(rr + 1) * km];
                for (ii, &g) in df.iter().enumerate() {
                    let jj = l as isize - km as isize + ii as isize;
                    if jj >= 0 {
                        dxr[jj as usize] = dxr[jj as usize] + g;
                    } else if let Some(di) = di.as_deref_mut() {
                        let q = (km as isize + jj) as usize;
                        di[q] = di[q] + g;
                    }
                }
            }
        }
    }
}

/// dweight (`p[..K]`) and dbias (`p[K]`) of one row at a fixed width `KC`.
#[inline(always)]
fn dw_pass<V: Vector, const KC: usize>(r: &Row<'_, V::E>, dp: &[V::E], p: &mut [V::E]) {
    let (l, w, km) = (r.x.len(), V::W, KC - 1);
    let mut acc = [V::zero(); KC];
    let mut accb = V::zero();
    let mut sc = [V::E::ZERO; KC];
    let mut sb = V::E::ZERO;
    let mut t = 0;
    while t < l {
        if r.fast(t, w) {
            let g = V::load(&dp[t..t + w]);
            let win = &r.x[t - km..t + w];
            accb = accb.add(g);
            for (kk, a) in acc.iter_mut().enumerate() {
                *a = g.fma(V::load(&win[kk..]), *a);
            }
            t += w;
        } else {
            let g = dp[t];
            sb = sb + g;
            for (kk, c) in sc.iter_mut().enumerate() {
                *c = g * r.tap(t, t as isize + kk as isize - km as isize) + *c;
            }
            t += 1;
        }
    }
    for ((o, a), c) in p.iter_mut().zip(acc).zip(sc) {
        *o = a.hsum() + c;
    }
    p[KC] = accb.hsum() + sb;
}

/// [`dw_pass`] for any width: one pass per tap.
#[inline(always)]
fn dw_pass_any<V: Vector>(r: &Row<'_, V::E>, dp: &[V::E], p: &mut [V::E]) {
    let (l, w) = (r.x.len(), V::W);
    let k = r.w.len();
    let km = k - 1;
    for (kk, pk) in p[..=k].iter_mut().enumerate() {
        let mut acc = V::zero();
        let mut sc = V::E::ZERO;
        let mut t = 0;
        while t < l {
            if r.fast(t, w) {
                let g = V::load(&dp[t..]);
                // the last slot is dbias: the tap value is one
                acc = if kk == k {
                    acc.add(g)
                } else {
                    g.fma(V::load(&r.x[t + kk - km..]), acc)
                };
                t += w;
            } else {
                let v = if kk == k {
                    V::E::ONE
                } else {
                    r.tap(t, t as isize + kk as isize - km as isize)
                };
                sc = dp[t] * v + sc;
                t += 1;
            }
        }
        *pk = acc.hsum() + sc;
    }
}

/// Backward of [`conv_fwd`] given `dout (batch, dim, len)` and optionally
/// `dfinal (batch, dim, K-1)`.
pub fn conv_bwd<T: SimdElem>(
    level: Level,
    s: &ConvArgs<'_, T>,
    dout: &[T],
    dfinal: Option<&[T]>,
    g: ConvGrads<'_, T>,
) -> Result<()> {
    check_args(s)?;
    let (b, d, l, k) = (s.batch, s.dim, s.len, s.width);
    let (rows, km) = (b * d, k - 1);
    check_lens(&[
        ("dout", dout.len(), rows * l),
        (
            "dfinal_states",
            dfinal.map_or(rows * km, <[T]>::len),
            rows * km,
        ),
        ("dx", g.dx.len(), rows * l),
        ("dweight", g.dweight.len(), d * k),
        ("dbias", g.dbias.len(), d),
        (
            "dinitial_states",
            g.dinit.as_deref().map_or(rows * km, <[T]>::len),
            rows * km,
        ),
    ])?;
    if g.dinit.is_some() && s.init.is_none() {
        return Err(Error::invalid(
            "dinitial_states",
            "given without initial_states",
        ));
    }
    let st = s.seq_idx.map(|q| seg_starts(q, l));
    let blocks = row_blocks(rows, l);
    let mut part = vec![T::ZERO; rows * (k + 1)];
    let dxs = split_rows(g.dx, &blocks, l);
    let parts = split_rows(&mut part, &blocks, k + 1);
    let dis: Vec<Option<&mut [T]>> = match g.dinit {
        Some(di) => split_rows(di, &blocks, km).into_iter().map(Some).collect(),
        None => blocks.iter().map(|_| None).collect(),
    };
    let items: Vec<_> = blocks.into_iter().zip(dxs).zip(parts).zip(dis).collect();
    pool::for_each(
        items,
        3 * rows * l * k,
        |_, ((((r0, n), dx), part), dinit)| {
            dispatch(
                level,
                BwdTask {
                    s,
                    st: &st,
                    dout,
                    dfinal,
                    r0,
                    rows: n,
                    dx,
                    dinit,
                    part,
                },
            )
        },
    );
    // Per-row partials summed over the batch in a fixed order.
    g.dweight.fill(T::ZERO);
    g.dbias.fill(T::ZERO);
    for pb in part.chunks_exact((d * (k + 1)).max(1)) {
        for (c, pr) in pb.chunks_exact(k + 1).enumerate() {
            for (dw, &p) in g.dweight[c * k..(c + 1) * k].iter_mut().zip(pr) {
                *dw = *dw + p;
            }
            g.dbias[c] = g.dbias[c] + pr[k];
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------- update

/// Streaming update of a pool of conv states `(slots, dim, S)`, S ≥ K-1, with `x`/`out`
/// `(batch, dim, T)`. Without `cache_seqlens` a state is a shift buffer (newest last);
/// with it, a circular buffer whose next write index is `cache_seqlens[b] mod S`.
/// `slots[b]` picks row b's state (negative: padding row, zero output, nothing written).
pub struct UpdateArgs<'a, T> {
    pub batch: usize,
    pub dim: usize,
    pub ntok: usize,
    pub width: usize,
    pub state_len: usize,
    pub x: &'a [T],
    pub weight: &'a [T],
    pub bias: Option<&'a [T]>,
    pub silu: bool,
    pub cache_seqlens: Option<&'a [i64]>,
    pub slots: Option<&'a [i64]>,
}

struct UpdTask<'s, 'a, T> {
    s: &'s UpdateArgs<'a, T>,
    b: usize,
    state: &'s mut [T],
    out: &'s mut [T],
}

impl<T: SimdElem> Kernel<T> for UpdTask<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let UpdTask { s, b, state, out } = self;
        let (nt, k, sl) = (s.ntok, s.width, s.state_len);
        let km = k - 1;
        // Next write index of the ring buffer (reduced first: no overflow for any input).
        let c0 = s
            .cache_seqlens
            .map(|c| c[b].rem_euclid(sl.max(1) as i64) as usize);
        if nt == 1 && c0.is_none() && sl == km && (2..=5).contains(&k) {
            // The decode step with a state of exactly K-1 inputs, at a fixed width.
            let xs = &s.x[b * s.dim..(b + 1) * s.dim];
            match k {
                2 => shift_one::<T, 2>(state, xs, s.weight, s.bias, out),
                3 => shift_one::<T, 3>(state, xs, s.weight, s.bias, out),
                4 => shift_one::<T, 4>(state, xs, s.weight, s.bias, out),
                _ => shift_one::<T, 5>(state, xs, s.weight, s.bias, out),
            }
            if s.silu {
                silu_inplace::<V>(out);
            }
            return;
        }
        let mut win = vec![T::ZERO; km + nt];
        for (d, orow) in out.chunks_exact_mut(nt).enumerate() {
            let srow = &mut state[d * sl..(d + 1) * sl];
            let xr = &s.x[(b * s.dim + d) * nt..(b * s.dim + d + 1) * nt];
            let w = &s.weight[d * k..(d + 1) * k];
            let bias = s.bias.map_or(T::ZERO, |bb| bb[d]);
            // Window: the K-1 newest state entries, then the new tokens.
            match c0 {
                None => win[..km].copy_from_slice(&srow[sl - km..]),
                Some(c) => {
                    for (j, v) in win[..km].iter_mut().enumerate() {
                        *v = srow[(c + sl - km + j) % sl];
                    }
                }
            }
            win[km..].copy_from_slice(xr);
            for (t, o) in orow.iter_mut().enumerate() {
                let mut acc = bias;
                for (kk, &wk) in w.iter().enumerate() {
                    acc = wk * win[t + kk] + acc;
                }
                *o = acc;
            }
            if sl == 0 {
                continue;
            }
            match c0 {
                None if nt >= sl => srow.copy_from_slice(&xr[nt - sl..]),
                None => {
                    srow.copy_within(nt.., 0);
                    srow[sl - nt..].copy_from_slice(xr);
                }
                Some(c) => {
                    for (t, &v) in xr.iter().enumerate() {
                        srow[(c + t) % sl] = v;
                    }
                }
            }
        }
        if s.silu {
            silu_inplace::<V>(out);
        }
    }
}

/// One token into shift states of exactly `K-1` inputs per channel (`state (dim, K-1)`,
/// `x`/`out` `(dim,)`); fixed sizes, so the window moves stay in registers.
#[inline(always)]
fn shift_one<T: Elem, const K: usize>(
    state: &mut [T],
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    out: &mut [T],
) {
    let km = K - 1;
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![T::ZERO; out.len()];
            &zeros[..]
        }
    };
    let rows = out
        .iter_mut()
        .zip(x)
        .zip(state.chunks_exact_mut(km))
        .zip(weight.chunks_exact(K))
        .zip(bias);
    for ((((o, &xv), srow), w), &bb) in rows {
        let mut win = [T::ZERO; K];
        win[..km].copy_from_slice(srow);
        win[km] = xv;
        let mut acc = bb;
        for (&wk, &v) in w.iter().zip(&win) {
            acc = wk * v + acc;
        }
        *o = acc;
        srow.copy_from_slice(&win[1..]);
    }
}

/// Validates everything (shapes, slot range, duplicate slots), then updates `state` in
/// place and writes `out`.
pub fn conv_update<T: SimdElem>(
    level: Level,
    s: &UpdateArgs<'_, T>,
    state: &mut [T],
    slots_total: usize,
    out: &mut [T],
) -> Result<()> {
    let (bt, d, nt, k, sl) = (s.batch, s.dim, s.ntok, s.width, s.state_len);
    if k == 0 {
        return Err(Error::value("weight", "a width K >= 1", k));
    }
    if sl < k - 1 {
        return Err(Error::value(
            "conv_state",
            format!("a state length >= K-1 = {}", k - 1),
            sl,
        ));
    }
    check_lens(&[
        ("x", s.x.len(), bt * d * nt),
        ("weight", s.weight.len(), d * k),
        ("bias", s.bias.map_or(d, <[T]>::len), d),
        ("conv_state", state.len(), slots_total * d * sl),
        ("out", out.len(), bt * d * nt),
        (
            "cache_seqlens",
            s.cache_seqlens.map_or(bt, <[i64]>::len),
            bt,
        ),
        ("conv_state_indices", s.slots.map_or(bt, <[i64]>::len), bt),
    ])?;
    let slot_of = slot_rows("conv_state_indices", "conv_state", s.slots, bt, slots_total)?;
    if bt == 0 || d == 0 || nt == 0 {
        return Ok(());
    }
    let mut srows: Vec<Option<&mut [T]>> = if sl == 0 {
        (0..slots_total).map(|_| Some(&mut [][..])).collect()
    } else {
        state.chunks_mut(d * sl).map(Some).collect()
    };
    let items: Vec<_> = out
        .chunks_mut(d * nt)
        .enumerate()
        .map(|(b, o)| (o, slot_of[b].and_then(|su| srows[su].take())))
        .collect();
    pool::for_each(items, bt * d * nt * k, |b, (out, st)| match st {
        Some(state) => dispatch(level, UpdTask { s, b, state, out }),
        None => out.fill(T::ZERO),
    });
    Ok(())
}
