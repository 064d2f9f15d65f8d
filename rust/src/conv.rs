//! `bmojo_core._core.conv`: the nilpotent shift state, causal depthwise convolution and
//! its ring-buffer update, design §3.
//!
//! Every shape is checked exactly here (the kernels check lengths), so a wrong call raises
//! instead of misreading a layout; the update is called with user tensors directly by the
//! Python fast path.

use bmojo_kernels::conv::{self, ConvArgs, ConvGrads, UpdateArgs};
use bmojo_kernels::SimdElem;
use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::args::{
    by_float, disjoint, is_f64, opt_ro, opt_rw, out_or_new, ro, rw, slice, want, Opt,
};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

/// An int32 or int64 array of the given shape, as int64 values.
fn ints(a: Opt<'_, '_>, name: &str, shape: &[usize]) -> Result<Option<Vec<i64>>> {
    let Some(a) = a else { return Ok(None) };
    let arr = a
        .cast::<PyUntypedArray>()
        .map_err(|_| PyBmojoErr::type_(format!("{name}: expected an int array")))?;
    want(name, arr.shape(), shape)?;
    let borrowed = |e| PyBmojoErr::value(format!("{name}: {e}"));
    if let Ok(r) = a.cast::<PyArrayDyn<i64>>() {
        let r = r.try_readonly().map_err(borrowed)?;
        Ok(Some(r.as_array().iter().copied().collect()))
    } else if let Ok(r) = a.cast::<PyArrayDyn<i32>>() {
        let r = r.try_readonly().map_err(borrowed)?;
        Ok(Some(r.as_array().iter().map(|&v| v as i64).collect()))
    } else {
        Err(PyBmojoErr::type_(format!(
            "{name}: expected an int32 or int64 array"
        )))
    }
}

/// The read-only inputs of a convolution, shape-checked.
struct Inputs<'py, T: Element> {
    dims: (usize, usize, usize, usize),
    x: PyReadonlyArrayDyn<'py, T>,
    w: PyReadonlyArrayDyn<'py, T>,
    bias: Option<PyReadonlyArrayDyn<'py, T>>,
    init: Option<PyReadonlyArrayDyn<'py, T>>,
    seq: Option<Vec<i64>>,
}

impl<'py, T: Element> Inputs<'py, T> {
    fn new(
        x: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        bias: Opt<'_, 'py>,
        seq_idx: Opt<'_, 'py>,
        init: Opt<'_, 'py>,
    ) -> Result<Self> {
        let (rx, rw_) = (ro::<T>(x, "x")?, ro::<T>(weight, "weight")?);
        let sx = rx.shape().to_vec();
        if sx.len() != 3 {
            return Err(PyBmojoErr::value(format!(
                "x: expected (batch, dim, len), got shape {sx:?}"
            )));
        }
        let (b, d, l) = (sx[0], sx[1], sx[2]);
        let k = rw_.shape().get(1).copied().unwrap_or(0);
        want("weight", rw_.shape(), &[d, k])?;
        if k == 0 {
            return Err(PyBmojoErr::value("weight: expected a width K >= 1, got 0"));
        }
        let rb = opt_ro::<T>(bias, "bias")?;
        if let Some(v) = &rb {
            want("bias", v.shape(), &[d])?;
        }
        let ri = opt_ro::<T>(init, "initial_states")?;
        if let Some(v) = &ri {
            want("initial_states", v.shape(), &[b, d, k - 1])?;
        }
        let seq = ints(seq_idx, "seq_idx", &[b, l])?;
        Ok(Inputs {
            dims: (b, d, l, k),
            x: rx,
            w: rw_,
            bias: rb,
            init: ri,
            seq,
        })
    }

    fn args(&self, silu: bool) -> ConvArgs<'_, T> {
        let (b, d, l, k) = self.dims;
        ConvArgs {
            batch: b,
            dim: d,
            len: l,
            width: k,
            x: slice(&self.x),
            weight: slice(&self.w),
            bias: self.bias.as_ref().map(slice),
            init: self.init.as_ref().map(slice),
            seq_idx: self.seq.as_deref(),
            silu,
        }
    }
}

/// `causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, silu, out, final_states)`:
/// x/out `(B, D, L)`, weight `(D, K)`, bias `(D,)`, seq_idx `(B, L)` int32/int64,
/// initial/final states `(B, D, K-1)`.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, seq_idx, initial_states, silu, out, final_states))]
#[allow(clippy::too_many_arguments)]
fn causal_conv1d_fwd(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    weight: Bound<'_, PyAny>,
    bias: Option<Bound<'_, PyAny>>,
    seq_idx: Option<Bound<'_, PyAny>>,
    initial_states: Option<Bound<'_, PyAny>>,
    silu: bool,
    out: Bound<'_, PyAny>,
    final_states: Option<Bound<'_, PyAny>>,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: Opt<'_, '_>,
        seq_idx: Opt<'_, '_>,
        init: Opt<'_, '_>,
        silu: bool,
        out: &Bound<'_, PyAny>,
        fin: Opt<'_, '_>,
    ) -> Result<()> {
        let inp = Inputs::<T>::new(x, weight, bias, seq_idx, init)?;
        let (b, d, l, k) = inp.dims;
        let mut ro_ = rw::<T>(out, "out")?;
        want("out", ro_.shape(), &[b, d, l])?;
        let mut rf = opt_rw::<T>(fin, "final_states")?;
        if let Some(v) = &rf {
            want("final_states", v.shape(), &[b, d, k - 1])?;
        }
        let s = inp.args(silu);
        let o = ro_.as_slice_mut()?;
        let f = rf.as_mut().map(|v| v.as_slice_mut()).transpose()?;
        let lv = level();
        Ok(py.detach(|| conv::conv_fwd(lv, &s, o, f))?)
    }
    by_float!(
        is_f64(&x, "x")?,
        go(
            py,
            &x,
            &weight,
            &bias,
            &seq_idx,
            &initial_states,
            silu,
            &out,
            &final_states,
        )
    )
}

/// `causal_conv1d_bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu,
/// dx, dweight, dbias, dinitial_states)`: the gradients of `causal_conv1d_fwd`.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu, dx, dweight, dbias, dinitial_states))]
#[allow(clippy::too_many_arguments)]
fn causal_conv1d_bwd(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    weight: Bound<'_, PyAny>,
    bias: Option<Bound<'_, PyAny>>,
    seq_idx: Option<Bound<'_, PyAny>>,
    initial_states: Option<Bound<'_, PyAny>>,
    dout: Bound<'_, PyAny>,
    dfinal_states: Option<Bound<'_, PyAny>>,
    silu: bool,
    dx: Bound<'_, PyAny>,
    dweight: Bound<'_, PyAny>,
    dbias: Bound<'_, PyAny>,
    dinitial_states: Option<Bound<'_, PyAny>>,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: Opt<'_, '_>,
        seq_idx: Opt<'_, '_>,
        init: Opt<'_, '_>,
        dout: &Bound<'_, PyAny>,
        dfinal: Opt<'_, '_>,
        silu: bool,
        dx: &Bound<'_, PyAny>,
        dweight: &Bound<'_, PyAny>,
        dbias: &Bound<'_, PyAny>,
        dinit: Opt<'_, '_>,
    ) -> Result<()> {
        let inp = Inputs::<T>::new(x, weight, bias, seq_idx, init)?;
        let (b, d, l, k) = inp.dims;
        let rdo = ro::<T>(dout, "dout")?;
        want("dout", rdo.shape(), &[b, d, l])?;
        let rdf = opt_ro::<T>(dfinal, "dfinal_states")?;
        if let Some(v) = &rdf {
            want("dfinal_states", v.shape(), &[b, d, k - 1])?;
        }
        let (mut rdx, mut rdw, mut rdb) = (
            rw::<T>(dx, "dx")?,
            rw::<T>(dweight, "dweight")?,
            rw::<T>(dbias, "dbias")?,
        );
        want("dx", rdx.shape(), &[b, d, l])?;
        want("dweight", rdw.shape(), &[d, k])?;
        want("dbias", rdb.shape(), &[d])?;
        let mut rdi = opt_rw::<T>(dinit, "dinitial_states")?;
        if let Some(v) = &rdi {
            want("dinitial_states", v.shape(), &[b, d, k - 1])?;
        }
        let s = inp.args(silu);
        let g = ConvGrads {
            dx: rdx.as_slice_mut()?,
            dweight: rdw.as_slice_mut()?,
            dbias: rdb.as_slice_mut()?,
            dinit: rdi.as_mut().map(|v| v.as_slice_mut()).transpose()?,
        };
        let (go_, gf) = (slice(&rdo), rdf.as_ref().map(slice));
        let lv = level();
        Ok(py.detach(|| conv::conv_bwd(lv, &s, go_, gf, g))?)
    }
    by_float!(
        is_f64(&x, "x")?,
        go(
            py,
            &x,
            &weight,
            &bias,
            &seq_idx,
            &initial_states,
            &dout,
            &dfinal_states,
            silu,
            &dx,
            &dweight,
            &dbias,
            &dinitial_states,
        )
    )
}

/// In-place update: `x` `(B, D)` or `(B, D, T)`, `conv_state (slots, D, S)`, `weight
/// (D, K)`, `bias (D,)`, `cache_seqlens`/`conv_state_indices` `(B,)` int32/int64. With
/// `out=None` the output (x's shape) is allocated here and returned. Everything is checked
/// before the state is written.
#[pyfunction]
#[pyo3(signature = (x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out))]
#[allow(clippy::too_many_arguments)]
fn causal_conv1d_update<'py>(
    py: Python<'py>,
    x: Bound<'py, PyAny>,
    conv_state: Bound<'py, PyAny>,
    weight: Bound<'py, PyAny>,
    bias: Option<Bound<'py, PyAny>>,
    silu: bool,
    cache_seqlens: Option<Bound<'py, PyAny>>,
    conv_state_indices: Option<Bound<'py, PyAny>>,
    out: Option<Bound<'py, PyAny>>,
) -> Result<Option<Bound<'py, PyAny>>> {
    #[allow(clippy::too_many_arguments)]
    fn go<'py, T: SimdElem + Element>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        state: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        bias: Opt<'_, 'py>,
        silu: bool,
        cache: Opt<'_, 'py>,
        slots: Opt<'_, 'py>,
        out: Opt<'_, 'py>,
    ) -> Result<Option<Bound<'py, PyAny>>> {
        let (rx, rw_) = (ro::<T>(x, "x")?, ro::<T>(weight, "weight")?);
        let sx = rx.shape().to_vec();
        if sx.len() != 2 && sx.len() != 3 {
            return Err(PyBmojoErr::value(format!(
                "x: expected (batch, dim) or (batch, dim, T), got shape {sx:?}"
            )));
        }
        let (b, d, nt) = (sx[0], sx[1], sx.get(2).copied().unwrap_or(1));
        let k = rw_.shape().get(1).copied().unwrap_or(0);
        want("weight", rw_.shape(), &[d, k])?;
        if k == 0 {
            return Err(PyBmojoErr::value("weight: expected a width K >= 1, got 0"));
        }
        let rb = opt_ro::<T>(bias, "bias")?;
        if let Some(v) = &rb {
            want("bias", v.shape(), &[d])?;
        }
        let cs = ints(cache, "cache_seqlens", &[b])?;
        let sl = ints(slots, "conv_state_indices", &[b])?;
        let mut rs = rw::<T>(state, "conv_state")?;
        let ss = rs.shape().to_vec();
        if ss.len() != 3 {
            return Err(PyBmojoErr::value(format!(
                "conv_state: expected (batch, dim, state_len), got shape {ss:?}"
            )));
        }
        want("conv_state", &ss, &[ss[0], d, ss[2]])?;
        let (out_any, new_out) = out_or_new::<T>(py, out, &sx);
        let mut rout = rw::<T>(&out_any, "out")?;
        want("out", rout.shape(), &sx)?;
        disjoint(
            &[("conv_state", Some(state)), ("out", out.as_ref())],
            &[
                ("x", Some(x)),
                ("weight", Some(weight)),
                ("bias", bias.as_ref()),
                ("cache_seqlens", cache.as_ref()),
                ("conv_state_indices", slots.as_ref()),
            ],
        )?;
        let s = UpdateArgs {
            batch: b,
            dim: d,
            ntok: nt,
            width: k,
            state_len: ss[2],
            x: slice(&rx),
            weight: slice(&rw_),
            bias: rb.as_ref().map(slice),
            silu,
            cache_seqlens: cs.as_deref(),
            slots: sl.as_deref(),
        };
        let (st, o) = (rs.as_slice_mut()?, rout.as_slice_mut()?);
        let lv = level();
        py.detach(|| conv::conv_update(lv, &s, st, ss[0], o))?;
        drop(rout);
        Ok(new_out)
    }
    by_float!(
        is_f64(&conv_state, "conv_state")?,
        go(
            py,
            &x,
            &conv_state,
            &weight,
            &bias,
            silu,
            &cache_seqlens,
            &conv_state_indices,
            &out,
        )
    )
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(causal_conv1d_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(causal_conv1d_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(causal_conv1d_update, m)?)?;
    Ok(())
}
