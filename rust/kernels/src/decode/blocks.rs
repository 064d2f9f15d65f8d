//! The per-task pieces of the step, each run by one team member on its own part of the
//! state: the SSM's conv update and selective state update (blocks of channels), the
//! attention of one row (memory refresh at a chunk boundary, ring write, softmax over
//! memory and window) and one row's innovation score, store push and fading ring write.

use super::math::{axpy, dot, silu, DecodeElem};
use super::model::{Attn, Layer, Ssm};
use super::state::{LayerBufs, Scratch};
use super::step::Member;
use crate::cpu::{sigmoid, softplus, Elem, Vector};
use crate::eidetic::{self, InnovArgs, InnovOut};

/// Conv update + SiLU of channels `c0..c0+n` for every row.
#[inline(always)]
pub(super) fn conv_block<V: Vector>(
    s: &Ssm<V::E>,
    sc: &Scratch<'_, V::E>,
    st: &LayerBufs<'_, V::E>,
    bsz: usize,
    c0: usize,
    n: usize,
) where
    V::E: DecodeElem,
{
    let (di, k) = (s.d_inner, s.d_conv);
    let km = k - 1;
    for b in 0..bsz {
        // SAFETY: team protocol: xz is read-only in this phase; channels c0..c0+n of row
        // b of the conv state and of xc belong to this task.
        let (xz, state, out) = unsafe {
            (
                sc.xz.view(b * 2 * di + c0..b * 2 * di + c0 + n),
                st.conv.part((b * di + c0) * km..(b * di + c0 + n) * km),
                sc.xc.part(b * di + c0..b * di + c0 + n),
            )
        };
        for (i, (o, &x)) in out.iter_mut().zip(xz).enumerate() {
            let c = c0 + i;
            let wr = &s.conv_w[c * k..(c + 1) * k];
            let srow = &mut state[i * km..(i + 1) * km];
            let mut acc = s.conv_b.as_ref().map_or(V::E::ZERO, |bb| bb[c]);
            for (&wk, &v) in wr.iter().zip(srow.iter()) {
                acc = wk * v + acc;
            }
            acc = wr[km] * x + acc;
            // A manual shift: `copy_within` is a memmove call per channel.
            for q in 1..km {
                srow[q - 1] = srow[q];
            }
            if km > 0 {
                srow[km - 1] = x;
            }
            *o = acc;
        }
        map_buf!(V, &mut *out, |v| silu::<V>(v));
    }
}

/// Δ = softplus(dt_proj(dbc) + bias), the selective state update, D skip and z gate for
/// channels `c0..c0+n` of every row.
#[inline(always)]
pub(super) fn ssm_block<V: Vector>(
    s: &Ssm<V::E>,
    sc: &Scratch<'_, V::E>,
    st: &LayerBufs<'_, V::E>,
    bsz: usize,
    c0: usize,
    n: usize,
) where
    V::E: DecodeElem,
{
    let (di, ns, r) = (s.d_inner, s.d_state, s.dt_rank);
    let nd = r + 2 * ns;
    let w = V::W;
    let mut dt = vec![V::E::ZERO; n];
    let mut tmp = [V::E::ZERO; 16];
    let mut tb = [V::E::ZERO; 16];
    let mut tc = [V::E::ZERO; 16];
    let dtb = s.dt_proj.b.as_deref().unwrap_or(&[]);
    for b in 0..bsz {
        // SAFETY: team protocol: dbc, xz, xc are read-only in this phase; channels
        // c0..c0+n of row b of the SSM state and of yi belong to this task.
        let (dbc, xz, xc, state, out) = unsafe {
            (
                sc.dbc.view(b * nd..(b + 1) * nd),
                sc.xz.view(b * 2 * di..(b + 1) * 2 * di),
                sc.xc.view(b * di..(b + 1) * di),
                st.ssm.part((b * di + c0) * ns..(b * di + c0 + n) * ns),
                sc.yi.part(b * di + c0..b * di + c0 + n),
            )
        };
        let (dtr, bv, cv) = (&dbc[..r], &dbc[r..r + ns], &dbc[r + ns..]);
        for (i, o) in dt.iter_mut().enumerate() {
            let c = c0 + i;
            *o = dot::<V>(&s.dt_proj.w[c * r..(c + 1) * r], dtr) + dtb[c];
        }
        map_buf!(V, &mut dt[..], |v| softplus::<V>(v));
        for i in 0..n {
            let c = c0 + i;
            let x = xc[c];
            let (dtv, dtx) = (V::splat(dt[i]), V::splat(dt[i] * x));
            let arow = &s.a[c * ns..(c + 1) * ns];
            let srow = &mut state[i * ns..(i + 1) * ns];
            let mut acc = V::zero();
            let mut j = 0;
            while j < ns {
                let m = w.min(ns - j);
                let (av, hv, bb, cc) = if m == w {
                    (
                        V::load(&arow[j..]),
                        V::load(&srow[j..]),
                        V::load(&bv[j..]),
                        V::load(&cv[j..]),
                    )
                } else {
                    let mut ta = [V::E::ZERO; 16];
                    ta[..m].copy_from_slice(&arow[j..j + m]);
                    tmp[..w].fill(V::E::ZERO);
                    tmp[..m].copy_from_slice(&srow[j..j + m]);
                    tb[..w].fill(V::E::ZERO);
                    tb[..m].copy_from_slice(&bv[j..j + m]);
                    tc[..w].fill(V::E::ZERO);
                    tc[..m].copy_from_slice(&cv[j..j + m]);
                    (V::load(&ta), V::load(&tmp), V::load(&tb), V::load(&tc))
                };
                let hn = hv.fma(dtv.mul(av).exp(), dtx.mul(bb));
                acc = hn.fma(cc, acc);
                if m == w {
                    hn.store(&mut srow[j..]);
                } else {
                    hn.store(&mut tmp);
                    srow[j..j + m].copy_from_slice(&tmp[..m]);
                }
                j += m;
            }
            let y = acc.hsum() + s.d[c] * x;
            let z = xz[di + c];
            out[i] = y * z;
        }
        // out = y * z so far; multiply by sigmoid(z) (vectorised).
        let zs = &xz[di + c0..di + c0 + n];
        let mut oc = out.chunks_exact_mut(w);
        let mut zc = zs.chunks_exact(w);
        for (o, z) in (&mut oc).zip(&mut zc) {
            V::load(o).mul(sigmoid(V::load(z))).store(o);
        }
        let (or, zr) = (oc.into_remainder(), zc.remainder());
        if !or.is_empty() {
            let k = or.len();
            tmp[..w].fill(V::E::ZERO);
            tmp[..k].copy_from_slice(zr);
            let g = sigmoid(V::load(&tmp));
            g.store(&mut tmp);
            for (o, &gg) in or.iter_mut().zip(&tmp[..k]) {
                *o = *o * gg;
            }
        }
    }
}

/// Memory refresh (at a chunk boundary), ring write and attention of row `b`.
#[inline(always)]
pub(super) fn attention_row<V: Vector>(
    l: &Layer<V::E>,
    a: &Attn<V::E>,
    mb: &Member<'_, '_, V::E>,
    st: &LayerBufs<'_, V::E>,
    b: usize,
) where
    V::E: DecodeElem,
{
    let d = mb.m.d_model;
    let (w, mf, me) = (l.window, l.n_fading, l.n_eidetic);
    let mm = me + mf;
    let pos = mb.pos[b];
    // SAFETY: team protocol: row b of the attention state and of ao belong to this task;
    // qkv, fkv and the store are read-only in this phase.
    let (qkv, ring_k, ring_v, mem_k, mem_v, mem_mask, ao) = unsafe {
        (
            mb.sc.qkv.view(b * 3 * d..(b + 1) * 3 * d),
            st.ring_k.part(b * w * d..(b + 1) * w * d),
            st.ring_v.part(b * w * d..(b + 1) * w * d),
            st.mem_k.part(b * mm * d..(b + 1) * mm * d),
            st.mem_v.part(b * mm * d..(b + 1) * mm * d),
            st.mem_mask.part(b * mm..(b + 1) * mm),
            mb.sc.ao.part(b * d..(b + 1) * d),
        )
    };
    if mm > 0 && pos % w as i64 == 0 {
        if me > 0 {
            // SAFETY: as above (row b of the store is read, its mem positions written).
            let (sp, mp) = unsafe {
                (
                    st.store_positions.view(b * me..(b + 1) * me),
                    st.mem_positions.part(b * me..(b + 1) * me),
                )
            };
            let mut held: Vec<i64> = sp.iter().copied().filter(|&p| p >= 0).collect();
            held.sort_unstable();
            held.resize(me, -1);
            let old_k = mem_k[..me * d].to_vec();
            let old_v = mem_v[..me * d].to_vec();
            for (i, &p) in held.iter().enumerate() {
                let (dk, dv) = (
                    &mut mem_k[i * d..(i + 1) * d],
                    &mut mem_v[i * d..(i + 1) * d],
                );
                if p < 0 {
                    dk.fill(V::E::ZERO);
                    dv.fill(V::E::ZERO);
                } else if p >= pos - w as i64 {
                    let r = (p as usize) % w;
                    dk.copy_from_slice(&ring_k[r * d..(r + 1) * d]);
                    dv.copy_from_slice(&ring_v[r * d..(r + 1) * d]);
                } else {
                    // Held at the previous boundary too (first match, as the Python path).
                    let j = mp.iter().position(|&q| q == p).unwrap_or(0);
                    dk.copy_from_slice(&old_k[j * d..(j + 1) * d]);
                    dv.copy_from_slice(&old_v[j * d..(j + 1) * d]);
                }
                mem_mask[i] = p >= 0;
            }
            mp.copy_from_slice(&held);
        }
        if mf > 0 {
            let bi = mb.brows.iter().position(|&x| x == b).unwrap_or(0);
            // SAFETY: fkv was written in phase A; read-only in this phase.
            let fkv = unsafe { mb.sc.fkv.view(bi * mf * 2 * d..(bi + 1) * mf * 2 * d) };
            let last = pos - 1;
            for j in 0..mf {
                let pf = last - (last - j as i64).rem_euclid(mf as i64);
                let ok = pf >= 0;
                let (dk, dv) = (
                    &mut mem_k[(me + j) * d..(me + j + 1) * d],
                    &mut mem_v[(me + j) * d..(me + j + 1) * d],
                );
                if ok {
                    dk.copy_from_slice(&fkv[j * 2 * d..j * 2 * d + d]);
                    dv.copy_from_slice(&fkv[j * 2 * d + d..(j + 1) * 2 * d]);
                } else {
                    dk.fill(V::E::ZERO);
                    dv.fill(V::E::ZERO);
                }
                mem_mask[me + j] = ok;
            }
        }
    }
    let slot = (pos as usize) % w;
    ring_k[slot * d..(slot + 1) * d].copy_from_slice(&qkv[d..2 * d]);
    ring_v[slot * d..(slot + 1) * d].copy_from_slice(&qkv[2 * d..3 * d]);
    attend::<V>(
        &qkv[..d],
        mem_k,
        mem_v,
        mem_mask,
        ring_k,
        ring_v,
        (pos as usize).min(w - 1) + 1,
        a.n_heads,
        ao,
    );
}

/// Softmax attention of one query `q (d)` over memory keys (masked) and the first
/// `nring` ring slots, per head.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn attend<V: Vector>(
    q: &[V::E],
    mem_k: &[V::E],
    mem_v: &[V::E],
    mem_mask: &[bool],
    ring_k: &[V::E],
    ring_v: &[V::E],
    nring: usize,
    heads: usize,
    out: &mut [V::E],
) where
    V::E: DecodeElem,
{
    let d = q.len();
    let hd = d / heads;
    let mm = mem_mask.len();
    let scale = V::E::ONE / V::E::from_f64(hd as f64).sqrt();
    let mut s = vec![V::E::ZERO; mm + nring];
    let neg = V::E::ZERO - V::E::INF;
    for h in 0..heads {
        let (lo, hi) = (h * hd, (h + 1) * hd);
        let qh = &q[lo..hi];
        let mut mx = neg;
        for (j, sj) in s.iter_mut().enumerate() {
            let (ok, k) = if j < mm {
                (mem_mask[j], &mem_k[j * d + lo..j * d + hi])
            } else {
                let r = j - mm;
                (true, &ring_k[r * d + lo..r * d + hi])
            };
            *sj = if ok { dot::<V>(qh, k) * scale } else { neg };
            if *sj > mx {
                mx = *sj;
            }
        }
        let mv = V::splat(mx);
        map_buf!(V, &mut s[..], |x| x.sub(mv).exp());
        let mut tot = V::E::ZERO;
        for &p in &s {
            tot = tot + p;
        }
        let o = &mut out[lo..hi];
        o.fill(V::E::ZERO);
        for (j, &p) in s.iter().enumerate() {
            if p == V::E::ZERO {
                continue;
            }
            let v = if j < mm {
                &mem_v[j * d + lo..j * d + hi]
            } else {
                let r = j - mm;
                &ring_v[r * d + lo..r * d + hi]
            };
            axpy::<V>(p, v, o);
        }
        let inv = V::E::ONE / tot;
        for x in o.iter_mut() {
            *x = *x * inv;
        }
    }
}

/// Innovation score, store push and fading ring write of row `b` (after the attention
/// read this token's memory).
#[inline(always)]
pub(super) fn memory_row<V: Vector>(
    l: &Layer<V::E>,
    mb: &Member<'_, '_, V::E>,
    st: &LayerBufs<'_, V::E>,
    b: usize,
) where
    V::E: DecodeElem,
{
    let d = mb.m.d_model;
    let (mf, me) = (l.n_fading, l.n_eidetic);
    let pos = mb.pos[b];
    // SAFETY: team protocol: y is read-only in this phase; row b of the innovation state,
    // the store and the fading ring belong to this task.
    let y = unsafe { mb.sc.y.view(b * d..(b + 1) * d) };
    if me > 0 {
        let k = l.taps.len();
        // SAFETY: as above.
        let (hist, cnt, ema, sp, ss, scnt) = unsafe {
            (
                st.innov_history.part(b * k * d..(b + 1) * k * d),
                st.innov_count.part(b..b + 1),
                st.innov_ema.part(2 * b..2 * b + 2),
                st.store_positions.part(b * me..(b + 1) * me),
                st.store_scores.part(b * me..(b + 1) * me),
                st.store_count.part(b..b + 1),
            )
        };
        let (h0, c0, e0) = (hist.to_vec(), [cnt[0]], [ema[0], ema[1]]);
        let mut score = [V::E::ZERO];
        let r = eidetic::innovation(
            mb.level,
            &InnovArgs {
                batch: 1,
                len: 1,
                dim: d,
                weights: &l.taps,
                y,
                history: &h0,
                count: &c0,
                ema: &e0,
                chi2: l.chi2,
                rate: l.rate,
                floor: l.floor,
            },
            InnovOut {
                scores: &mut score,
                history: hist,
                count: cnt,
                ema,
            },
        )
        .and_then(|_| {
            // Non-finite scores are clamped to the element type's finite range, NaN to its
            // lowest value, as in the Python layer: the store stays valid and the step never
            // fails halfway through the model.
            let hi = if size_of::<V::E>() == 4 {
                f32::MAX as f64
            } else {
                f64::MAX
            };
            let s = score[0].to_f64();
            let s = if s.is_nan() { -hi } else { s.clamp(-hi, hi) };
            eidetic::push(l.policy, 1, me, sp, ss, scnt, &[s])
        });
        if let Err(e) = r {
            let mut g = mb.err.lock().unwrap_or_else(|e| e.into_inner());
            g.get_or_insert(e.context(format!("row {b}: ")));
        }
    }
    if mf > 0 {
        let slot = (pos as usize) % mf;
        // SAFETY: as above.
        let f = unsafe {
            st.fading_y
                .part((b * mf + slot) * d..(b * mf + slot + 1) * d)
        };
        f.copy_from_slice(y);
    }
}
