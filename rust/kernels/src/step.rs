//! Streaming step of the selective SSM (SPEC §2.3): one or several tokens per sequence,
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

use crate::dispatch::{dispatch, Kernel, Level, SimdElem};
use crate::pool;
use crate::selective::BLOCK;
use crate::simd::{exp, sigmoid, softplus, Vector};

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
    d0: usize,
    /// `(rows, N)` state rows of this task.
    state: &'s mut [T],
    /// `(T, dim)` output of this batch row; the task writes its channels.
    out: &'s mut [T],
    snaps: Option<&'s mut [T]>,
    rows: usize,
}

impl<T: SimdElem> Kernel<T> for Task<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let Task {
            s,
            b,
            d0,
            state,
            out,
            mut snaps,
            rows,
        } = self;
        let (w, n, dim, nt) = (V::W, s.dstate, s.dim, s.ntok);
        let nv = n.div_ceil(w);
        let np = nv * w;
        let pad = |src: &[T], dst: &mut Vec<T>| {
            dst.clear();
            dst.extend_from_slice(src);
            dst.resize(np, T::ZERO);
        };
        let (mut hrow, mut arow, mut brow, mut crow) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut dts = vec![T::ZERO; rows.div_ceil(w) * w];
        let mut ztmp = vec![T::ZERO; w];
        let gsize = dim / s.groups;
        for k in 0..nt {
            let base = (b * nt + k) * dim + d0;
            // Δ for the task's channels, vectorised across channels.
            for (i, ch) in dts.chunks_mut(w).enumerate() {
                for (j, v) in ch.iter_mut().enumerate() {
                    let r = i * w + j;
                    *v = if r < rows {
                        s.dt[base + r] + s.dt_bias.map_or(T::ZERO, |x| x[d0 + r])
                    } else {
                        T::ZERO
                    };
                }
                let v = V::load(ch);
                let v = if s.softplus { softplus(v) } else { v };
                v.store(ch);
            }
            for r in 0..rows {
                let d = d0 + r;
                let g = d / gsize;
                let boff = ((b * nt + k) * s.groups + g) * n;
                // Padded copies only when N is not a whole number of vectors.
                let (h_s, a_s, b_s, c_s): (&mut [T], &[T], &[T], &[T]) = if np == n {
                    (
                        &mut state[r * n..(r + 1) * n],
                        &s.a[d * n..(d + 1) * n],
                        &s.b[boff..boff + n],
                        &s.c[boff..boff + n],
                    )
                } else {
                    pad(&state[r * n..(r + 1) * n], &mut hrow);
                    pad(&s.a[d * n..(d + 1) * n], &mut arow);
                    pad(&s.b[boff..boff + n], &mut brow);
                    pad(&s.c[boff..boff + n], &mut crow);
                    (&mut hrow, &arow, &brow, &crow)
                };
                let dt = dts[r];
                let xv = s.x[base + r];
                let dtv = V::splat(dt);
                let dtx = V::splat(dt * xv);
                let mut acc = V::zero();
                for i in 0..nv {
                    let o = i * w;
                    let da = exp(dtv.mul(V::load(&a_s[o..])));
                    let h = V::load(&h_s[o..]).fma(da, dtx.mul(V::load(&b_s[o..])));
                    h.store(&mut h_s[o..]);
                    acc = h.fma(V::load(&c_s[o..]), acc);
                }
                if np != n {
                    state[r * n..(r + 1) * n].copy_from_slice(&hrow[..n]);
                }
                if let Some(sn) = snaps.as_deref_mut() {
                    sn[(k * rows + r) * n..][..n].copy_from_slice(&state[r * n..(r + 1) * n]);
                }
                let mut y = acc.hsum() + s.d.map_or(T::ZERO, |x| x[d] * xv);
                if let Some(z) = s.z {
                    // silu through the vector sigmoid, so every level shares one formula.
                    let zz = V::splat(z[base + r]);
                    zz.mul(sigmoid(zz)).store(&mut ztmp);
                    y = y * ztmp[0];
                }
                out[k * dim + d0 + r] = y;
            }
        }
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
) -> Result<(), String> {
    let (bt, nt, d, n, g) = (s.batch, s.ntok, s.dim, s.dstate, s.groups);
    if n == 0 {
        return Err("A: the state size N must be >= 1".into());
    }
    if g == 0 || d % g != 0 {
        return Err(format!("B: {g} groups do not divide dim {d}"));
    }
    let lens = [
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
    ];
    for (name, got, want) in lens {
        if got != want {
            return Err(format!("{name}: expected {want} elements, got {got}"));
        }
    }
    // Row -> slot, rejecting out-of-range and duplicate slots before touching anything.
    let mut owner = vec![usize::MAX; slots_total];
    let mut slot_of = Vec::with_capacity(bt);
    for b in 0..bt {
        let sl = match s.slots {
            Some(x) => x[b],
            None => b as i64,
        };
        if sl < 0 {
            slot_of.push(None);
            continue;
        }
        let su = sl as usize;
        if su >= slots_total {
            return Err(format!("state_batch_indices: entry {b} is {sl}, out of range for a state pool of {slots_total} slots"));
        }
        if owner[su] != usize::MAX {
            return Err(format!(
                "state_batch_indices: slot {sl} is used by rows {} and {b}",
                owner[su]
            ));
        }
        owner[su] = b;
        slot_of.push(Some(su));
    }
    if s.slots.is_none() && slots_total != bt {
        return Err(format!(
            "state: expected {bt} slots (one per batch row), got {slots_total}"
        ));
    }

    if bt == 0 || nt == 0 || d == 0 {
        return Ok(());
    }
    // Hand each batch row its own state slot, output row and snapshot row; the channel
    // blocks of a row run in order inside one task.
    let mut slot_rows: Vec<Option<&mut [T]>> = state.chunks_mut(d * n).map(Some).collect();
    let out_rows = out.chunks_mut(nt * d);
    let snap_rows: Vec<Option<&mut [T]>> = match snapshots {
        Some(sn) => sn.chunks_mut(nt * d * n).map(Some).collect(),
        None => (0..bt).map(|_| None).collect(),
    };
    let items: Vec<_> = out_rows
        .zip(snap_rows)
        .enumerate()
        .map(|(b, (o, sn))| (o, sn, slot_of[b].and_then(|su| slot_rows[su].take())))
        .collect();
    pool::for_each(items, bt * nt * d * n, |b, (out_row, mut snap_row, st)| {
        let Some(st) = st else {
            out_row.fill(T::ZERO); // padding row: zero output, nothing written
            return;
        };
        let mut block_snap = if snap_row.is_some() {
            vec![T::ZERO; nt * BLOCK * n]
        } else {
            Vec::new()
        };
        for (d0, state) in (0..d).step_by(BLOCK).zip(st.chunks_mut(BLOCK * n)) {
            let rows = BLOCK.min(d - d0);
            let snaps = snap_row.as_ref().map(|_| &mut block_snap[..nt * rows * n]);
            dispatch(
                level,
                Task {
                    s,
                    b,
                    d0,
                    state,
                    out: &mut *out_row,
                    snaps,
                    rows,
                },
            );
            // A block's snapshots are (T, rows, N); the row's are (T, dim, N).
            if let Some(sr) = snap_row.as_deref_mut() {
                for k in 0..nt {
                    sr[(k * d + d0) * n..][..rows * n]
                        .copy_from_slice(&block_snap[k * rows * n..][..rows * n]);
                }
            }
        }
    });
    Ok(())
}
