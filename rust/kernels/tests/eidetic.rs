//! Eidetic retention (design §6.1, §6.2): the innovation kernel at every supported level
//! against the scalar f64 reference (whole and in pieces, thread invariance), and the
//! heap store (streaming in pieces and chunked) against a brute-force top-m.
#![allow(clippy::needless_range_loop)]

use bmojo_kernels::cpu::pool;
use bmojo_kernels::eidetic::{
    check_store, innovation, push, select, InnovArgs, InnovOut, Policy, SelectArgs, SelectOut,
};
use bmojo_kernels::Error;
use bmojo_kernels::{Level, SimdElem};
use common::reference::eidetic as refe;

mod common;
use common::Rng;

trait Cast: SimdElem {
    fn to(self) -> f64;
}
impl Cast for f32 {
    fn to(self) -> f64 {
        self as f64
    }
}
impl Cast for f64 {
    fn to(self) -> f64 {
        self
    }
}

fn cv<T: Cast>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::from_f64(v)).collect()
}

struct State<T> {
    hist: Vec<T>,
    count: Vec<i64>,
    ema: Vec<T>,
}

/// Runs the kernel on `y (b, l, d)` from `st`, returns the scores and the new state.
#[allow(clippy::too_many_arguments)]
fn run<T: Cast>(
    level: Level,
    b: usize,
    l: usize,
    d: usize,
    c: &[T],
    y: &[T],
    st: &State<T>,
    chi2: bool,
) -> (Vec<T>, State<T>) {
    let k = c.len();
    let s = InnovArgs {
        batch: b,
        len: l,
        dim: d,
        weights: c,
        y,
        history: &st.hist,
        count: &st.count,
        ema: &st.ema,
        chi2,
        rate: T::from_f64(0.125),
        floor: T::from_f64(1e-6),
    };
    let mut sc = vec![T::ZERO; b * l];
    let mut out = State {
        hist: vec![T::ZERO; b * k * d],
        count: vec![0; b],
        ema: vec![T::ZERO; 2 * b],
    };
    innovation(
        level,
        &s,
        InnovOut {
            scores: &mut sc,
            history: &mut out.hist,
            count: &mut out.count,
            ema: &mut out.ema,
        },
    )
    .unwrap();
    (sc, out)
}

fn check_innovation<T: Cast>(rtol: f64) {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for &(b, l, d, k) in &[
        (2, 9, 1, 1),
        (3, 17, 7, 2),
        (2, 33, 16, 4),
        (1, 20, 37, 7),
        (2, 5, 19, 7),
        (2, 0, 5, 3),
    ] {
        for chi2 in [false, true] {
            let y = rng.vec(b * l * d, -1.0, 1.0);
            let c = if k == 4 {
                vec![0.25; 4]
            } else {
                rng.vec(k, -0.5, 1.0)
            };
            let hist = rng.vec(b * k * d, -1.0, 1.0);
            let count: Vec<i64> = (0..b).map(|i| [0, 2, 50][i % 3]).collect();
            let ema: Vec<f64> = (0..b)
                .flat_map(|i| [0.3 * i as f64, 0.5 * i as f64])
                .collect();
            for level in Level::supported() {
                let (yt, ct) = (cv::<T>(&y), cv::<T>(&c));
                let st = State {
                    hist: cv::<T>(&hist),
                    count: count.clone(),
                    ema: cv::<T>(&ema),
                };
                let (sc, out) = run(level, b, l, d, &ct, &yt, &st, chi2);
                for r in 0..b {
                    let back = |v: &[T]| v.iter().map(|x| x.to()).collect::<Vec<_>>();
                    let (want, wema) = refe::innovation(
                        &back(&yt[r * l * d..(r + 1) * l * d]),
                        l,
                        d,
                        &back(&ct),
                        &back(&st.hist[r * k * d..(r + 1) * k * d]),
                        count[r] as usize,
                        (ema[2 * r], ema[2 * r + 1]),
                        chi2,
                        0.125,
                        1e-6,
                    );
                    for t in 0..l {
                        let g = sc[r * l + t].to();
                        let w = want[t];
                        assert!(
                            (g - w).abs() <= rtol * (1.0 + w.abs()),
                            "{level:?} b{b} l{l} d{d} k{k} chi2={chi2} row {r} t {t}: {g} vs {w}"
                        );
                    }
                    assert_eq!(out.count[r], count[r] + l as i64);
                    assert!((out.ema[2 * r].to() - wema.0).abs() <= rtol * (1.0 + wema.0.abs()));
                    assert!((out.ema[2 * r + 1].to() - wema.1).abs() <= rtol);
                }
                // Pieces carrying the state equal the whole, bitwise.
                let cut = l / 3;
                let piece = |lo: usize, hi: usize| -> Vec<T> {
                    (0..b)
                        .flat_map(|r| yt[(r * l + lo) * d..(r * l + hi) * d].to_vec())
                        .collect()
                };
                let (s1, mid) = run(level, b, cut, d, &ct, &piece(0, cut), &st, chi2);
                let (s2, end) = run(level, b, l - cut, d, &ct, &piece(cut, l), &mid, chi2);
                for r in 0..b {
                    for t in 0..l {
                        let g = if t < cut {
                            s1[r * cut + t]
                        } else {
                            s2[r * (l - cut) + t - cut]
                        };
                        assert_eq!(g.to().to_bits(), sc[r * l + t].to().to_bits());
                    }
                }
                assert_eq!(
                    end.hist.iter().map(|x| x.to()).collect::<Vec<_>>(),
                    out.hist.iter().map(|x| x.to()).collect::<Vec<_>>()
                );
            }
        }
    }
}

#[test]
fn innovation_every_level_f64() {
    check_innovation::<f64>(1e-12);
}

#[test]
fn innovation_every_level_f32() {
    check_innovation::<f32>(1e-4);
}

#[test]
fn innovation_constant_sequence_is_explained() {
    // Constant y: the mean predictor explains every position after the first exactly.
    let (b, l, d) = (1, 12, 5);
    let y = vec![0.75f32; b * l * d];
    for level in Level::supported() {
        let st = State {
            hist: vec![0.0f32; 4 * d],
            count: vec![0],
            ema: vec![0.0; 2],
        };
        let (sc, _) = run(level, b, l, d, &[0.25f32; 4], &y, &st, false);
        assert!(sc[0] > 0.0);
        assert!(sc[4..].iter().all(|&s| s == 0.0), "{level:?}: {sc:?}");
    }
}

#[test]
fn innovation_threads_bitwise() {
    let (b, l, d, k) = (8, 256, 33, 4);
    let mut rng = Rng(7);
    let y = cv::<f32>(&rng.vec(b * l * d, -1.0, 1.0));
    let st = State {
        hist: vec![0.0f32; b * k * d],
        count: vec![0; b],
        ema: vec![0.0; 2 * b],
    };
    for level in Level::supported() {
        pool::set_num_threads(1).unwrap();
        let (a, _) = run(level, b, l, d, &[0.25f32; 4], &y, &st, true);
        pool::set_num_threads(3).unwrap();
        let (c, _) = run(level, b, l, d, &[0.25f32; 4], &y, &st, true);
        pool::set_num_threads(2).unwrap();
        assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn innovation_rejects_bad_arguments() {
    let st = State {
        hist: vec![0.0f64; 2],
        count: vec![0],
        ema: vec![0.0; 2],
    };
    let y = vec![1.0f64; 3];
    let mut sc = vec![0.0; 3];
    let (mut h, mut c, mut e) = (vec![0.0; 2], vec![0], vec![0.0; 2]);
    for (rate, floor, count, want) in [
        (0.0, 1e-6, 0, "rate"),
        (0.5, 0.0, 0, "floor"),
        (0.5, 1e-6, -1, "count"),
    ] {
        let cnt = [count];
        let s = InnovArgs {
            batch: 1,
            len: 3,
            dim: 1,
            weights: &[0.5, 0.5],
            y: &y,
            history: &st.hist,
            count: &cnt,
            ema: &st.ema,
            chi2: true,
            rate,
            floor,
        };
        let out = InnovOut {
            scores: &mut sc,
            history: &mut h,
            count: &mut c,
            ema: &mut e,
        };
        let err = innovation(Level::Scalar, &s, out).unwrap_err();
        assert!(
            matches!(&err, Error::Value { name, .. } if name == want),
            "{err}"
        );
    }
}

// ------------------------------------------------------------------------ store

/// A store invariant broken in row 0.
fn is_corrupt(e: &Error) -> bool {
    matches!(e, Error::Context { context, source } if context == "row 0: "
        && matches!(**source, Error::Corrupt { .. }))
}

const POLICIES: [(&str, f64); 4] = [
    ("topk", 0.0),
    ("threshold", 2.0),
    ("fifo", 2.0),
    ("fifo", 0.0),
];

/// Scores with many exact ties: small integers.
fn tied_scores(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.below(6) as f64).collect()
}

fn sorted_held(pos: &[i64]) -> Vec<i64> {
    let mut v: Vec<i64> = pos.iter().copied().filter(|&p| p >= 0).collect();
    v.sort_unstable();
    v
}

#[test]
fn streaming_store_equals_brute_force() {
    let mut rng = Rng(0xabcdef);
    for &(name, tau) in &POLICIES {
        for cap in [1, 2, 3, 5, 8] {
            let (b, l) = (3, 40);
            let policy = Policy::from_name(name, tau).unwrap();
            let scores: Vec<f64> = tied_scores(&mut rng, b * l);
            let mut pos = vec![-1i64; b * cap];
            let mut sc = vec![0.0; b * cap];
            let mut count = vec![0i64; b];
            let mut t = 0;
            while t < l {
                let n = rng.below(6).min(l - t);
                let new: Vec<f64> = (0..b)
                    .flat_map(|r| scores[r * l + t..r * l + t + n].to_vec())
                    .collect();
                push(policy, b, cap, &mut pos, &mut sc, &mut count, &new).unwrap();
                t += n;
                for r in 0..b {
                    assert_eq!(count[r], t as i64);
                    let row = &scores[r * l..(r + 1) * l];
                    let got = sorted_held(&pos[r * cap..(r + 1) * cap]);
                    assert!(got.len() <= cap);
                    assert_eq!(
                        got,
                        refe::held(row, t, cap, name, tau),
                        "{name} cap {cap} t {t}"
                    );
                }
                check_store(policy, b, cap, &pos, &sc, &count).unwrap();
            }
        }
    }
}

#[test]
fn chunked_select_equals_brute_force() {
    let mut rng = Rng(0x1234567);
    for &(name, tau) in &POLICIES {
        for cap in [1, 3, 4, 7] {
            for chunk in [1, 2, 5, 13, 64] {
                let (b, l) = (2, 37);
                let policy = Policy::from_name(name, tau).unwrap();
                let scores = tied_scores(&mut rng, b * l);
                // Whole sequence in one call, then split at a chunk multiple.
                let whole = select_run(policy, b, l, cap, chunk, &scores, None);
                let nch = l.div_ceil(chunk);
                for r in 0..b {
                    let row = &scores[r * l..(r + 1) * l];
                    for c in 0..nch {
                        let got = &whole.0[(r * nch + c) * cap..(r * nch + c + 1) * cap];
                        let mut want = refe::held(row, c * chunk, cap, name, tau);
                        want.resize(cap, -1);
                        assert_eq!(got, &want[..], "{name} cap {cap} chunk {chunk} c {c}");
                    }
                }
                let cut = (nch / 2) * chunk;
                let first: Vec<f64> = (0..b)
                    .flat_map(|r| scores[r * l..r * l + cut].to_vec())
                    .collect();
                let rest: Vec<f64> = (0..b)
                    .flat_map(|r| scores[r * l + cut..(r + 1) * l].to_vec())
                    .collect();
                let p1 = select_run(policy, b, cut, cap, chunk, &first, None);
                let p2 = select_run(policy, b, l - cut, cap, chunk, &rest, Some(&p1));
                let (n1, n2) = (cut / chunk, nch - cut / chunk);
                for r in 0..b {
                    let mut joined = p1.0[r * n1 * cap..(r + 1) * n1 * cap].to_vec();
                    joined.extend_from_slice(&p2.0[r * n2 * cap..(r + 1) * n2 * cap]);
                    assert_eq!(joined, whole.0[r * nch * cap..(r + 1) * nch * cap]);
                }
                assert_eq!((&p2.1, &p2.3), (&whole.1, &whole.3));
            }
        }
    }
}

type Sel = (Vec<i64>, Vec<i64>, Vec<f64>, Vec<i64>);

fn select_run(
    policy: Policy,
    b: usize,
    l: usize,
    cap: usize,
    chunk: usize,
    scores: &[f64],
    prev: Option<&Sel>,
) -> Sel {
    let (pos0, sc0, start) = match prev {
        Some(p) => (p.1.clone(), p.2.clone(), p.3.clone()),
        None => (vec![-1; b * cap], vec![0.0; b * cap], vec![0; b]),
    };
    let nch = l.div_ceil(chunk);
    let mut out: Sel = (
        vec![0; b * nch * cap],
        vec![0; b * cap],
        vec![0.0; b * cap],
        vec![0; b],
    );
    let s = SelectArgs {
        policy,
        batch: b,
        len: l,
        cap,
        chunk,
        scores,
        positions: &pos0,
        store_scores: &sc0,
        start: &start,
    };
    select(
        &s,
        SelectOut {
            held: &mut out.0,
            positions: &mut out.1,
            scores: &mut out.2,
            count: &mut out.3,
        },
    )
    .unwrap();
    out
}

#[test]
fn store_threads_bitwise() {
    let (b, l, cap) = (16, 4000, 9);
    let mut rng = Rng(99);
    let scores = rng.vec(b * l, 0.0, 1.0);
    let policy = Policy::TopK;
    pool::set_num_threads(1).unwrap();
    let a = select_run(policy, b, l, cap, 64, &scores, None);
    pool::set_num_threads(3).unwrap();
    let c = select_run(policy, b, l, cap, 64, &scores, None);
    pool::set_num_threads(2).unwrap();
    assert_eq!(a, c);
}

#[test]
fn failed_push_writes_nothing() {
    let policy = Policy::TopK;
    let (b, cap) = (2, 3);
    let mut pos = vec![-1i64; b * cap];
    let mut sc = vec![0.0; b * cap];
    let mut count = vec![0i64; b];
    push(
        policy,
        b,
        cap,
        &mut pos,
        &mut sc,
        &mut count,
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
    )
    .unwrap();
    let before = (pos.clone(), sc.clone(), count.clone());
    // NaN score, wrong length, corrupted heap, held position not before count, duplicate.
    let err = push(
        policy,
        b,
        cap,
        &mut pos,
        &mut sc,
        &mut count,
        &[1.0, f64::NAN],
    )
    .unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let err = push(policy, b, cap, &mut pos, &mut sc, &mut count, &[1.0]).unwrap_err();
    assert!(err.to_string().starts_with("scores"), "{err}");
    assert_eq!((pos.clone(), sc.clone(), count.clone()), before);
    let mut bad = pos.clone();
    bad.swap(0, 1);
    let mut bsc = sc.clone();
    bsc.swap(0, 1);
    let err = push(policy, b, cap, &mut bad, &mut bsc, &mut count, &[1.0, 1.0]).unwrap_err();
    assert!(
        is_corrupt(&err) && err.to_string().contains("heap order"),
        "{err}"
    );
    let mut late = pos.clone();
    late[0] = 10;
    let err = push(policy, b, cap, &mut late, &mut sc, &mut count, &[1.0, 1.0]).unwrap_err();
    assert!(
        is_corrupt(&err) && err.to_string().contains("not before"),
        "{err}"
    );
    let mut gap = pos.clone();
    gap[1] = -1;
    let err = push(policy, b, cap, &mut gap, &mut sc, &mut count, &[1.0, 1.0]).unwrap_err();
    assert!(
        is_corrupt(&err) && err.to_string().contains("empty slots"),
        "{err}"
    );
    assert_eq!((pos, sc, count), before);
    assert!(Policy::from_name("lru", 0.0).is_err());
    assert!(Policy::from_name("fifo", -1.0).is_err());
    assert!(check_store(policy, 1, 0, &[], &[], &[0]).is_err());
}
