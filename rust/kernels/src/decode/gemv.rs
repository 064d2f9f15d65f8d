//! Batched GEMV `out (nx, n_out) = act(x (nx, n_in) @ w^T + bias)`: every weight is read
//! once per call for all input rows (4 weight rows × 2 input rows per register block), and
//! the rows are cut into tasks of [`ROWS`] split over the team by cost.

use std::ops::Range;

use super::math::{dot, DecodeElem};
use crate::cpu::team::TeamBuf;
use crate::cpu::{Elem, Vector};

/// Weight rows per GEMV task.
pub const ROWS: usize = 16;

/// Activation applied to a GEMV's outputs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Act {
    None,
    Gelu,
}

/// `out[b, o] = act(Σ_i w[o, i] x[b, i] + bias[o])` for `nx` input rows.
pub(super) struct Job<'s, 'a, T> {
    pub(super) w: &'s [T],
    pub(super) bias: Option<&'s [T]>,
    pub(super) n_out: usize,
    pub(super) n_in: usize,
    pub(super) x: &'s [T],
    pub(super) nx: usize,
    pub(super) out: &'s TeamBuf<'a, T>,
    pub(super) act: Act,
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
pub(super) fn gemv_phase<V: Vector>(
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
