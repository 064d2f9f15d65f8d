//! Building blocks of the fused decode step (GEMV with bias and GELU, LayerNorm,
//! single-query attention, erf) against plain scalar f64 loops, at every SIMD level, and
//! the GEMV bitwise independent of the thread count.

mod common;

use bmojo_kernels::decode;
use bmojo_kernels::dispatch::Level;
use bmojo_kernels::pool;
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
    let r = if ax <= 2.0 { simpson(0.0, ax) } else { 1.0 - simpson(ax, ax + 12.0) };
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
        assert!((got - want).abs() < 1e-14, "erf({x}): got {got}, want {want}");
    }
    // Tabulated values (to 17 digits): the series and the fraction are exact to ~1 ulp.
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
    ] {
        let got = decode::erf(x);
        assert!((got - want).abs() <= 3e-16, "erf({x}): got {got}, want {want}");
    }
    assert_eq!(decode::erf(10.0), 1.0);
    assert_eq!(decode::erf(-10.0), -1.0);
    assert!(decode::erf(f64::NAN).is_nan());
}

fn gemv_ref(w: &[f64], b: Option<&[f64]>, n_out: usize, n_in: usize, x: &[f64], gelu: bool) -> Vec<f64> {
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
            close(&format!("gemv f32 {level:?}"), &to64(&o32), &want, 1e-4, 1e-5);
        }
    }
    let mut out = vec![0.0; 3];
    assert!(decode::gemv(Level::Scalar, &[1.0; 6], None, 3, 2, &[1.0; 3], false, &mut out).is_err());
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
            close(&format!("ln f64 d={d} {level:?}"), &out, &want, 1e-12, 1e-12);
            let mut o32 = vec![0f32; rows * d];
            decode::layer_norm_rows(level, &to32(&x), &to32(&g), &to32(&b), eps as f32, &mut o32)
                .unwrap();
            close(&format!("ln f32 d={d} {level:?}"), &to64(&o32), &want, 1e-4, 1e-4);
        }
    }
}

#[test]
fn attention_matches_scalar_softmax_at_every_level() {
    let mut rng = Rng(5);
    for &(d, heads, m, w, nring) in &[(16usize, 2usize, 3usize, 5usize, 5usize), (24, 3, 0, 6, 2), (64, 1, 4, 4, 1)] {
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
                .map(|(k, _)| (0..hd).map(|i| q[lo + i] * k[lo + i]).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
            let tot: f64 = p.iter().sum();
            for i in 0..hd {
                want[lo + i] = keys.iter().zip(&p).map(|((_, v), pj)| pj * v[lo + i]).sum::<f64>() / tot;
            }
        }
        for level in Level::supported() {
            let mut out = vec![0.0; d];
            decode::attention(level, &q, &mk, &mv, &mask, &rk, &rv, nring, heads, &mut out).unwrap();
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
            close(&format!("attn f32 {level:?}"), &to64(&o32), &want, 1e-5, 1e-5);
        }
    }
}
