//! Eidetic token retention (design §6.1, §6.2): the fused innovation score and the bounded
//! top-m store (one binary heap per batch row), streaming and chunked.
//!
//! Innovation. `ŷ_t = Σ_{j=1..k} c_j y_{t-j}`, `ε_t = ‖y_t − ŷ_t‖² / d`. A position with
//! only `a < k` predecessors (counting the carried history) uses the first `a` taps,
//! rescaled by `S_k / S_a` (`S_a = Σ_{j≤a} c_j`; no rescaling when `S_a = 0`), so the
//! default mean predictor becomes the mean of the available history; `ŷ = 0` at the very
//! first position. The χ² metric divides `ε_t` by `max(v_{t-1}, floor)`, `v` the
//! bias-corrected exponential moving average of the past innovations (`m ← (1−ρ)m + ρε`,
//! `z ← (1−ρ)z + ρ`, `v = m / z`); with no past innovation (`z = 0`) `v = ε_t` itself.
//! Rows are independent tasks; within a row the work is sequential in time and vectorised
//! over `d`.
//!
//! Store. A token enters if it is a candidate (any score for top-k; `score > τ` for the
//! threshold and FIFO policies) and the store is not full, or (top-k, threshold) its score
//! is strictly larger than the smallest held, which it evicts; among equal scores the
//! newest is the one evicted (the older token stays). FIFO evicts the oldest. The held
//! entries are a min-heap (lowest-ranked at the root) in the first `size` slots of the row;
//! the empty slots after them hold position -1 and score 0.

use crate::cpu::pool;
use crate::cpu::{dispatch, Elem, Kernel, Level, SimdElem, Vector};
use crate::error::{check_lens, Error, Result};

// ------------------------------------------------------------------------ innovation

pub struct InnovArgs<'a, T> {
    pub batch: usize,
    pub len: usize,
    pub dim: usize,
    /// `c_1 .. c_k` (k >= 1): `weights[j-1]` multiplies `y_{t-j}`.
    pub weights: &'a [T],
    /// `(batch, len, dim)`.
    pub y: &'a [T],
    /// `(batch, k, dim)`: the k outputs before `y`, oldest first (only the last
    /// `min(count, k)` are read).
    pub history: &'a [T],
    /// `(batch,)`: positions consumed before `y` (>= 0).
    pub count: &'a [i64],
    /// `(batch, 2)`: the χ² moving average `(m, z)`.
    pub ema: &'a [T],
    pub chi2: bool,
    /// EMA rate ρ in (0, 1].
    pub rate: T,
    /// Floor of the χ² denominator (> 0).
    pub floor: T,
}

pub struct InnovOut<'a, T> {
    /// `(batch, len)`.
    pub scores: &'a mut [T],
    /// `(batch, k, dim)`: the last k outputs, oldest first.
    pub history: &'a mut [T],
    /// `(batch,)`: `count + len`.
    pub count: &'a mut [i64],
    /// `(batch, 2)`.
    pub ema: &'a mut [T],
}

/// Row `a` (0..=k) holds the taps used with `a` predecessors available (first `a` used).
fn warmup_table<T: SimdElem>(c: &[T]) -> Vec<T> {
    let k = c.len();
    let mut tab = vec![T::ZERO; (k + 1) * k];
    let total = c.iter().fold(T::ZERO, |s, &x| s + x);
    for a in 1..=k {
        let row = &mut tab[a * k..a * k + a];
        if a == k {
            row.copy_from_slice(c);
            continue;
        }
        let part = c[..a].iter().fold(T::ZERO, |s, &x| s + x);
        let f = if part == T::ZERO {
            T::ONE
        } else {
            total / part
        };
        for (r, &x) in row.iter_mut().zip(c) {
            *r = x * f;
        }
    }
    tab
}

struct InnovRow<'s, 'a, T> {
    s: &'s InnovArgs<'a, T>,
    tab: &'s [T],
    b: usize,
    scores: &'s mut [T],
    hist: &'s mut [T],
    count: &'s mut i64,
    ema: &'s mut [T],
}

/// `(y[off..off+W] padded with zeros)`: loads a possibly short slice.
#[inline(always)]
fn load_part<V: Vector>(src: &[V::E], off: usize, n: usize, tmp: &mut [V::E]) -> V {
    if n == V::W {
        V::load(&src[off..])
    } else {
        tmp.fill(V::E::ZERO);
        tmp[..n].copy_from_slice(&src[off..off + n]);
        V::load(tmp)
    }
}

impl<T: SimdElem> Kernel<T> for InnovRow<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        let InnovRow {
            s,
            tab,
            b,
            scores,
            hist,
            count,
            ema,
        } = self;
        let (l, d, k, w) = (s.len, s.dim, s.weights.len(), V::W);
        let y = &s.y[b * l * d..(b + 1) * l * d];
        let h0 = &s.history[b * k * d..(b + 1) * k * d];
        let cnt = s.count[b] as u64;
        let (mut m, mut z) = (s.ema[2 * b], s.ema[2 * b + 1]);
        let one_minus = T::ONE - s.rate;
        let inv_d = if d == 0 {
            T::ZERO
        } else {
            T::ONE / T::from_f64(d as f64)
        };
        let mut tmp = vec![T::ZERO; w];
        for t in 0..l {
            let a = (cnt + t as u64).min(k as u64) as usize;
            let taps = &tab[a * k..a * k + a];
            let yt = &y[t * d..(t + 1) * d];
            let mut acc = V::zero();
            let mut off = 0;
            while off < d {
                let n = w.min(d - off);
                let mut p = V::zero();
                for (j, &c) in (1..=a).zip(taps) {
                    let src = if t >= j {
                        &y[(t - j) * d..(t - j + 1) * d]
                    } else {
                        let r = k + t - j;
                        &h0[r * d..(r + 1) * d]
                    };
                    p = V::splat(c).fma(load_part::<V>(src, off, n, &mut tmp), p);
                }
                let e = load_part::<V>(yt, off, n, &mut tmp).sub(p);
                acc = e.fma(e, acc);
                off += n;
            }
            let eps = acc.hsum() * inv_d;
            scores[t] = if s.chi2 {
                let v = if z > T::ZERO { m / z } else { eps };
                let den = if v > s.floor { v } else { s.floor };
                eps / den
            } else {
                eps
            };
            m = one_minus * m + s.rate * eps;
            z = one_minus * z + s.rate;
        }
        // The last k outputs of (history ++ y).
        for i in 0..k {
            let n = l + i;
            let src = if n < k {
                &h0[n * d..(n + 1) * d]
            } else {
                &y[(n - k) * d..(n - k + 1) * d]
            };
            hist[i * d..(i + 1) * d].copy_from_slice(src);
        }
        *count = s.count[b] + l as i64;
        ema[0] = m;
        ema[1] = z;
    }
}

/// Innovation scores of `y` (see the module doc), with the state carried in and out.
pub fn innovation<T: SimdElem>(
    level: Level,
    s: &InnovArgs<'_, T>,
    out: InnovOut<'_, T>,
) -> Result<()> {
    let (b, l, d, k) = (s.batch, s.len, s.dim, s.weights.len());
    if k == 0 {
        return Err(Error::expected("weights", "at least one tap"));
    }
    check_lens(&[
        ("y", s.y.len(), b * l * d),
        ("history", s.history.len(), b * k * d),
        ("count", s.count.len(), b),
        ("ema", s.ema.len(), 2 * b),
        ("scores", out.scores.len(), b * l),
        ("history_out", out.history.len(), b * k * d),
        ("count_out", out.count.len(), b),
        ("ema_out", out.ema.len(), 2 * b),
    ])?;
    // Written as negated comparisons so that NaN is rejected too.
    if !(s.rate > T::ZERO && s.rate <= T::ONE) {
        return Err(Error::value(
            "rate",
            "a value in (0, 1]",
            format!("{:?}", s.rate),
        ));
    }
    if s.floor.partial_cmp(&T::ZERO) != Some(core::cmp::Ordering::Greater) {
        return Err(Error::value(
            "floor",
            "a value > 0",
            format!("{:?}", s.floor),
        ));
    }
    if let Some(c) = s.count.iter().find(|&&c| c < 0 || c > i64::MAX - l as i64) {
        return Err(Error::value("count", "values in [0, 2^63 - 1 - len]", c));
    }
    let tab = warmup_table(s.weights);
    let items: Vec<_> = pool::split_lengths(out.scores, &vec![l; b])
        .into_iter()
        .zip(pool::split_lengths(out.history, &vec![k * d; b]))
        .zip(out.count.iter_mut())
        .zip(out.ema.chunks_mut(2))
        .collect();
    let tab = &tab[..];
    pool::for_each(
        items,
        b * l * d * k,
        |bi, (((scores, hist), count), ema)| {
            dispatch(
                level,
                InnovRow {
                    s,
                    tab,
                    b: bi,
                    scores,
                    hist,
                    count,
                    ema,
                },
            )
        },
    );
    Ok(())
}

// ------------------------------------------------------------------------ store

/// Selection policy of the store.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Top-m scores of the whole past (every token is a candidate).
    TopK,
    /// Only tokens with `score > τ` are candidates, then as top-k.
    Threshold(f64),
    /// Tokens with `score > τ` enter; the oldest is evicted when full.
    Fifo(f64),
}

impl Policy {
    pub fn from_name(name: &str, threshold: f64) -> Result<Policy> {
        if !(threshold.is_finite() && threshold >= 0.0) {
            return Err(Error::value("threshold", "a finite value >= 0", threshold));
        }
        match name {
            "topk" => Ok(Policy::TopK),
            "threshold" => Ok(Policy::Threshold(threshold)),
            "fifo" => Ok(Policy::Fifo(threshold)),
            _ => Err(Error::value(
                "policy",
                "'topk', 'threshold' or 'fifo'",
                format!("{name:?}"),
            )),
        }
    }

    #[inline]
    fn candidate(self, s: f64) -> bool {
        match self {
            Policy::TopK => true,
            Policy::Threshold(t) | Policy::Fifo(t) => s > t,
        }
    }

    /// Whether entry `a` ranks below `b` (is evicted before it).
    #[inline]
    fn below(self, a: (f64, i64), b: (f64, i64)) -> bool {
        match self {
            Policy::Fifo(_) => a.1 < b.1,
            _ => a.0 < b.0 || (a.0 == b.0 && a.1 > b.1),
        }
    }
}

/// One row of the store: a min-heap (by [`Policy::below`]) in `pos[..size]`/`sc[..size]`.
struct Heap<'a> {
    policy: Policy,
    pos: &'a mut [i64],
    sc: &'a mut [f64],
    size: usize,
}

impl Heap<'_> {
    #[inline]
    fn key(&self, i: usize) -> (f64, i64) {
        (self.sc[i], self.pos[i])
    }

    fn swap(&mut self, i: usize, j: usize) {
        self.pos.swap(i, j);
        self.sc.swap(i, j);
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let p = (i - 1) / 2;
            if self.policy.below(self.key(i), self.key(p)) {
                self.swap(i, p);
                i = p;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < self.size && self.policy.below(self.key(l), self.key(m)) {
                m = l;
            }
            if r < self.size && self.policy.below(self.key(r), self.key(m)) {
                m = r;
            }
            if m == i {
                break;
            }
            self.swap(i, m);
            i = m;
        }
    }

    /// Offers the token at position `p` with score `s` (p newer than every held one).
    #[inline]
    fn offer(&mut self, s: f64, p: i64) {
        if !self.policy.candidate(s) {
            return;
        }
        if self.size < self.pos.len() {
            let i = self.size;
            self.pos[i] = p;
            self.sc[i] = s;
            self.size += 1;
            self.sift_up(i);
            return;
        }
        let replace = match self.policy {
            Policy::Fifo(_) => true,
            _ => s > self.sc[0],
        };
        if replace {
            self.pos[0] = p;
            self.sc[0] = s;
            self.sift_down(0);
        }
    }

    /// Held positions sorted ascending, padded with -1, into `out` (capacity long).
    fn held(&self, out: &mut [i64]) {
        out.fill(-1);
        out[..self.size].copy_from_slice(&self.pos[..self.size]);
        out[..self.size].sort_unstable();
    }
}

/// Checks one row of a store against the invariants (held prefix then empty slots, held
/// positions distinct and in `[0, count)`, finite scores, heap order); returns its size.
fn check_row(policy: Policy, pos: &[i64], sc: &[f64], count: i64) -> Result<usize> {
    let size = pos.iter().take_while(|&&p| p >= 0).count();
    if let Some(p) = pos[size..].iter().find(|&&p| p != -1) {
        return Err(Error::corrupt(
            "positions",
            format!("empty slots (-1) must all come after the held entries, found {p} after one"),
        ));
    }
    if count < 0 {
        return Err(Error::value("count", "values >= 0", count));
    }
    if let Some(p) = pos[..size].iter().find(|&&p| p >= count) {
        return Err(Error::corrupt(
            "positions",
            format!("held position {p} is not before the row's count {count}"),
        ));
    }
    if let Some(s) = sc[..size].iter().find(|s| !s.is_finite()) {
        return Err(Error::corrupt(
            "scores",
            format!("held scores must be finite, got {s}"),
        ));
    }
    for i in 1..size {
        let p = (i - 1) / 2;
        if policy.below((sc[i], pos[i]), (sc[p], pos[p])) {
            return Err(Error::corrupt(
                "positions",
                format!("slots {p} and {i} break the heap order of the store (corrupted state)"),
            ));
        }
    }
    let mut sorted = pos[..size].to_vec();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::corrupt("positions", "a position is held twice"));
    }
    Ok(size)
}

/// Checks a whole store `(batch, cap)` against the invariants, without changing it.
pub fn check_store(
    policy: Policy,
    batch: usize,
    cap: usize,
    pos: &[i64],
    sc: &[f64],
    count: &[i64],
) -> Result<()> {
    if cap == 0 {
        return Err(Error::expected("capacity", ">= 1"));
    }
    check_lens(&[
        ("positions", pos.len(), batch * cap),
        ("scores", sc.len(), batch * cap),
        ("count", count.len(), batch),
    ])?;
    for (b, &c) in count.iter().enumerate() {
        let r = b * cap..(b + 1) * cap;
        check_row(policy, &pos[r.clone()], &sc[r], c)
            .map_err(|e| e.context(format!("row {b}: ")))?;
    }
    Ok(())
}

fn check_scores(new: &[f64]) -> Result<()> {
    match new.iter().find(|s| s.is_nan()) {
        Some(_) => Err(Error::invalid("scores", "NaN is not a valid score")),
        None => Ok(()),
    }
}

fn check_counts(count: &[i64], len: usize) -> Result<()> {
    match count.iter().find(|&&c| c > i64::MAX - len as i64) {
        Some(c) => Err(Error::invalid("count", format!("{c} + {len} overflows"))),
        None => Ok(()),
    }
}

/// Streaming: consumes `new (batch, t)` (positions `count[b] ..`) into the store in place
/// and advances `count`. Everything is checked before anything is written.
pub fn push(
    policy: Policy,
    batch: usize,
    cap: usize,
    pos: &mut [i64],
    sc: &mut [f64],
    count: &mut [i64],
    new: &[f64],
) -> Result<()> {
    check_store(policy, batch, cap, pos, sc, count)?;
    if batch == 0 {
        return check_lens(&[("new scores", new.len(), 0)]);
    }
    if !new.len().is_multiple_of(batch) {
        return Err(Error::value(
            "scores",
            format!("a multiple of {batch} elements"),
            new.len(),
        ));
    }
    let t = new.len() / batch;
    check_scores(new)?;
    check_counts(count, t)?;
    let items: Vec<_> = pos
        .chunks_mut(cap)
        .zip(sc.chunks_mut(cap))
        .zip(count.iter_mut())
        .collect();
    pool::for_each(items, batch * t * 8, |b, ((pos, sc), c)| {
        let size = pos.iter().take_while(|&&p| p >= 0).count();
        let mut h = Heap {
            policy,
            pos,
            sc,
            size,
        };
        for (i, &s) in new[b * t..(b + 1) * t].iter().enumerate() {
            h.offer(s, *c + i as i64);
        }
        *c += t as i64;
    });
    Ok(())
}

pub struct SelectArgs<'a> {
    pub policy: Policy,
    pub batch: usize,
    pub len: usize,
    pub cap: usize,
    pub chunk: usize,
    /// `(batch, len)`; row b's position t is `start[b] + t`.
    pub scores: &'a [f64],
    /// The store before the first position: `(batch, cap)` each, and `(batch,)`.
    pub positions: &'a [i64],
    pub store_scores: &'a [f64],
    pub start: &'a [i64],
}

pub struct SelectOut<'a> {
    /// `(batch, ceil(len / chunk), cap)`: held positions at each chunk's start, sorted
    /// ascending, padded with -1.
    pub held: &'a mut [i64],
    /// The store after the last position.
    pub positions: &'a mut [i64],
    pub scores: &'a mut [f64],
    pub count: &'a mut [i64],
}

/// Chunked builder: for every chunk of `chunk` positions, the positions held at its start.
pub fn select(s: &SelectArgs<'_>, out: SelectOut<'_>) -> Result<()> {
    let (b, l, m) = (s.batch, s.len, s.cap);
    if s.chunk == 0 {
        return Err(Error::expected("chunk", ">= 1"));
    }
    let nch = l.div_ceil(s.chunk);
    check_store(s.policy, b, m, s.positions, s.store_scores, s.start)?;
    check_lens(&[
        ("scores", s.scores.len(), b * l),
        ("held", out.held.len(), b * nch * m),
        ("positions_out", out.positions.len(), b * m),
        ("scores_out", out.scores.len(), b * m),
        ("count_out", out.count.len(), b),
    ])?;
    check_scores(s.scores)?;
    check_counts(s.start, l)?;
    out.positions.copy_from_slice(s.positions);
    out.scores.copy_from_slice(s.store_scores);
    let items: Vec<_> = pool::split_lengths(out.held, &vec![nch * m; b])
        .into_iter()
        .zip(out.positions.chunks_mut(m))
        .zip(out.scores.chunks_mut(m))
        .zip(out.count.iter_mut())
        .collect();
    pool::for_each(
        items,
        b * l * 8 + b * nch * m,
        |r, (((held, pos), sc), c)| {
            let size = pos.iter().take_while(|&&p| p >= 0).count();
            let mut h = Heap {
                policy: s.policy,
                pos,
                sc,
                size,
            };
            let row = &s.scores[r * l..(r + 1) * l];
            let p0 = s.start[r];
            for (t, &x) in row.iter().enumerate() {
                if t % s.chunk == 0 {
                    let ci = t / s.chunk;
                    h.held(&mut held[ci * m..(ci + 1) * m]);
                }
                h.offer(x, p0 + t as i64);
            }
            *c = p0 + l as i64;
        },
    );
    Ok(())
}
