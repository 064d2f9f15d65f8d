//! Eidetic retention (design §6.1, §6.2) written straight from the definitions: the
//! innovation score one position at a time in f64, and the store as a brute-force top-m
//! over the whole past (no heap).
#![allow(clippy::needless_range_loop)]

/// Scores of one row `y (len, dim)` after `hist (k, dim)` (oldest first, the last
/// `min(count, k)` rows valid); returns `(scores, ema (m, z) after the row)`.
#[allow(clippy::too_many_arguments)]
pub fn innovation(
    y: &[f64],
    len: usize,
    dim: usize,
    c: &[f64],
    hist: &[f64],
    count: usize,
    ema: (f64, f64),
    chi2: bool,
    rate: f64,
    floor: f64,
) -> (Vec<f64>, (f64, f64)) {
    let k = c.len();
    let avail = count.min(k);
    // The sequence of known outputs: valid history then y.
    let mut ext: Vec<&[f64]> = (k - avail..k)
        .map(|r| &hist[r * dim..(r + 1) * dim])
        .collect();
    ext.extend((0..len).map(|t| &y[t * dim..(t + 1) * dim]));
    let total: f64 = c.iter().sum();
    let (mut m, mut z) = ema;
    let mut out = Vec::with_capacity(len);
    for t in 0..len {
        let i = avail + t;
        let a = i.min(k);
        let part: f64 = c[..a].iter().sum();
        let f = if a == k || part == 0.0 {
            1.0
        } else {
            total / part
        };
        let mut e = 0.0;
        for x in 0..dim {
            let pred: f64 = (1..=a).map(|j| c[j - 1] * f * ext[i - j][x]).sum();
            e += (ext[i][x] - pred).powi(2);
        }
        let eps = if dim == 0 { 0.0 } else { e / dim as f64 };
        out.push(if chi2 {
            let v = if z > 0.0 { m / z } else { eps };
            eps / v.max(floor)
        } else {
            eps
        });
        m = (1.0 - rate) * m + rate * eps;
        z = (1.0 - rate) * z + rate;
    }
    (out, (m, z))
}

/// Positions held after consuming `scores[..upto]` (position t has score `scores[t]`),
/// sorted ascending: "topk" ranks every past token by (score desc, position asc) and keeps
/// the first `cap`; "threshold" does the same among scores > tau; "fifo" keeps the last
/// `cap` tokens with score > tau.
pub fn held(scores: &[f64], upto: usize, cap: usize, policy: &str, tau: f64) -> Vec<i64> {
    let mut cand: Vec<usize> = (0..upto)
        .filter(|&t| policy == "topk" || scores[t] > tau)
        .collect();
    if policy == "fifo" {
        let n = cand.len();
        cand.drain(..n.saturating_sub(cap));
    } else {
        cand.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        cand.truncate(cap);
    }
    let mut out: Vec<i64> = cand.into_iter().map(|t| t as i64).collect();
    out.sort_unstable();
    out
}
