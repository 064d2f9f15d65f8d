//! Unit tests of the step's building blocks (GEMV, GELU, LayerNorm, attention) at every
//! SIMD level, in f64 and f32, against plain f64 loops. The blocks are private: each is
//! run here through a small test-only entry point with the step's kernel and task split.

use super::blocks::attend;
use super::gemv::{gemv_phase, Act, Job};
use super::math::{erf, layer_norm, DecodeElem};
use crate::cpu::team::{self, Barrier, TeamBuf};
use crate::cpu::{dispatch, pool, Kernel, Level, Vector};

#[path = "../../tests/common/util.rs"]
mod util;
use util::{close, to32, to64, Rng};

/// `out (nx, n_out) = act(x (nx, n_in) @ w^T + bias)` with the step's GEMV and task split.
#[allow(clippy::too_many_arguments)]
fn gemv<T: DecodeElem>(
    level: Level,
    w: &[T],
    bias: Option<&[T]>,
    n_out: usize,
    n_in: usize,
    x: &[T],
    gelu: bool,
    out: &mut [T],
) {
    let nx = x.len() / n_in;
    assert_eq!(
        (w.len(), x.len(), out.len()),
        (n_out * n_in, nx * n_in, nx * n_out)
    );
    let ob = TeamBuf::new(out);
    struct G<'s, 'a, T> {
        j: Job<'s, 'a, T>,
        tid: usize,
        nt: usize,
        bar: &'s Barrier,
    }
    impl<T: DecodeElem> Kernel<T> for G<'_, '_, T> {
        type Out = ();
        #[inline(always)]
        fn run<V: Vector<E = T>>(self) {
            gemv_phase::<V>(std::slice::from_ref(&self.j), 0, 0, self.tid, self.nt);
            self.bar.wait();
        }
    }
    team::team(pool::num_threads(), |tid, nt, bar| {
        let act = if gelu { Act::Gelu } else { Act::None };
        let j = Job {
            w,
            bias,
            n_out,
            n_in,
            x,
            nx,
            out: &ob,
            act,
        };
        dispatch(level, G { j, tid, nt, bar })
    });
}

struct LnK<'s, T> {
    x: &'s [T],
    g: &'s [T],
    b: &'s [T],
    eps: T,
    out: &'s mut [T],
}
impl<T: DecodeElem> Kernel<T> for LnK<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        layer_norm::<V>(self.x, self.g, self.b, self.eps, self.out);
    }
}

/// LayerNorm of the rows of `x (rows, d)`.
fn layer_norm_rows<T: DecodeElem>(level: Level, x: &[T], g: &[T], b: &[T], eps: T, out: &mut [T]) {
    assert!(b.len() == g.len() && out.len() == x.len() && x.len().is_multiple_of(g.len()));
    dispatch(level, LnK { x, g, b, eps, out });
}

struct GeluK<'s, T> {
    buf: &'s mut [T],
}
impl<T: DecodeElem> Kernel<T> for GeluK<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        T::gelu::<V>(self.buf);
    }
}

/// Exact GELU in place.
fn gelu<T: DecodeElem>(level: Level, buf: &mut [T]) {
    dispatch(level, GeluK { buf });
}

struct AttnK<'s, T> {
    q: &'s [T],
    mem_k: &'s [T],
    mem_v: &'s [T],
    mem_mask: &'s [bool],
    ring_k: &'s [T],
    ring_v: &'s [T],
    nring: usize,
    heads: usize,
    out: &'s mut [T],
}
impl<T: DecodeElem> Kernel<T> for AttnK<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        attend::<V>(
            self.q,
            self.mem_k,
            self.mem_v,
            self.mem_mask,
            self.ring_k,
            self.ring_v,
            self.nring,
            self.heads,
            self.out,
        );
    }
}

/// One query's attention over `[memory (masked), ring[..nring]]` per head: `q, out (d)`,
/// `mem_k/v (m, d)`, `ring_k/v (>= nring, d)`.
#[allow(clippy::too_many_arguments)]
fn attention<T: DecodeElem>(
    level: Level,
    q: &[T],
    mem_k: &[T],
    mem_v: &[T],
    mem_mask: &[bool],
    ring_k: &[T],
    ring_v: &[T],
    nring: usize,
    heads: usize,
    out: &mut [T],
) {
    let (d, m) = (q.len(), mem_mask.len());
    assert!(
        d.is_multiple_of(heads) && out.len() == d && mem_k.len() == m * d && mem_v.len() == m * d
    );
    assert!(ring_k.len() >= nring * d && ring_v.len() >= nring * d);
    let k = AttnK {
        q,
        mem_k,
        mem_v,
        mem_mask,
        ring_k,
        ring_v,
        nring,
        heads,
        out,
    };
    dispatch(level, k);
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
        let (got, want) = (erf(x), erf_ref(x));
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
        let got = erf(x);
        assert!(
            (got - want).abs() <= 3e-16,
            "erf({x}): got {got}, want {want}"
        );
    }
    assert_eq!(erf(10.0), 1.0);
    assert_eq!(erf(-10.0), -1.0);
    assert!(erf(f64::NAN).is_nan());
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
        // The case the Python binding `decode_gemv` was tested with.
        (37, 29, 3, true, true),
        (1, 1, 2, false, false),
    ] {
        let w = rng.vec(n_out * n_in, -1.0, 1.0);
        let b = rng.vec(n_out, -1.0, 1.0);
        let x = rng.vec(nx * n_in, -1.0, 1.0);
        let bo = if bias { Some(&b[..]) } else { None };
        let want = gemv_ref(&w, bo, n_out, n_in, &x, gelu);
        for level in Level::supported() {
            let mut out = vec![0.0; nx * n_out];
            gemv(level, &w, bo, n_out, n_in, &x, gelu, &mut out);
            close(&format!("gemv f64 {level:?}"), &out, &want, 1e-13, 1e-13);
            let mut o32 = vec![0f32; nx * n_out];
            let b32 = to32(&b);
            gemv(
                level,
                &to32(&w),
                bias.then_some(&b32[..]),
                n_out,
                n_in,
                &to32(&x),
                gelu,
                &mut o32,
            );
            close(
                &format!("gemv f32 {level:?}"),
                &to64(&o32),
                &want,
                1e-4,
                1e-5,
            );
        }
    }
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
            gemv(level, &w, None, n_out, n_in, &x, true, &mut out);
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
        gelu(level, &mut b);
        close(&format!("gelu f32 {level:?}"), &to64(&b), &want, 1e-6, 1e-6);
        let mut b = xs.clone();
        gelu(level, &mut b);
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
            layer_norm_rows(level, &x, &g, &b, eps, &mut out);
            close(
                &format!("ln f64 d={d} {level:?}"),
                &out,
                &want,
                1e-12,
                1e-12,
            );
            let mut o32 = vec![0f32; rows * d];
            layer_norm_rows(level, &to32(&x), &to32(&g), &to32(&b), eps as f32, &mut o32);
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
            attention(level, &q, &mk, &mv, &mask, &rk, &rv, nring, heads, &mut out);
            close(&format!("attn f64 {level:?}"), &out, &want, 1e-12, 1e-13);
            let mut o32 = vec![0f32; d];
            attention(
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
            );
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

/// `cargo test -p bmojo-kernels --release --lib -- --ignored --nocapture`: µs per
/// attention of one query over the benchmark model's 164 keys (d=256).
#[test]
#[ignore]
fn timing_attention() {
    let mut rng = Rng(1);
    let (d, m, w) = (256, 36, 128);
    let q = to32(&rng.vec(d, -1.0, 1.0));
    let mk = to32(&rng.vec(m * d, -1.0, 1.0));
    let rk = to32(&rng.vec(w * d, -1.0, 1.0));
    let mask = vec![true; m];
    let mut out = vec![0f32; d];
    let t0 = std::time::Instant::now();
    for _ in 0..1000 {
        attention(Level::best(), &q, &mk, &mk, &mask, &rk, &rk, w, 4, &mut out);
    }
    println!(
        "attention d=256 164 keys: {:.2} us",
        t0.elapsed().as_secs_f64() * 1e3
    );
}
