//! `bmojo_core._core.companion`: the companion (canonical) recurrence, design §4.
//!
//! Layouts are told apart by rank: `alpha`/`c` `(B, D, L, n)` per step or `(D, n)` per
//! channel; `beta` `(B, D, L)` or `(D,)`.

use bmojo_kernels::companion::{self, BwdOut, CompanionArgs, FwdOut, Seq};
use bmojo_kernels::SimdElem;
use numpy::{Element, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::args::{by_float, is_f64, ndim, opt_ro, opt_rw, ro, rw, shape, slice, Opt};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

/// Whether a coefficient is per step (`var_rank`) or per channel (`const_rank`).
fn is_var(a: &Bound<'_, PyAny>, name: &str, var_rank: usize, const_rank: usize) -> Result<bool> {
    match ndim(a, name)? {
        k if k == var_rank => Ok(true),
        k if k == const_rank => Ok(false),
        k => Err(PyBmojoErr::value(format!(
            "{name}: expected {var_rank} or {const_rank} dimensions, got {k}"
        ))),
    }
}

/// Read-only inputs borrowed from Python.
struct Inputs<'py, T: Element> {
    dims: (usize, usize, usize, usize),
    u: PyReadonlyArrayDyn<'py, T>,
    alpha: (PyReadonlyArrayDyn<'py, T>, bool),
    beta: Option<(PyReadonlyArrayDyn<'py, T>, bool)>,
    c: Option<(PyReadonlyArrayDyn<'py, T>, bool)>,
    d: Option<PyReadonlyArrayDyn<'py, T>>,
    h0: Option<PyReadonlyArrayDyn<'py, T>>,
}

fn inputs<'py, T: Element>(
    u: &Bound<'py, PyAny>,
    alpha: &Bound<'py, PyAny>,
    beta: Opt<'_, 'py>,
    c: Opt<'_, 'py>,
    d: Opt<'_, 'py>,
    h0: Opt<'_, 'py>,
) -> Result<Inputs<'py, T>> {
    let su = shape(u, "u", 3)?;
    let a_var = is_var(alpha, "alpha", 4, 2)?;
    let sa = shape(alpha, "alpha", if a_var { 4 } else { 2 })?;
    let n = sa[sa.len() - 1];
    let seq = |x: Opt<'_, 'py>, name: &str, vr, cr| -> Result<_> {
        x.as_ref()
            .map(|x| Ok((ro::<T>(x, name)?, is_var(x, name, vr, cr)?)))
            .transpose()
    };
    Ok(Inputs {
        dims: (su[0], su[1], su[2], n),
        u: ro(u, "u")?,
        alpha: (ro(alpha, "alpha")?, a_var),
        beta: seq(beta, "beta", 3, 1)?,
        c: seq(c, "c", 4, 2)?,
        d: opt_ro(d, "D")?,
        h0: opt_ro(h0, "initial_state")?,
    })
}

impl<T: Element> Inputs<'_, T> {
    fn args(&self) -> CompanionArgs<'_, T> {
        fn sq<'a, T: Element>((x, var): &'a (PyReadonlyArrayDyn<'_, T>, bool)) -> Seq<'a, T> {
            if *var {
                Seq::Var(slice(x))
            } else {
                Seq::Const(slice(x))
            }
        }
        let (batch, dim, len, order) = self.dims;
        CompanionArgs {
            batch,
            dim,
            len,
            order,
            u: slice(&self.u),
            alpha: sq(&self.alpha),
            beta: self.beta.as_ref().map(sq),
            c: self.c.as_ref().map(sq),
            d: self.d.as_ref().map(slice),
            s0: self.h0.as_ref().map(slice),
        }
    }
}

/// Forward: writes `y`, `s (B, D, L)` (optional: y = s without c and D) and
/// `last (B, D, n)`.
#[pyfunction]
#[pyo3(signature = (u, alpha, beta, c, d, h0, y, s, last))]
#[allow(clippy::too_many_arguments)]
fn scan_fwd(
    py: Python<'_>,
    u: Bound<'_, PyAny>,
    alpha: Bound<'_, PyAny>,
    beta: Option<Bound<'_, PyAny>>,
    c: Option<Bound<'_, PyAny>>,
    d: Option<Bound<'_, PyAny>>,
    h0: Option<Bound<'_, PyAny>>,
    y: Bound<'_, PyAny>,
    s: Option<Bound<'_, PyAny>>,
    last: Bound<'_, PyAny>,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        u: &Bound<'_, PyAny>,
        alpha: &Bound<'_, PyAny>,
        beta: Opt<'_, '_>,
        c: Opt<'_, '_>,
        d: Opt<'_, '_>,
        h0: Opt<'_, '_>,
        (y, s, last): (&Bound<'_, PyAny>, Opt<'_, '_>, &Bound<'_, PyAny>),
    ) -> Result<()> {
        let inp = inputs::<T>(u, alpha, beta, c, d, h0)?;
        let mut y = rw::<T>(y, "y")?;
        let mut s = opt_rw::<T>(s, "s")?;
        let mut last = rw::<T>(last, "last_state")?;
        let args = inp.args();
        let out = FwdOut {
            y: y.as_slice_mut()?,
            s: s.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            last: last.as_slice_mut()?,
        };
        let lv = level();
        Ok(py.detach(|| companion::companion_fwd(lv, &args, out))?)
    }
    let outs = (&y, &s, &last);
    by_float!(
        is_f64(&u, "u")?,
        go(py, &u, &alpha, &beta, &c, &d, &h0, outs)
    )
}

/// Backward: from the saved `s`, `dy` and `dlast`, writes every gradient in its input's
/// layout (`dbeta`, `dc`, `dd` exactly when `beta`, `c`, `d` are given).
#[pyfunction]
#[pyo3(signature = (u, alpha, beta, c, d, h0, s, dy, dlast, du, dalpha, dbeta, dc, dd, dh0))]
#[allow(clippy::too_many_arguments)]
fn scan_bwd(
    py: Python<'_>,
    u: Bound<'_, PyAny>,
    alpha: Bound<'_, PyAny>,
    beta: Option<Bound<'_, PyAny>>,
    c: Option<Bound<'_, PyAny>>,
    d: Option<Bound<'_, PyAny>>,
    h0: Option<Bound<'_, PyAny>>,
    s: Bound<'_, PyAny>,
    dy: Bound<'_, PyAny>,
    dlast: Option<Bound<'_, PyAny>>,
    du: Bound<'_, PyAny>,
    dalpha: Bound<'_, PyAny>,
    dbeta: Option<Bound<'_, PyAny>>,
    dc: Option<Bound<'_, PyAny>>,
    dd: Option<Bound<'_, PyAny>>,
    dh0: Bound<'_, PyAny>,
) -> Result<()> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: SimdElem + Element>(
        py: Python<'_>,
        ins: [&Bound<'_, PyAny>; 4],
        opts: [Opt<'_, '_>; 5],
        outs: [&Bound<'_, PyAny>; 3],
        oouts: [Opt<'_, '_>; 3],
    ) -> Result<()> {
        let [u, alpha, s, dy] = ins;
        let [beta, c, d, h0, dlast] = opts;
        let inp = inputs::<T>(u, alpha, beta, c, d, h0)?;
        let (rs, rdy, rdl) = (
            ro::<T>(s, "s")?,
            ro::<T>(dy, "dy")?,
            opt_ro::<T>(dlast, "dlast_state")?,
        );
        let mut du = rw::<T>(outs[0], "du")?;
        let mut da = rw::<T>(outs[1], "dalpha")?;
        let mut dh0 = rw::<T>(outs[2], "dinitial_state")?;
        let mut db = opt_rw::<T>(oouts[0], "dbeta")?;
        let mut dc = opt_rw::<T>(oouts[1], "dc")?;
        let mut dd = opt_rw::<T>(oouts[2], "dD")?;
        let args = inp.args();
        let out = BwdOut {
            du: du.as_slice_mut()?,
            dalpha: da.as_slice_mut()?,
            dbeta: db.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            dc: dc.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            dd: dd.as_mut().map(|x| x.as_slice_mut()).transpose()?,
            ds0: dh0.as_slice_mut()?,
        };
        let (sl, dyl, dll) = (slice(&rs), slice(&rdy), rdl.as_ref().map(slice));
        let lv = level();
        Ok(py.detach(|| companion::companion_bwd(lv, &args, sl, dyl, dll, out))?)
    }
    let ins = [&u, &alpha, &s, &dy];
    let opts = [&beta, &c, &d, &h0, &dlast];
    let outs = [&du, &dalpha, &dh0];
    let oouts = [&dbeta, &dc, &dd];
    by_float!(is_f64(&u, "u")?, go(py, ins, opts, outs, oouts))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MAX_ORDER", companion::MAX_ORDER)?;
    m.add_function(wrap_pyfunction!(scan_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(scan_bwd, m)?)?;
    Ok(())
}
