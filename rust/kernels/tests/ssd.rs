//! Mamba-2's SSD kernel (`ssd.rs`) against a scalar recurrence written here: forward at
//! every SIMD level in f64 and f32, the backward against finite differences of the
//! kernel's own f64 forward, thread counts bitwise, the decoding step against one forward
//! step, and bad lengths refused before anything is written.

mod common;

use bmojo_kernels::cpu::pool;
use bmojo_kernels::ssd::{self, BwdOut, FwdOut, RowStrides, SsdArgs, StepArgs};
use bmojo_kernels::{Level, SimdElem};
use common::{close, to32, to64, Rng};

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    l: usize,
    h: usize,
    p: usize,
    g: usize,
    n: usize,
    opts: bool,
    d_hp: bool,
}

struct Data {
    x: Vec<f64>,
    dt: Vec<f64>,
    a: Vec<f64>,
    bm: Vec<f64>,
    cm: Vec<f64>,
    d: Vec<f64>,
    z: Vec<f64>,
    bias: Vec<f64>,
    h0: Vec<f64>,
    seq: Vec<i64>,
}

fn data(c: &Case, seed: u64) -> Data {
    let mut r = Rng(seed);
    let (bl, h, p, g, n) = (c.b * c.l, c.h, c.p, c.g, c.n);
    Data {
        x: r.vec(bl * h * p, -1.0, 1.0),
        dt: r.vec(bl * h, -1.0, 1.0),
        a: r.vec(h, -1.2, -0.2),
        bm: r.vec(bl * g * n, -1.0, 1.0),
        cm: r.vec(bl * g * n, -1.0, 1.0),
        d: r.vec(if c.d_hp { h * p } else { h }, -1.0, 1.0),
        z: r.vec(bl * h * p, -1.0, 1.0),
        bias: r.vec(h, -0.3, 0.3),
        h0: r.vec(c.b * h * p * n, -1.0, 1.0),
        // two packed sequences per row, the cut at a third of the length
        seq: (0..bl).map(|i| i64::from(i % c.l >= c.l / 3)).collect(),
    }
}

fn args<'a, T: Copy>(c: &'a Case, x: &'a [Vec<T>; 9], seq: &'a [i64]) -> SsdArgs<'a, T> {
    SsdArgs {
        batch: c.b,
        len: c.l,
        heads: c.h,
        hdim: c.p,
        groups: c.g,
        dstate: c.n,
        x: &x[0],
        dt: &x[1],
        a: &x[2],
        b: &x[3],
        c: &x[4],
        d: c.opts.then_some(&x[5][..]),
        z: c.opts.then_some(&x[6][..]),
        dt_bias: c.opts.then_some(&x[7][..]),
        h0: c.opts.then_some(&x[8][..]),
        seq_idx: c.opts.then_some(seq),
        softplus: c.opts,
        limit: None,
        rows: RowStrides::natural(c.h, c.p, c.g, c.n),
    }
}

fn arrays<T>(x: &Data, f: impl Fn(&[f64]) -> Vec<T>) -> [Vec<T>; 9] {
    [
        f(&x.x),
        f(&x.dt),
        f(&x.a),
        f(&x.bm),
        f(&x.cm),
        f(&x.d),
        f(&x.z),
        f(&x.bias),
        f(&x.h0),
    ]
}

/// The recurrence, one scalar at a time: `out (b, l, h, p)` (token-major) and the final
/// state `(b, h, p, n)`.
fn reference(c: &Case, x: &Data) -> (Vec<f64>, Vec<f64>) {
    let (h, p, g, n, l) = (c.h, c.p, c.g, c.n, c.l);
    let mut out = vec![0.0; c.b * l * h * p];
    let mut last = vec![0.0; c.b * h * p * n];
    for b in 0..c.b {
        for hh in 0..h {
            let grp = hh / (h / g);
            let mut s = vec![0.0; p * n];
            if c.opts {
                s.copy_from_slice(&x.h0[(b * h + hh) * p * n..(b * h + hh + 1) * p * n]);
            }
            for t in 0..l {
                let row = b * l + t;
                if c.opts && t > 0 && x.seq[row] != x.seq[row - 1] {
                    s.fill(0.0);
                }
                let mut delta = x.dt[row * h + hh];
                if c.opts {
                    delta += x.bias[hh];
                    delta = if delta > 20.0 {
                        delta
                    } else {
                        delta.exp().ln_1p()
                    };
                }
                let a = (delta * x.a[hh]).exp();
                let bc = (row * g + grp) * n;
                for r in 0..p {
                    let xi = x.x[(row * h + hh) * p + r];
                    let mut y = 0.0;
                    for k in 0..n {
                        let v = a * s[r * n + k] + delta * xi * x.bm[bc + k];
                        s[r * n + k] = v;
                        y += v * x.cm[bc + k];
                    }
                    if c.opts {
                        let d = if c.d_hp { x.d[hh * p + r] } else { x.d[hh] };
                        let zz = x.z[(row * h + hh) * p + r];
                        y = (y + d * xi) * zz / (1.0 + (-zz).exp());
                    }
                    out[(row * h + hh) * p + r] = y;
                }
            }
            last[(b * h + hh) * p * n..(b * h + hh + 1) * p * n].copy_from_slice(&s);
        }
    }
    (out, last)
}

/// Forward at `level`, token-major output and the checkpoints.
fn forward<T: SimdElem>(level: Level, s: &SsdArgs<'_, T>) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (b, l, h, p, n) = (s.batch, s.len, s.heads, s.hdim, s.dstate);
    let mut out = vec![T::ZERO; b * l * h * p];
    let mut last = vec![T::ZERO; b * h * p * n];
    let mut ckpt = vec![T::ZERO; b * h * ssd::n_chunks(l) * p * n];
    let o = FwdOut {
        out: &mut out,
        token_major: true,
        last: &mut last,
        ckpt: &mut ckpt,
    };
    ssd::forward(level, s, o).unwrap();
    (out, last, ckpt)
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            b: 2,
            l: 70,
            h: 4,
            p: 5,
            g: 2,
            n: 19,
            opts: true,
            d_hp: false,
        },
        Case {
            b: 1,
            l: 130,
            h: 3,
            p: 17,
            g: 1,
            n: 37,
            opts: true,
            d_hp: true,
        },
        Case {
            b: 2,
            l: 1,
            h: 2,
            p: 3,
            g: 2,
            n: 16,
            opts: false,
            d_hp: false,
        },
        Case {
            b: 1,
            l: 64,
            h: 1,
            p: 1,
            g: 1,
            n: 1,
            opts: true,
            d_hp: false,
        },
        // state widths of 4, 8 and 16 vectors at AVX-512 f32 (B and C held in registers)
        Case {
            b: 1,
            l: 40,
            h: 2,
            p: 3,
            g: 1,
            n: 64,
            opts: true,
            d_hp: false,
        },
        Case {
            b: 2,
            l: 33,
            h: 2,
            p: 5,
            g: 2,
            n: 128,
            opts: true,
            d_hp: true,
        },
        Case {
            b: 1,
            l: 17,
            h: 1,
            p: 2,
            g: 1,
            n: 256,
            opts: false,
            d_hp: false,
        },
    ]
}

#[test]
fn forward_matches_the_recurrence_at_every_level() {
    for (i, c) in cases().iter().enumerate() {
        let x = data(c, 7 + i as u64);
        let (want, want_last) = reference(c, &x);
        let a64 = arrays(&x, <[f64]>::to_vec);
        let a32 = arrays(&x, to32);
        for level in Level::supported() {
            let (out, last, _) = forward(level, &args(c, &a64, &x.seq));
            close(
                &format!("{level:?} f64 out {c:?}"),
                &out,
                &want,
                1e-12,
                1e-12,
            );
            close(
                &format!("{level:?} f64 last"),
                &last,
                &want_last,
                1e-12,
                1e-12,
            );
            let (out, last, _) = forward(level, &args(c, &a32, &x.seq));
            close(
                &format!("{level:?} f32 out {c:?}"),
                &to64(&out),
                &want,
                1e-4,
                1e-4,
            );
            close(
                &format!("{level:?} f32 last"),
                &to64(&last),
                &want_last,
                1e-4,
                1e-4,
            );
        }
    }
}

/// Σ w·out + Σ v·last for the kernel's f64 forward.
fn loss(c: &Case, arr: &[Vec<f64>; 9], seq: &[i64], w: &[f64], v: &[f64]) -> f64 {
    let (out, last, _) = forward(Level::Scalar, &args(c, arr, seq));
    out.iter().zip(w).map(|(a, b)| a * b).sum::<f64>()
        + last.iter().zip(v).map(|(a, b)| a * b).sum::<f64>()
}

/// The backward with every optional input present: the nine gradients (`dx`, `ddt`,
/// `dz` head-major; the others in their input's layout).
fn backward<T: SimdElem>(
    level: Level,
    c: &Case,
    s: &SsdArgs<'_, T>,
    ckpt: &[T],
    dout: &[T],
    dlast: Option<&[T]>,
) -> [Vec<T>; 9] {
    let (bl, h, p, g, n) = (c.b * c.l, c.h, c.p, c.g, c.n);
    let dlen = s.d.map_or(0, <[T]>::len);
    let mut gr = [
        vec![T::ZERO; bl * h * p],
        vec![T::ZERO; bl * h],
        vec![T::ZERO; h],
        vec![T::ZERO; bl * g * n],
        vec![T::ZERO; bl * g * n],
        vec![T::ZERO; dlen],
        vec![T::ZERO; bl * h * p],
        vec![T::ZERO; h],
        vec![T::ZERO; c.b * h * p * n],
    ];
    let [dx, ddt, da, db, dc, dd, dz, dbias, dh0] = &mut gr;
    let o = BwdOut {
        dx,
        ddt,
        da,
        db,
        dc,
        dd: Some(dd),
        dz: Some(dz),
        ddt_bias: Some(dbias),
        dh0,
    };
    ssd::backward(level, s, ckpt, dout, dlast, o).unwrap();
    gr
}

#[test]
fn backward_matches_finite_differences() {
    let c = Case {
        b: 2,
        l: 75,
        h: 4,
        p: 3,
        g: 2,
        n: 5,
        opts: true,
        d_hp: true,
    };
    let x = data(&c, 3);
    let arr = arrays(&x, <[f64]>::to_vec);
    let mut r = Rng(11);
    let w = r.vec(c.b * c.l * c.h * c.p, -1.0, 1.0);
    let v = r.vec(c.b * c.h * c.p * c.n, -1.0, 1.0);
    for level in Level::supported() {
        let s = args(&c, &arr, &x.seq);
        let (_, _, ckpt) = forward(level, &s);
        let (bl, h, p) = (c.b * c.l, c.h, c.p);
        // dout in the kernel's head-major layout
        let mut dout = vec![0.0; bl * h * p];
        for row in 0..bl {
            let (b, t) = (row / c.l, row % c.l);
            for hh in 0..h {
                for i in 0..p {
                    dout[((b * h + hh) * c.l + t) * p + i] = w[(row * h + hh) * p + i];
                }
            }
        }
        let g_ = backward(level, &c, &s, &ckpt, &dout, Some(&v));
        // finite differences at a few entries of every input
        let head_major = |k: usize, i: usize, width: usize| -> usize {
            // token-major index i of input k -> the kernel's gradient index
            if !(k == 0 || k == 1 || k == 6) {
                return i;
            }
            let (row, rest) = (i / (h * width), i % (h * width));
            let (hh, j) = (rest / width, rest % width);
            let (b, t) = (row / c.l, row % c.l);
            ((b * h + hh) * c.l + t) * width + j
        };
        for k in 0..9 {
            let len = arr[k].len();
            for trial in 0..4 {
                let i = (trial * 7919 + 13 * k) % len;
                let eps = 1e-6;
                let mut plus = arr.clone();
                plus[k][i] += eps;
                let mut minus = arr.clone();
                minus[k][i] -= eps;
                let fd = (loss(&c, &plus, &x.seq, &w, &v) - loss(&c, &minus, &x.seq, &w, &v))
                    / (2.0 * eps);
                let width = if k == 1 { 1 } else { p };
                let got = g_[k][head_major(k, i, width)];
                assert!(
                    (got - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "{level:?} input {k} entry {i}: kernel {got}, finite differences {fd}"
                );
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let c = Case {
        b: 2,
        l: 150,
        h: 6,
        p: 16,
        g: 2,
        n: 40,
        opts: true,
        d_hp: false,
    };
    let x = data(&c, 5);
    let arr = arrays(&x, to32);
    let s = args(&c, &arr, &x.seq);
    let run = || {
        let (out, last, ckpt) = forward(Level::best(), &s);
        let (bl, h, p) = (c.b * c.l, c.h, c.p);
        let dout: Vec<f32> = (0..bl * h * p).map(|i| (i % 7) as f32 - 3.0).collect();
        let gr = backward(Level::best(), &c, &s, &ckpt, &dout, None);
        (out, last, gr)
    };
    pool::set_num_threads(1).unwrap();
    let one = run();
    pool::set_num_threads(3).unwrap();
    let three = run();
    assert_eq!(one.0, three.0);
    assert_eq!(one.1, three.1);
    for (a, b) in one.2.iter().zip(&three.2) {
        assert_eq!(a, b);
    }
}

#[test]
fn step_equals_one_forward_step() {
    let c = Case {
        b: 3,
        l: 1,
        h: 4,
        p: 6,
        g: 2,
        n: 33,
        opts: true,
        d_hp: true,
    };
    let x = data(&c, 9);
    let arr = arrays(&x, <[f64]>::to_vec);
    let mut s = args(&c, &arr, &x.seq);
    s.seq_idx = None;
    let (want, want_state, _) = forward(Level::best(), &s);
    let st = StepArgs {
        batch: c.b,
        heads: c.h,
        hdim: c.p,
        groups: c.g,
        dstate: c.n,
        x: &arr[0],
        dt: &arr[1],
        a: &arr[2],
        b: &arr[3],
        c: &arr[4],
        d: Some(&arr[5]),
        z: Some(&arr[6]),
        dt_bias: Some(&arr[7]),
        softplus: true,
    };
    let mut state = arr[8].clone();
    let mut out = vec![0.0; c.b * c.h * c.p];
    ssd::state_update(Level::best(), &st, &mut state, &mut out).unwrap();
    close("step out", &out, &want, 1e-13, 1e-13);
    close("step state", &state, &want_state, 1e-13, 1e-13);
}

#[test]
fn bad_lengths_are_refused_before_any_write() {
    let c = Case {
        b: 1,
        l: 9,
        h: 2,
        p: 3,
        g: 1,
        n: 4,
        opts: false,
        d_hp: false,
    };
    let x = data(&c, 1);
    let mut arr = arrays(&x, <[f64]>::to_vec);
    arr[3].pop(); // B one element short
    let s = args(&c, &arr, &x.seq);
    let mut out = vec![7.0; 9 * 2 * 3];
    let mut last = vec![7.0; 2 * 3 * 4];
    let o = FwdOut {
        out: &mut out,
        token_major: false,
        last: &mut last,
        ckpt: &mut [],
    };
    let err = ssd::forward(Level::best(), &s, o).unwrap_err();
    assert!(format!("{err}").contains('B'), "{err}");
    assert!(out.iter().chain(&last).all(|&v| v == 7.0));
    let mut arr = arrays(&x, <[f64]>::to_vec);
    arr[0].push(0.0); // x one element long
    let mut state = vec![7.0; 2 * 3 * 4];
    let mut o1 = vec![7.0; 2 * 3];
    let st = StepArgs {
        batch: 1,
        heads: 2,
        hdim: 3,
        groups: 1,
        dstate: 4,
        x: &arr[0][..6 + 1],
        dt: &arr[1][..2],
        a: &arr[2],
        b: &arr[3][..4],
        c: &arr[4][..4],
        d: None,
        z: None,
        dt_bias: None,
        softplus: false,
    };
    assert!(ssd::state_update(Level::best(), &st, &mut state, &mut o1).is_err());
    assert!(state.iter().chain(&o1).all(|&v| v == 7.0));
}
