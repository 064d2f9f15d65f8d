//! Scalar f64 oracle: Nilpotent shift state: causal depthwise convolution and its ring-buffer update, design §3.
//!
//! Written from the definitions: the forward gathers taps, the backward scatters every
//! output's gradient to the inputs it read (the kernel gathers instead).

use super::sigmoid;

/// Shapes and options of a reference convolution.
pub struct Conv<'a> {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub width: usize,
    pub x: &'a [f64],
    pub weight: &'a [f64],
    pub bias: Option<&'a [f64]>,
    pub init: Option<&'a [f64]>,
    pub seq_idx: Option<&'a [i64]>,
    pub silu: bool,
}

impl Conv<'_> {
    /// Where input `j` (negative: initial state) of row `r` lives as seen from output `t`,
    /// or None when the tap is cut (zero padding, or a different sequence).
    fn source(&self, r: usize, t: usize, j: isize) -> Option<Src> {
        let (l, km) = (self.len, self.width - 1);
        let b = r / self.dim;
        if j >= 0 {
            if let Some(q) = self.seq_idx {
                let q = &q[b * l..(b + 1) * l];
                if (j as usize..=t).any(|m| q[m] != q[t]) {
                    return None;
                }
            }
            Some(Src::X(r * l + j as usize))
        } else if self.seq_idx.is_none() && self.init.is_some() {
            Some(Src::Init(r * km + (km as isize + j) as usize))
        } else {
            None
        }
    }

    fn pre(&self, r: usize, t: usize) -> f64 {
        let (k, d) = (self.width, self.dim);
        let c = r % d;
        let mut acc = self.bias.map_or(0.0, |b| b[c]);
        for i in 0..k {
            let j = t as isize - i as isize;
            let v = match self.source(r, t, j) {
                Some(Src::X(p)) => self.x[p],
                Some(Src::Init(p)) => self.init.unwrap()[p],
                None => 0.0,
            };
            acc += self.weight[c * k + (k - 1 - i)] * v;
        }
        acc
    }

    /// `(out, final_states)`.
    pub fn forward(&self) -> (Vec<f64>, Vec<f64>) {
        let (rows, l, km) = (self.batch * self.dim, self.len, self.width - 1);
        let mut out = vec![0.0; rows * l];
        let mut fin = vec![0.0; rows * km];
        for r in 0..rows {
            for t in 0..l {
                let p = self.pre(r, t);
                out[r * l + t] = if self.silu { p * sigmoid(p) } else { p };
            }
            // Concatenate (initial state or zeros, x) and keep the last K-1.
            let mut ext: Vec<f64> = match self.init {
                Some(h) => h[r * km..(r + 1) * km].to_vec(),
                None => vec![0.0; km],
            };
            ext.extend_from_slice(&self.x[r * l..(r + 1) * l]);
            fin[r * km..(r + 1) * km].copy_from_slice(&ext[ext.len() - km..]);
        }
        (out, fin)
    }

    /// `(dx, dweight, dbias, dinit)` for upstream `dout` and optional `dfinal`.
    pub fn backward(
        &self,
        dout: &[f64],
        dfinal: Option<&[f64]>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (d, l, k) = (self.dim, self.len, self.width);
        let (rows, km) = (self.batch * d, k - 1);
        let mut dx = vec![0.0; rows * l];
        let mut dw = vec![0.0; d * k];
        let mut db = vec![0.0; d];
        let mut di = vec![0.0; rows * km];
        for r in 0..rows {
            let c = r % d;
            for t in 0..l {
                let p = self.pre(r, t);
                let g = dout[r * l + t];
                let dp = if self.silu {
                    let s = sigmoid(p);
                    g * (s + p * s * (1.0 - s))
                } else {
                    g
                };
                db[c] += dp;
                for i in 0..k {
                    let wi = c * k + (k - 1 - i);
                    match self.source(r, t, t as isize - i as isize) {
                        Some(Src::X(q)) => {
                            dx[q] += self.weight[wi] * dp;
                            dw[wi] += self.x[q] * dp;
                        }
                        Some(Src::Init(q)) => {
                            di[q] += self.weight[wi] * dp;
                            dw[wi] += self.init.unwrap()[q] * dp;
                        }
                        None => {}
                    }
                }
            }
            if let Some(df) = dfinal {
                for i in 0..km {
                    let j = l as isize - km as isize + i as isize;
                    let g = df[r * km + i];
                    if j >= 0 {
                        dx[r * l + j as usize] += g;
                    } else if self.init.is_some() {
                        di[r * km + (km as isize + j) as usize] += g;
                    }
                }
            }
        }
        (dx, dw, db, di)
    }
}

enum Src {
    X(usize),
    Init(usize),
}

/// The peer's `causal_conv1d_update_ref` on rows mapped through `slots`: `x (batch, dim,
/// T)`, `state (slots, dim, S)` updated in place; returns `out (batch, dim, T)`.
#[allow(clippy::too_many_arguments)]
pub fn update(
    batch: usize,
    dim: usize,
    ntok: usize,
    width: usize,
    state_len: usize,
    x: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    silu: bool,
    cache_seqlens: Option<&[i64]>,
    slots: Option<&[i64]>,
    state: &mut [f64],
) -> Vec<f64> {
    let (k, s) = (width, state_len);
    let mut out = vec![0.0; batch * dim * ntok];
    for b in 0..batch {
        let slot = slots.map_or(b as i64, |v| v[b]);
        if slot < 0 {
            continue;
        }
        for c in 0..dim {
            let st = &mut state[(slot as usize * dim + c) * s..(slot as usize * dim + c + 1) * s];
            let xs = &x[(b * dim + c) * ntok..(b * dim + c + 1) * ntok];
            let mut full: Vec<f64>;
            match cache_seqlens {
                None => {
                    full = st.to_vec();
                    full.extend_from_slice(xs);
                    let n = full.len();
                    st.copy_from_slice(&full[n - s..]);
                }
                Some(cs) => {
                    let cl = cs[b];
                    full = (0..k - 1)
                        .map(|i| st[(cl - (k as i64 - 1) + i as i64).rem_euclid(s as i64) as usize])
                        .collect();
                    full.extend_from_slice(xs);
                    for (t, &v) in xs.iter().enumerate().filter(|_| s > 0) {
                        st[(cl + t as i64).rem_euclid(s as i64) as usize] = v;
                    }
                }
            }
            // Valid convolution over the concatenation, last T outputs.
            let n = full.len();
            for t in 0..ntok {
                let end = n - ntok + t; // index of x_t in `full`
                let mut acc = bias.map_or(0.0, |bb| bb[c]);
                for i in 0..k {
                    acc += weight[c * k + (k - 1 - i)] * full[end - i];
                }
                out[(b * dim + c) * ntok + t] = if silu { acc * sigmoid(acc) } else { acc };
            }
        }
    }
    out
}
