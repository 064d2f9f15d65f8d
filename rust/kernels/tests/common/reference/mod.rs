//! Plain scalar implementations, written straight from the spec with no tiling, no
//! vectors and full storage of every state. They are the oracles of the kernel tests.

pub mod bilinear;
pub mod companion;
pub mod conv;
pub mod eidetic;

use bmojo_kernels::selective::{Mat, ScanArgs};

fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn dsoftplus(x: f64) -> f64 {
    if x > 20.0 {
        1.0
    } else {
        1.0 / (1.0 + (-x).exp())
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `h_t = a_t h_{t-1} + b_t` (or from the end when `reverse`); returns `(h, last)`.
pub fn diag_scan(
    lanes: usize,
    len: usize,
    a: &[f64],
    b: &[f64],
    h0: Option<&[f64]>,
    reverse: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; lanes * len];
    let mut last = vec![0.0; lanes];
    for m in 0..lanes {
        let mut h = h0.map_or(0.0, |x| x[m]);
        for i in 0..len {
            let t = if reverse { len - 1 - i } else { i };
            h = a[m * len + t] * h + b[m * len + t];
            out[m * len + t] = h;
        }
        last[m] = h;
    }
    (out, last)
}

/// Reads B or C at (batch b, channel d, state n, time t).
fn mat(s: &ScanArgs<'_, f64>, m: &Mat<'_, f64>, b: usize, d: usize, n: usize, t: usize) -> f64 {
    match m {
        Mat::Const(x) => x[d * s.dstate + n],
        Mat::Var { data, groups } => {
            let g = d / (s.dim / groups);
            data[((b * groups + g) * s.dstate + n) * s.len + t]
        }
    }
}

fn dt_pre(s: &ScanArgs<'_, f64>, b: usize, d: usize, t: usize) -> f64 {
    s.delta[(b * s.dim + d) * s.len + t] + s.delta_bias.map_or(0.0, |x| x[d])
}

fn reset(s: &ScanArgs<'_, f64>, b: usize, t: usize) -> bool {
    s.seq_idx
        .is_some_and(|q| t > 0 && q[b * s.len + t] != q[b * s.len + t - 1])
}

/// All states `h[b][d][t+1][n]` (index 0 = initial), and the outputs.
#[allow(clippy::type_complexity)]
fn run(s: &ScanArgs<'_, f64>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bt, dm, l, n) = (s.batch, s.dim, s.len, s.dstate);
    let mut hs = vec![0.0; bt * dm * (l + 1) * n];
    let mut y = vec![0.0; bt * dm * l];
    let mut out = vec![0.0; bt * dm * l];
    for b in 0..bt {
        for d in 0..dm {
            let hidx = |t: usize, k: usize| ((b * dm + d) * (l + 1) + t) * n + k;
            for k in 0..n {
                hs[hidx(0, k)] = s.h0.map_or(0.0, |x| x[(b * dm + d) * n + k]);
            }
            for t in 0..l {
                let pre = dt_pre(s, b, d, t);
                let dt = if s.softplus { softplus(pre) } else { pre };
                let i = (b * dm + d) * l + t;
                let u = s.u[i];
                let mut acc = s.d.map_or(0.0, |x| x[d]) * u;
                for k in 0..n {
                    let prev = if reset(s, b, t) { 0.0 } else { hs[hidx(t, k)] };
                    let h = (dt * s.a[d * n + k]).exp() * prev + dt * mat(s, &s.b, b, d, k, t) * u;
                    hs[hidx(t + 1, k)] = h;
                    acc += mat(s, &s.c, b, d, k, t) * h;
                }
                y[i] = acc;
                out[i] = match s.z {
                    Some(z) => acc * z[i] * sigmoid(z[i]),
                    None => acc,
                };
            }
        }
    }
    (hs, y, out)
}

/// Forward: `(out, last_state)`.
pub fn selective_forward(s: &ScanArgs<'_, f64>) -> (Vec<f64>, Vec<f64>) {
    let (bt, dm, l, n) = (s.batch, s.dim, s.len, s.dstate);
    let (hs, _, out) = run(s);
    let mut last = vec![0.0; bt * dm * n];
    for bd in 0..bt * dm {
        for k in 0..n {
            last[bd * n + k] = hs[(bd * (l + 1) + l) * n + k];
        }
    }
    (out, last)
}

/// Gradients in the order `du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0`, with the
/// shapes of the corresponding inputs (dD, dz, ddelta_bias always allocated).
pub struct Grads {
    pub du: Vec<f64>,
    pub ddelta: Vec<f64>,
    pub da: Vec<f64>,
    pub db: Vec<f64>,
    pub dc: Vec<f64>,
    pub dd: Vec<f64>,
    pub dz: Vec<f64>,
    pub ddelta_bias: Vec<f64>,
    pub dh0: Vec<f64>,
}

/// Backpropagation through time over the stored states.
pub fn selective_backward(s: &ScanArgs<'_, f64>, dout: &[f64], dlast: Option<&[f64]>) -> Grads {
    let (bt, dm, l, n) = (s.batch, s.dim, s.len, s.dstate);
    let (hs, y, _) = run(s);
    let mat_len = |m: &Mat<'_, f64>| match m {
        Mat::Const(_) => dm * n,
        Mat::Var { groups, .. } => bt * groups * n * l,
    };
    let mut g = Grads {
        du: vec![0.0; bt * dm * l],
        ddelta: vec![0.0; bt * dm * l],
        da: vec![0.0; dm * n],
        db: vec![0.0; mat_len(&s.b)],
        dc: vec![0.0; mat_len(&s.c)],
        dd: vec![0.0; dm],
        dz: vec![0.0; bt * dm * l],
        ddelta_bias: vec![0.0; dm],
        dh0: vec![0.0; bt * dm * n],
    };
    let midx = |m: &Mat<'_, f64>, b: usize, d: usize, k: usize, t: usize| match m {
        Mat::Const(_) => d * n + k,
        Mat::Var { groups, .. } => ((b * groups + d / (dm / groups)) * n + k) * l + t,
    };
    for b in 0..bt {
        for d in 0..dm {
            let hidx = |t: usize, k: usize| ((b * dm + d) * (l + 1) + t) * n + k;
            let mut adj: Vec<f64> = (0..n)
                .map(|k| dlast.map_or(0.0, |x| x[(b * dm + d) * n + k]))
                .collect();
            for t in (0..l).rev() {
                let i = (b * dm + d) * l + t;
                let u = s.u[i];
                let pre = dt_pre(s, b, d, t);
                let dt = if s.softplus { softplus(pre) } else { pre };
                let dy = match s.z {
                    Some(z) => {
                        let sg = sigmoid(z[i]);
                        g.dz[i] = dout[i] * y[i] * sg * (1.0 + z[i] * (1.0 - sg));
                        dout[i] * z[i] * sg
                    }
                    None => dout[i],
                };
                g.dd[d] += dy * u;
                g.du[i] += s.d.map_or(0.0, |x| x[d]) * dy;
                let mut ddt = 0.0;
                for k in 0..n {
                    let cv = mat(s, &s.c, b, d, k, t);
                    let bv = mat(s, &s.b, b, d, k, t);
                    let h = hs[hidx(t + 1, k)];
                    let prev = if reset(s, b, t) { 0.0 } else { hs[hidx(t, k)] };
                    let decay = (dt * s.a[d * n + k]).exp();
                    g.dc[midx(&s.c, b, d, k, t)] += h * dy;
                    let gk = adj[k] + cv * dy;
                    ddt += gk * prev * decay * s.a[d * n + k] + gk * bv * u;
                    g.da[d * n + k] += gk * prev * decay * dt;
                    g.db[midx(&s.b, b, d, k, t)] += gk * dt * u;
                    g.du[i] += gk * dt * bv;
                    adj[k] = if reset(s, b, t) { 0.0 } else { gk * decay };
                }
                if s.softplus {
                    ddt *= dsoftplus(pre);
                }
                g.ddelta[i] = ddt;
                g.ddelta_bias[d] += ddt;
            }
            g.dh0[(b * dm + d) * n..(b * dm + d + 1) * n].copy_from_slice(&adj);
        }
    }
    g
}
