//! Bilinear / time-varying dense scans at every level against the scalar reference.
#![allow(clippy::needless_range_loop)]

use bmojo_kernels::bilinear::{self, BilinearArgs, BwdOut, Trans, PAR_CHUNK};
use bmojo_kernels::cpu::pool;
use bmojo_kernels::{Level, SimdElem};

mod common;
use common::{close, reference, Rng};

/// Owned inputs of one problem (f64); `per_step` picks the form.
#[derive(Clone)]
struct Problem {
    batch: usize,
    len: usize,
    n: usize,
    m: usize,
    per_step: bool,
    a0: Vec<f64>,
    nmat: Vec<f64>,
    v: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    h0: Option<Vec<f64>>,
}

impl Problem {
    fn new(seed: u64, batch: usize, len: usize, n: usize, m: usize, per_step: bool) -> Self {
        let mut r = Rng(seed.wrapping_mul(2654435761).wrapping_add(99));
        // Entries ~ 0.9 / sqrt(n): spectral radius well below 1 even with modulation.
        let s = 0.9 / (n as f64).sqrt();
        Problem {
            batch,
            len,
            n,
            m,
            per_step,
            a0: r.vec(n * n, -s, s),
            nmat: r.vec(m * n * n, -0.5 * s, 0.5 * s),
            v: r.vec(batch * len * m, -1.0, 1.0),
            a: if per_step {
                r.vec(batch * len * n * n, -s, s)
            } else {
                Vec::new()
            },
            b: r.vec(batch * len * n, -1.0, 1.0),
            h0: Some(r.vec(batch * n, -1.0, 1.0)),
        }
    }
    fn cast<T: SimdElem>(x: &[f64]) -> Vec<T> {
        x.iter().map(|&v| T::from_f64(v)).collect()
    }
}

/// The problem's arrays converted to `T`, plus an args builder.
struct Typed<T> {
    a0: Vec<T>,
    nmat: Vec<T>,
    v: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    h0: Option<Vec<T>>,
}
impl<T: SimdElem> Typed<T> {
    fn of(p: &Problem) -> Self {
        Typed {
            a0: Problem::cast(&p.a0),
            nmat: Problem::cast(&p.nmat),
            v: Problem::cast(&p.v),
            a: Problem::cast(&p.a),
            b: Problem::cast(&p.b),
            h0: p.h0.as_ref().map(|h| Problem::cast(h)),
        }
    }
    fn args<'a>(&'a self, p: &Problem) -> BilinearArgs<'a, T> {
        BilinearArgs {
            batch: p.batch,
            len: p.len,
            n: p.n,
            trans: if p.per_step {
                Trans::PerStep { a: &self.a }
            } else {
                Trans::Modulated {
                    a0: &self.a0,
                    nmat: &self.nmat,
                    v: &self.v,
                    m: p.m,
                }
            },
            b: &self.b,
            h0: self.h0.as_deref(),
        }
    }
}

trait Wide: SimdElem {
    fn wide(self) -> f64;
}
impl Wide for f32 {
    fn wide(self) -> f64 {
        self as f64
    }
}
impl Wide for f64 {
    fn wide(self) -> f64 {
        self
    }
}

fn to64<T: Wide>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&v| v.wide()).collect()
}

struct KOut {
    xs: Vec<f64>,
    last: Vec<f64>,
    g: reference::bilinear::Grads,
}

fn run_kernel<T: Wide>(
    level: Level,
    p: &Problem,
    parallel: bool,
    dxs: &[f64],
    dlast: &[f64],
) -> KOut {
    let ty = Typed::<T>::of(p);
    let s = ty.args(p);
    let (bt, l, n, m) = (p.batch, p.len, p.n, p.m);
    let mut xs = vec![T::ZERO; bt * l * n];
    let mut last = vec![T::ZERO; bt * n];
    bilinear::forward(level, &s, parallel, &mut xs, &mut last).unwrap();
    let (dxs_t, dl_t) = (Problem::cast::<T>(dxs), Problem::cast::<T>(dlast));
    let mut db = vec![T::ZERO; bt * l * n];
    let mut da = vec![T::ZERO; if p.per_step { bt * l * n * n } else { n * n }];
    let mut dn = vec![T::ZERO; if p.per_step { 0 } else { m * n * n }];
    let mut dv = vec![T::ZERO; if p.per_step { 0 } else { bt * l * m }];
    let mut dh0 = vec![T::ZERO; bt * n];
    let o = BwdOut {
        db: &mut db,
        da: &mut da,
        dn: &mut dn,
        dv: &mut dv,
        dh0: &mut dh0,
    };
    bilinear::backward(level, &s, &xs, &dxs_t, Some(&dl_t), o).unwrap();
    KOut {
        xs: to64(&xs),
        last: to64(&last),
        g: reference::bilinear::Grads {
            db: to64(&db),
            da: to64(&da),
            dn: to64(&dn),
            dv: to64(&dv),
            dh0: to64(&dh0),
        },
    }
}

fn compare(tag: &str, k: &KOut, p: &Problem, dxs: &[f64], dlast: &[f64], rtol: f64, atol: f64) {
    let ty = Typed::<f64>::of(p);
    let s = ty.args(p);
    let (xs, last) = reference::bilinear::forward(&s);
    let g = reference::bilinear::backward(&s, dxs, Some(dlast));
    close(&format!("{tag} xs"), &k.xs, &xs, rtol, atol);
    close(&format!("{tag} last"), &k.last, &last, rtol, atol);
    // Gradients sum over time (and the batch for dA0/dN): scale the tolerance.
    let ga = atol * (p.len.max(1) * p.batch) as f64;
    close(&format!("{tag} db"), &k.g.db, &g.db, rtol, atol * 4.0);
    close(&format!("{tag} dA"), &k.g.da, &g.da, rtol, ga);
    close(&format!("{tag} dN"), &k.g.dn, &g.dn, rtol, ga);
    close(&format!("{tag} dv"), &k.g.dv, &g.dv, rtol, atol * 4.0);
    close(&format!("{tag} dh0"), &k.g.dh0, &g.dh0, rtol, atol * 4.0);
}

fn grads_in(p: &Problem, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut r = Rng(seed + 5);
    (
        r.vec(p.batch * p.len * p.n, -1.0, 1.0),
        r.vec(p.batch * p.n, -1.0, 1.0),
    )
}

#[test]
fn every_level_matches_reference() {
    let lens = [0, 1, 7, 2 * PAR_CHUNK + 9];
    let mut seed = 0;
    for &n in &[1usize, 2, 5, 16, 33, 64] {
        for form in 0..4 {
            // forms: modulated m = 0, 1, 3; per-step.
            let (m, per_step) = [(0, false), (1, false), (3, false), (0, true)][form];
            for &l in &lens {
                if n == 64 && l > 100 && form == 2 {
                    continue; // the slowest case adds nothing the others miss
                }
                seed += 1;
                let batch = if l > 100 { 1 } else { 2 };
                let mut p = Problem::new(seed, batch, l, n, m, per_step);
                if seed % 3 == 0 {
                    p.h0 = None;
                }
                let (dxs, dlast) = grads_in(&p, seed);
                for level in Level::supported() {
                    for parallel in [false, true] {
                        let tag = format!(
                            "n={n} m={m} per_step={per_step} L={l} {level:?} par={parallel}"
                        );
                        let k = run_kernel::<f64>(level, &p, parallel, &dxs, &dlast);
                        compare(&tag, &k, &p, &dxs, &dlast, 1e-10, 1e-11);
                        let k = run_kernel::<f32>(level, &p, parallel, &dxs, &dlast);
                        compare(&format!("{tag} f32"), &k, &p, &dxs, &dlast, 1e-3, 2e-4);
                    }
                }
            }
        }
    }
}

#[test]
fn parallel_equals_sequential() {
    // 37 full chunks: two full lane groups and a partial one at W = 16 (more at narrower
    // levels), with and without a partial last chunk; every form, small (compile-time)
    // and large state sizes.
    let cases = [
        (1, false, 6, 2, 37 * PAR_CHUNK + 11),
        (2, true, 6, 0, 37 * PAR_CHUNK),
        (3, false, 2, 0, 37 * PAR_CHUNK + 1),
        (4, false, 11, 3, 20 * PAR_CHUNK + 5),
        (5, true, 9, 0, 19 * PAR_CHUNK),
    ];
    for (seed, per_step, n, m, l) in cases {
        let p = Problem::new(seed, 2, l, n, m, per_step);
        let (dxs, dlast) = grads_in(&p, seed);
        for level in Level::supported() {
            let tag = format!("n={n} m={m} per_step={per_step} L={l} {level:?}");
            let a = run_kernel::<f64>(level, &p, false, &dxs, &dlast);
            let b = run_kernel::<f64>(level, &p, true, &dxs, &dlast);
            close(&format!("{tag} xs"), &b.xs, &a.xs, 1e-12, 1e-12);
            close(&format!("{tag} last"), &b.last, &a.last, 1e-12, 1e-12);
            let a = run_kernel::<f32>(level, &p, false, &dxs, &dlast);
            let b = run_kernel::<f32>(level, &p, true, &dxs, &dlast);
            close(&format!("{tag} f32 xs"), &b.xs, &a.xs, 1e-4, 1e-5);
            close(&format!("{tag} f32 last"), &b.last, &a.last, 1e-4, 1e-5);
        }
    }
}

#[test]
fn bitwise_thread_invariance() {
    for per_step in [false, true] {
        let p = Problem::new(11, 5, 4 * PAR_CHUNK + 3, 9, 3, per_step);
        let (dxs, dlast) = grads_in(&p, 3);
        for parallel in [false, true] {
            let level = Level::best();
            pool::set_num_threads(1).unwrap();
            let a = run_kernel::<f32>(level, &p, parallel, &dxs, &dlast);
            pool::set_num_threads(3).unwrap();
            let b = run_kernel::<f32>(level, &p, parallel, &dxs, &dlast);
            pool::set_num_threads(2).unwrap();
            let c = run_kernel::<f32>(level, &p, parallel, &dxs, &dlast);
            for o in [&b, &c] {
                assert_eq!(a.xs, o.xs);
                assert_eq!(a.last, o.last);
                assert_eq!(a.g.db, o.g.db);
                assert_eq!(a.g.da, o.g.da);
                assert_eq!(a.g.dn, o.g.dn);
                assert_eq!(a.g.dv, o.g.dv);
                assert_eq!(a.g.dh0, o.g.dh0);
            }
        }
    }
}

/// Loss = Σ dxs·xs + dlast·last of the reference forward.
fn loss(p: &Problem, dxs: &[f64], dlast: &[f64]) -> f64 {
    let ty = Typed::<f64>::of(p);
    let (xs, last) = reference::bilinear::forward(&ty.args(p));
    let a: f64 = xs.iter().zip(dxs).map(|(x, d)| x * d).sum();
    a + last.iter().zip(dlast).map(|(x, d)| x * d).sum::<f64>()
}

#[test]
fn reference_backward_matches_finite_differences() {
    for per_step in [false, true] {
        let p = Problem::new(21, 2, 5, 3, 2, per_step);
        let (dxs, dlast) = grads_in(&p, 4);
        let ty = Typed::<f64>::of(&p);
        let g = reference::bilinear::backward(&ty.args(&p), &dxs, Some(&dlast));
        let h = 1e-6;
        type Field = fn(&mut Problem) -> &mut Vec<f64>;
        let fields: [(&str, Field, &Vec<f64>); 6] = [
            ("b", |p| &mut p.b, &g.db),
            ("a0", |p| &mut p.a0, &g.da),
            ("a", |p| &mut p.a, &g.da),
            ("nmat", |p| &mut p.nmat, &g.dn),
            ("v", |p| &mut p.v, &g.dv),
            ("h0", |p| p.h0.as_mut().unwrap(), &g.dh0),
        ];
        for (name, field, want) in fields {
            let mut q = p.clone();
            let len = field(&mut q).len();
            let modulated_only = matches!(name, "a0" | "nmat" | "v");
            if (modulated_only && per_step) || (name == "a" && !per_step) {
                continue;
            }
            assert_eq!(len, want.len(), "{name}");
            for i in 0..len {
                let x = field(&mut q)[i];
                field(&mut q)[i] = x + h;
                let up = loss(&q, &dxs, &dlast);
                field(&mut q)[i] = x - h;
                let dn = loss(&q, &dxs, &dlast);
                field(&mut q)[i] = x;
                let fd = (up - dn) / (2.0 * h);
                assert!(
                    (fd - want[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                    "{name}[{i}] per_step={per_step}: fd {fd} vs {}",
                    want[i]
                );
            }
        }
    }
}

#[test]
fn bad_lengths_are_errors() {
    let p = Problem::new(1, 2, 4, 3, 1, false);
    let ty = Typed::<f64>::of(&p);
    let mut s = ty.args(&p);
    let (mut xs, mut last) = (vec![0.0; 2 * 4 * 3], vec![0.0; 6]);
    assert!(bilinear::forward(Level::Scalar, &s, false, &mut xs, &mut last).is_ok());
    assert!(bilinear::forward(Level::Scalar, &s, false, &mut xs[1..], &mut last).is_err());
    s.n = 65;
    assert!(bilinear::forward(Level::Scalar, &s, false, &mut xs, &mut last).is_err());
    s.n = 3;
    s.b = &ty.b[1..];
    assert!(bilinear::forward(Level::Scalar, &s, true, &mut xs, &mut last).is_err());
}

/// Timings behind the `method="auto"` rule; run on a quiet machine with
/// `cargo test -p bmojo-kernels --release --test bilinear -- --ignored --nocapture`.
/// Environment (comma lists): `BMOJO_TIMING_THREADS` (default 1,2), `BMOJO_TIMING_BATCH`
/// (1,4), `BMOJO_TIMING_N` (2,4,8,16,64), `BMOJO_TIMING_L` (256,4096,16384); `BMOJO_TIMING_REPS`
/// (best of, 5).
#[test]
#[ignore]
fn timing_parallel_vs_sequential() {
    use std::time::Instant;
    let list = |var: &str, default: &str| -> Vec<usize> {
        std::env::var(var)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect()
    };
    let threads = list("BMOJO_TIMING_THREADS", "1,2");
    let (batches, ns) = (
        list("BMOJO_TIMING_BATCH", "1,4"),
        list("BMOJO_TIMING_N", "2,4,8,16,64"),
    );
    let lens = list("BMOJO_TIMING_L", "256,4096,16384");
    let reps = list("BMOJO_TIMING_REPS", "5")[0];
    println!("threads,batch,n,L,per_step,seq_us,par_us,speedup");
    for &th in &threads {
        pool::set_num_threads(th).unwrap();
        for &batch in &batches {
            for &n in &ns {
                for &l in &lens {
                    for per_step in [false, true] {
                        let p = Problem::new(1, batch, l, n, 2, per_step);
                        let ty = Typed::<f32>::of(&p);
                        let s = ty.args(&p);
                        let mut xs = vec![0.0f32; batch * l * n];
                        let mut last = vec![0.0f32; batch * n];
                        let mut best = [f64::INFINITY; 2];
                        for (k, par) in [false, true].into_iter().enumerate() {
                            for _ in 0..reps {
                                let t = Instant::now();
                                bilinear::forward(Level::best(), &s, par, &mut xs, &mut last)
                                    .unwrap();
                                best[k] = best[k].min(t.elapsed().as_secs_f64() * 1e6);
                            }
                        }
                        println!(
                            "{th},{batch},{n},{l},{per_step},{:.1},{:.1},{:.2}",
                            best[0],
                            best[1],
                            best[0] / best[1]
                        );
                    }
                }
            }
        }
    }
}
