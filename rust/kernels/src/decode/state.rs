//! The stream state the decode step updates in place ([`State`], one [`LayerState`] per
//! block: the tensors of `BMojoLayer.init_state`, flattened), the element counts each
//! piece must have and the checks of the state against the model, and the team's views
//! of the state and of one token's scratch buffers.

use super::model::{Layer, Model};
use crate::cpu::team::TeamBuf;
use crate::eidetic;
use crate::error::{check_lens, Error, Result};

/// One layer's stream state (the tensors of `BMojoLayer.init_state`, flattened; absent
/// pieces are empty slices).
pub struct LayerState<'a, T> {
    pub conv: &'a mut [T],
    pub ssm: &'a mut [T],
    pub innov_history: &'a mut [T],
    pub innov_count: &'a mut [i64],
    pub innov_ema: &'a mut [T],
    pub store_positions: &'a mut [i64],
    pub store_scores: &'a mut [f64],
    pub store_count: &'a mut [i64],
    pub mem_positions: &'a mut [i64],
    pub ring_k: &'a mut [T],
    pub ring_v: &'a mut [T],
    pub mem_k: &'a mut [T],
    pub mem_v: &'a mut [T],
    pub mem_mask: &'a mut [bool],
    pub fading_y: &'a mut [T],
}

pub struct State<'a, T> {
    pub position: &'a mut [i64],
    pub logits: &'a mut [T],
    pub has_logits: &'a mut [bool],
    pub layers: Vec<LayerState<'a, T>>,
}

/// Expected element counts of a layer's state pieces for `b` rows.
fn layer_sizes<T>(l: &Layer<T>, d: usize, b: usize) -> [(&'static str, usize); 15] {
    let (w, mf, me) = (l.window, l.n_fading, l.n_eidetic);
    let (conv, ssm) = l.ssm.as_ref().map_or((0, 0), |s| {
        (b * s.d_inner * (s.d_conv - 1), b * s.d_inner * s.d_state)
    });
    let e = |x: usize| if me > 0 { x } else { 0 };
    let a = |x: usize| if w > 0 { x } else { 0 };
    [
        ("conv", conv),
        ("ssm", ssm),
        ("innov_history", e(b * l.taps.len() * d)),
        ("innov_count", e(b)),
        ("innov_ema", e(2 * b)),
        ("store_positions", e(b * me)),
        ("store_scores", e(b * me)),
        ("store_count", e(b)),
        ("mem_positions", e(b * me)),
        ("ring_k", a(b * w * d)),
        ("ring_v", a(b * w * d)),
        ("mem_k", a(b * (me + mf) * d)),
        ("mem_v", a(b * (me + mf) * d)),
        ("mem_mask", a(b * (me + mf))),
        ("fading_y", b * mf * d),
    ]
}

fn layer_lens<T>(s: &LayerState<'_, T>) -> [usize; 15] {
    [
        s.conv.len(),
        s.ssm.len(),
        s.innov_history.len(),
        s.innov_count.len(),
        s.innov_ema.len(),
        s.store_positions.len(),
        s.store_scores.len(),
        s.store_count.len(),
        s.mem_positions.len(),
        s.ring_k.len(),
        s.ring_v.len(),
        s.mem_k.len(),
        s.mem_v.len(),
        s.mem_mask.len(),
        s.fading_y.len(),
    ]
}

impl<T> State<'_, T> {
    /// Checks the state of `tokens.len()` rows against the model and the token ids and
    /// positions against their ranges.
    pub(super) fn check(&self, m: &Model<T>, tokens: &[i64]) -> Result<()> {
        let bsz = tokens.len();
        let d = m.d_model;
        check_lens(&[
            ("position", self.position.len(), bsz),
            ("has_logits", self.has_logits.len(), bsz),
            ("logits", self.logits.len(), bsz * m.vocab),
        ])?;
        if self.layers.len() != m.layers.len() {
            return Err(Error::value(
                "state",
                format!("{} layers", m.layers.len()),
                self.layers.len(),
            ));
        }
        if let Some(t) = tokens
            .iter()
            .find(|&&t| t < 0 || t as u64 >= m.vocab as u64)
        {
            return Err(Error::invalid(
                "tokens",
                format!("token id {t} is outside the vocabulary [0, {})", m.vocab),
            ));
        }
        if let Some(p) = self
            .position
            .iter()
            .find(|&&p| !(0..i64::MAX - 1).contains(&p))
        {
            return Err(Error::value("position", "values in [0, 2^63 - 2)", p));
        }
        for (i, (l, ls)) in m.layers.iter().zip(&self.layers).enumerate() {
            let at = |e: Error| e.context(format!("layers.{i}."));
            let (sizes, lens) = (layer_sizes(l, d, bsz), layer_lens(ls));
            let items: [(&str, usize, usize); 15] =
                core::array::from_fn(|k| (sizes[k].0, lens[k], sizes[k].1));
            check_lens(&items).map_err(at)?;
            if l.n_eidetic > 0 {
                eidetic::check_store(
                    l.policy,
                    bsz,
                    l.n_eidetic,
                    ls.store_positions,
                    ls.store_scores,
                    ls.store_count,
                )
                .map_err(|e| e.context(format!("layers.{i}: invalid eidetic store: ")))?;
                if let Some(c) = ls
                    .innov_count
                    .iter()
                    .find(|&&c| !(0..i64::MAX - 1).contains(&c))
                {
                    return Err(at(Error::value("innov_count", "a valid count", c)));
                }
                if let Some(p) = ls.mem_positions.iter().find(|&&p| p < -1) {
                    return Err(at(Error::value("mem_positions", "a valid position", p)));
                }
            }
        }
        Ok(())
    }
}

/// Shared views of one layer's state.
pub(super) struct LayerBufs<'a, T> {
    pub(super) conv: TeamBuf<'a, T>,
    pub(super) ssm: TeamBuf<'a, T>,
    pub(super) innov_history: TeamBuf<'a, T>,
    pub(super) innov_count: TeamBuf<'a, i64>,
    pub(super) innov_ema: TeamBuf<'a, T>,
    pub(super) store_positions: TeamBuf<'a, i64>,
    pub(super) store_scores: TeamBuf<'a, f64>,
    pub(super) store_count: TeamBuf<'a, i64>,
    pub(super) mem_positions: TeamBuf<'a, i64>,
    pub(super) ring_k: TeamBuf<'a, T>,
    pub(super) ring_v: TeamBuf<'a, T>,
    pub(super) mem_k: TeamBuf<'a, T>,
    pub(super) mem_v: TeamBuf<'a, T>,
    pub(super) mem_mask: TeamBuf<'a, bool>,
    pub(super) fading_y: TeamBuf<'a, T>,
}

impl<'a, T> LayerBufs<'a, T> {
    pub(super) fn new(s: LayerState<'a, T>) -> Self {
        LayerBufs {
            conv: TeamBuf::new(s.conv),
            ssm: TeamBuf::new(s.ssm),
            innov_history: TeamBuf::new(s.innov_history),
            innov_count: TeamBuf::new(s.innov_count),
            innov_ema: TeamBuf::new(s.innov_ema),
            store_positions: TeamBuf::new(s.store_positions),
            store_scores: TeamBuf::new(s.store_scores),
            store_count: TeamBuf::new(s.store_count),
            mem_positions: TeamBuf::new(s.mem_positions),
            ring_k: TeamBuf::new(s.ring_k),
            ring_v: TeamBuf::new(s.ring_v),
            mem_k: TeamBuf::new(s.mem_k),
            mem_v: TeamBuf::new(s.mem_v),
            mem_mask: TeamBuf::new(s.mem_mask),
            fading_y: TeamBuf::new(s.fading_y),
        }
    }
}

/// Scratch buffers of one token shared by the team.
pub(super) struct Scratch<'a, T> {
    pub(super) xz: TeamBuf<'a, T>,
    pub(super) qkv: TeamBuf<'a, T>,
    pub(super) fkv: TeamBuf<'a, T>,
    pub(super) xc: TeamBuf<'a, T>,
    pub(super) ao: TeamBuf<'a, T>,
    pub(super) dbc: TeamBuf<'a, T>,
    pub(super) ho: TeamBuf<'a, T>,
    pub(super) yi: TeamBuf<'a, T>,
    pub(super) y: TeamBuf<'a, T>,
    pub(super) f1: TeamBuf<'a, T>,
    pub(super) f2: TeamBuf<'a, T>,
    pub(super) logits: TeamBuf<'a, T>,
}
