//! `bmojo_core._core`: the Python binding of the kernel crate.
//!
//! Functions take NumPy arrays (zero-copy views of torch CPU tensors made by the Python
//! layer, which also validates shapes and dtypes and allocates the outputs). Everything is
//! checked again here against the kernels' expectations, so a wrong call raises
//! `ValueError`/`TypeError` instead of reading or writing the wrong memory. The GIL is
//! released while a kernel runs.

/// `by_float!(is_f64(..)?, go(args))`: calls the binding's generic `go::<f64>` or
/// `go::<f32>` with the same arguments (the one place the float dtype is dispatched).
macro_rules! by_float {
    ($f64:expr, $go:ident($($a:expr),* $(,)?)) => {
        if $f64 {
            $go::<f64>($($a),*)
        } else {
            $go::<f32>($($a),*)
        }
    };
}

mod bilinear;
mod companion;
mod conv;
mod cuda;
mod decode;
mod eidetic;

use std::sync::atomic::{AtomicU8, Ordering};

use bmojo_kernels::cpu::pool;
use bmojo_kernels::selective::{self, BwdOut, FwdOut, Mat, ScanArgs};
use bmojo_kernels::{diag, step};
use bmojo_kernels::{Level, SimdElem};
use numpy::{
    Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

// ------------------------------------------------------------------ runtime settings

/// Current level as its index in `Level::ALL` (u8::MAX: not chosen yet = best).
static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);

fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        u8::MAX => Level::best(),
        i => Level::ALL[i as usize],
    }
}

/// Name of the instruction-set level the kernels use now.
#[pyfunction]
fn simd_level() -> &'static str {
    level().name()
}

/// Levels this CPU supports, best first.
#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    Level::supported().into_iter().map(Level::name).collect()
}

/// Forces a level (one of `simd_levels()`).
#[pyfunction]
fn set_simd_level(name: &str) -> PyResult<()> {
    let Some(l) = Level::from_name(name).filter(|l| l.is_supported()) else {
        return Err(PyValueError::new_err(format!(
            "simd level: expected one of {:?} (supported on this CPU), got {name:?}",
            simd_levels()
        )));
    };
    let i = Level::ALL.iter().position(|&x| x == l).unwrap_or(0);
    LEVEL.store(i as u8, Ordering::Relaxed);
    Ok(())
}

#[pyfunction]
fn get_num_threads() -> usize {
    pool::num_threads()
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    if n < 1 {
        return Err(PyValueError::new_err(format!(
            "num_threads: expected an integer >= 1, got {n}"
        )));
    }
    pool::set_num_threads(n as usize).map_err(kernel_err)
}

// ------------------------------------------------------------------ array access

fn type_err(name: &str, what: &str) -> PyErr {
    PyTypeError::new_err(format!("{name}: expected a C-contiguous {what} array"))
}

fn ro<'py, T: Element>(a: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let arr = a
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| type_err(name, std::any::type_name::<T>()))?;
    let r = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
    if !r.is_c_contiguous() {
        return Err(type_err(name, std::any::type_name::<T>()));
    }
    Ok(r)
}

fn rw<'py, T: Element>(a: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    let arr = a
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| type_err(name, std::any::type_name::<T>()))?;
    let r = arr
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("{name}: not writable or aliased ({e})")))?;
    if !r.is_c_contiguous() {
        return Err(type_err(name, std::any::type_name::<T>()));
    }
    Ok(r)
}

fn opt_ro<'py, T: Element>(
    a: &Option<Bound<'py, PyAny>>,
    name: &str,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, T>>> {
    a.as_ref().map(|x| ro(x, name)).transpose()
}

fn opt_rw<'py, T: Element>(
    a: &Option<Bound<'py, PyAny>>,
    name: &str,
) -> PyResult<Option<PyReadwriteArrayDyn<'py, T>>> {
    a.as_ref().map(|x| rw(x, name)).transpose()
}

fn slice<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> &'a [T] {
    // Contiguity was checked when the view was taken.
    a.as_slice().unwrap_or(&[])
}

fn shape(a: &Bound<'_, PyAny>, name: &str, ndim: usize) -> PyResult<Vec<usize>> {
    let arr = a
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected an array")))?;
    if arr.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name}: expected {ndim} dimensions, got {}",
            arr.ndim()
        )));
    }
    Ok(arr.shape().to_vec())
}

fn is_f64(a: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    if a.cast::<PyArrayDyn<f64>>().is_ok() {
        Ok(true)
    } else if a.cast::<PyArrayDyn<f32>>().is_ok() {
        Ok(false)
    } else {
        Err(PyTypeError::new_err(format!(
            "{name}: expected a float32 or float64 array"
        )))
    }
}

fn kernel_err(e: bmojo_kernels::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

// ------------------------------------------------------------------ diagonal scan

/// `diag_scan(a, b, h0, out, last, reverse)`: a, b, out `(lanes, len)`; h0, last `(lanes,)`.
#[pyfunction]
#[pyo3(signature = (a, b, h0, out, last, reverse))]
fn diag_scan(
    py: Python<'_>,
    a: Bound<'_, PyAny>,
    b: Bound<'_, PyAny>,
    h0: Option<Bound<'_, PyAny>>,
    out: Bound<'_, PyAny>,
    last: Bound<'_, PyAny>,
    reverse: bool,
) -> PyResult<()> {
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        a: &Bound<'_, PyAny>,
        b: &Bound<'_, PyAny>,
        h0: &Option<Bound<'_, PyAny>>,
        out: &Bound<'_, PyAny>,
        last: &Bound<'_, PyAny>,
        reverse: bool,
    ) -> PyResult<()> {
        let sh = shape(a, "a", 2)?;
        let (ra, rb, rh) = (
            ro::<T>(a, "a")?,
            ro::<T>(b, "b")?,
            opt_ro::<T>(h0, "initial_state")?,
        );
        let (mut ro_, mut rl) = (rw::<T>(out, "out")?, rw::<T>(last, "last_state")?);
        let s = diag::DiagArgs {
            lanes: sh[0],
            len: sh[1],
            a: slice(&ra),
            b: slice(&rb),
            h0: rh.as_ref().map(slice),
            reverse,
        };
        let (o, l) = (ro_.as_slice_mut()?, rl.as_slice_mut()?);
        let lv = level();
        py.detach(|| diag::diag_scan(lv, &s, o, l))
            .map_err(kernel_err)
    }
    by_float!(is_f64(&a, "a")?, go(py, &a, &b, &h0, &out, &last, reverse))
}

// ------------------------------------------------------------------ selective scan

/// The read-only inputs of a selective scan, borrowed from Python.
struct ScanInputs<'py, T: Element> {
    dims: (usize, usize, usize, usize),
    u: PyReadonlyArrayDyn<'py, T>,
    delta: PyReadonlyArrayDyn<'py, T>,
    a: PyReadonlyArrayDyn<'py, T>,
    b: PyReadonlyArrayDyn<'py, T>,
    b_groups: Option<usize>,
    c: PyReadonlyArrayDyn<'py, T>,
    c_groups: Option<usize>,
    d: Option<PyReadonlyArrayDyn<'py, T>>,
    z: Option<PyReadonlyArrayDyn<'py, T>>,
    delta_bias: Option<PyReadonlyArrayDyn<'py, T>>,
    h0: Option<PyReadonlyArrayDyn<'py, T>>,
    seq_idx: Option<PyReadonlyArrayDyn<'py, i64>>,
    softplus: bool,
}

/// B/C are `(dim, N)` (constant) or `(batch, G, N, len)`; returns the group count of the
/// latter.
fn mat_groups(m: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<usize>> {
    let arr = m
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected an array")))?;
    match arr.ndim() {
        2 => Ok(None),
        4 => Ok(Some(arr.shape()[1])),
        k => Err(PyValueError::new_err(format!(
            "{name}: expected 2 or 4 dimensions, got {k}"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn scan_inputs<'py, T: Element>(
    u: &Bound<'py, PyAny>,
    delta: &Bound<'py, PyAny>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    c: &Bound<'py, PyAny>,
    d: &Option<Bound<'py, PyAny>>,
    z: &Option<Bound<'py, PyAny>>,
    delta_bias: &Option<Bound<'py, PyAny>>,
    h0: &Option<Bound<'py, PyAny>>,
    seq_idx: &Option<Bound<'py, PyAny>>,
    softplus: bool,
) -> PyResult<ScanInputs<'py, T>> {
    let su = shape(u, "u", 3)?;
    let sa = shape(a, "A", 2)?;
    Ok(ScanInputs {
        dims: (su[0], su[1], su[2], sa[1]),
        u: ro(u, "u")?,
        delta: ro(delta, "delta")?,
        a: ro(a, "A")?,
        b_groups: mat_groups(b, "B")?,
        b: ro(b, "B")?,
        c_groups: mat_groups(c, "C")?,
        c: ro(c, "C")?,
        d: opt_ro(d, "D")?,
        z: opt_ro(z, "z")?,
        delta_bias: opt_ro(delta_bias, "delta_bias")?,
        h0: opt_ro(h0, "initial_state")?,
        seq_idx: opt_ro(seq_idx, "seq_idx")?,
        softplus,
    })
}

impl<T: Element> ScanInputs<'_, T> {
    fn args(&self) -> ScanArgs<'_, T> {
        fn m<'a, T: Element>(x: &'a PyReadonlyArrayDyn<'_, T>, g: Option<usize>) -> Mat<'a, T> {
            match g {
                Some(groups) => Mat::Var {
                    data: slice(x),
                    groups,
                },
                None => Mat::Const(slice(x)),
            }
        }
        let (batch, dim, len, dstate) = self.dims;
        ScanArgs {
            batch,
            dim,
            len,
            dstate,
            u: slice(&self.u),
            delta: slice(&self.delta),
            a: slice(&self.a),
            b: m(&self.b, self.b_groups),
            c: m(&self.c, self.c_groups),
            d: self.d.as_ref().map(slice),
            z: self.z.as_ref().map(slice),
            delta_bias: self.delta_bias.as_ref().map(slice),
            h0: self.h0.as_ref().map(slice),
            seq_idx: self.seq_idx.as_ref().map(slice),
            softplus: self.softplus,
        }
    }
}

/// Forward: writes `out (batch, dim, len)`, `last (batch, dim, N)` and the checkpoints
/// `ckpt (batch, dim, ceil(len / CHECKPOINT_CHUNK), N)`.
#[pyfunction]
#[pyo3(signature = (u, delta, a, b, c, d, z, delta_bias, h0, seq_idx, softplus, out, last, ckpt))]
#[allow(clippy::too_many_arguments)]
fn selective_scan_fwd(
    py: Python<'_>,
    u: Bound<'_, PyAny>,
    delta: Bound<'_, PyAny>,
    a: Bound<'_, PyAny>,
    b: Bound<'_, PyAny>,
    c: Bound<'_, PyAny>,
    d: Option<Bound<'_, PyAny>>,
    z: Option<Bound<'_, PyAny>>,
    delta_bias: Option<Bound<'_, PyAny>>,
    h0: Option<Bound<'_, PyAny>>,
    seq_idx: Option<Bound<'_, PyAny>>,
    softplus: bool,
    out: Bound<'_, PyAny>,
    last: Bound<'_, PyAny>,
    ckpt: Bound<'_, PyAny>,
) -> PyResult<()> {
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        i: ScanInputs<'_, T>,
        out: &Bound<'_, PyAny>,
        last: &Bound<'_, PyAny>,
        ckpt: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (mut o, mut l, mut k) = (
            rw::<T>(out, "out")?,
            rw::<T>(last, "last_state")?,
            rw::<T>(ckpt, "checkpoints")?,
        );
        let s = i.args();
        let fo = FwdOut {
            out: o.as_slice_mut()?,
            last: l.as_slice_mut()?,
            ckpt: k.as_slice_mut()?,
        };
        let lv = level();
        py.detach(|| selective::forward(lv, &s, fo))
            .map_err(kernel_err)
    }
    if is_f64(&u, "u")? {
        let i = scan_inputs::<f64>(
            &u,
            &delta,
            &a,
            &b,
            &c,
            &d,
            &z,
            &delta_bias,
            &h0,
            &seq_idx,
            softplus,
        )?;
        go(py, i, &out, &last, &ckpt)
    } else {
        let i = scan_inputs::<f32>(
            &u,
            &delta,
            &a,
            &b,
            &c,
            &d,
            &z,
            &delta_bias,
            &h0,
            &seq_idx,
            softplus,
        )?;
        go(py, i, &out, &last, &ckpt)
    }
}

/// Backward: fills the gradient arrays (`dd`, `dz`, `ddelta_bias` optional).
#[pyfunction]
#[pyo3(signature = (u, delta, a, b, c, d, z, delta_bias, h0, seq_idx, softplus, ckpt, dout, dlast,
                    du, ddelta, da, db, dc, dd, dz, ddelta_bias, dh0))]
#[allow(clippy::too_many_arguments)]
fn selective_scan_bwd(
    py: Python<'_>,
    u: Bound<'_, PyAny>,
    delta: Bound<'_, PyAny>,
    a: Bound<'_, PyAny>,
    b: Bound<'_, PyAny>,
    c: Bound<'_, PyAny>,
    d: Option<Bound<'_, PyAny>>,
    z: Option<Bound<'_, PyAny>>,
    delta_bias: Option<Bound<'_, PyAny>>,
    h0: Option<Bound<'_, PyAny>>,
    seq_idx: Option<Bound<'_, PyAny>>,
    softplus: bool,
    ckpt: Bound<'_, PyAny>,
    dout: Bound<'_, PyAny>,
    dlast: Option<Bound<'_, PyAny>>,
    du: Bound<'_, PyAny>,
    ddelta: Bound<'_, PyAny>,
    da: Bound<'_, PyAny>,
    db: Bound<'_, PyAny>,
    dc: Bound<'_, PyAny>,
    dd: Option<Bound<'_, PyAny>>,
    dz: Option<Bound<'_, PyAny>>,
    ddelta_bias: Option<Bound<'_, PyAny>>,
    dh0: Bound<'_, PyAny>,
) -> PyResult<()> {
    let grads = [&du, &ddelta, &da, &db, &dc, &dh0];
    let opt_grads = [&dd, &dz, &ddelta_bias];
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        i: ScanInputs<'_, T>,
        ckpt: &Bound<'_, PyAny>,
        dout: &Bound<'_, PyAny>,
        dlast: &Option<Bound<'_, PyAny>>,
        g: [&Bound<'_, PyAny>; 6],
        og: [&Option<Bound<'_, PyAny>>; 3],
    ) -> PyResult<()> {
        let (k, go_, dl) = (
            ro::<T>(ckpt, "checkpoints")?,
            ro::<T>(dout, "dout")?,
            opt_ro::<T>(dlast, "dlast_state")?,
        );
        let mut du = rw::<T>(g[0], "du")?;
        let mut ddelta = rw::<T>(g[1], "ddelta")?;
        let mut da = rw::<T>(g[2], "dA")?;
        let mut db = rw::<T>(g[3], "dB")?;
        let mut dc = rw::<T>(g[4], "dC")?;
        let mut dh0 = rw::<T>(g[5], "dinitial_state")?;
        let mut dd = opt_rw::<T>(og[0], "dD")?;
        let mut dz = opt_rw::<T>(og[1], "dz")?;
        let mut dbias = opt_rw::<T>(og[2], "ddelta_bias")?;
        let s = i.args();
        let o = BwdOut {
            du: du.as_slice_mut()?,
            ddelta: ddelta.as_slice_mut()?,
            da: da.as_slice_mut()?,
            db: db.as_slice_mut()?,
            dc: dc.as_slice_mut()?,
            dd: dd.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            dz: dz.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            ddelta_bias: dbias.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            dh0: dh0.as_slice_mut()?,
        };
        let (ks, gs, dls) = (slice(&k), slice(&go_), dl.as_ref().map(slice));
        let lv = level();
        py.detach(|| selective::backward(lv, &s, ks, gs, dls, o))
            .map_err(kernel_err)
    }
    if is_f64(&u, "u")? {
        let i = scan_inputs::<f64>(
            &u,
            &delta,
            &a,
            &b,
            &c,
            &d,
            &z,
            &delta_bias,
            &h0,
            &seq_idx,
            softplus,
        )?;
        go(py, i, &ckpt, &dout, &dlast, grads, opt_grads)
    } else {
        let i = scan_inputs::<f32>(
            &u,
            &delta,
            &a,
            &b,
            &c,
            &d,
            &z,
            &delta_bias,
            &h0,
            &seq_idx,
            softplus,
        )?;
        go(py, i, &ckpt, &dout, &dlast, grads, opt_grads)
    }
}

// ------------------------------------------------------------------ streaming step

/// In-place step: `state (slots, dim, N)`; `x`/`dt`/`z`/`out` `(batch, dim)` or
/// `(batch, T, dim)`; `b`/`c` `(batch, [T,] N)` or `(batch, [T,] G, N)`; `slots (batch,)`
/// int64; `snaps (batch, T, dim, N)`. Every shape is checked exactly, so the Python fast
/// path can hand over user tensors unvalidated. With `out=None` the output array is
/// allocated here and returned.
#[pyfunction]
#[pyo3(signature = (state, x, dt, a, b, c, d, z, dt_bias, softplus, slots, out, snaps))]
#[allow(clippy::too_many_arguments)]
fn selective_state_update<'py>(
    py: Python<'py>,
    state: Bound<'py, PyAny>,
    x: Bound<'py, PyAny>,
    dt: Bound<'py, PyAny>,
    a: Bound<'py, PyAny>,
    b: Bound<'py, PyAny>,
    c: Bound<'py, PyAny>,
    d: Option<Bound<'py, PyAny>>,
    z: Option<Bound<'py, PyAny>>,
    dt_bias: Option<Bound<'py, PyAny>>,
    softplus: bool,
    slots: Option<Bound<'py, PyAny>>,
    out: Option<Bound<'py, PyAny>>,
    snaps: Option<Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    fn want(name: &str, got: &[usize], want: &[usize]) -> PyResult<()> {
        if got == want {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!(
                "{name}: expected shape {want:?}, got {got:?}"
            )))
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn go<'py, T: SimdElem + Element>(
        py: Python<'py>,
        state: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
        dt: &Bound<'py, PyAny>,
        a: &Bound<'py, PyAny>,
        b: &Bound<'py, PyAny>,
        c: &Bound<'py, PyAny>,
        d: &Option<Bound<'py, PyAny>>,
        z: &Option<Bound<'py, PyAny>>,
        dt_bias: &Option<Bound<'py, PyAny>>,
        softplus: bool,
        slots: &Option<Bound<'py, PyAny>>,
        out: &Option<Bound<'py, PyAny>>,
        snaps: &Option<Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (rx, rdt, ra, rb, rc) = (
            ro::<T>(x, "x")?,
            ro::<T>(dt, "dt")?,
            ro::<T>(a, "A")?,
            ro::<T>(b, "B")?,
            ro::<T>(c, "C")?,
        );
        let (rd, rz, rbias) = (
            opt_ro::<T>(d, "D")?,
            opt_ro::<T>(z, "z")?,
            opt_ro::<T>(dt_bias, "dt_bias")?,
        );
        let rslots = opt_ro::<i64>(slots, "state_batch_indices")?;
        // Exact shapes, so that no layout is ever misread: x is (batch, dim) for one token
        // or (batch, T, dim); B/C add a group axis when they have one more dimension.
        let sx = rx.shape().to_vec();
        let xnd = sx.len();
        if xnd != 2 && xnd != 3 {
            return Err(PyValueError::new_err(format!(
                "x: expected (batch, dim) or (batch, T, dim), got shape {sx:?}"
            )));
        }
        let (batch, ntok, dim) = (sx[0], if xnd == 3 { sx[1] } else { 1 }, sx[xnd - 1]);
        let sa = ra.shape();
        want("A", sa, &[dim, sa.get(1).copied().unwrap_or(0)])?;
        let n = sa[1];
        let sb = rb.shape();
        let groups = if sb.len() == xnd {
            1
        } else {
            sb.get(xnd - 1).copied().unwrap_or(0)
        };
        let mut bshape = sx[..xnd - 1].to_vec();
        if sb.len() != xnd {
            bshape.push(groups);
        }
        bshape.push(n);
        want("B", sb, &bshape)?;
        want("C", rc.shape(), &bshape)?;
        want("dt", rdt.shape(), &sx)?;
        for (v, name, w) in [
            (&rd, "D", &[dim][..]),
            (&rz, "z", &sx[..]),
            (&rbias, "dt_bias", &[dim][..]),
        ] {
            if let Some(v) = v {
                want(name, v.shape(), w)?;
            }
        }
        if let Some(v) = &rslots {
            want("state_batch_indices", v.shape(), &[batch])?;
        }
        let mut rstate = rw::<T>(state, "state")?;
        let slots_total = rstate.shape().first().copied().unwrap_or(0);
        want("state", rstate.shape(), &[slots_total, dim, n])?;
        let new_out = match out {
            Some(_) => None,
            None => Some(PyArrayDyn::<T>::zeros(py, sx.as_slice(), false)),
        };
        let out_any = match (&new_out, out) {
            (Some(o), _) => o.as_any().clone(),
            (None, Some(o)) => o.clone(),
            (None, None) => unreachable!("allocated above"),
        };
        let mut rout = rw::<T>(&out_any, "out")?;
        want("out", rout.shape(), &sx)?;
        let mut rsnaps = opt_rw::<T>(snaps, "intermediate_states")?;
        if let Some(v) = &rsnaps {
            want("intermediate_states", v.shape(), &[batch, ntok, dim, n])?;
        }
        let s = step::StepArgs {
            batch,
            ntok,
            dim,
            dstate: n,
            groups,
            x: slice(&rx),
            dt: slice(&rdt),
            a: slice(&ra),
            b: slice(&rb),
            c: slice(&rc),
            d: rd.as_ref().map(slice),
            z: rz.as_ref().map(slice),
            dt_bias: rbias.as_ref().map(slice),
            softplus,
            slots: rslots.as_ref().map(slice),
        };
        let (st, o) = (rstate.as_slice_mut()?, rout.as_slice_mut()?);
        let sn = rsnaps.as_mut().map(|x| x.as_slice_mut()).transpose()?;
        let lv = level();
        py.detach(|| step::step(lv, &s, st, slots_total, o, sn))
            .map_err(kernel_err)?;
        drop(rout);
        Ok(new_out.map(|o| o.into_any()))
    }
    by_float!(
        is_f64(&state, "state")?,
        go(py, &state, &x, &dt, &a, &b, &c, &d, &z, &dt_bias, softplus, &slots, &out, &snaps,)
    )
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CHECKPOINT_CHUNK", selective::CHUNK)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(diag_scan, m)?)?;
    m.add_function(wrap_pyfunction!(selective_scan_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(selective_scan_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(selective_state_update, m)?)?;
    companion::register(m)?;
    conv::register(m)?;
    bilinear::register(m)?;
    eidetic::register(m)?;
    decode::register(m)?;
    cuda::register(m)?;
    Ok(())
}
