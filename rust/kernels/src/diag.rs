//! First-order diagonal scan `h_t = a_t * h_{t-1} + b_t` (design §2.1) over independent
//! lanes laid out `(lanes, len)`, forward or reverse (`h_t = a_t * h_{t+1} + b_t`).
//!
//! Same scheme as the selective scan: tasks of [`BLOCK`] lanes, vectors across lanes,
//! time chunks transposed to `[time][lane]`.

use crate::cpu::pool;
use crate::cpu::{dispatch, Kernel, Level, SimdElem, Vector};
use crate::error::{check_lens, Result};
use crate::selective::{load_t, store_t, BLOCK, CHUNK};

pub struct DiagArgs<'a, T> {
    pub lanes: usize,
    pub len: usize,
    pub a: &'a [T],
    pub b: &'a [T],
    pub h0: Option<&'a [T]>,
    pub reverse: bool,
}

struct Task<'s, 'a, T> {
    s: &'s DiagArgs<'a, T>,
    m0: usize,
    rows: usize,
    out: &'s mut [T],
    last: &'s mut [T],
}

impl<T: SimdElem> Kernel<T> for Task<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let Task {
            s,
            m0,
            rows,
            out,
            last,
        } = self;
        let (w, len) = (V::W, s.len);
        let mut ba = vec![T::ZERO; CHUNK * w];
        let mut bb = vec![T::ZERO; CHUNK * w];
        let mut tmp = vec![T::ZERO; w];
        for r0 in (0..rows).step_by(w) {
            let valid = w.min(rows - r0);
            for (j, x) in tmp.iter_mut().enumerate() {
                *x = match s.h0 {
                    Some(h0) if j < valid => h0[m0 + r0 + j],
                    _ => T::ZERO,
                };
            }
            let mut h = V::load(&tmp);
            let nck = len.div_ceil(CHUNK);
            for ci in 0..nck {
                let c = if s.reverse { nck - 1 - ci } else { ci };
                let t0 = c * CHUNK;
                let tl = CHUNK.min(len - t0);
                load_t::<V>(s.a, m0 + r0, valid, len, t0, tl, &mut ba);
                load_t::<V>(s.b, m0 + r0, valid, len, t0, tl, &mut bb);
                for kk in 0..tl {
                    let k = if s.reverse { tl - 1 - kk } else { kk };
                    h = h.fma(V::load(&ba[k * w..]), V::load(&bb[k * w..]));
                    h.store(&mut bb[k * w..]);
                }
                store_t::<V>(&mut out[r0 * len..], valid, len, t0, tl, &bb);
            }
            h.store(&mut tmp);
            last[r0..r0 + valid].copy_from_slice(&tmp[..valid]);
        }
    }
}

/// Runs the scan into `out (lanes, len)` and `last (lanes,)` (the state after the last
/// step consumed: `h_len` forward, `h_1` reverse).
pub fn diag_scan<T: SimdElem>(
    level: Level,
    s: &DiagArgs<'_, T>,
    out: &mut [T],
    last: &mut [T],
) -> Result<()> {
    let (m, l) = (s.lanes, s.len);
    check_lens(&[
        ("a", s.a.len(), m * l),
        ("b", s.b.len(), m * l),
        ("out", out.len(), m * l),
        ("last_state", last.len(), m),
        ("initial_state", s.h0.map_or(m, <[T]>::len), m),
    ])?;
    let starts: Vec<usize> = (0..m).step_by(BLOCK).collect();
    let rows: Vec<usize> = starts.iter().map(|&m0| BLOCK.min(m - m0)).collect();
    let outs = pool::split_lengths(out, &rows.iter().map(|r| r * l).collect::<Vec<_>>());
    let lasts = pool::split_lengths(last, &rows);
    let items: Vec<_> = starts.into_iter().zip(rows).zip(outs).zip(lasts).collect();
    pool::for_each(items, m * l, |_, (((m0, rows), out), last)| {
        dispatch(
            level,
            Task {
                s,
                m0,
                rows,
                out,
                last,
            },
        )
    });
    Ok(())
}
