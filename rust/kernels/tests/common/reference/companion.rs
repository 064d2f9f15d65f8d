//! Scalar f64 oracle: Companion (canonical) recurrence, design §4.
//!
//! Full storage of s over [-n, L); the backward is the adjoint written as a gather
//! (each g_t reads the later adjoints it feeds), unlike the kernel's scatter.

use bmojo_kernels::companion::{CompanionArgs, Seq};

/// Coefficient `j` of lane `m` at time `t` (`per` values per step / channel).
fn at(
    s: &Seq<'_, f64>,
    a: &CompanionArgs<'_, f64>,
    per: usize,
    m: usize,
    t: usize,
    j: usize,
) -> f64 {
    match s {
        Seq::Var(x) => x[(m * a.len + t) * per + j],
        Seq::Const(x) => x[(m % a.dim) * per + j],
    }
}

/// `s` of lane m over times -n..L at index `t + n`.
fn states(a: &CompanionArgs<'_, f64>, m: usize) -> Vec<f64> {
    let (l, n) = (a.len, a.order);
    let mut s = vec![0.0; n + l];
    if let Some(h0) = a.s0 {
        for j in 0..n {
            s[n - 1 - j] = h0[m * n + j];
        }
    }
    for t in 0..l {
        let beta = a.beta.as_ref().map_or(1.0, |b| at(b, a, 1, m, t, 0));
        let mut v = beta * a.u[m * l + t];
        for i in 1..=n {
            v += at(&a.alpha, a, n, m, t, i - 1) * s[n + t - i];
        }
        s[n + t] = v;
    }
    s
}

/// Returns `(y, s, last)` in the layouts of [`bmojo_kernels::companion::FwdOut`].
pub fn companion_forward(a: &CompanionArgs<'_, f64>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (m_all, l, n) = (a.batch * a.dim, a.len, a.order);
    let (mut y, mut s_out, mut last) = (
        vec![0.0; m_all * l],
        vec![0.0; m_all * l],
        vec![0.0; m_all * n],
    );
    for m in 0..m_all {
        let s = states(a, m);
        for t in 0..l {
            let mut v = match &a.c {
                Some(c) => (0..n).map(|i| at(c, a, n, m, t, i) * s[n + t - i]).sum(),
                None => s[n + t],
            };
            if let Some(d) = a.d {
                v += d[m % a.dim] * a.u[m * l + t];
            }
            y[m * l + t] = v;
            s_out[m * l + t] = s[n + t];
        }
        for k in 0..n {
            last[m * n + k] = s[n + l - 1 - k];
        }
    }
    (y, s_out, last)
}

/// Gradients in the layouts of the inputs (`None` for absent optional inputs).
#[derive(Debug, Clone)]
pub struct CompanionGrads {
    pub du: Vec<f64>,
    pub dalpha: Vec<f64>,
    pub dbeta: Option<Vec<f64>>,
    pub dc: Option<Vec<f64>>,
    pub dd: Option<Vec<f64>>,
    pub ds0: Vec<f64>,
}

pub fn companion_backward(
    a: &CompanionArgs<'_, f64>,
    dy: &[f64],
    dlast: Option<&[f64]>,
) -> CompanionGrads {
    let (m_all, l, n, dim) = (a.batch * a.dim, a.len, a.order, a.dim);
    let size = |s: &Seq<'_, f64>, per: usize| {
        if s.is_var() {
            m_all * l * per
        } else {
            dim * per
        }
    };
    let mut gr = CompanionGrads {
        du: vec![0.0; m_all * l],
        dalpha: vec![0.0; size(&a.alpha, n)],
        dbeta: a.beta.as_ref().map(|b| vec![0.0; size(b, 1)]),
        dc: a.c.as_ref().map(|c| vec![0.0; size(c, n)]),
        dd: a.d.map(|_| vec![0.0; dim]),
        ds0: vec![0.0; m_all * n],
    };
    // Index of a coefficient's gradient: per step, or per channel (summed).
    let idx = |s: &Seq<'_, f64>, per: usize, m: usize, t: usize, j: usize| {
        if s.is_var() {
            (m * l + t) * per + j
        } else {
            (m % dim) * per + j
        }
    };
    for m in 0..m_all {
        let s = states(a, m);
        let dyt = |t: usize| dy[m * l + t];
        // g[t + n] = total ∂L/∂s_t for t in -n..L.
        let mut g = vec![0.0; n + l];
        for p in (0..n + l).rev() {
            let t = p as isize - n as isize;
            let mut v = 0.0;
            // s_t is the k-th entry of the final state when t = L-1-k.
            if let Some(dl) = dlast {
                let k = l as isize - 1 - t;
                if (0..n as isize).contains(&k) {
                    v += dl[m * n + k as usize];
                }
            }
            // y_{t+i} reads s_t through c_{t+i,i}.
            for i in 0..n {
                let ti = t + i as isize;
                if ti < 0 || ti >= l as isize {
                    continue;
                }
                let ti = ti as usize;
                v += match &a.c {
                    Some(c) => at(c, a, n, m, ti, i) * dyt(ti),
                    None if i == 0 => dyt(ti),
                    None => 0.0,
                };
            }
            // s_{t+i} = … + α_{t+i,i} s_t.
            for i in 1..=n {
                let ti = t + i as isize;
                if ti < 0 || ti >= l as isize {
                    continue;
                }
                v += at(&a.alpha, a, n, m, ti as usize, i - 1) * g[p + i];
            }
            g[p] = v;
        }
        for j in 0..n {
            gr.ds0[m * n + j] = g[n - 1 - j];
        }
        for t in 0..l {
            let gt = g[n + t];
            let u = a.u[m * l + t];
            let beta = a.beta.as_ref().map_or(1.0, |b| at(b, a, 1, m, t, 0));
            gr.du[m * l + t] = beta * gt + a.d.map_or(0.0, |d| d[m % dim] * dyt(t));
            if let (Some(b), Some(db)) = (&a.beta, gr.dbeta.as_mut()) {
                db[idx(b, 1, m, t, 0)] += u * gt;
            }
            for i in 1..=n {
                gr.dalpha[idx(&a.alpha, n, m, t, i - 1)] += gt * s[n + t - i];
            }
            if let (Some(c), Some(dc)) = (&a.c, gr.dc.as_mut()) {
                for i in 0..n {
                    dc[idx(c, n, m, t, i)] += dyt(t) * s[n + t - i];
                }
            }
            if let Some(dd) = gr.dd.as_mut() {
                dd[m % dim] += dyt(t) * u;
            }
        }
    }
    gr
}
