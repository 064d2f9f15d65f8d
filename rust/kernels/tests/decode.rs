//! The whole fused decode step: bitwise independent of the thread count at every SIMD
//! level, a failed step writes nothing; and an ignored timing of the benchmark model. The
//! building blocks (GEMV, GELU, LayerNorm, attention, erf) are unit tests of the crate
//! (`src/decode/tests.rs`).

mod common;

use bmojo_kernels::cpu::pool;
use bmojo_kernels::decode::{self, Attn, Layer, LayerState, Linear, Model, Norm, Ssm, State};
use bmojo_kernels::eidetic::Policy;
use bmojo_kernels::Level;
use common::{to32, Rng};

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

/// The benchmark model's shape (d=256, 4 layers, window 128, 4 fading, 32 eidetic tokens).
fn bench_model(rng: &mut Rng, vocab: usize, d: usize, layers: usize) -> Model<f32> {
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
    let m = bench_model(&mut rng, 64, 64, 2);
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
/// µs per step of the benchmark model (d=256, 4 layers) at batch 1 and 32.
#[test]
#[ignore]
fn timing_bench_model() {
    let mut rng = Rng(1);
    let m = bench_model(&mut rng, 512, 256, 4);
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
