//! `bmojo_core._core.scan`: the diagonal scan (design §2.1) and the Mamba-1 selective scan
//! (design §2.2), forward and backward.

use bmojo_kernels::selective::{self, BwdOut, FwdOut, Mat, ScanArgs};
use bmojo_kernels::{diag, SimdElem};
use numpy::{Element, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::args::{by_float, is_f64, ndim, opt_ro, opt_rw, ro, rw, shape, slice, Opt};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

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
) -> Result<()> {
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        a: &Bound<'_, PyAny>,
        b: &Bound<'_, PyAny>,
        h0: Opt<'_, '_>,
        out: &Bound<'_, PyAny>,
        last: &Bound<'_, PyAny>,
        reverse: bool,
    ) -> Result<()> {
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
        Ok(py.detach(|| diag::diag_scan(lv, &s, o, l))?)
    }
    by_float!(is_f64(&a, "a")?, go(py, &a, &b, &h0, &out, &last, reverse))
}

/// The inputs of a selective scan as Python passed them.
struct Raw<'a, 'py> {
    u: &'a Bound<'py, PyAny>,
    delta: &'a Bound<'py, PyAny>,
    a: &'a Bound<'py, PyAny>,
    b: &'a Bound<'py, PyAny>,
    c: &'a Bound<'py, PyAny>,
    d: Opt<'a, 'py>,
    z: Opt<'a, 'py>,
    delta_bias: Opt<'a, 'py>,
    h0: Opt<'a, 'py>,
    seq_idx: Opt<'a, 'py>,
    softplus: bool,
}

/// The read-only inputs of a selective scan, borrowed from Python.
struct Inputs<'py, T: Element> {
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
fn mat_groups(m: &Bound<'_, PyAny>, name: &str) -> Result<Option<usize>> {
    match ndim(m, name)? {
        2 => Ok(None),
        4 => Ok(Some(shape(m, name, 4)?[1])),
        k => Err(PyBmojoErr::value(format!(
            "{name}: expected 2 or 4 dimensions, got {k}"
        ))),
    }
}

impl<'a, 'py> Raw<'a, 'py> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        u: &'a Bound<'py, PyAny>,
        delta: &'a Bound<'py, PyAny>,
        a: &'a Bound<'py, PyAny>,
        b: &'a Bound<'py, PyAny>,
        c: &'a Bound<'py, PyAny>,
        d: Opt<'a, 'py>,
        z: Opt<'a, 'py>,
        delta_bias: Opt<'a, 'py>,
        h0: Opt<'a, 'py>,
        seq_idx: Opt<'a, 'py>,
        softplus: bool,
    ) -> Self {
        Raw {
            u,
            delta,
            a,
            b,
            c,
            d,
            z,
            delta_bias,
            h0,
            seq_idx,
            softplus,
        }
    }

    /// Typed views of the inputs (`T` the float dtype).
    fn borrow<T: Element>(&self) -> Result<Inputs<'py, T>> {
        let su = shape(self.u, "u", 3)?;
        let sa = shape(self.a, "A", 2)?;
        Ok(Inputs {
            dims: (su[0], su[1], su[2], sa[1]),
            u: ro(self.u, "u")?,
            delta: ro(self.delta, "delta")?,
            a: ro(self.a, "A")?,
            b_groups: mat_groups(self.b, "B")?,
            b: ro(self.b, "B")?,
            c_groups: mat_groups(self.c, "C")?,
            c: ro(self.c, "C")?,
            d: opt_ro(self.d, "D")?,
            z: opt_ro(self.z, "z")?,
            delta_bias: opt_ro(self.delta_bias, "delta_bias")?,
            h0: opt_ro(self.h0, "initial_state")?,
            seq_idx: opt_ro(self.seq_idx, "seq_idx")?,
            softplus: self.softplus,
        })
    }
}

impl<T: Element> Inputs<'_, T> {
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
) -> Result<()> {
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        raw: &Raw<'_, '_>,
        out: &Bound<'_, PyAny>,
        last: &Bound<'_, PyAny>,
        ckpt: &Bound<'_, PyAny>,
    ) -> Result<()> {
        let i = raw.borrow::<T>()?;
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
        Ok(py.detach(|| selective::forward(lv, &s, fo))?)
    }
    let raw = Raw::new(
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
    );
    by_float!(is_f64(&u, "u")?, go(py, &raw, &out, &last, &ckpt))
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
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        raw: &Raw<'_, '_>,
        ckpt: &Bound<'_, PyAny>,
        dout: &Bound<'_, PyAny>,
        dlast: Opt<'_, '_>,
        g: [&Bound<'_, PyAny>; 6],
        og: [Opt<'_, '_>; 3],
    ) -> Result<()> {
        let i = raw.borrow::<T>()?;
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
        Ok(py.detach(|| selective::backward(lv, &s, ks, gs, dls, o))?)
    }
    let raw = Raw::new(
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
    );
    let grads = [&du, &ddelta, &da, &db, &dc, &dh0];
    let opt_grads = [&dd, &dz, &ddelta_bias];
    by_float!(
        is_f64(&u, "u")?,
        go(py, &raw, &ckpt, &dout, &dlast, grads, opt_grads)
    )
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CHECKPOINT_CHUNK", selective::CHUNK)?;
    m.add_function(wrap_pyfunction!(diag_scan, m)?)?;
    m.add_function(wrap_pyfunction!(selective_scan_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(selective_scan_bwd, m)?)?;
    Ok(())
}
