//! Scalar f64 oracle: Bilinear / time-varying dense affine recurrence, design §5.
//!
//! Forms every `A_t` explicitly, then `X_t = A_t X_{t-1} + b_t`; the backward is the
//! textbook adjoint over the stored states.

use bmojo_kernels::bilinear::{BilinearArgs, Trans};

/// The dense `A_t (n, n)` of row `row`, step `t`.
pub fn transition(s: &BilinearArgs<'_, f64>, row: usize, t: usize) -> Vec<f64> {
    let nn = s.n * s.n;
    match s.trans {
        Trans::Modulated { a0, nmat, v, m } => {
            let mut a = a0.to_vec();
            for j in 0..m {
                let vj = v[(row * s.len + t) * m + j];
                for (x, &y) in a.iter_mut().zip(&nmat[j * nn..(j + 1) * nn]) {
                    *x += vj * y;
                }
            }
            a
        }
        Trans::PerStep { a } => a[(row * s.len + t) * nn..(row * s.len + t + 1) * nn].to_vec(),
    }
}

fn start(s: &BilinearArgs<'_, f64>, row: usize) -> Vec<f64> {
    s.h0.map_or(vec![0.0; s.n], |h| h[row * s.n..(row + 1) * s.n].to_vec())
}

/// Returns `(xs (batch, len, n), last (batch, n))`.
pub fn forward(s: &BilinearArgs<'_, f64>) -> (Vec<f64>, Vec<f64>) {
    let (bt, l, n) = (s.batch, s.len, s.n);
    let mut xs = vec![0.0; bt * l * n];
    let mut last = vec![0.0; bt * n];
    for row in 0..bt {
        let mut x = start(s, row);
        for t in 0..l {
            let a = transition(s, row, t);
            let b = &s.b[(row * l + t) * n..];
            x = (0..n)
                .map(|i| b[i] + (0..n).map(|k| a[i * n + k] * x[k]).sum::<f64>())
                .collect();
            xs[(row * l + t) * n..(row * l + t + 1) * n].copy_from_slice(&x);
        }
        last[row * n..(row + 1) * n].copy_from_slice(&x);
    }
    (xs, last)
}

/// Gradients of a scan; `da` is `dA0 (n, n)` or `dA (batch, len, n, n)` as in
/// [`bmojo_kernels::bilinear::BwdOut`].
#[derive(Debug, Clone)]
pub struct Grads {
    pub db: Vec<f64>,
    pub da: Vec<f64>,
    pub dn: Vec<f64>,
    pub dv: Vec<f64>,
    pub dh0: Vec<f64>,
}

/// Adjoint: `λ_t = dX_t + A_{t+1}^T λ_{t+1}` (with `A_{L+1}^T λ_{L+1} = dlast`).
pub fn backward(s: &BilinearArgs<'_, f64>, dxs: &[f64], dlast: Option<&[f64]>) -> Grads {
    let (bt, l, n, m) = (s.batch, s.len, s.n, s.m());
    let nn = n * n;
    let (xs, _) = forward(s);
    let per_step = matches!(s.trans, Trans::PerStep { .. });
    let mut g = Grads {
        db: vec![0.0; bt * l * n],
        da: vec![0.0; if per_step { bt * l * nn } else { nn }],
        dn: vec![0.0; if per_step { 0 } else { m * nn }],
        dv: vec![0.0; if per_step { 0 } else { bt * l * m }],
        dh0: vec![0.0; bt * n],
    };
    for row in 0..bt {
        let mut carry = dlast.map_or(vec![0.0; n], |d| d[row * n..(row + 1) * n].to_vec());
        for t in (0..l).rev() {
            let lam: Vec<f64> = (0..n)
                .map(|i| dxs[(row * l + t) * n + i] + carry[i])
                .collect();
            g.db[(row * l + t) * n..(row * l + t + 1) * n].copy_from_slice(&lam);
            let xp = if t == 0 {
                start(s, row)
            } else {
                xs[(row * l + t - 1) * n..(row * l + t) * n].to_vec()
            };
            // dA_t = λ x_prev^T, then chain it into the parameters of A_t.
            let dat: Vec<f64> = (0..nn).map(|e| lam[e / n] * xp[e % n]).collect();
            match s.trans {
                Trans::PerStep { .. } => {
                    g.da[(row * l + t) * nn..(row * l + t + 1) * nn].copy_from_slice(&dat)
                }
                Trans::Modulated { nmat, v, .. } => {
                    for (d, &x) in g.da.iter_mut().zip(&dat) {
                        *d += x;
                    }
                    for j in 0..m {
                        let vj = v[(row * l + t) * m + j];
                        let nj = &nmat[j * nn..(j + 1) * nn];
                        let mut dvj = 0.0;
                        let dnj = &mut g.dn[j * nn..(j + 1) * nn];
                        for ((d, &x), &nje) in dnj.iter_mut().zip(&dat).zip(nj) {
                            *d += vj * x;
                            dvj += nje * x;
                        }
                        g.dv[(row * l + t) * m + j] = dvj;
                    }
                }
            }
            let a = transition(s, row, t);
            carry = (0..n)
                .map(|k| (0..n).map(|i| a[i * n + k] * lam[i]).sum())
                .collect();
        }
        g.dh0[row * n..(row + 1) * n].copy_from_slice(&carry);
    }
    g
}
