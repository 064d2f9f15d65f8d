//! Every kernel at every level this CPU supports, against the scalar references.
#![allow(clippy::needless_range_loop)] // index loops read more plainly in tests

use bmojo_kernels::cpu::pool;
use bmojo_kernels::cpu::{self, Vector};
use bmojo_kernels::cpu::{dispatch, Kernel, Level, SimdElem};
use bmojo_kernels::selective::{self, n_chunks, BwdOut, FwdOut, Mat, ScanArgs};
use bmojo_kernels::{diag, step};

mod common;
use common::{close, reference, to32, to64, Rng};

// ---------------------------------------------------------------- math functions

struct MathK<'a, T> {
    x: &'a [T],
    out: &'a mut [T],
    which: u8,
}
impl<T: SimdElem> Kernel<T> for MathK<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        for (i, o) in self
            .x
            .chunks_exact(V::W)
            .zip(self.out.chunks_exact_mut(V::W))
        {
            let v = V::load(i);
            let r = match self.which {
                0 => cpu::exp(v),
                1 => cpu::softplus(v),
                _ => cpu::sigmoid(v),
            };
            r.store(o);
        }
    }
}

fn math<T: SimdElem>(level: Level, which: u8, x: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    dispatch(
        level,
        MathK {
            x,
            out: &mut out,
            which,
        },
    );
    out
}

#[test]
fn vector_math_matches_std_at_every_level() {
    let mut xs: Vec<f64> = (-2000..=2000).map(|i| i as f64 * 0.0517).collect();
    xs.extend([
        0.0, -0.0, 1e-30, -1e-30, 88.0, 88.7, 88.8, -87.3, -87.4, -103.0, 700.0, 709.7, 710.0,
        -708.0, -746.0,
    ]);
    xs.extend([
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        19.99,
        20.0,
        20.01,
    ]);
    while !xs.len().is_multiple_of(16) {
        xs.push(0.5);
    }
    for level in Level::supported() {
        let e64 = math(level, 0, &xs);
        let e32 = math(level, 0, &to32(&xs));
        for (i, &x) in xs.iter().enumerate() {
            let want = x.exp();
            let got = e64[i];
            let ok = if want.is_nan() {
                got.is_nan()
            } else if want < 2.3e-308 {
                got == 0.0 || (got - want).abs() < 1e-300
            } else {
                ((got - want) / want).abs() < 4e-16 || got == want
            };
            assert!(ok, "{level:?} exp f64 at {x}: {got} vs {want}");
            let w32 = (x as f32).exp();
            let g32 = e32[i];
            let ok = if w32.is_nan() {
                g32.is_nan()
            } else if w32 < 1.2e-38 {
                g32 == 0.0 || (g32 - w32).abs() < 1.2e-38
            } else {
                ((g32 - w32) / w32).abs() < 3e-7 || g32 == w32
            };
            assert!(ok, "{level:?} exp f32 at {x}: {g32} vs {w32}");
        }
        let sp = math(level, 1, &xs);
        let sg = math(level, 2, &xs);
        for (i, &x) in xs.iter().enumerate() {
            let want = if x > 20.0 { x } else { x.exp().ln_1p() };
            assert!(
                (sp[i] - want).abs() <= 2e-16 * want.abs().max(1e-300) * 4.0
                    || (want.is_nan() && sp[i].is_nan())
                    || sp[i] == want,
                "{level:?} softplus at {x}: {} vs {want}",
                sp[i]
            );
            let want = 1.0 / (1.0 + (-x).exp());
            assert!(
                (sg[i] - want).abs() <= 1e-15 || (want.is_nan() && sg[i].is_nan()),
                "{level:?} sigmoid at {x}"
            );
        }
        let sp32 = math(level, 1, &to32(&xs));
        for (i, &x) in xs.iter().enumerate() {
            let want = if x as f32 > 20.0 {
                x as f32 as f64
            } else {
                (x as f32 as f64).exp().ln_1p()
            };
            let got = sp32[i] as f64;
            assert!(
                got == want
                    || (got - want).abs() <= 4e-7 * want.abs() + 1e-37
                    || (want.is_nan() && got.is_nan()),
                "{level:?} softplus f32 at {x}: {got} vs {want}"
            );
        }
    }
}

// ---------------------------------------------------------------- diagonal scan

#[test]
fn diag_scan_matches_reference() {
    let mut rng = Rng(7);
    for &(m, l) in &[(1, 1), (3, 0), (5, 7), (17, 65), (70, 130), (33, 200)] {
        let a = rng.vec(m * l, -1.0, 1.0);
        let b = rng.vec(m * l, -1.0, 1.0);
        let h0 = rng.vec(m, -1.0, 1.0);
        for reverse in [false, true] {
            for init in [None, Some(&h0[..])] {
                let (want, wlast) = reference::diag_scan(m, l, &a, &b, init, reverse);
                for level in Level::supported() {
                    let s = diag::DiagArgs {
                        lanes: m,
                        len: l,
                        a: &a,
                        b: &b,
                        h0: init,
                        reverse,
                    };
                    let (mut out, mut last) = (vec![0.0; m * l], vec![0.0; m]);
                    diag::diag_scan(level, &s, &mut out, &mut last).unwrap();
                    close("h", &out, &want, 1e-13, 1e-13);
                    close("last", &last, &wlast, 1e-13, 1e-13);
                    let (a32, b32, h32) = (to32(&a), to32(&b), to32(&h0));
                    let s = diag::DiagArgs {
                        lanes: m,
                        len: l,
                        a: &a32,
                        b: &b32,
                        h0: init.map(|_| &h32[..]),
                        reverse,
                    };
                    let (mut out, mut last) = (vec![0.0f32; m * l], vec![0.0f32; m]);
                    diag::diag_scan(level, &s, &mut out, &mut last).unwrap();
                    close("h32", &to64(&out), &want, 1e-4, 1e-4);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- selective scan

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    dim: usize,
    len: usize,
    n: usize,
    b_groups: Option<usize>,
    c_groups: Option<usize>,
    d: bool,
    z: bool,
    bias: bool,
    softplus: bool,
    h0: bool,
    seq: bool,
}

struct Data {
    u: Vec<f64>,
    delta: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    d: Vec<f64>,
    z: Vec<f64>,
    bias: Vec<f64>,
    h0: Vec<f64>,
    seq: Vec<i64>,
    dout: Vec<f64>,
    dlast: Vec<f64>,
}

fn data(c: &Case, seed: u64) -> Data {
    let mut r = Rng(seed);
    let (bt, d, l, n) = (c.batch, c.dim, c.len, c.n);
    let mat = |g: Option<usize>, r: &mut Rng| match g {
        Some(g) => r.vec(bt * g * n * l, -1.0, 1.0),
        None => r.vec(d * n, -1.0, 1.0),
    };
    let mut seq = vec![0i64; bt * l];
    for b in 0..bt {
        let mut id = 0;
        for t in 0..l {
            if t > 0 && r.next() < 0.1 {
                id += 1;
            }
            seq[b * l + t] = id;
        }
    }
    Data {
        u: r.vec(bt * d * l, -1.0, 1.0),
        delta: if c.softplus {
            r.vec(bt * d * l, -3.0, 1.0)
        } else {
            r.vec(bt * d * l, 0.0, 0.5)
        },
        a: r.vec(d * n, -2.0, -0.1),
        b: mat(c.b_groups, &mut r),
        c: mat(c.c_groups, &mut r),
        d: r.vec(d, -1.0, 1.0),
        z: r.vec(bt * d * l, -2.0, 2.0),
        bias: r.vec(d, -0.5, 0.5),
        h0: r.vec(bt * d * n, -1.0, 1.0),
        seq,
        dout: r.vec(bt * d * l, -1.0, 1.0),
        dlast: r.vec(bt * d * n, -1.0, 1.0),
    }
}

fn args<'a, T>(c: &Case, x: &'a Data32<T>) -> ScanArgs<'a, T> {
    let m = |g: Option<usize>, v: &'a [T]| match g {
        Some(groups) => Mat::Var { data: v, groups },
        None => Mat::Const(v),
    };
    ScanArgs {
        batch: c.batch,
        dim: c.dim,
        len: c.len,
        dstate: c.n,
        u: &x.u,
        delta: &x.delta,
        a: &x.a,
        b: m(c.b_groups, &x.b),
        c: m(c.c_groups, &x.c),
        d: c.d.then_some(&x.d[..]),
        z: c.z.then_some(&x.z[..]),
        delta_bias: c.bias.then_some(&x.bias[..]),
        h0: c.h0.then_some(&x.h0[..]),
        seq_idx: if c.seq { Some(&x.seq[..]) } else { None },
        softplus: c.softplus,
    }
}

/// The data in element type T.
struct Data32<T> {
    u: Vec<T>,
    delta: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    d: Vec<T>,
    z: Vec<T>,
    bias: Vec<T>,
    h0: Vec<T>,
    seq: Vec<i64>,
    dout: Vec<T>,
    dlast: Vec<T>,
}

fn conv<T: Copy>(x: &Data, f: impl Fn(f64) -> T) -> Data32<T> {
    let m = |v: &Vec<f64>| v.iter().map(|&e| f(e)).collect();
    Data32 {
        u: m(&x.u),
        delta: m(&x.delta),
        a: m(&x.a),
        b: m(&x.b),
        c: m(&x.c),
        d: m(&x.d),
        z: m(&x.z),
        bias: m(&x.bias),
        h0: m(&x.h0),
        seq: x.seq.clone(),
        dout: m(&x.dout),
        dlast: m(&x.dlast),
    }
}

struct Run<T> {
    out: Vec<T>,
    last: Vec<T>,
    grads: Vec<Vec<T>>,
}

fn run_kernel<T: SimdElem>(level: Level, c: &Case, x: &Data32<T>) -> Run<T> {
    let s = args(c, x);
    let (bt, d, l, n) = (c.batch, c.dim, c.len, c.n);
    let mut out = vec![T::ZERO; bt * d * l];
    let mut last = vec![T::ZERO; bt * d * n];
    let mut ckpt = vec![T::ZERO; bt * d * n_chunks(l) * n];
    selective::forward(
        level,
        &s,
        FwdOut {
            out: &mut out,
            last: &mut last,
            ckpt: &mut ckpt,
        },
    )
    .unwrap();
    let ml = |g: Option<usize>| g.map_or(d * n, |g| bt * g * n * l);
    let mut g: Vec<Vec<T>> = vec![
        vec![T::ZERO; bt * d * l],
        vec![T::ZERO; bt * d * l],
        vec![T::ZERO; d * n],
        vec![T::ZERO; ml(c.b_groups)],
        vec![T::ZERO; ml(c.c_groups)],
        vec![T::ZERO; d],
        vec![T::ZERO; bt * d * l],
        vec![T::ZERO; d],
        vec![T::ZERO; bt * d * n],
    ];
    {
        let [du, ddelta, da, db, dc, dd, dz, dbias, dh0] = &mut g[..] else {
            unreachable!()
        };
        let o = BwdOut {
            du,
            ddelta,
            da,
            db,
            dc,
            dd: Some(dd),
            dz: c.z.then_some(&mut dz[..]),
            ddelta_bias: Some(dbias),
            dh0,
        };
        selective::backward(level, &s, &ckpt, &x.dout, Some(&x.dlast), o).unwrap();
    }
    Run {
        out,
        last,
        grads: g,
    }
}

fn reference_run(c: &Case, x: &Data) -> (Vec<f64>, Vec<f64>, Vec<Vec<f64>>) {
    let xx = conv(x, |v| v);
    let s = args(c, &xx);
    let (out, last) = reference::selective_forward(&s);
    let g = reference::selective_backward(&s, &x.dout, Some(&x.dlast));
    (
        out,
        last,
        vec![
            g.du,
            g.ddelta,
            g.da,
            g.db,
            g.dc,
            g.dd,
            g.dz,
            g.ddelta_bias,
            g.dh0,
        ],
    )
}

const GRAD_NAMES: [&str; 9] = [
    "du",
    "ddelta",
    "dA",
    "dB",
    "dC",
    "dD",
    "dz",
    "ddelta_bias",
    "dh0",
];

fn cases() -> Vec<Case> {
    let base = Case {
        batch: 2,
        dim: 5,
        len: 9,
        n: 3,
        b_groups: Some(1),
        c_groups: Some(1),
        d: true,
        z: true,
        bias: true,
        softplus: true,
        h0: true,
        seq: false,
    };
    let mut v = vec![
        base,
        Case { len: 0, ..base },
        Case { len: 1, ..base },
        Case {
            dim: 17,
            len: 70,
            n: 4,
            ..base
        },
        Case {
            dim: 70,
            len: 130,
            n: 2,
            b_groups: None,
            c_groups: None,
            ..base
        },
        Case {
            dim: 24,
            len: 66,
            n: 5,
            b_groups: Some(3),
            c_groups: Some(2),
            ..base
        },
        Case {
            dim: 8,
            len: 40,
            n: 1,
            d: false,
            z: false,
            bias: false,
            softplus: false,
            h0: false,
            ..base
        },
        Case {
            dim: 9,
            len: 150,
            n: 3,
            seq: true,
            ..base
        },
        Case {
            dim: 3,
            len: 20,
            n: 33,
            b_groups: None,
            c_groups: Some(1),
            ..base
        },
        Case {
            batch: 1,
            dim: 130,
            len: 65,
            n: 16,
            b_groups: Some(2),
            c_groups: None,
            seq: true,
            ..base
        },
    ];
    v.push(Case {
        batch: 3,
        dim: 4,
        len: 5,
        n: 2,
        b_groups: Some(4),
        c_groups: Some(4),
        ..base
    });
    v
}

#[test]
fn selective_scan_f64_matches_reference_at_every_level() {
    for (i, c) in cases().iter().enumerate() {
        let x = data(c, 100 + i as u64);
        let (wo, wl, wg) = reference_run(c, &x);
        for level in Level::supported() {
            let r = run_kernel(level, c, &conv(&x, |v| v));
            let tag = format!("{level:?} {c:?}");
            close(&format!("out {tag}"), &r.out, &wo, 1e-11, 1e-11);
            close(&format!("last {tag}"), &r.last, &wl, 1e-11, 1e-11);
            for (k, name) in GRAD_NAMES.iter().enumerate() {
                if (*name == "dz" && !c.z) || (*name == "dD" && !c.d) {
                    continue;
                }
                close(&format!("{name} {tag}"), &r.grads[k], &wg[k], 1e-10, 1e-10);
            }
        }
    }
}

#[test]
fn selective_scan_f32_matches_reference_at_every_level() {
    for (i, c) in cases().iter().enumerate() {
        let x = data(c, 200 + i as u64);
        let (wo, wl, wg) = reference_run(c, &x);
        for level in Level::supported() {
            let r = run_kernel(level, c, &conv(&x, |v| v as f32));
            let tag = format!("{level:?} {c:?}");
            close(&format!("out {tag}"), &to64(&r.out), &wo, 1e-4, 1e-4);
            close(&format!("last {tag}"), &to64(&r.last), &wl, 1e-4, 1e-4);
            for (k, name) in GRAD_NAMES.iter().enumerate() {
                if (*name == "dz" && !c.z) || (*name == "dD" && !c.d) {
                    continue;
                }
                close(
                    &format!("{name} {tag}"),
                    &to64(&r.grads[k]),
                    &wg[k],
                    2e-4,
                    2e-4,
                );
            }
        }
    }
}

#[test]
fn reference_backward_matches_finite_differences() {
    let c = Case {
        batch: 2,
        dim: 4,
        len: 7,
        n: 3,
        b_groups: Some(2),
        c_groups: Some(1),
        d: true,
        z: true,
        bias: true,
        softplus: true,
        h0: true,
        seq: true,
    };
    let x = data(&c, 9);
    let (_, _, g) = reference_run(&c, &x);
    let loss = |x: &Data| {
        let xx = conv(x, |v| v);
        let (out, last) = reference::selective_forward(&args(&c, &xx));
        out.iter().zip(&x.dout).map(|(a, b)| a * b).sum::<f64>()
            + last.iter().zip(&x.dlast).map(|(a, b)| a * b).sum::<f64>()
    };
    let fields: [fn(&mut Data) -> &mut Vec<f64>; 9] = [
        |d| &mut d.u,
        |d| &mut d.delta,
        |d| &mut d.a,
        |d| &mut d.b,
        |d| &mut d.c,
        |d| &mut d.d,
        |d| &mut d.z,
        |d| &mut d.bias,
        |d| &mut d.h0,
    ];
    for (k, f) in fields.iter().enumerate() {
        let mut y = data(&c, 9);
        for i in 0..f(&mut y).len() {
            let eps = 1e-6;
            let v0 = f(&mut y)[i];
            f(&mut y)[i] = v0 + eps;
            let lp = loss(&y);
            f(&mut y)[i] = v0 - eps;
            let lm = loss(&y);
            f(&mut y)[i] = v0;
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[k][i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{} [{i}]: fd {fd} vs {}",
                GRAD_NAMES[k],
                g[k][i]
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    // Big enough to be split across the pool.
    let c = Case {
        batch: 3,
        dim: 200,
        len: 300,
        n: 8,
        b_groups: Some(2),
        c_groups: Some(1),
        d: true,
        z: true,
        bias: true,
        softplus: true,
        h0: true,
        seq: true,
    };
    let x = conv(&data(&c, 5), |v| v as f32);
    for level in Level::supported() {
        pool::set_num_threads(1).unwrap();
        let one = run_kernel(level, &c, &x);
        pool::set_num_threads(3).unwrap();
        let three = run_kernel(level, &c, &x);
        assert_eq!(one.out, three.out, "{level:?}");
        assert_eq!(one.last, three.last);
        assert_eq!(one.grads, three.grads);
    }
}

#[test]
fn nan_and_inf_propagate() {
    let c = Case {
        batch: 1,
        dim: 5,
        len: 10,
        n: 2,
        b_groups: Some(1),
        c_groups: Some(1),
        d: true,
        z: true,
        bias: true,
        softplus: true,
        h0: true,
        seq: false,
    };
    let mut x = data(&c, 3);
    x.u[3] = f64::NAN;
    x.delta[12] = f64::INFINITY;
    for level in Level::supported() {
        let r = run_kernel(level, &c, &conv(&x, |v| v));
        assert!(r.out[3].is_nan(), "{level:?}");
        assert!(r.out.iter().any(|v| !v.is_finite()));
    }
}

// ---------------------------------------------------------------- streaming step

#[test]
fn step_tokens_equal_the_scan() {
    let c = Case {
        batch: 3,
        dim: 37,
        len: 12,
        n: 19,
        b_groups: Some(1),
        c_groups: Some(1),
        d: true,
        z: true,
        bias: true,
        softplus: true,
        h0: true,
        seq: false,
    };
    let x = data(&c, 11);
    let xx = conv(&x, |v| v);
    let (want_out, want_last) = reference::selective_forward(&args(&c, &xx));
    let (bt, d, l, n) = (c.batch, c.dim, c.len, c.n);
    // (batch, dim, len) -> (batch, len, dim); B (batch, 1, N, len) -> (batch, len, 1, N).
    let tr = |v: &[f64]| {
        let mut o = vec![0.0; bt * d * l];
        for b in 0..bt {
            for dd in 0..d {
                for t in 0..l {
                    o[(b * l + t) * d + dd] = v[(b * d + dd) * l + t];
                }
            }
        }
        o
    };
    let trm = |v: &[f64]| {
        let mut o = vec![0.0; bt * n * l];
        for b in 0..bt {
            for k in 0..n {
                for t in 0..l {
                    o[(b * l + t) * n + k] = v[(b * n + k) * l + t];
                }
            }
        }
        o
    };
    let (xs, dts, zs, bs, cs) = (tr(&x.u), tr(&x.delta), tr(&x.z), trm(&x.b), trm(&x.c));
    for level in Level::supported() {
        // Whole sequence in one multi-token call, with snapshots; and token by token.
        for per_call in [l, 1, 5] {
            // State pool with an extra slot, rows mapped in reverse; one padding row.
            let slots: Vec<i64> = (0..bt as i64).rev().collect();
            let mut state = vec![0.0; (bt + 1) * d * n];
            for b in 0..bt {
                let sl = slots[b] as usize;
                state[sl * d * n..(sl + 1) * d * n]
                    .copy_from_slice(&x.h0[b * d * n..(b + 1) * d * n]);
            }
            let mut got = vec![0.0; bt * l * d];
            let mut t0 = 0;
            while t0 < l {
                let tl = per_call.min(l - t0);
                let pick = |v: &[f64], w: usize| -> Vec<f64> {
                    (0..bt)
                        .flat_map(|b| v[(b * l + t0) * w..(b * l + t0 + tl) * w].to_vec())
                        .collect()
                };
                let (xk, dk, zk, bk, ck) = (
                    pick(&xs, d),
                    pick(&dts, d),
                    pick(&zs, d),
                    pick(&bs, n),
                    pick(&cs, n),
                );
                let s = step::StepArgs {
                    batch: bt,
                    ntok: tl,
                    dim: d,
                    dstate: n,
                    groups: 1,
                    x: &xk,
                    dt: &dk,
                    a: &x.a,
                    b: &bk,
                    c: &ck,
                    d: Some(&x.d),
                    z: Some(&zk),
                    dt_bias: Some(&x.bias),
                    softplus: true,
                    slots: Some(&slots),
                };
                let mut out = vec![0.0; bt * tl * d];
                let mut snaps = vec![0.0; bt * tl * d * n];
                step::step(level, &s, &mut state, bt + 1, &mut out, Some(&mut snaps)).unwrap();
                for b in 0..bt {
                    got[(b * l + t0) * d..(b * l + t0 + tl) * d]
                        .copy_from_slice(&out[b * tl * d..(b + 1) * tl * d]);
                    let sl = slots[b] as usize;
                    assert_eq!(
                        &snaps[((b * tl) + tl - 1) * d * n..][..d * n],
                        &state[sl * d * n..(sl + 1) * d * n]
                    );
                }
                t0 += tl;
            }
            close(
                &format!("{level:?} step out"),
                &got,
                &tr(&want_out),
                1e-12,
                1e-12,
            );
            for b in 0..bt {
                let sl = slots[b] as usize;
                close(
                    "state",
                    &state[sl * d * n..(sl + 1) * d * n],
                    &want_last[b * d * n..(b + 1) * d * n],
                    1e-12,
                    1e-12,
                );
            }
            assert!(
                state[bt * d * n..].iter().all(|&v| v == 0.0),
                "unused slot untouched"
            );
        }
    }
}

#[test]
fn step_rejects_bad_slots_without_writing() {
    let (bt, d, n) = (2, 3, 2);
    let x = vec![1.0; bt * d];
    let a = vec![-1.0; d * n];
    let bm = vec![1.0; bt * n];
    for slots in [vec![0i64, 0], vec![0, 5]] {
        let s = step::StepArgs {
            batch: bt,
            ntok: 1,
            dim: d,
            dstate: n,
            groups: 1,
            x: &x,
            dt: &x,
            a: &a,
            b: &bm,
            c: &bm,
            d: None,
            z: None,
            dt_bias: None,
            softplus: false,
            slots: Some(&slots),
        };
        let mut state = vec![0.5; 3 * d * n];
        let mut out = vec![0.0; bt * d];
        let err = step::step(Level::Scalar, &s, &mut state, 3, &mut out, None).unwrap_err();
        assert!(err.to_string().contains("state_batch_indices"), "{err}");
        assert!(state.iter().all(|&v| v == 0.5));
    }
}
