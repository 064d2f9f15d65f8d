//! Building blocks of the fused decode step (GEMV with bias and GELU, LayerNorm,
//! single-query attention, erf) against plain scalar f64 loops, at every SIMD level, and
//! the GEMV bitwise independent of the thread count.

mod common;

use bmojo_kernels::cpu::pool;
use bmojo_kernels::decode;
use bmojo_kernels::Level;
use common::Rng;

fn close(name: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{name}[{i}]: got {g}, want {w}"
        );
    }
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// erf by numerical integration of 2/√π e^{-t²} (Simpson on a fine grid): independent of
/// the kernel's series and continued fraction.
fn erf_ref(x: f64) -> f64 {
    let simpson = |a: f64, b: f64| {
        let n = 20_000;
        let h = (b - a) / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(a) + f(b);
        for i in 1..n {
            s += if i % 2 == 1 { 4.0 } else { 2.0 } * f(a + i as f64 * h);
        }
        s * h / 3.0 * core::f64::consts::FRAC_2_SQRT_PI
    };
    let ax = x.abs();
    // Past 2 the tail ∫_|x|^∞ is integrated instead (small, so accurate in absolute terms).
    let r = if ax <= 2.0 {
        simpson(0.0, ax)
    } else {
        1.0 - simpson(ax, ax + 12.0)
    };
    r.copysign(x)
}

fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + erf_ref(x / 2f64.sqrt()))
}

#[test]
fn erf_matches_integration() {
    for i in -80..=80 {
        let x = i as f64 * 0.1;
        let (got, want) = (decode::erf(x), erf_ref(x));
        assert!(
            (got - want).abs() < 1e-14,
            "erf({x}): got {got}, want {want}"
        );
    }
    // Tabulated values (to 17 digits): the series and the fraction are exact to ~1 ulp.
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
    ] {
        let got = decode::erf(x);
        assert!(
            (got - want).abs() <= 3e-16,
            "erf({x}): got {got}, want {want}"
        );
    }
    assert_eq!(decode::erf(10.0), 1.0);
    assert_eq!(decode::erf(-10.0), -1.0);
    assert!(decode::erf(f64::NAN).is_nan());
}

fn gemv_ref(
    w: &[f64],
    b: Option<&[f64]>,
    n_out: usize,
    n_in: usize,
    x: &[f64],
    gelu: bool,
) -> Vec<f64> {
    let nx = x.len() / n_in;
    let mut out = vec![0.0; nx * n_out];
    for r in 0..nx {
        for o in 0..n_out {
            let mut s = b.map_or(0.0, |b| b[o]);
            for i in 0..n_in {
                s += w[o * n_in + i] * x[r * n_in + i];
            }
            out[r * n_out + o] = if gelu { gelu_ref(s) } else { s };
        }
    }
    out
}

#[test]
fn gemv_matches_scalar_loops_at_every_level() {
    let mut rng = Rng(7);
    // Odd sizes exercise the 4-row groups' tails, the vector tails and partial blocks.
    for &(n_out, n_in, nx, bias, gelu) in &[
        (37usize, 29usize, 1usize, true, false),
        (64, 64, 3, false, true),
        (19, 130, 5, true, true),
        (1, 1, 2, false, false),
    ] {
        let w = rng.vec(n_out * n_in, -1.0, 1.0);
        let b = rng.vec(n_out, -1.0, 1.0);
        let x = rng.vec(nx * n_in, -1.0, 1.0);
        let bo = if bias { Some(&b[..]) } else { None };
        let want = gemv_ref(&w, bo, n_out, n_in, &x, gelu);
        for level in Level::supported() {
            let mut out = vec![0.0; nx * n_out];
            decode::gemv(level, &w, bo, n_out, n_in, &x, gelu, &mut out).unwrap();
            close(&format!("gemv f64 {level:?}"), &out, &want, 1e-13, 1e-13);
            let mut o32 = vec![0f32; nx * n_out];
            let b32 = to32(&b);
            decode::gemv(
                level,
                &to32(&w),
                bias.then_some(&b32[..]),
                n_out,
                n_in,
                &to32(&x),
                gelu,
                &mut o32,
            )
            .unwrap();
            close(
                &format!("gemv f32 {level:?}"),
                &to64(&o32),
                &want,
                1e-4,
                1e-5,
            );
        }
    }
    let mut out = vec![0.0; 3];
    assert!(decode::gemv(
        Level::Scalar,
        &[1.0; 6],
        None,
        3,
        2,
        &[1.0; 3],
        false,
        &mut out
    )
    .is_err());
}

#[test]
fn gemv_is_bitwise_independent_of_thread_count() {
    let mut rng = Rng(11);
    let (n_out, n_in, nx) = (300, 256, 4);
    let w = to32(&rng.vec(n_out * n_in, -1.0, 1.0));
    let x = to32(&rng.vec(nx * n_in, -1.0, 1.0));
    for level in Level::supported() {
        let mut outs = Vec::new();
        for nt in [1, 2, 3] {
            pool::set_num_threads(nt).unwrap();
            let mut out = vec![0f32; nx * n_out];
            decode::gemv(level, &w, None, n_out, n_in, &x, true, &mut out).unwrap();
            outs.push(out);
        }
        assert_eq!(outs[0], outs[1], "{level:?}: 1 vs 2 threads");
        assert_eq!(outs[0], outs[2], "{level:?}: 1 vs 3 threads");
    }
}

#[test]
fn gelu_f32_is_accurate_at_every_level() {
    let xs: Vec<f64> = (-100..=100).map(|i| i as f64 * 0.09).collect();
    let want: Vec<f64> = xs.iter().map(|&x| gelu_ref(x)).collect();
    for level in Level::supported() {
        let mut b = to32(&xs);
        decode::gelu(level, &mut b);
        close(&format!("gelu f32 {level:?}"), &to64(&b), &want, 1e-6, 1e-6);
        let mut b = xs.clone();
        decode::gelu(level, &mut b);
        close(&format!("gelu f64 {level:?}"), &b, &want, 1e-14, 1e-14);
    }
}

#[test]
fn layer_norm_matches_scalar_loops_at_every_level() {
    let mut rng = Rng(3);
    for &d in &[1usize, 7, 64, 100] {
        let rows = 3;
        let x = rng.vec(rows * d, -2.0, 3.0);
        let g = rng.vec(d, 0.5, 1.5);
        let b = rng.vec(d, -0.5, 0.5);
        let eps = 1e-5;
        let mut want = vec![0.0; rows * d];
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let mean = xr.iter().sum::<f64>() / d as f64;
            let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                want[r * d + i] = (xr[i] - mean) / (var + eps).sqrt() * g[i] + b[i];
            }
        }
        for level in Level::supported() {
            let mut out = vec![0.0; rows * d];
            decode::layer_norm_rows(level, &x, &g, &b, eps, &mut out).unwrap();
            close(
                &format!("ln f64 d={d} {level:?}"),
                &out,
                &want,
                1e-12,
                1e-12,
            );
            let mut o32 = vec![0f32; rows * d];
            decode::layer_norm_rows(level, &to32(&x), &to32(&g), &to32(&b), eps as f32, &mut o32)
                .unwrap();
            close(
                &format!("ln f32 d={d} {level:?}"),
                &to64(&o32),
                &want,
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn attention_matches_scalar_softmax_at_every_level() {
    let mut rng = Rng(5);
    for &(d, heads, m, w, nring) in &[
        (16usize, 2usize, 3usize, 5usize, 5usize),
        (24, 3, 0, 6, 2),
        (64, 1, 4, 4, 1),
    ] {
        let q = rng.vec(d, -1.0, 1.0);
        let mk = rng.vec(m * d, -1.0, 1.0);
        let mv = rng.vec(m * d, -1.0, 1.0);
        let mask: Vec<bool> = (0..m).map(|i| i % 2 == 0).collect();
        let rk = rng.vec(w * d, -1.0, 1.0);
        let rv = rng.vec(w * d, -1.0, 1.0);
        let hd = d / heads;
        let mut want = vec![0.0; d];
        for h in 0..heads {
            let lo = h * hd;
            let mut keys: Vec<(&[f64], &[f64])> = Vec::new();
            for j in 0..m {
                if mask[j] {
                    keys.push((&mk[j * d..(j + 1) * d], &mv[j * d..(j + 1) * d]));
                }
            }
            for j in 0..nring {
                keys.push((&rk[j * d..(j + 1) * d], &rv[j * d..(j + 1) * d]));
            }
            let s: Vec<f64> = keys
                .iter()
                .map(|(k, _)| {
                    (0..hd).map(|i| q[lo + i] * k[lo + i]).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
            let tot: f64 = p.iter().sum();
            for i in 0..hd {
                want[lo + i] = keys
                    .iter()
                    .zip(&p)
                    .map(|((_, v), pj)| pj * v[lo + i])
                    .sum::<f64>()
                    / tot;
            }
        }
        for level in Level::supported() {
            let mut out = vec![0.0; d];
            decode::attention(level, &q, &mk, &mv, &mask, &rk, &rv, nring, heads, &mut out)
                .unwrap();
            close(&format!("attn f64 {level:?}"), &out, &want, 1e-12, 1e-13);
            let mut o32 = vec![0f32; d];
            decode::attention(
                level,
                &to32(&q),
                &to32(&mk),
                &to32(&mv),
                &mask,
                &to32(&rk),
                &to32(&rv),
                nring,
                heads,
                &mut o32,
            )
            .unwrap();
            close(
                &format!("attn f32 {level:?}"),
                &to64(&o32),
                &want,
                1e-5,
                1e-5,
            );
        }
    }
}

// ------------------------------------------------------------------------ whole step

use bmojo_kernels::decode::{Attn, Layer, LayerState, Linear, Model, Norm, Ssm, State};
use bmojo_kernels::eidetic::Policy;

fn lin(rng: &mut Rng, o: usize, i: usize, bias: bool) -> Linear<f32> {
    let s = 1.0 / (i as f64).sqrt();
    let w = to32(&rng.vec(o * i, -s, s));
    let b = bias.then(|| to32(&rng.vec(o, -s, s)));
    Linear::new("lin", &w, b.as_deref(), o, i).unwrap()
}

fn norm(d: usize) -> Norm<f32> {
    Norm {
        w: vec![1.0; d],
        b: vec![0.0; d],
        eps: 1e-5,
    }
}

/// The issue's model shape (d=256, 4 layers, window 128, 4 fading, 32 eidetic tokens).
fn issue_model(rng: &mut Rng, vocab: usize, d: usize, layers: usize) -> Model<f32> {
    let (di, n, r, k) = (2 * d, 16, d.div_ceil(16), 4);
    let layers = (0..layers)
        .map(|_| Layer {
            norm1: norm(d),
            ssm: Some(Ssm {
                d_inner: di,
                d_state: n,
                dt_rank: r,
                d_conv: k,
                in_proj: lin(rng, 2 * di, d, false),
                conv_w: to32(&rng.vec(di * k, -0.5, 0.5)),
                conv_b: Some(to32(&rng.vec(di, -0.5, 0.5))),
                x_proj: lin(rng, r + 2 * n, di, false),
                dt_proj: lin(rng, di, r, true),
                a: (0..di * n).map(|i| -((i % n) as f32 + 1.0)).collect(),
                d: vec![1.0; di],
                out_proj: lin(rng, d, di, false),
            }),
            attn: Some(Attn {
                n_heads: d / 64,
                qkv: lin(rng, 3 * d, d, false),
                out_proj: lin(rng, d, d, false),
            }),
            window: 128,
            n_fading: 4,
            n_eidetic: 32,
            taps: vec![0.25; 4],
            chi2: false,
            rate: 0.1,
            floor: 1e-6,
            policy: Policy::TopK,
            norm2: norm(d),
            fc1: lin(rng, 4 * d, d, true),
            fc2: lin(rng, d, 4 * d, true),
        })
        .collect();
    Model {
        vocab,
        d_model: d,
        embedding: to32(&rng.vec(vocab * d, -0.1, 0.1)),
        layers,
        norm_f: norm(d),
    }
}

/// Owned state of a stream, in the layout of `BMojoLayer.init_state`.
struct Owned {
    pos: Vec<i64>,
    logits: Vec<f32>,
    has: Vec<bool>,
    f: Vec<[Vec<f32>; 9]>,
    i: Vec<[Vec<i64>; 4]>,
    sc: Vec<Vec<f64>>,
    mask: Vec<Vec<bool>>,
}

impl Owned {
    fn new(m: &Model<f32>, b: usize) -> Owned {
        let d = m.d_model;
        let mut o = Owned {
            pos: vec![0; b],
            logits: vec![0.0; b * m.vocab],
            has: vec![false; b],
            f: Vec::new(),
            i: Vec::new(),
            sc: Vec::new(),
            mask: Vec::new(),
        };
        for l in &m.layers {
            let s = l.ssm.as_ref().unwrap();
            let (w, mf, me, k) = (l.window, l.n_fading, l.n_eidetic, l.taps.len());
            o.f.push([
                vec![0.0; b * s.d_inner * (s.d_conv - 1)],
                vec![0.0; b * s.d_inner * s.d_state],
                vec![0.0; b * k * d],
                vec![0.0; 2 * b],
                vec![0.0; b * w * d],
                vec![0.0; b * w * d],
                vec![0.0; b * (me + mf) * d],
                vec![0.0; b * (me + mf) * d],
                vec![0.0; b * mf * d],
            ]);
            o.i.push([vec![0; b], vec![-1; b * me], vec![0; b], vec![-1; b * me]]);
            o.sc.push(vec![0.0; b * me]);
            o.mask.push(vec![false; b * (me + mf)]);
        }
        o
    }

    fn state(&mut self) -> State<'_, f32> {
        let mut layers = Vec::new();
        for (((f, i), sc), mask) in self
            .f
            .iter_mut()
            .zip(self.i.iter_mut())
            .zip(self.sc.iter_mut())
            .zip(self.mask.iter_mut())
        {
            let [conv, ssm, hist, ema, rk, rv, mk, mv, fy] = f;
            let [ic, sp, scnt, mp] = i;
            layers.push(LayerState {
                conv,
                ssm,
                innov_history: hist,
                innov_count: ic,
                innov_ema: ema,
                store_positions: sp,
                store_scores: sc,
                store_count: scnt,
                mem_positions: mp,
                ring_k: rk,
                ring_v: rv,
                mem_k: mk,
                mem_v: mv,
                mem_mask: mask,
                fading_y: fy,
            });
        }
        State {
            position: &mut self.pos,
            logits: &mut self.logits,
            has_logits: &mut self.has,
            layers,
        }
    }
}

#[test]
fn whole_step_is_bitwise_independent_of_thread_count() {
    let mut rng = Rng(21);
    let m = issue_model(&mut rng, 64, 64, 2);
    let b = 3;
    let toks: Vec<Vec<i64>> = (0..140)
        .map(|_| (0..b).map(|_| rng.below(64) as i64).collect())
        .collect();
    for level in Level::supported() {
        let mut runs = Vec::new();
        for nt in [1, 2] {
            pool::set_num_threads(nt).unwrap();
            let mut st = Owned::new(&m, b);
            for t in &toks {
                decode::decode_step(level, &m, t, st.state()).unwrap();
            }
            runs.push(st);
        }
        assert_eq!(runs[0].logits, runs[1].logits, "{level:?}");
        assert_eq!(runs[0].f, runs[1].f, "{level:?}");
        assert_eq!(runs[0].i, runs[1].i, "{level:?}");
        assert!(runs[0].logits.iter().all(|x| x.is_finite()));
        assert!(runs[0].i[0][1].iter().all(|&p| p >= 0), "store filled");
    }
    let mut st = Owned::new(&m, b);
    assert!(decode::decode_step(Level::Scalar, &m, &[0, 1, 64], st.state()).is_err());
    assert!(decode::decode_step(Level::Scalar, &m, &[0, 1], st.state()).is_err());
    assert_eq!(st.pos, vec![0; b], "a failed step writes nothing");
}

/// `cargo test -p bmojo-kernels --release --test decode -- --ignored --nocapture`:
/// µs per step of the issue's model (d=256, 4 layers) at batch 1 and 32.
#[test]
#[ignore]
fn timing_issue_model() {
    let mut rng = Rng(1);
    {
        let (d, m, w) = (256, 36, 128);
        let q = to32(&rng.vec(d, -1.0, 1.0));
        let mk = to32(&rng.vec(m * d, -1.0, 1.0));
        let rk = to32(&rng.vec(w * d, -1.0, 1.0));
        let mask = vec![true; m];
        let mut out = vec![0f32; d];
        let t0 = std::time::Instant::now();
        for _ in 0..1000 {
            decode::attention(Level::best(), &q, &mk, &mk, &mask, &rk, &rk, w, 4, &mut out)
                .unwrap();
        }
        println!(
            "attention d=256 164 keys: {:.2} us",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let m = issue_model(&mut rng, 512, 256, 4);
    for b in [1usize, 32] {
        for nt in [1, 2] {
            pool::set_num_threads(nt).unwrap();
            let mut st = Owned::new(&m, b);
            let tok: Vec<i64> = (0..b as i64).collect();
            for _ in 0..300 {
                decode::decode_step(Level::best(), &m, &tok, st.state()).unwrap();
            }
            let n = if b == 1 { 2000 } else { 100 };
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = std::time::Instant::now();
                for _ in 0..n {
                    decode::decode_step(Level::best(), &m, &tok, st.state()).unwrap();
                }
                best = best.min(t0.elapsed().as_secs_f64() / n as f64);
            }
            println!(
                "batch {b} threads {nt}: {:.0} us/step, {:.0} tok/s",
                best * 1e6,
                b as f64 / best
            );
        }
    }
}
