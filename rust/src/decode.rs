//! `bmojo_core._core.decode`: the fused streaming decode step (used by
//! `bmojo_core.ops.decode`).
//!
//! `DecodePlan(vocab, d_model, top, layers, f64)` copies a `BMojoLM`'s parameters once
//! (laid out as the kernel reads them); the Python side rebuilds it when the parameters
//! change. `DecodeState(stream, layers)` owns a stream's state buffers, declared by name,
//! dtype and shape (the stream's own pieces, then each layer's), and hands each one to
//! Python as a NumPy array over the same memory (torch tensors view them), so that
//! `plan.step(tokens, state)` passes nothing but the tokens.

use bmojo_kernels::decode::{
    self, Attn, DecodeElem, Layer, LayerState, Linear, Model, Norm, Ssm, State,
};
use bmojo_kernels::eidetic::Policy;
use std::cell::UnsafeCell;
use std::sync::Mutex;

use numpy::ndarray::{ArrayViewD, IxDyn};
use numpy::{Element, PyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::args::{ro, slice};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

enum Inner {
    F32(Model<f32>),
    F64(Model<f64>),
}

/// A model's parameters prepared for the fused decode step.
#[pyclass(module = "bmojo_core._core.decode", frozen)]
struct DecodePlan {
    inner: Inner,
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
        let inner = if f64 {
            Inner::F64(build::<f64>(vocab, d_model, &top, &layers)?)
        } else {
            Inner::F32(build::<f32>(vocab, d_model, &top, &layers)?)
        };
        Ok(DecodePlan { inner })
    }

    /// One token per row: `tokens (batch,)` int64 through every layer, on `state` (its
    /// float buffers in the plan's dtype). Everything is checked before anything is
    /// written.
    fn step(&self, py: Python<'_>, tokens: Bound<'_, PyAny>, state: &DecodeState) -> Result<()> {
        let tok = ro::<i64>(&tokens, "tokens")?;
        let tokens = slice(&tok);
        let lv = level();
        match &self.inner {
            Inner::F32(m) => {
                py.detach(|| state.with::<f32, _>(|st| Ok(decode::decode_step(lv, m, tokens, st)?)))
            }
            Inner::F64(m) => {
                py.detach(|| state.with::<f64, _>(|st| Ok(decode::decode_step(lv, m, tokens, st)?)))
            }
        }
    }
}

// ------------------------------------------------------------------------ the state

/// A buffer's elements. `UnsafeCell` because the buffer is written through shared
/// references: by the kernel inside [`DecodeState::with`] and by Python through the arrays
/// [`DecodeState::array`] hands out.
enum Buf {
    F32(Box<[UnsafeCell<f32>]>),
    F64(Box<[UnsafeCell<f64>]>),
    I64(Box<[UnsafeCell<i64>]>),
    Bool(Box<[UnsafeCell<bool>]>),
}

/// The element types a state buffer can hold.
trait Piece: Element + Copy + Default {
    const DTYPE: &'static str;
    fn cells(b: &Buf) -> Option<&[UnsafeCell<Self>]>;
}

macro_rules! piece {
    ($t:ty, $v:ident, $name:literal) => {
        impl Piece for $t {
            const DTYPE: &'static str = $name;
            fn cells(b: &Buf) -> Option<&[UnsafeCell<Self>]> {
                match b {
                    Buf::$v(c) => Some(c),
                    _ => None,
                }
            }
        }
    };
}
piece!(f32, F32, "float32");
piece!(f64, F64, "float64");
piece!(i64, I64, "int64");
piece!(bool, Bool, "bool");

/// `n` default cells, or an error when the memory cannot be had (a failed infallible
/// allocation would abort the process).
fn zeroed<T: Piece>(name: &str, n: usize) -> Result<Box<[UnsafeCell<T>]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        PyBmojoErr::value(format!(
            "batch_size: too large, cannot allocate {n} elements for the state piece {name}"
        ))
    })?;
    v.extend((0..n).map(|_| UnsafeCell::new(T::default())));
    Ok(v.into_boxed_slice())
}

/// One declared piece: its name, shape and buffer.
struct Entry {
    name: String,
    shape: Vec<usize>,
    buf: Buf,
}

/// The kernel's per-layer pieces, by name (a layer may lack any of them).
const LAYER_PIECES: [&str; 15] = [
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
/// The stream's own pieces.
const STREAM_PIECES: [&str; 3] = ["position", "logits", "has_logits"];

/// A stream's state buffers, owned here and shared with Python.
#[pyclass(module = "bmojo_core._core.decode", frozen)]
struct DecodeState {
    stream: Vec<Entry>,
    layers: Vec<Vec<Entry>>,
    /// Held by a step for its whole run: two steps on one state never overlap.
    busy: Mutex<()>,
}

// SAFETY: the buffers are only ever accessed (1) by `with`, which holds `busy` for as long
// as the slices it builds live, so no two native accesses overlap, and (2) by Python
// through the arrays of `array` (and the tensors viewing them). Python reaches them under
// the GIL, and `with` runs with the GIL released: Python code in another thread writing a
// state tensor while a step runs would race with the kernel, exactly as it would with any
// torch op writing a tensor in place (in-place ops release the GIL too); not doing so is
// the documented contract of `Stream`, whose own methods never overlap a step. Nothing else
// in the type is tied to a thread.
unsafe impl Sync for DecodeState {}

/// Reads one `(name, dtype, shape)` declaration.
fn entry(item: &Bound<'_, PyAny>, allowed: &[&str]) -> Result<Entry> {
    let (name, dtype, shape): (String, String, Vec<usize>) = item.extract().map_err(|_| {
        PyBmojoErr::type_("state: expected (name, dtype, shape) tuples for every piece")
    })?;
    if !allowed.contains(&name.as_str()) {
        return Err(PyBmojoErr::value(format!(
            "state: unknown piece {name:?} (expected one of {allowed:?})"
        )));
    }
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let n = n.ok_or_else(|| PyBmojoErr::value(format!("{name}: shape {shape:?} overflows")))?;
    let buf = match dtype.as_str() {
        "float32" => Buf::F32(zeroed(&name, n)?),
        "float64" => Buf::F64(zeroed(&name, n)?),
        "int64" => Buf::I64(zeroed(&name, n)?),
        "bool" => Buf::Bool(zeroed(&name, n)?),
        _ => {
            return Err(PyBmojoErr::type_(format!(
                "{name}: expected dtype float32, float64, int64 or bool, got {dtype:?}"
            )))
        }
    };
    Ok(Entry { name, shape, buf })
}

fn entries(list: &Bound<'_, PyList>, allowed: &[&str]) -> Result<Vec<Entry>> {
    let out: Vec<Entry> = list
        .iter()
        .map(|x| entry(&x, allowed))
        .collect::<Result<_>>()?;
    for (i, e) in out.iter().enumerate() {
        if out[..i].iter().any(|f| f.name == e.name) {
            return Err(PyBmojoErr::value(format!(
                "state: piece {:?} declared twice",
                e.name
            )));
        }
    }
    Ok(out)
}

impl DecodeState {
    /// The elements of `name` among `list` as a mutable slice of `T` (empty when the piece
    /// is not declared).
    ///
    /// # Safety
    /// The caller holds `busy` for the life of the slice and takes each piece once.
    // A `&mut` out of `&self` is what `UnsafeCell` is for; the contract above makes it
    // exclusive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn piece<'a, T: Piece>(list: &'a [Entry], name: &str) -> Result<&'a mut [T]> {
        let Some(e) = list.iter().find(|e| e.name == name) else {
            return Ok(&mut []);
        };
        let cells = T::cells(&e.buf).ok_or_else(|| {
            PyBmojoErr::type_(format!(
                "{name}: expected a {} buffer for this model",
                T::DTYPE
            ))
        })?;
        // SAFETY: `UnsafeCell<T>` has the layout of `T`, the cells are valid for their
        // length and, by the caller's contract, nothing else accesses them meanwhile.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(UnsafeCell::raw_get(cells.as_ptr()), cells.len())
        })
    }

    /// Runs `f` on the whole state as the kernel's [`State`] of float type `T`.
    fn with<T: Piece, R>(&self, f: impl FnOnce(State<'_, T>) -> Result<R>) -> Result<R> {
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.stream;
        // SAFETY: `busy` is held until the slices die with `f`'s return, and every piece is
        // taken once (the names of a list are distinct: checked at construction).
        let st = unsafe {
            let mut layers = Vec::with_capacity(self.layers.len());
            for l in &self.layers {
                layers.push(LayerState {
                    conv: Self::piece(l, "conv")?,
                    ssm: Self::piece(l, "ssm")?,
                    innov_history: Self::piece(l, "innov_history")?,
                    innov_count: Self::piece(l, "innov_count")?,
                    innov_ema: Self::piece(l, "innov_ema")?,
                    store_positions: Self::piece(l, "store_positions")?,
                    store_scores: Self::piece(l, "store_scores")?,
                    store_count: Self::piece(l, "store_count")?,
                    mem_positions: Self::piece(l, "mem_positions")?,
                    ring_k: Self::piece(l, "ring_k")?,
                    ring_v: Self::piece(l, "ring_v")?,
                    mem_k: Self::piece(l, "mem_k")?,
                    mem_v: Self::piece(l, "mem_v")?,
                    mem_mask: Self::piece(l, "mem_mask")?,
                    fading_y: Self::piece(l, "fading_y")?,
                });
            }
            State {
                position: Self::piece(s, "position")?,
                logits: Self::piece(s, "logits")?,
                has_logits: Self::piece(s, "has_logits")?,
                layers,
            }
        };
        f(st)
    }
}

fn share<'py, T: Piece>(
    owner: &Bound<'py, DecodeState>,
    cells: &[UnsafeCell<T>],
    shape: &[usize],
) -> Result<Bound<'py, PyAny>> {
    let ptr = UnsafeCell::raw_get(cells.as_ptr()) as *const T;
    // SAFETY: `ptr` addresses `cells.len()` = product(shape) initialised elements (checked
    // at construction) of a buffer that is never reallocated or freed while `owner` lives.
    let view = unsafe { ArrayViewD::from_shape_ptr(IxDyn(shape), ptr) };
    // SAFETY: the array's base object is `owner`, which owns the buffer: the memory stays
    // valid and in place for as long as the array (or a tensor viewing it) exists.
    Ok(unsafe { PyArrayDyn::borrow_from_array(&view, owner.clone().into_any()) }.into_any())
}

#[pymethods]
impl DecodeState {
    /// `DecodeState(stream, layers)`: `stream` the stream's pieces, `layers` one list per
    /// layer, each piece a `(name, dtype, shape)` tuple (dtype `"float32"`, `"float64"`,
    /// `"int64"` or `"bool"`; shape with the batch first). Buffers start zeroed.
    #[new]
    fn new(stream: Bound<'_, PyList>, layers: Bound<'_, PyList>) -> Result<Self> {
        let stream = entries(&stream, &STREAM_PIECES)?;
        let layers = layers
            .iter()
            .map(|l| {
                let l = l
                    .cast::<PyList>()
                    .map_err(|_| PyBmojoErr::type_("layers: expected a list of lists"))?;
                entries(l, &LAYER_PIECES)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodeState {
            stream,
            layers,
            busy: Mutex::new(()),
        })
    }

    /// The NumPy array over piece `name` of layer `layer` (None: the stream's own pieces);
    /// it shares the buffer (and keeps this object alive).
    #[pyo3(signature = (layer, name))]
    fn array<'py>(
        slf: &Bound<'py, Self>,
        layer: Option<usize>,
        name: &str,
    ) -> Result<Bound<'py, PyAny>> {
        let this = slf.get();
        let list = match layer {
            None => &this.stream,
            Some(i) => this.layers.get(i).ok_or_else(|| {
                PyBmojoErr::value(format!("layer: expected < {}, got {i}", this.layers.len()))
            })?,
        };
        let e = list
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| PyBmojoErr::value(format!("name: no piece {name:?} declared")))?;
        match &e.buf {
            Buf::F32(c) => share(slf, c, &e.shape),
            Buf::F64(c) => share(slf, c, &e.shape),
            Buf::I64(c) => share(slf, c, &e.shape),
            Buf::Bool(c) => share(slf, c, &e.shape),
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DecodePlan>()?;
    m.add_class::<DecodeState>()?;
    Ok(())
}
