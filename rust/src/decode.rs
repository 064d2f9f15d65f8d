//! `bmojo_core._core.decode`: the fused streaming decode step (used by
//! `bmojo_core.decode`).
//!
//! `DecodePlan(vocab, d_model, embedding, norm_f, layers)` copies a `BMojoLM`'s parameters
//! once (laid out as the kernel reads them); `plan.step(tokens, state)` runs one token per
//! row on the stream state, given as a list of arrays in [`STATE_NAMES`] order per layer
//! after `position, logits, has_logits`. The Python side rebuilds the plan when the
//! parameters change.

use bmojo_kernels::decode::{
    self, Attn, DecodeElem, Layer, LayerState, Linear, Model, Norm, Ssm, State,
};
use bmojo_kernels::eidetic::Policy;
use numpy::{Element, PyReadwriteArrayDyn};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::args::{ro, rw, slice};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

/// Per-layer state pieces, in the order `step` expects them.
const STATE_NAMES: [&str; 15] = [
    "conv",
    "ssm",
    "innov_history",
    "innov_count",
    "innov_ema",
    "store_positions",
    "store_scores",
    "store_count",
    "mem_positions",
    "ring_k",
    "ring_v",
    "mem_k",
    "mem_v",
    "mem_mask",
    "fading_y",
];

enum Inner {
    F32(Model<f32>),
    F64(Model<f64>),
}

/// A model's parameters prepared for the fused decode step.
#[pyclass(module = "bmojo_core._core.decode", frozen)]
struct DecodePlan {
    inner: Inner,
    n_layers: usize,
}

fn item<'py>(d: &Bound<'py, PyDict>, key: &str) -> Result<Bound<'py, PyAny>> {
    d.get_item(key)?
        .ok_or_else(|| PyBmojoErr::value(format!("layer spec: missing {key:?}")))
}

fn vec_of<T: Element + Copy>(d: &Bound<'_, PyDict>, key: &str) -> Result<Vec<T>> {
    let a = item(d, key)?;
    let r = ro::<T>(&a, key)?;
    Ok(slice(&r).to_vec())
}

fn opt_vec<T: Element + Copy>(d: &Bound<'_, PyDict>, key: &str) -> Result<Option<Vec<T>>> {
    match d.get_item(key)? {
        Some(a) if !a.is_none() => {
            let r = ro::<T>(&a, key)?;
            Ok(Some(slice(&r).to_vec()))
        }
        _ => Ok(None),
    }
}

fn usize_of(d: &Bound<'_, PyDict>, key: &str) -> Result<usize> {
    Ok(item(d, key)?.extract::<usize>()?)
}

/// `spec` as a dict (`what` names it).
fn dict<'a, 'py>(spec: &'a Bound<'py, PyAny>, what: &str) -> Result<&'a Bound<'py, PyDict>> {
    spec.cast::<PyDict>()
        .map_err(|_| PyBmojoErr::type_(format!("{what}: expected a dict")))
}

fn linear<T: Element + Copy>(
    d: &Bound<'_, PyDict>,
    key: &str,
    n_out: usize,
    n_in: usize,
) -> Result<Linear<T>> {
    let w = vec_of::<T>(d, &format!("{key}_w"))?;
    let b = opt_vec::<T>(d, &format!("{key}_b"))?;
    Ok(Linear::new(key, &w, b.as_deref(), n_out, n_in)?)
}

fn norm<T: Element + Copy + DecodeElem>(d: &Bound<'_, PyDict>, key: &str) -> Result<Norm<T>> {
    Ok(Norm {
        w: vec_of::<T>(d, &format!("{key}_w"))?,
        b: vec_of::<T>(d, &format!("{key}_b"))?,
        eps: T::from_f64(item(d, &format!("{key}_eps"))?.extract::<f64>()?),
    })
}

fn build<T: Element + Copy + DecodeElem>(
    vocab: usize,
    d_model: usize,
    top: &Bound<'_, PyDict>,
    layers: &Bound<'_, PyList>,
) -> Result<Model<T>> {
    let dm = d_model;
    let mut out = Vec::with_capacity(layers.len());
    for spec in layers.iter() {
        let l = spec
            .cast::<PyDict>()
            .map_err(|_| PyBmojoErr::type_("layers: expected a list of dicts"))?;
        let ff = usize_of(l, "d_ff")?;
        let window = usize_of(l, "window")?;
        let ssm = match l.get_item("ssm")? {
            Some(s) if !s.is_none() => {
                let s = dict(&s, "ssm")?;
                let (di, n, r) = (
                    usize_of(s, "d_inner")?,
                    usize_of(s, "d_state")?,
                    usize_of(s, "dt_rank")?,
                );
                Some(Ssm {
                    d_inner: di,
                    d_state: n,
                    dt_rank: r,
                    d_conv: usize_of(s, "d_conv")?,
                    in_proj: linear::<T>(s, "in_proj", 2 * di, dm)?,
                    conv_w: vec_of::<T>(s, "conv_w")?,
                    conv_b: opt_vec::<T>(s, "conv_b")?,
                    x_proj: linear::<T>(s, "x_proj", r + 2 * n, di)?,
                    dt_proj: linear::<T>(s, "dt_proj", di, r)?,
                    a: vec_of::<T>(s, "a")?,
                    d: vec_of::<T>(s, "d")?,
                    out_proj: linear::<T>(s, "out_proj", dm, di)?,
                })
            }
            _ => None,
        };
        let attn = match l.get_item("attn")? {
            Some(a) if !a.is_none() => {
                let a = dict(&a, "attn")?;
                Some(Attn {
                    n_heads: usize_of(a, "n_heads")?,
                    qkv: linear::<T>(a, "qkv", 3 * dm, dm)?,
                    out_proj: linear::<T>(a, "out_proj", dm, dm)?,
                })
            }
            _ => None,
        };
        let k = usize_of(l, "taps")?;
        let policy: String = item(l, "policy")?.extract()?;
        let threshold: f64 = item(l, "threshold")?.extract()?;
        out.push(Layer {
            norm1: norm::<T>(l, "norm1")?,
            ssm,
            attn,
            window,
            n_fading: usize_of(l, "n_fading")?,
            n_eidetic: usize_of(l, "n_eidetic")?,
            taps: vec![T::ONE / T::from_f64(k as f64); k],
            chi2: item(l, "chi2")?.extract()?,
            rate: T::from_f64(item(l, "rate")?.extract()?),
            floor: T::from_f64(item(l, "floor")?.extract()?),
            policy: Policy::from_name(&policy, threshold)?,
            norm2: norm::<T>(l, "norm2")?,
            fc1: linear::<T>(l, "fc1", ff, dm)?,
            fc2: linear::<T>(l, "fc2", dm, ff)?,
        });
    }
    let m = Model {
        vocab,
        d_model,
        embedding: vec_of::<T>(top, "embedding")?,
        layers: out,
        norm_f: norm::<T>(top, "norm_f")?,
    };
    m.check()?;
    Ok(m)
}

fn step_with<T: Element + DecodeElem>(
    py: Python<'_>,
    m: &Model<T>,
    n_layers: usize,
    tokens: &Bound<'_, PyAny>,
    state: &Bound<'_, PyList>,
) -> Result<()> {
    if state.len() != 3 + STATE_NAMES.len() * n_layers {
        return Err(PyBmojoErr::value(format!(
            "state: expected {} arrays, got {}",
            3 + STATE_NAMES.len() * n_layers,
            state.len()
        )));
    }
    let tok = ro::<i64>(tokens, "tokens")?;
    let arrs: Vec<Bound<'_, PyAny>> = state.iter().collect();
    let mut pos = rw::<i64>(&arrs[0], "position")?;
    let mut logits = rw::<T>(&arrs[1], "logits")?;
    let mut has = rw::<bool>(&arrs[2], "has_logits")?;
    struct Guards<'py, T: Element> {
        f: Vec<PyReadwriteArrayDyn<'py, T>>,
        i: Vec<PyReadwriteArrayDyn<'py, i64>>,
        d: Vec<PyReadwriteArrayDyn<'py, f64>>,
        b: Vec<PyReadwriteArrayDyn<'py, bool>>,
    }
    let mut g = Guards::<T> {
        f: Vec::new(),
        i: Vec::new(),
        d: Vec::new(),
        b: Vec::new(),
    };
    for li in 0..n_layers {
        for (j, name) in STATE_NAMES.iter().enumerate() {
            let a = &arrs[3 + li * STATE_NAMES.len() + j];
            match *name {
                "innov_count" | "store_positions" | "store_count" | "mem_positions" => {
                    g.i.push(rw::<i64>(a, name)?)
                }
                "store_scores" => g.d.push(rw::<f64>(a, name)?),
                "mem_mask" => g.b.push(rw::<bool>(a, name)?),
                _ => g.f.push(rw::<T>(a, name)?),
            }
        }
    }
    let mut fi = g.f.iter_mut();
    let mut ii = g.i.iter_mut();
    let mut di = g.d.iter_mut();
    let mut bi = g.b.iter_mut();
    let mut layers = Vec::with_capacity(n_layers);
    for _ in 0..n_layers {
        let mut f = || fi.next().map(|a| a.as_slice_mut()).transpose();
        let (conv, ssm, innov_history) = (f()?, f()?, f()?);
        let (innov_ema, ring_k, ring_v, mem_k, mem_v, fading_y) =
            (f()?, f()?, f()?, f()?, f()?, f()?);
        let mut i = || ii.next().map(|a| a.as_slice_mut()).transpose();
        let (innov_count, store_positions, store_count, mem_positions) = (i()?, i()?, i()?, i()?);
        let store_scores = di.next().map(|a| a.as_slice_mut()).transpose()?;
        let mem_mask = bi.next().map(|a| a.as_slice_mut()).transpose()?;
        let e = || PyBmojoErr::value("state: missing arrays");
        layers.push(LayerState {
            conv: conv.ok_or_else(e)?,
            ssm: ssm.ok_or_else(e)?,
            innov_history: innov_history.ok_or_else(e)?,
            innov_count: innov_count.ok_or_else(e)?,
            innov_ema: innov_ema.ok_or_else(e)?,
            store_positions: store_positions.ok_or_else(e)?,
            store_scores: store_scores.ok_or_else(e)?,
            store_count: store_count.ok_or_else(e)?,
            mem_positions: mem_positions.ok_or_else(e)?,
            ring_k: ring_k.ok_or_else(e)?,
            ring_v: ring_v.ok_or_else(e)?,
            mem_k: mem_k.ok_or_else(e)?,
            mem_v: mem_v.ok_or_else(e)?,
            mem_mask: mem_mask.ok_or_else(e)?,
            fading_y: fading_y.ok_or_else(e)?,
        });
    }
    let st = State {
        position: pos.as_slice_mut()?,
        logits: logits.as_slice_mut()?,
        has_logits: has.as_slice_mut()?,
        layers,
    };
    let tokens = slice(&tok);
    let lv = level();
    Ok(py.detach(|| decode::decode_step(lv, m, tokens, st))?)
}

#[pymethods]
impl DecodePlan {
    /// `DecodePlan(vocab, d_model, top, layers, f64)`: `top` holds `embedding`,
    /// `norm_f_w/_b/_eps`; `layers` one dict per block (see `bmojo_core.decode`).
    #[new]
    fn new(
        vocab: usize,
        d_model: usize,
        top: Bound<'_, PyDict>,
        layers: Bound<'_, PyList>,
        f64: bool,
    ) -> Result<Self> {
        let n_layers = layers.len();
        let inner = if f64 {
            Inner::F64(build::<f64>(vocab, d_model, &top, &layers)?)
        } else {
            Inner::F32(build::<f32>(vocab, d_model, &top, &layers)?)
        };
        Ok(DecodePlan { inner, n_layers })
    }

    /// Names of the per-layer state arrays, in `step`'s order.
    #[staticmethod]
    fn state_names() -> Vec<&'static str> {
        STATE_NAMES.to_vec()
    }

    /// One token per row: `tokens (batch,)` int64, `state` the arrays (see the module doc).
    fn step(
        &self,
        py: Python<'_>,
        tokens: Bound<'_, PyAny>,
        state: Bound<'_, PyList>,
    ) -> Result<()> {
        match &self.inner {
            Inner::F32(m) => step_with::<f32>(py, m, self.n_layers, &tokens, &state),
            Inner::F64(m) => step_with::<f64>(py, m, self.n_layers, &tokens, &state),
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DecodePlan>()?;
    Ok(())
}
