//! One decode step: the checks, the scratch buffers, and the program every team member
//! runs (phases A to H of each layer, met at the barrier, then the final norm and head).

use std::sync::Mutex;

use super::blocks::{attention_row, conv_block, memory_row, ssm_block};
use super::gemv::{gemv_phase, Act, Job};
use super::math::{add_into, layer_norm, DecodeElem};
use super::model::{Layer, Model};
use super::state::{LayerBufs, Scratch, State};
use crate::cpu::team::{self, share, Barrier, TeamBuf};
use crate::cpu::{dispatch, pool, Elem, Kernel, Level, Vector};
use crate::error::{Error, Result};

/// Channels per SSM task.
const CHANNELS: usize = 64;

/// Everything one team member needs.
pub(super) struct Member<'s, 'a, T> {
    pub(super) m: &'s Model<T>,
    pub(super) tokens: &'s [i64],
    pub(super) pos: &'s [i64],
    /// Rows at a chunk boundary (memory refresh), ascending.
    pub(super) brows: &'s [usize],
    pub(super) layers: &'s [LayerBufs<'a, T>],
    pub(super) sc: &'s Scratch<'a, T>,
    pub(super) bar: &'s Barrier,
    pub(super) err: &'s Mutex<Option<Error>>,
    pub(super) level: Level,
    pub(super) tid: usize,
    pub(super) nt: usize,
}

impl<T: DecodeElem> Kernel<T> for Member<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<V: Vector<E = T>>(self) {
        member::<V>(&self);
    }
}

#[inline(always)]
fn member<V: Vector>(mb: &Member<'_, '_, V::E>)
where
    V::E: DecodeElem,
{
    let (m, tid, nt, sc) = (mb.m, mb.tid, mb.nt, mb.sc);
    let d = m.d_model;
    let bsz = mb.tokens.len();
    let nb = mb.brows.len();
    // Private copies of the residual stream and the normalised inputs.
    let mut h = vec![V::E::ZERO; bsz * d];
    for (b, &t) in mb.tokens.iter().enumerate() {
        let t = t as usize;
        h[b * d..(b + 1) * d].copy_from_slice(&m.embedding[t * d..(t + 1) * d]);
    }
    let mut xn = vec![V::E::ZERO; bsz * d];
    let mut fin = Vec::new();
    for (l, st) in m.layers.iter().zip(mb.layers) {
        layer_norm::<V>(&h, &l.norm1.w, &l.norm1.b, l.norm1.eps, &mut xn);
        let (w, mf, me) = (l.window, l.n_fading, l.n_eidetic);
        // Fading tokens of the rows at a chunk boundary: their K/V are computed below.
        let fading_refresh = w > 0 && mf > 0 && nb > 0;
        if fading_refresh {
            fin.clear();
            for &b in mb.brows {
                // SAFETY: team protocol: fading_y is only read in this phase.
                fin.extend_from_slice(unsafe { st.fading_y.view(b * mf * d..(b + 1) * mf * d) });
            }
        }
        // Phase A: in_proj and qkv (the same input), and the fading K/V.
        {
            let mut jobs = Vec::with_capacity(3);
            if let Some(s) = &l.ssm {
                jobs.push(Job {
                    w: &s.in_proj.w,
                    bias: s.in_proj.b.as_deref(),
                    n_out: s.in_proj.n_out,
                    n_in: d,
                    x: &xn,
                    nx: bsz,
                    out: &sc.xz,
                    act: Act::None,
                });
            }
            if let Some(a) = &l.attn {
                jobs.push(Job {
                    w: &a.qkv.w,
                    bias: a.qkv.b.as_deref(),
                    n_out: 3 * d,
                    n_in: d,
                    x: &xn,
                    nx: bsz,
                    out: &sc.qkv,
                    act: Act::None,
                });
                if fading_refresh {
                    jobs.push(Job {
                        w: &a.qkv.w[d * d..],
                        bias: a.qkv.b.as_deref().map(|b| &b[d..]),
                        n_out: 2 * d,
                        n_in: d,
                        x: &fin,
                        nx: nb * mf,
                        out: &sc.fkv,
                        act: Act::None,
                    });
                }
            }
            gemv_phase::<V>(&jobs, 0, 0, tid, nt);
        }
        mb.bar.wait();
        // Phase B: conv (channel blocks) and attention (rows).
        {
            let (nchan, ccost) = match &l.ssm {
                Some(s) => (s.d_inner.div_ceil(CHANNELS), CHANNELS * s.d_conv * bsz * 4),
                None => (0, 0),
            };
            let acost = (l.n_eidetic + l.n_fading + w) * d * 2 + 1;
            let rows_att = if l.attn.is_some() { bsz } else { 0 };
            let total = nchan * ccost + rows_att * acost;
            let (lo, hi) = (total * tid / nt, total * (tid + 1) / nt);
            let mut acc = 0;
            if let Some(s) = &l.ssm {
                for c in 0..nchan {
                    if acc >= lo && acc < hi {
                        conv_block::<V>(
                            s,
                            sc,
                            st,
                            bsz,
                            c * CHANNELS,
                            CHANNELS.min(s.d_inner - c * CHANNELS),
                        );
                    }
                    acc += ccost;
                }
            }
            if let Some(a) = &l.attn {
                for b in 0..bsz {
                    if acc >= lo && acc < hi {
                        attention_row::<V>(l, a, mb, st, b);
                    }
                    acc += acost;
                }
            }
        }
        mb.bar.wait();
        // Phase C: x_proj and the attention's out_proj.
        {
            let mut jobs = Vec::with_capacity(2);
            // SAFETY: team protocol: xc and ao were written in phase B and are only read
            // until the end of this phase.
            let (xc, ao) = unsafe { (sc.xc.all(), sc.ao.all()) };
            if let Some(s) = &l.ssm {
                jobs.push(Job {
                    w: &s.x_proj.w,
                    bias: s.x_proj.b.as_deref(),
                    n_out: s.x_proj.n_out,
                    n_in: s.d_inner,
                    x: &xc[..bsz * s.d_inner],
                    nx: bsz,
                    out: &sc.dbc,
                    act: Act::None,
                });
            }
            if let Some(a) = &l.attn {
                jobs.push(Job {
                    w: &a.out_proj.w,
                    bias: a.out_proj.b.as_deref(),
                    n_out: d,
                    n_in: d,
                    x: &ao[..bsz * d],
                    nx: bsz,
                    out: &sc.ho,
                    act: Act::None,
                });
            }
            gemv_phase::<V>(&jobs, 0, 0, tid, nt);
        }
        mb.bar.wait();
        if l.attn.is_some() {
            // SAFETY: ho was written in phase C; read-only until the end of the layer.
            add_into::<V>(unsafe { &sc.ho.all()[..bsz * d] }, &mut h);
            layer_norm::<V>(&h, &l.norm2.w, &l.norm2.b, l.norm2.eps, &mut xn);
        }
        if let Some(s) = &l.ssm {
            // Phase D: Δ, the state update and the gate (channel blocks).
            let nchan = s.d_inner.div_ceil(CHANNELS);
            for c in share(nchan, tid, nt) {
                ssm_block::<V>(
                    s,
                    sc,
                    st,
                    bsz,
                    c * CHANNELS,
                    CHANNELS.min(s.d_inner - c * CHANNELS),
                );
            }
            mb.bar.wait();
        }
        // Phase E: the SSM's out_proj, and fc1 when the layer output is the attention's.
        {
            let mut jobs = Vec::with_capacity(2);
            // SAFETY: yi was written in phase D; read-only in this phase.
            let yi = unsafe { sc.yi.all() };
            if let Some(s) = &l.ssm {
                jobs.push(Job {
                    w: &s.out_proj.w,
                    bias: s.out_proj.b.as_deref(),
                    n_out: d,
                    n_in: s.d_inner,
                    x: &yi[..bsz * s.d_inner],
                    nx: bsz,
                    out: &sc.y,
                    act: Act::None,
                });
            }
            if l.attn.is_some() {
                jobs.push(fc1_job(l, &xn, bsz, sc));
            }
            gemv_phase::<V>(&jobs, 0, 0, tid, nt);
        }
        mb.bar.wait();
        if l.attn.is_none() {
            // Pure SSM: the layer output is y.
            // SAFETY: y was written in phase E; read-only until the end of the layer.
            add_into::<V>(unsafe { &sc.y.all()[..bsz * d] }, &mut h);
            layer_norm::<V>(&h, &l.norm2.w, &l.norm2.b, l.norm2.eps, &mut xn);
            gemv_phase::<V>(&[fc1_job(l, &xn, bsz, sc)], 0, 0, tid, nt);
            mb.bar.wait();
        }
        // Phase H: fc2, and per row the innovation score, store push and fading ring.
        {
            // SAFETY: f1 was written in the previous phase; read-only in this one.
            let f1 = unsafe { sc.f1.all() };
            let ff = l.fc1.n_out;
            let jobs = [Job {
                w: &l.fc2.w,
                bias: l.fc2.b.as_deref(),
                n_out: d,
                n_in: ff,
                x: &f1[..bsz * ff],
                nx: bsz,
                out: &sc.f2,
                act: Act::None,
            }];
            let rows = if l.attn.is_some() && (me > 0 || mf > 0) {
                bsz
            } else {
                0
            };
            for b in gemv_phase::<V>(&jobs, rows, d * (l.taps.len() + 2) + 64, tid, nt) {
                memory_row::<V>(l, mb, st, b);
            }
        }
        mb.bar.wait();
        // SAFETY: f2 was written in phase H; read-only until the next layer's phase H.
        add_into::<V>(unsafe { &sc.f2.all()[..bsz * d] }, &mut h);
    }
    // Final norm and the tied head, straight into the logits.
    layer_norm::<V>(&h, &m.norm_f.w, &m.norm_f.b, m.norm_f.eps, &mut xn);
    let jobs = [Job {
        w: &m.embedding,
        bias: None,
        n_out: m.vocab,
        n_in: d,
        x: &xn,
        nx: bsz,
        out: &sc.logits,
        act: Act::None,
    }];
    gemv_phase::<V>(&jobs, 0, 0, tid, nt);
}

fn fc1_job<'s, 'a, T>(
    l: &'s Layer<T>,
    xn: &'s [T],
    bsz: usize,
    sc: &'s Scratch<'a, T>,
) -> Job<'s, 'a, T> {
    Job {
        w: &l.fc1.w,
        bias: l.fc1.b.as_deref(),
        n_out: l.fc1.n_out,
        n_in: l.fc1.n_in,
        x: xn,
        nx: bsz,
        out: &sc.f1,
        act: Act::Gelu,
    }
}

/// One decode step: consumes `tokens (batch,)` at the rows' positions, writes the logits
/// and advances the state. Everything is checked before anything is written, and nothing
/// can fail after that (a NaN innovation score counts as -inf), so a failed step changes
/// nothing. An error reported by a row while running would be returned after the step.
pub fn decode_step<T: DecodeElem>(
    level: Level,
    m: &Model<T>,
    tokens: &[i64],
    st: State<'_, T>,
) -> Result<()> {
    m.check()?;
    st.check(m, tokens)?;
    let bsz = tokens.len();
    let d = m.d_model;
    let pos: Vec<i64> = st.position.to_vec();
    let max_mem = m.layers.iter().map(|l| l.n_fading).max().unwrap_or(0);
    // Rows at a chunk boundary: the same for every layer with memory tokens (one window).
    let brows_for = |w: usize| -> Vec<usize> {
        (0..bsz)
            .filter(|&b| w > 0 && pos[b] % w as i64 == 0)
            .collect()
    };
    // Windows may differ per layer only through the model config, which is shared.
    let win = m
        .layers
        .iter()
        .map(|l| l.window)
        .find(|&w| w > 0)
        .unwrap_or(0);
    if m.layers.iter().any(|l| l.window != 0 && l.window != win) {
        return Err(Error::invalid(
            "layers",
            "every layer must have the same window",
        ));
    }
    let brows = brows_for(win);
    let max_di = m
        .layers
        .iter()
        .filter_map(|l| l.ssm.as_ref().map(|s| s.d_inner))
        .max()
        .unwrap_or(0);
    let max_nd = m
        .layers
        .iter()
        .filter_map(|l| l.ssm.as_ref().map(|s| s.dt_rank + 2 * s.d_state))
        .max()
        .unwrap_or(0);
    let max_ff = m.layers.iter().map(|l| l.fc1.n_out).max().unwrap_or(0);
    let z = T::ZERO;
    let (mut xz, mut qkv, mut fkv) = (
        vec![z; bsz * 2 * max_di],
        vec![z; bsz * 3 * d],
        vec![z; brows.len() * max_mem * 2 * d],
    );
    let (mut xc, mut ao, mut dbc, mut ho) = (
        vec![z; bsz * max_di],
        vec![z; bsz * d],
        vec![z; bsz * max_nd],
        vec![z; bsz * d],
    );
    let (mut yi, mut y, mut f1, mut f2) = (
        vec![z; bsz * max_di],
        vec![z; bsz * d],
        vec![z; bsz * max_ff],
        vec![z; bsz * d],
    );
    let State {
        position,
        logits,
        has_logits,
        layers,
    } = st;
    let sc = Scratch {
        xz: TeamBuf::new(&mut xz),
        qkv: TeamBuf::new(&mut qkv),
        fkv: TeamBuf::new(&mut fkv),
        xc: TeamBuf::new(&mut xc),
        ao: TeamBuf::new(&mut ao),
        dbc: TeamBuf::new(&mut dbc),
        ho: TeamBuf::new(&mut ho),
        yi: TeamBuf::new(&mut yi),
        y: TeamBuf::new(&mut y),
        f1: TeamBuf::new(&mut f1),
        f2: TeamBuf::new(&mut f2),
        logits: TeamBuf::new(logits),
    };
    let lbufs: Vec<LayerBufs<'_, T>> = layers.into_iter().map(LayerBufs::new).collect();
    let err = Mutex::new(None);
    let work = m.layers.iter().map(|l| l.fc1.w.len() * 3).sum::<usize>() * bsz;
    let nt = if work >= 1 << 16 {
        pool::num_threads()
    } else {
        1
    };
    team::team(nt, |tid, nt, bar| {
        dispatch(
            level,
            Member {
                m,
                tokens,
                pos: &pos,
                brows: &brows,
                layers: &lbufs,
                sc: &sc,
                bar,
                err: &err,
                level,
                tid,
                nt,
            },
        )
    });
    for p in position.iter_mut() {
        *p += 1;
    }
    has_logits.fill(true);
    match err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
