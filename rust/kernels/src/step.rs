//! Streaming step of the selective SSM (design §2.3): one or several tokens per sequence,
//! updating a pool of states in place.
//!
//! Layout: `state (slots, dim, N)`; `x`, `dt`, `z`, `out` are `(batch, T, dim)`; `B`/`C`
//! `(batch, T, G, N)`; `A (dim, N)`; `D`, `dt_bias (dim,)`; `slots (batch,)` maps each
//! batch row to its state slot (negative: padding row, output zero, nothing written);
//! `snapshots (batch, T, dim, N)` receives the state after every token.
//!
//! The state of a channel is contiguous over N, so vectors run across N here (padded to
//! a whole number of vectors with zero A/B/C lanes, which stay exactly zero).
//!
//! Everything is validated before the first write, so a failed call changes nothing.

use crate::cpu::pool;
use crate::cpu::{
    dispatch, exp, sigmoid, softplus, sum_rows, Elem, Kernel, Level, SimdElem, Vector,
};
use crate::error::{check_lens, Error, Result};
use crate::slots::slot_rows;

pub struct StepArgs<'a, T> {
    pub batch: usize,
    pub ntok: usize,
    pub dim: usize,
    pub dstate: usize,
    pub groups: usize,
    pub x: &'a [T],
    pub dt: &'a [T],
    pub a: &'a [T],
    pub b: &'a [T],
    pub c: &'a [T],
    pub d: Option<&'a [T]>,
    pub z: Option<&'a [T]>,
    pub dt_bias: Option<&'a [T]>,
    pub softplus: bool,
    pub slots: Option<&'a [i64]>,
}

struct Task<'s, 'a, T> {
    s: &'s StepArgs<'a, T>,
    b: usize,
    /// `(dim, N)`: this row's state slot.
    state: &'s mut [T],
    /// `(T, dim)`: this row's output.
    out: &'s mut [T],
    snaps: Option<&'s mut [T]>,
}

impl<T: SimdElem> Kernel<T> for Task<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let Task {
            s,
            b,
            state,
            out,
            mut snaps,
        } = self;
        let (w, n, nt) = (V::W, s.dstate, s.ntok);
        let rows = s.dim; // channels, one state row each
        let nv = n.div_ceil(w);
        let np = nv * w;
        let pad = |src: &[T], dst: &mut Vec<T>| {
            dst.clear();
            dst.extend_from_slice(src);
            dst.resize(np, T::ZERO);
        };
        let (mut hrow, mut arow, mut brow, mut crow) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Per-channel quantities of one token, vectorised across channels: Δ, Δ·x, the
        // output gate silu(z) and D·x; `y` collects C·h.
        let rp = rows.div_ceil(w) * w;
        let (mut dts, mut dtx, mut gate, mut dx, mut y) = (
            vec![T::ZERO; rp],
            vec![T::ZERO; rp],
            vec![T::ZERO; rp],
            vec![T::ZERO; rp],
            vec![T::ZERO; rp],
        );
        let mut lane = vec![T::ZERO; w];
        // C·h per channel as a vector, reduced after the channel loop so the horizontal
        // sums stay off the loop's critical path.
        let mut accs = vec![T::ZERO; w * w];
        let (mut bv, mut cv): (Vec<V>, Vec<V>) = (Vec::new(), Vec::new());
        let gsize = rows / s.groups;
        for k in 0..nt {
            let base = (b * nt + k) * rows;
            // Whole vectors load straight from the slice; only the last, partial one is
            // assembled lane by lane.
            for i in 0..rp / w {
                let o = i * w;
                let xv = fetch::<V>(Some(s.x), base, i * w, rows, &mut lane);
                let pre = fetch::<V>(Some(s.dt), base, i * w, rows, &mut lane).add(fetch::<V>(
                    s.dt_bias,
                    0,
                    i * w,
                    rows,
                    &mut lane,
                ));
                let dt = if s.softplus { softplus(pre) } else { pre };
                dt.store(&mut dts[o..]);
                dt.mul(xv).store(&mut dtx[o..]);
                fetch::<V>(s.d, 0, i * w, rows, &mut lane)
                    .mul(xv)
                    .store(&mut dx[o..]);
                let g = match s.z {
                    Some(z) => {
                        let zz = fetch::<V>(Some(z), base, i * w, rows, &mut lane);
                        zz.mul(sigmoid(zz))
                    }
                    None => V::splat(T::ONE),
                };
                g.store(&mut gate[o..]);
            }
            // Blocks of at most W channels of one group: their C·h vectors go to a W×W
            // buffer (in L1) and are reduced together by `sum_rows`.
            let mut r0 = 0;
            while r0 < rows {
                let g = r0 / gsize;
                let r1 = rows.min((g + 1) * gsize).min(r0 + w);
                let boff = ((b * nt + k) * s.groups + g) * n;
                let (bsl, csl) = (&s.b[boff..boff + n], &s.c[boff..boff + n]);
                let acc_blk = &mut accs[..(r1 - r0) * w];
                if np == n {
                    bv.clear();
                    for c in bsl.chunks_exact(w) {
                        bv.push(V::load(c));
                    }
                    cv.clear();
                    for c in csl.chunks_exact(w) {
                        cv.push(V::load(c));
                    }
                    let (hs, as_) = (&mut state[r0 * n..r1 * n], &s.a[r0 * n..r1 * n]);
                    if nv == 1 {
                        // N fills exactly one vector (Mamba's N = 16 with AVX-512).
                        one_vector_channels::<V>(
                            hs,
                            as_,
                            &dts[r0..r1],
                            &dtx[r0..r1],
                            bv[0],
                            cv[0],
                            acc_blk,
                        );
                    } else {
                        let rows_h = hs.chunks_exact_mut(n).zip(as_.chunks_exact(n));
                        for (r, ((hr, ar), o)) in
                            (r0..).zip(rows_h.zip(acc_blk.chunks_exact_mut(w)))
                        {
                            channel::<V>(hr, ar, dts[r], dtx[r], &bv, &cv).store(o);
                        }
                    }
                } else {
                    // N not a whole number of vectors: work on zero-padded copies (padding
                    // lanes have A = B = C = 0 and stay exactly zero).
                    pad(bsl, &mut brow);
                    pad(csl, &mut crow);
                    bv.clear();
                    for c in brow.chunks_exact(w) {
                        bv.push(V::load(c));
                    }
                    cv.clear();
                    for c in crow.chunks_exact(w) {
                        cv.push(V::load(c));
                    }
                    for (r, o) in (r0..r1).zip(acc_blk.chunks_exact_mut(w)) {
                        pad(&state[r * n..(r + 1) * n], &mut hrow);
                        pad(&s.a[r * n..(r + 1) * n], &mut arow);
                        channel::<V>(&mut hrow, &arow, dts[r], dtx[r], &bv, &cv).store(o);
                        state[r * n..(r + 1) * n].copy_from_slice(&hrow[..n]);
                    }
                }
                sum_rows::<V>(acc_blk, &mut y[r0..r1]);
                if let Some(sn) = snaps.as_deref_mut() {
                    sn[(k * rows + r0) * n..(k * rows + r1) * n]
                        .copy_from_slice(&state[r0 * n..r1 * n]);
                }
                r0 = r1;
            }
            let orow = &mut out[k * rows..][..rows];
            for i in 0..rp / w {
                let o = i * w;
                let v = V::load(&y[o..])
                    .add(V::load(&dx[o..]))
                    .mul(V::load(&gate[o..]));
                v.store(&mut lane);
                let m = w.min(rows - o);
                orow[o..o + m].copy_from_slice(&lane[..m]);
            }
        }
    }
}

/// Channels `o..o + W` of `src[off..]` as a vector (zero past `rows` or when `src` is
/// absent). A function, not a closure: closures are not compiled with the level's target
/// features, so their vector code would not inline into the kernel.
#[inline(always)]
fn fetch<V: Vector>(
    src: Option<&[V::E]>,
    off: usize,
    o: usize,
    rows: usize,
    lane: &mut [V::E],
) -> V {
    let w = V::W;
    match src {
        None => V::zero(),
        Some(x) if o + w <= rows => V::load(&x[off + o..off + o + w]),
        Some(x) => {
            for (j, v) in lane.iter_mut().enumerate() {
                *v = if o + j < rows {
                    x[off + o + j]
                } else {
                    V::E::ZERO
                };
            }
            V::load(lane)
        }
    }
}

/// One channel's update `h = exp(Δ A) h + Δ x B` over its N states (a whole number of
/// vectors); returns the vector of partial sums of C·h.
#[inline(always)]
fn channel<V: Vector>(h: &mut [V::E], a: &[V::E], dt: V::E, dtx: V::E, bv: &[V], cv: &[V]) -> V {
    let (dtv, dtxv) = (V::splat(dt), V::splat(dtx));
    let mut acc = V::zero();
    for (((hc, ac), bb), cc) in h
        .chunks_exact_mut(V::W)
        .zip(a.chunks_exact(V::W))
        .zip(bv)
        .zip(cv)
    {
        let da = exp(dtv.mul(V::load(ac)));
        let hn = V::load(hc).fma(da, dtxv.mul(*bb));
        hn.store(hc);
        acc = hn.fma(*cc, acc);
    }
    acc
}

/// Channels whose N states fill exactly one vector, two per iteration (independent `exp`
/// chains for the out-of-order core). Writes each channel's vector C ⊙ h into `accs`.
#[inline(always)]
fn one_vector_channels<V: Vector>(
    h: &mut [V::E],
    a: &[V::E],
    dt: &[V::E],
    dtx: &[V::E],
    bv: V,
    cv: V,
    accs: &mut [V::E],
) {
    let w = V::W;
    let mut hp = h.chunks_exact_mut(2 * w);
    let mut ap = a.chunks_exact(2 * w);
    let mut op = accs.chunks_exact_mut(2 * w);
    let mut r = 0;
    for ((hc, ac), oc) in (&mut hp).zip(&mut ap).zip(&mut op) {
        let da0 = exp(V::splat(dt[r]).mul(V::load(&ac[..w])));
        let da1 = exp(V::splat(dt[r + 1]).mul(V::load(&ac[w..])));
        let h0 = V::load(&hc[..w]).fma(da0, V::splat(dtx[r]).mul(bv));
        let h1 = V::load(&hc[w..]).fma(da1, V::splat(dtx[r + 1]).mul(bv));
        h0.store(&mut hc[..w]);
        h1.store(&mut hc[w..]);
        h0.mul(cv).store(&mut oc[..w]);
        h1.mul(cv).store(&mut oc[w..]);
        r += 2;
    }
    let (hc, ac, oc) = (hp.into_remainder(), ap.remainder(), op.into_remainder());
    if !hc.is_empty() {
        let h0 = V::load(hc).fma(
            exp(V::splat(dt[r]).mul(V::load(ac))),
            V::splat(dtx[r]).mul(bv),
        );
        h0.store(hc);
        h0.mul(cv).store(oc);
    }
}

/// Validates everything, then updates `state` in place and writes `out`.
pub fn step<T: SimdElem>(
    level: Level,
    s: &StepArgs<'_, T>,
    state: &mut [T],
    slots_total: usize,
    out: &mut [T],
    snapshots: Option<&mut [T]>,
) -> Result<()> {
    let (bt, nt, d, n, g) = (s.batch, s.ntok, s.dim, s.dstate, s.groups);
    if n == 0 {
        return Err(Error::value("A", "a state size N >= 1", n));
    }
    if g == 0 || d % g != 0 {
        return Err(Error::invalid(
            "B",
            format!("{g} groups do not divide dim {d}"),
        ));
    }
    check_lens(&[
        ("x", s.x.len(), bt * nt * d),
        ("dt", s.dt.len(), bt * nt * d),
        ("A", s.a.len(), d * n),
        ("B", s.b.len(), bt * nt * g * n),
        ("C", s.c.len(), bt * nt * g * n),
        ("D", s.d.map_or(d, <[T]>::len), d),
        ("z", s.z.map_or(bt * nt * d, <[T]>::len), bt * nt * d),
        ("dt_bias", s.dt_bias.map_or(d, <[T]>::len), d),
        ("state", state.len(), slots_total * d * n),
        ("out", out.len(), bt * nt * d),
        ("state_batch_indices", s.slots.map_or(bt, <[i64]>::len), bt),
        (
            "intermediate_states",
            snapshots.as_deref().map_or(bt * nt * d * n, <[T]>::len),
            bt * nt * d * n,
        ),
    ])?;
    // Row -> slot, rejecting out-of-range and duplicate slots before touching anything.
    let slot_of = slot_rows("state_batch_indices", "state", s.slots, bt, slots_total)?;

    if bt == 0 || nt == 0 || d == 0 {
        return Ok(());
    }
    // One task per batch row, holding its own state slot, output row and snapshot row.
    // (Cutting a single row into channel blocks for the pool was measured slower: waking
    // the pool costs more than a whole decode step.)
    let mut slot_rows: Vec<Option<&mut [T]>> = state.chunks_mut(d * n).map(Some).collect();
    let snap_rows: Vec<Option<&mut [T]>> = match snapshots {
        Some(sn) => sn.chunks_mut(nt * d * n).map(Some).collect(),
        None => (0..bt).map(|_| None).collect(),
    };
    let items: Vec<_> = out
        .chunks_mut(nt * d)
        .zip(snap_rows)
        .enumerate()
        .map(|(b, (o, sn))| (o, sn, slot_of[b].and_then(|su| slot_rows[su].take())))
        .collect();
    pool::for_each(
        items,
        bt * nt * d * n,
        |b, (out, snaps, state)| match state {
            Some(state) => dispatch(
                level,
                Task {
                    s,
                    b,
                    state,
                    out,
                    snaps,
                },
            ),
            None => out.fill(T::ZERO), // padding row: zero output, nothing written
        },
    );
    Ok(())
}
