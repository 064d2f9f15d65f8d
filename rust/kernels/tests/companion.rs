//! Companion scan kernels at every supported level against the scalar reference, and the
//! reference backward against finite differences.
#![allow(clippy::needless_range_loop)]

use bmojo_kernels::companion::{self, BwdOut, CompanionArgs, FwdOut, Seq};
use bmojo_kernels::cpu::pool;
use bmojo_kernels::{Level, SimdElem};
use common::reference::companion::{companion_backward, companion_forward, CompanionGrads};

mod common;
use common::{close, Rng};

/// Which inputs a case has: `Some(true)` per step, `Some(false)` per channel.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    dim: usize,
    len: usize,
    n: usize,
    a_var: bool,
    beta: Option<bool>,
    c: Option<bool>,
    d: bool,
    h0: bool,
}

#[derive(Clone)]
struct Data<T> {
    u: Vec<T>,
    alpha: Vec<T>,
    beta: Vec<T>,
    c: Vec<T>,
    d: Vec<T>,
    h0: Vec<T>,
    dy: Vec<T>,
    dlast: Vec<T>,
}

fn data(c: &Case, seed: u64) -> Data<f64> {
    let mut r = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let (m, l, n) = (c.batch * c.dim, c.len, c.n);
    let seq = |r: &mut Rng, var: bool, per: usize, lo: f64, hi: f64| {
        r.vec(if var { m * l * per } else { c.dim * per }, lo, hi)
    };
    // Σ|α| <= 0.9: a stable filter, so magnitudes stay O(1) over long runs.
    let amp = 0.9 / n as f64;
    Data {
        u: r.vec(m * l, -1.0, 1.0),
        alpha: seq(&mut r, c.a_var, n, -amp, amp),
        beta: c.beta.map_or(vec![], |v| seq(&mut r, v, 1, 0.5, 1.5)),
        c: c.c.map_or(vec![], |v| seq(&mut r, v, n, -1.0, 1.0)),
        d: if c.d { r.vec(c.dim, -1.0, 1.0) } else { vec![] },
        h0: if c.h0 {
            r.vec(m * n, -1.0, 1.0)
        } else {
            vec![]
        },
        dy: r.vec(m * l, -1.0, 1.0),
        dlast: r.vec(m * n, -1.0, 1.0),
    }
}

fn conv<T: Copy, U>(x: &Data<T>, f: impl Fn(T) -> U + Copy) -> Data<U> {
    let g = |v: &Vec<T>| v.iter().map(|&a| f(a)).collect();
    Data {
        u: g(&x.u),
        alpha: g(&x.alpha),
        beta: g(&x.beta),
        c: g(&x.c),
        d: g(&x.d),
        h0: g(&x.h0),
        dy: g(&x.dy),
        dlast: g(&x.dlast),
    }
}

fn args<'a, T>(c: &Case, x: &'a Data<T>) -> CompanionArgs<'a, T> {
    let seq = |var: bool, v: &'a [T]| if var { Seq::Var(v) } else { Seq::Const(v) };
    CompanionArgs {
        batch: c.batch,
        dim: c.dim,
        len: c.len,
        order: c.n,
        u: &x.u,
        alpha: seq(c.a_var, &x.alpha),
        beta: c.beta.map(|v| seq(v, &x.beta)),
        c: c.c.map(|v| seq(v, &x.c)),
        d: c.d.then_some(&x.d[..]),
        s0: c.h0.then_some(&x.h0[..]),
    }
}

struct Res {
    y: Vec<f64>,
    s: Vec<f64>,
    last: Vec<f64>,
    g: CompanionGrads,
}

fn run_kernel<T: SimdElem + Into<f64>>(level: Level, c: &Case, x: &Data<T>, dlast: bool) -> Res {
    let a = args(c, x);
    let (m, l, n) = (c.batch * c.dim, c.len, c.n);
    let (mut y, mut s, mut last) = (
        vec![T::ZERO; m * l],
        vec![T::ZERO; m * l],
        vec![T::ZERO; m * n],
    );
    companion::companion_fwd(
        level,
        &a,
        FwdOut {
            y: &mut y,
            s: Some(&mut s),
            last: &mut last,
        },
    )
    .unwrap();
    // Without s the other outputs are the same.
    if c.c.is_none() || !c.d {
        let (mut y2, mut last2) = (vec![T::ZERO; m * l], vec![T::ZERO; m * n]);
        let out = FwdOut {
            y: &mut y2,
            s: None,
            last: &mut last2,
        };
        companion::companion_fwd(level, &a, out).unwrap();
        assert!(y2 == y && last2 == last);
    }
    let mut du = vec![T::ZERO; m * l];
    let mut da = vec![T::ZERO; x.alpha.len()];
    let mut db = vec![T::ZERO; x.beta.len()];
    let mut dc = vec![T::ZERO; x.c.len()];
    let mut dd = vec![T::ZERO; x.d.len()];
    let mut ds0 = vec![T::ZERO; m * n];
    companion::companion_bwd(
        level,
        &a,
        &s,
        &x.dy,
        dlast.then_some(&x.dlast[..]),
        BwdOut {
            du: &mut du,
            dalpha: &mut da,
            dbeta: c.beta.map(|_| &mut db[..]),
            dc: c.c.map(|_| &mut dc[..]),
            dd: c.d.then_some(&mut dd[..]),
            ds0: &mut ds0,
        },
    )
    .unwrap();
    let f = |v: &[T]| v.iter().map(|&e| e.into()).collect::<Vec<f64>>();
    Res {
        y: f(&y),
        s: f(&s),
        last: f(&last),
        g: CompanionGrads {
            du: f(&du),
            dalpha: f(&da),
            dbeta: c.beta.map(|_| f(&db)),
            dc: c.c.map(|_| f(&dc)),
            dd: c.d.then(|| f(&dd)),
            ds0: f(&ds0),
        },
    }
}

fn check_case(c: &Case, seed: u64) {
    let x = data(c, seed);
    let a = args(c, &x);
    let (y, s, last) = companion_forward(&a);
    for dl in [false, true] {
        let g = companion_backward(&a, &x.dy, dl.then_some(&x.dlast[..]));
        let x32 = conv(&x, |v| v as f32);
        // Gradients of per-channel inputs are sums over batch·time: scale atol.
        let sum = (c.batch * c.len.max(1)) as f64;
        for level in Level::supported() {
            for (r, rtol, atol) in [
                (run_kernel::<f64>(level, c, &x, dl), 1e-11, 1e-11),
                (run_kernel::<f32>(level, c, &x32, dl), 2e-4, 2e-4),
            ] {
                let tag = format!("{c:?} {level:?} rtol {rtol} dlast {dl}");
                close(&format!("y {tag}"), &r.y, &y, rtol, atol);
                close(&format!("s {tag}"), &r.s, &s, rtol, atol);
                close(&format!("last {tag}"), &r.last, &last, rtol, atol);
                close(&format!("du {tag}"), &r.g.du, &g.du, rtol, atol);
                close(&format!("ds0 {tag}"), &r.g.ds0, &g.ds0, rtol, atol);
                let at = |var: bool| if var { atol } else { atol * sum };
                close(
                    &format!("dalpha {tag}"),
                    &r.g.dalpha,
                    &g.dalpha,
                    rtol,
                    at(c.a_var),
                );
                if let Some(v) = c.beta {
                    close(
                        &format!("dbeta {tag}"),
                        r.g.dbeta.as_ref().unwrap(),
                        g.dbeta.as_ref().unwrap(),
                        rtol,
                        at(v),
                    );
                }
                if let Some(v) = c.c {
                    close(
                        &format!("dc {tag}"),
                        r.g.dc.as_ref().unwrap(),
                        g.dc.as_ref().unwrap(),
                        rtol,
                        at(v),
                    );
                }
                if c.d {
                    close(
                        &format!("dD {tag}"),
                        r.g.dd.as_ref().unwrap(),
                        g.dd.as_ref().unwrap(),
                        rtol,
                        at(false),
                    );
                }
            }
        }
    }
}

/// Every combination of the optional inputs, cycled over orders and lengths.
#[test]
fn kernels_match_reference() {
    let mut k = 0u64;
    for n in [1, 2, 3, 7, 16, 33, 64] {
        for len in [0, 1, 37, 300] {
            for combo in 0..4u64 {
                let bits = k.wrapping_mul(2654435761) ^ combo;
                k += 1;
                let c = Case {
                    batch: 2,
                    dim: 9,
                    len,
                    n,
                    a_var: combo & 1 == 1,
                    beta: [None, Some(true), Some(false)][(bits % 3) as usize],
                    c: [None, Some(false), Some(true)][(bits / 3 % 3) as usize],
                    d: combo & 2 == 2,
                    h0: (bits / 9) % 2 == 1 || combo == 3,
                };
                check_case(&c, k);
            }
        }
    }
}

/// More lanes than one task (BLOCK = 64), all inputs present and absent.
#[test]
fn kernels_match_reference_across_tasks() {
    for (var, all) in [(true, true), (false, true), (true, false), (false, false)] {
        let c = Case {
            batch: 3,
            dim: 29,
            len: 75,
            n: 4,
            a_var: var,
            beta: all.then_some(var),
            c: all.then_some(!var),
            d: all,
            h0: all,
        };
        check_case(&c, 7);
    }
}

/// Loss = Σ y·wy + Σ last·wl, through the reference forward.
fn loss(c: &Case, x: &Data<f64>) -> f64 {
    let (y, _, last) = companion_forward(&args(c, x));
    let yl: f64 = y.iter().zip(&x.dy).map(|(a, b)| a * b).sum();
    let ll: f64 = last.iter().zip(&x.dlast).map(|(a, b)| a * b).sum();
    yl + ll
}

/// Picks one input of the data.
type Field = fn(&mut Data<f64>) -> &mut Vec<f64>;

#[test]
fn reference_backward_matches_finite_differences() {
    let mut seed = 100;
    for n in [1, 3, 5] {
        for len in [0, 2, 4, 9] {
            for (a_var, b, cc) in [
                (true, Some(true), Some(true)),
                (false, Some(false), Some(false)),
                (true, None, None),
                (false, Some(true), Some(false)),
            ] {
                seed += 1;
                let c = Case {
                    batch: 2,
                    dim: 2,
                    len,
                    n,
                    a_var,
                    beta: b,
                    c: cc,
                    d: true,
                    h0: true,
                };
                let x = data(&c, seed);
                let g = companion_backward(&args(&c, &x), &x.dy, Some(&x.dlast));
                let fields: [(&str, Field, Option<&Vec<f64>>); 6] = [
                    ("u", |d| &mut d.u, Some(&g.du)),
                    ("alpha", |d| &mut d.alpha, Some(&g.dalpha)),
                    ("beta", |d| &mut d.beta, g.dbeta.as_ref()),
                    ("c", |d| &mut d.c, g.dc.as_ref()),
                    ("D", |d| &mut d.d, g.dd.as_ref()),
                    ("h0", |d| &mut d.h0, Some(&g.ds0)),
                ];
                for (name, f, grad) in fields {
                    let Some(grad) = grad else { continue };
                    let mut xm = x.clone();
                    assert_eq!(f(&mut xm).len(), grad.len(), "{name}");
                    for i in 0..grad.len() {
                        let eps = 1e-6;
                        let v0 = f(&mut xm)[i];
                        f(&mut xm)[i] = v0 + eps;
                        let lp = loss(&c, &xm);
                        f(&mut xm)[i] = v0 - eps;
                        let lm = loss(&c, &xm);
                        f(&mut xm)[i] = v0;
                        let fd = (lp - lm) / (2.0 * eps);
                        assert!(
                            (fd - grad[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                            "{name}[{i}] {c:?}: fd {fd} vs {}",
                            grad[i]
                        );
                    }
                }
            }
        }
    }
}

/// Hand-computed: s_t = 0.5 s_{t-1} + 0.25 s_{t-2} + u_t.
#[test]
fn known_values() {
    let c = Case {
        batch: 1,
        dim: 1,
        len: 3,
        n: 2,
        a_var: false,
        beta: None,
        c: None,
        d: false,
        h0: true,
    };
    let x = Data {
        u: vec![1.0, 0.0, 2.0],
        alpha: vec![0.5, 0.25],
        beta: vec![],
        c: vec![],
        d: vec![],
        h0: vec![4.0, 8.0], // s_0 = 4, s_{-1} = 8
        dy: vec![0.0; 3],
        dlast: vec![0.0; 2],
    };
    // s_1 = 2 + 2 + 1 = 5; s_2 = 2.5 + 1 = 3.5; s_3 = 1.75 + 1.25 + 2 = 5
    let (y, _, last) = companion_forward(&args(&c, &x));
    assert_eq!(y, vec![5.0, 3.5, 5.0]);
    assert_eq!(last, vec![5.0, 3.5]);
    for level in Level::supported() {
        let r = run_kernel::<f64>(level, &c, &x, true);
        assert_eq!(r.y, y);
        assert_eq!(r.last, last);
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let c = Case {
        batch: 3,
        dim: 150,
        len: 300,
        n: 5,
        a_var: false,
        beta: Some(false),
        c: Some(false),
        d: true,
        h0: true,
    };
    let c2 = Case {
        a_var: true,
        beta: Some(true),
        c: Some(true),
        ..c
    };
    for case in [c, c2] {
        let x = conv(&data(&case, 5), |v| v as f32);
        for level in Level::supported() {
            pool::set_num_threads(1).unwrap();
            let one = run_kernel(level, &case, &x, true);
            pool::set_num_threads(3).unwrap();
            let three = run_kernel(level, &case, &x, true);
            assert_eq!(one.y, three.y, "{level:?}");
            assert_eq!(one.last, three.last);
            assert_eq!(one.g.du, three.g.du);
            assert_eq!(one.g.dalpha, three.g.dalpha);
            assert_eq!(one.g.dbeta, three.g.dbeta);
            assert_eq!(one.g.dc, three.g.dc);
            assert_eq!(one.g.dd, three.g.dd);
            assert_eq!(one.g.ds0, three.g.ds0);
        }
    }
}

#[test]
fn bad_lengths_are_errors() {
    let c = Case {
        batch: 1,
        dim: 2,
        len: 4,
        n: 3,
        a_var: true,
        beta: None,
        c: None,
        d: false,
        h0: false,
    };
    let x = data(&c, 1);
    let mut a = args(&c, &x);
    a.alpha = Seq::Var(&x.alpha[1..]);
    let (mut y, mut s, mut last) = (vec![0.0; 8], vec![0.0; 8], vec![0.0; 6]);
    let out = FwdOut {
        y: &mut y,
        s: Some(&mut s),
        last: &mut last,
    };
    assert!(companion::companion_fwd(Level::Scalar, &a, out)
        .unwrap_err()
        .to_string()
        .contains("alpha"));
    let mut a = args(&c, &x);
    a.order = 0;
    let out = FwdOut {
        y: &mut y,
        s: Some(&mut s),
        last: &mut last,
    };
    assert!(companion::companion_fwd(Level::Scalar, &a, out).is_err());
    let a = args(&c, &x);
    let (mut du, mut da, mut ds0) = (vec![0.0; 8], vec![0.0; 24], vec![0.0; 6]);
    let out = BwdOut {
        du: &mut du,
        dalpha: &mut da,
        dbeta: None,
        dc: None,
        dd: None,
        ds0: &mut ds0,
    };
    let err = companion::companion_bwd(Level::Scalar, &a, &s[1..], &x.dy, None, out).unwrap_err();
    assert_eq!(err, bmojo_kernels::Error::len("s", 8, 7));
}
