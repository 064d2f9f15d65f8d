//! Causal depthwise convolution (design §3) at every supported level against the scalar
//! f64 reference: forward, backward, streaming update; thread invariance; failed updates
//! write nothing.
#![allow(clippy::needless_range_loop)]

use bmojo_kernels::conv::{conv_bwd, conv_fwd, conv_update, ConvArgs, ConvGrads, UpdateArgs};
use bmojo_kernels::cpu::pool;
use bmojo_kernels::{Level, SimdElem};
use common::reference::conv as refc;

mod common;
use common::{close, Rng};

trait Cast: SimdElem + numcast::Sealed {}
mod numcast {
    pub trait Sealed {
        fn of(x: f64) -> Self;
        fn to(self) -> f64;
    }
    impl Sealed for f32 {
        fn of(x: f64) -> f32 {
            x as f32
        }
        fn to(self) -> f64 {
            self as f64
        }
    }
    impl Sealed for f64 {
        fn of(x: f64) -> f64 {
            x
        }
        fn to(self) -> f64 {
            self
        }
    }
}
impl Cast for f32 {}
impl Cast for f64 {}

fn cv<T: Cast>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::of(v)).collect()
}
fn back<T: Cast>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&v| v.to()).collect()
}

/// One random problem (f64 data; seq_idx sorted segment ids when asked).
struct Case {
    b: usize,
    d: usize,
    l: usize,
    k: usize,
    x: Vec<f64>,
    w: Vec<f64>,
    bias: Option<Vec<f64>>,
    init: Option<Vec<f64>>,
    seq: Option<Vec<i64>>,
    silu: bool,
    dout: Vec<f64>,
    dfin: Option<Vec<f64>>,
}

fn case(rng: &mut Rng, b: usize, d: usize, l: usize, k: usize, mode: u8) -> Case {
    let km = k - 1;
    let seq = (mode & 4 != 0).then(|| {
        let mut v = Vec::with_capacity(b * l);
        for _ in 0..b {
            let mut id = 0i64;
            for t in 0..l {
                if t > 0 && rng.next() < 0.15 {
                    id += 1;
                }
                v.push(id);
            }
        }
        v
    });
    Case {
        b,
        d,
        l,
        k,
        x: rng.vec(b * d * l, -1.0, 1.0),
        w: rng.vec(d * k, -1.0, 1.0),
        bias: (mode & 1 != 0).then(|| rng.vec(d, -0.5, 0.5)),
        init: (mode & 2 != 0 && seq.is_none()).then(|| rng.vec(b * d * km, -1.0, 1.0)),
        seq,
        silu: mode & 8 != 0,
        dout: rng.vec(b * d * l, -1.0, 1.0),
        dfin: (mode & 16 != 0).then(|| rng.vec(b * d * km, -1.0, 1.0)),
    }
}

struct Res {
    out: Vec<f64>,
    fin: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
    di: Vec<f64>,
}

fn run<T: Cast>(level: Level, c: &Case) -> Res {
    let (x, w, bias, init) = (
        cv::<T>(&c.x),
        cv::<T>(&c.w),
        c.bias.as_deref().map(cv::<T>),
        c.init.as_deref().map(cv::<T>),
    );
    let s = ConvArgs {
        batch: c.b,
        dim: c.d,
        len: c.l,
        width: c.k,
        x: &x,
        weight: &w,
        bias: bias.as_deref(),
        init: init.as_deref(),
        seq_idx: c.seq.as_deref(),
        silu: c.silu,
    };
    let rows = c.b * c.d;
    let km = c.k - 1;
    let mut out = vec![T::of(0.0); rows * c.l];
    let mut fin = vec![T::of(0.0); rows * km];
    conv_fwd(level, &s, &mut out, Some(&mut fin)).unwrap();
    let (dout, dfin) = (cv::<T>(&c.dout), c.dfin.as_deref().map(cv::<T>));
    let mut dx = vec![T::of(0.0); rows * c.l];
    let mut dw = vec![T::of(0.0); c.d * c.k];
    let mut db = vec![T::of(0.0); c.d];
    let mut di = vec![T::of(0.0); rows * km];
    conv_bwd(
        level,
        &s,
        &dout,
        dfin.as_deref(),
        ConvGrads {
            dx: &mut dx,
            dweight: &mut dw,
            dbias: &mut db,
            dinit: init.is_some().then_some(&mut di[..]),
        },
    )
    .unwrap();
    Res {
        out: back(&out),
        fin: back(&fin),
        dx: back(&dx),
        dw: back(&dw),
        db: back(&db),
        di: back(&di),
    }
}

fn reference(c: &Case) -> Res {
    let r = refc::Conv {
        batch: c.b,
        dim: c.d,
        len: c.l,
        width: c.k,
        x: &c.x,
        weight: &c.w,
        bias: c.bias.as_deref(),
        init: c.init.as_deref(),
        seq_idx: c.seq.as_deref(),
        silu: c.silu,
    };
    let (out, fin) = r.forward();
    let (dx, dw, db, di) = r.backward(&c.dout, c.dfin.as_deref());
    Res {
        out,
        fin,
        dx,
        dw,
        db,
        di,
    }
}

fn check(tag: &str, got: &Res, want: &Res, rtol: f64, atol: f64) {
    close(&format!("{tag} out"), &got.out, &want.out, rtol, atol);
    close(
        &format!("{tag} final"),
        &got.fin,
        &want.fin,
        rtol.min(1e-7),
        0.0,
    );
    close(&format!("{tag} dx"), &got.dx, &want.dx, rtol, atol);
    // Weight and bias gradients sum over batch and time: scale atol with the count.
    close(&format!("{tag} dw"), &got.dw, &want.dw, rtol, atol * 8.0);
    close(&format!("{tag} db"), &got.db, &want.db, rtol, atol * 8.0);
    close(&format!("{tag} dinit"), &got.di, &want.di, rtol, atol);
}

#[test]
fn fwd_bwd_every_level_vs_reference() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for k in [1usize, 2, 3, 4, 5, 8, 17] {
        for l in [0usize, 1, 2, k - 1, k + 2, 37, 70] {
            for mode in [0u8, 1 | 2, 2 | 8 | 16, 1 | 4 | 8, 4 | 16, 1 | 2 | 8 | 16] {
                let c = case(&mut rng, 2, 3, l, k, mode);
                let want = reference(&c);
                for level in Level::supported() {
                    let tag = format!("{level:?} k={k} l={l} mode={mode}");
                    check(
                        &format!("f64 {tag}"),
                        &run::<f64>(level, &c),
                        &want,
                        1e-12,
                        1e-12,
                    );
                    check(
                        &format!("f32 {tag}"),
                        &run::<f32>(level, &c),
                        &want,
                        1e-5,
                        2e-5,
                    );
                }
            }
        }
    }
}

#[test]
fn thread_count_is_bitwise_invisible() {
    let mut rng = Rng(77);
    for mode in [1 | 2 | 8 | 16, 1 | 4 | 8] {
        let c = case(&mut rng, 4, 64, 600, 4, mode);
        for level in Level::supported() {
            pool::set_num_threads(1).unwrap();
            let one = run::<f32>(level, &c);
            pool::set_num_threads(3).unwrap();
            let three = run::<f32>(level, &c);
            for (a, b) in [
                (&one.out, &three.out),
                (&one.dx, &three.dx),
                (&one.dw, &three.dw),
                (&one.db, &three.db),
                (&one.di, &three.di),
            ] {
                assert!(
                    a.iter()
                        .zip(b.iter())
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{level:?} mode {mode}"
                );
            }
        }
    }
}

/// One update call at `level` on a copy of `state`; returns (out, state after).
#[allow(clippy::too_many_arguments)]
fn upd<T: Cast>(
    level: Level,
    b: usize,
    d: usize,
    nt: usize,
    k: usize,
    sl: usize,
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    silu: bool,
    cache: Option<&[i64]>,
    slots: Option<&[i64]>,
    state: &[f64],
) -> Result<(Vec<f64>, Vec<f64>), bmojo_kernels::Error> {
    let (xt, wt, bt) = (cv::<T>(x), cv::<T>(w), bias.map(cv::<T>));
    let mut st = cv::<T>(state);
    let mut out = vec![T::of(0.0); b * d * nt];
    let s = UpdateArgs {
        batch: b,
        dim: d,
        ntok: nt,
        width: k,
        state_len: sl,
        x: &xt,
        weight: &wt,
        bias: bt.as_deref(),
        silu,
        cache_seqlens: cache,
        slots,
    };
    let total = state.len() / (d * sl).max(1);
    let total = if sl == 0 {
        slots.map_or(b, |_| 5)
    } else {
        total
    };
    conv_update(level, &s, &mut st, total, &mut out)?;
    Ok((back(&out), back(&st)))
}

#[test]
fn update_every_level_vs_reference() {
    let mut rng = Rng(12345);
    let (b, d, pool_n) = (3, 5, 5);
    for k in [1usize, 2, 3, 4, 5, 8, 17] {
        for extra in [0, 3] {
            let sl = k - 1 + extra;
            for nt in [1, 2, 7, 20] {
                for (circ, pad) in [(false, false), (true, false), (false, true), (true, true)] {
                    let x = rng.vec(b * d * nt, -1.0, 1.0);
                    let w = rng.vec(d * k, -1.0, 1.0);
                    let bias = rng.vec(d, -0.5, 0.5);
                    let state = rng.vec(pool_n * d * sl, -1.0, 1.0);
                    let cache: Vec<i64> = (0..b as i64).map(|i| 3 * i + 1 + nt as i64).collect();
                    let slots: Vec<i64> = vec![4, -1, 1];
                    let cache = circ.then_some(&cache[..]);
                    let slots = pad.then_some(&slots[..]);
                    let state = if pad {
                        state
                    } else {
                        state[..b * d * sl].to_vec()
                    };
                    let silu = nt % 2 == 0;
                    let mut want_st = state.clone();
                    let want_out = refc::update(
                        b,
                        d,
                        nt,
                        k,
                        sl,
                        &x,
                        &w,
                        Some(&bias),
                        silu,
                        cache,
                        slots,
                        &mut want_st,
                    );
                    for level in Level::supported() {
                        let tag = format!("{level:?} k={k} sl={sl} nt={nt} circ={circ} pad={pad}");
                        let (o, s) = upd::<f64>(
                            level,
                            b,
                            d,
                            nt,
                            k,
                            sl,
                            &x,
                            &w,
                            Some(&bias),
                            silu,
                            cache,
                            slots,
                            &state,
                        )
                        .unwrap();
                        close(&tag, &o, &want_out, 1e-12, 1e-12);
                        close(&tag, &s, &want_st, 0.0, 0.0);
                        let (o, s) = upd::<f32>(
                            level,
                            b,
                            d,
                            nt,
                            k,
                            sl,
                            &x,
                            &w,
                            Some(&bias),
                            silu,
                            cache,
                            slots,
                            &state,
                        )
                        .unwrap();
                        close(&tag, &o, &want_out, 1e-5, 2e-5);
                        close(&tag, &s, &want_st, 1e-7, 0.0);
                    }
                }
            }
        }
    }
}

#[test]
fn streaming_update_equals_forward() {
    let mut rng = Rng(999);
    let (b, d, l, k) = (2, 4, 23, 4);
    let c = case(&mut rng, b, d, l, k, 1 | 2 | 8);
    let want = reference(&c);
    for level in Level::supported() {
        let mut state = c.init.clone().unwrap();
        let mut outs = vec![0.0; b * d * l];
        for t in 0..l {
            let xt: Vec<f64> = (0..b * d).map(|r| c.x[r * l + t]).collect();
            let (o, s) = upd::<f64>(
                level,
                b,
                d,
                1,
                k,
                k - 1,
                &xt,
                &c.w,
                c.bias.as_deref(),
                true,
                None,
                None,
                &state,
            )
            .unwrap();
            state = s;
            for r in 0..b * d {
                outs[r * l + t] = o[r];
            }
        }
        close("stream out", &outs, &want.out, 1e-12, 1e-12);
        close("stream state", &state, &want.fin, 0.0, 0.0);
    }
}

#[test]
fn bad_update_writes_nothing() {
    let (b, d, k, sl) = (3, 2, 3, 2);
    let x = vec![1.0; b * d];
    let w = vec![1.0; d * k];
    let state: Vec<f64> = (0..4 * d * sl).map(|i| i as f64).collect();
    for level in Level::supported() {
        for slots in [[0i64, 2, 0], [0, 4, 1], [1, -1, 1], [0, 1, 9]] {
            let (xt, wt) = (x.clone(), w.clone());
            let mut st = state.clone();
            let mut out = vec![0.0; b * d];
            let s = UpdateArgs {
                batch: b,
                dim: d,
                ntok: 1,
                width: k,
                state_len: sl,
                x: &xt,
                weight: &wt,
                bias: None,
                silu: false,
                cache_seqlens: None,
                slots: Some(&slots),
            };
            assert!(
                conv_update(level, &s, &mut st, 4, &mut out).is_err(),
                "{slots:?}"
            );
            assert_eq!(st, state);
        }
        // state shorter than K-1
        let mut st = vec![0.0; b * d];
        let s = UpdateArgs {
            batch: b,
            dim: d,
            ntok: 1,
            width: k,
            state_len: 1,
            x: &x,
            weight: &w,
            bias: None,
            silu: false,
            cache_seqlens: None,
            slots: None,
        };
        let mut out = vec![0.0; b * d];
        assert!(conv_update(level, &s, &mut st, b, &mut out).is_err());
        assert!(st.iter().all(|&v| v == 0.0));
    }
}

#[test]
fn bad_shapes_are_errors() {
    let x = vec![0.0f64; 12];
    let w = vec![0.0f64; 6];
    let mut out = vec![0.0f64; 12];
    let mk = |width: usize, seq: Option<&'static [i64]>, init: Option<&'static [f64]>| {
        (width, seq, init)
    };
    static SEQ: [i64; 6] = [0; 6];
    static INIT: [f64; 4] = [0.0; 4];
    for (width, seq, init) in [
        mk(0, None, None),
        mk(2, Some(&SEQ), Some(&INIT)),
        mk(4, None, None),
    ] {
        let s = ConvArgs {
            batch: 2,
            dim: 2,
            len: 3,
            width,
            x: &x,
            weight: &w,
            bias: None,
            init,
            seq_idx: seq,
            silu: false,
        };
        assert!(conv_fwd(Level::Scalar, &s, &mut out, None).is_err());
    }
}
