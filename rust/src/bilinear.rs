//! `bmojo_core._core.bilinear`: the bilinear / time-varying dense affine recurrence,
//! design §5.
//!
//! `b (batch, L, n)`; modulated form `a0 (n, n)`, `nmat (m, n, n)`, `v (batch, L, m)`;
//! per-step form `a (batch, L, n, n)`; `h0`, `last`, `dh0 (batch, n)`; states `xs
//! (batch, L, n)`. Outputs are written in place.

use bmojo_kernels::bilinear::{self, BilinearArgs, BwdOut, Trans};
use bmojo_kernels::SimdElem;
use numpy::{Element, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::args::{by_float, is_f64, opt_ro, ro, rw, shape, slice, Opt};
use crate::errors::Result;
use crate::runtime::level;

/// Borrowed inputs of either form (`a` is `A0` or the per-step `A`).
struct Inputs<'py, T: Element> {
    dims: (usize, usize, usize, usize),
    b: PyReadonlyArrayDyn<'py, T>,
    a: PyReadonlyArrayDyn<'py, T>,
    nmat: Option<PyReadonlyArrayDyn<'py, T>>,
    v: Option<PyReadonlyArrayDyn<'py, T>>,
    h0: Option<PyReadonlyArrayDyn<'py, T>>,
}

impl<T: Element> Inputs<'_, T> {
    fn args(&self) -> BilinearArgs<'_, T> {
        let (batch, len, n, m) = self.dims;
        let trans = match (&self.nmat, &self.v) {
            (Some(nm), Some(v)) => Trans::Modulated {
                a0: slice(&self.a),
                nmat: slice(nm),
                v: slice(v),
                m,
            },
            _ => Trans::PerStep { a: slice(&self.a) },
        };
        BilinearArgs {
            batch,
            len,
            n,
            trans,
            b: slice(&self.b),
            h0: self.h0.as_ref().map(slice),
        }
    }
}

/// The modulated form's `nmat` and `v` (absent for the per-step form).
type Mod<'a, 'py> = Option<(&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>)>;

fn inputs<'py, T: Element>(
    b: &Bound<'py, PyAny>,
    a: &Bound<'py, PyAny>,
    modulated: Mod<'_, 'py>,
    h0: Opt<'_, 'py>,
) -> Result<Inputs<'py, T>> {
    let sb = shape(b, "b", 3)?;
    let m = match modulated {
        Some((nm, _)) => shape(nm, "N", 3)?[0],
        None => 0,
    };
    Ok(Inputs {
        dims: (sb[0], sb[1], sb[2], m),
        b: ro(b, "b")?,
        a: ro(a, "A")?,
        nmat: modulated.map(|(x, _)| ro(x, "N")).transpose()?,
        v: modulated.map(|(_, x)| ro(x, "v")).transpose()?,
        h0: opt_ro(h0, "initial_state")?,
    })
}

#[allow(clippy::too_many_arguments)]
fn fwd<T: SimdElem + Element>(
    py: Python<'_>,
    b: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    modulated: Mod<'_, '_>,
    h0: Opt<'_, '_>,
    parallel: bool,
    xs: &Bound<'_, PyAny>,
    last: &Bound<'_, PyAny>,
) -> Result<()> {
    let i = inputs::<T>(b, a, modulated, h0)?;
    let (mut rx, mut rl) = (rw::<T>(xs, "xs")?, rw::<T>(last, "last_state")?);
    let s = i.args();
    let (x, l) = (rx.as_slice_mut()?, rl.as_slice_mut()?);
    let lv = level();
    Ok(py.detach(|| bilinear::forward(lv, &s, parallel, x, l))?)
}

/// Forward of the modulated form `A_t = A0 + Σ_j v_{t,j} N_j`.
#[pyfunction]
#[pyo3(signature = (b, a0, nmat, v, h0, parallel, xs, last))]
#[allow(clippy::too_many_arguments)]
fn scan_fwd(
    py: Python<'_>,
    b: Bound<'_, PyAny>,
    a0: Bound<'_, PyAny>,
    nmat: Bound<'_, PyAny>,
    v: Bound<'_, PyAny>,
    h0: Option<Bound<'_, PyAny>>,
    parallel: bool,
    xs: Bound<'_, PyAny>,
    last: Bound<'_, PyAny>,
) -> Result<()> {
    let md = Some((&nmat, &v));
    by_float!(
        is_f64(&b, "b")?,
        fwd(py, &b, &a0, md, &h0, parallel, &xs, &last)
    )
}

/// Forward with per-step matrices `a (batch, L, n, n)`.
#[pyfunction]
#[pyo3(signature = (b, a, h0, parallel, xs, last))]
fn tv_scan_fwd(
    py: Python<'_>,
    b: Bound<'_, PyAny>,
    a: Bound<'_, PyAny>,
    h0: Option<Bound<'_, PyAny>>,
    parallel: bool,
    xs: Bound<'_, PyAny>,
    last: Bound<'_, PyAny>,
) -> Result<()> {
    by_float!(
        is_f64(&b, "b")?,
        fwd(py, &b, &a, None, &h0, parallel, &xs, &last)
    )
}

/// Gradient arrays: `db`, `da`, `dh0` always, `dn`/`dv` for the modulated form.
struct Grads<'a, 'py> {
    db: &'a Bound<'py, PyAny>,
    da: &'a Bound<'py, PyAny>,
    dn: Option<&'a Bound<'py, PyAny>>,
    dv: Option<&'a Bound<'py, PyAny>>,
    dh0: &'a Bound<'py, PyAny>,
}

#[allow(clippy::too_many_arguments)]
fn bwd<T: SimdElem + Element>(
    py: Python<'_>,
    b: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    modulated: Mod<'_, '_>,
    h0: Opt<'_, '_>,
    xs: &Bound<'_, PyAny>,
    dxs: &Bound<'_, PyAny>,
    dlast: Opt<'_, '_>,
    g: &Grads<'_, '_>,
) -> Result<()> {
    let i = inputs::<T>(b, a, modulated, h0)?;
    let (rx, rdx, rdl) = (
        ro::<T>(xs, "xs")?,
        ro::<T>(dxs, "dxs")?,
        opt_ro::<T>(dlast, "dlast_state")?,
    );
    let mut db = rw::<T>(g.db, "db")?;
    let mut da = rw::<T>(g.da, "dA")?;
    let mut dn = g.dn.map(|x| rw::<T>(x, "dN")).transpose()?;
    let mut dv = g.dv.map(|x| rw::<T>(x, "dv")).transpose()?;
    let mut dh0 = rw::<T>(g.dh0, "dinitial_state")?;
    let s = i.args();
    let o = BwdOut {
        db: db.as_slice_mut()?,
        da: da.as_slice_mut()?,
        dn: match dn.as_mut() {
            Some(x) => x.as_slice_mut()?,
            None => &mut [],
        },
        dv: match dv.as_mut() {
            Some(x) => x.as_slice_mut()?,
            None => &mut [],
        },
        dh0: dh0.as_slice_mut()?,
    };
    let (x, dx, dl) = (slice(&rx), slice(&rdx), rdl.as_ref().map(slice));
    let lv = level();
    Ok(py.detach(|| bilinear::backward(lv, &s, x, dx, dl, o))?)
}

/// Backward of the modulated form: fills `db`, `da0`, `dn`, `dv`, `dh0`.
#[pyfunction]
#[pyo3(signature = (b, a0, nmat, v, h0, xs, dxs, dlast, db, da0, dn, dv, dh0))]
#[allow(clippy::too_many_arguments)]
fn scan_bwd(
    py: Python<'_>,
    b: Bound<'_, PyAny>,
    a0: Bound<'_, PyAny>,
    nmat: Bound<'_, PyAny>,
    v: Bound<'_, PyAny>,
    h0: Option<Bound<'_, PyAny>>,
    xs: Bound<'_, PyAny>,
    dxs: Bound<'_, PyAny>,
    dlast: Option<Bound<'_, PyAny>>,
    db: Bound<'_, PyAny>,
    da0: Bound<'_, PyAny>,
    dn: Bound<'_, PyAny>,
    dv: Bound<'_, PyAny>,
    dh0: Bound<'_, PyAny>,
) -> Result<()> {
    let g = Grads {
        db: &db,
        da: &da0,
        dn: Some(&dn),
        dv: Some(&dv),
        dh0: &dh0,
    };
    let md = Some((&nmat, &v));
    by_float!(
        is_f64(&b, "b")?,
        bwd(py, &b, &a0, md, &h0, &xs, &dxs, &dlast, &g)
    )
}

/// Backward with per-step matrices: fills `db`, `da (batch, L, n, n)`, `dh0`.
#[pyfunction]
#[pyo3(signature = (b, a, h0, xs, dxs, dlast, db, da, dh0))]
#[allow(clippy::too_many_arguments)]
fn tv_scan_bwd(
    py: Python<'_>,
    b: Bound<'_, PyAny>,
    a: Bound<'_, PyAny>,
    h0: Option<Bound<'_, PyAny>>,
    xs: Bound<'_, PyAny>,
    dxs: Bound<'_, PyAny>,
    dlast: Option<Bound<'_, PyAny>>,
    db: Bound<'_, PyAny>,
    da: Bound<'_, PyAny>,
    dh0: Bound<'_, PyAny>,
) -> Result<()> {
    let g = Grads {
        db: &db,
        da: &da,
        dn: None,
        dv: None,
        dh0: &dh0,
    };
    by_float!(
        is_f64(&b, "b")?,
        bwd(py, &b, &a, None, &h0, &xs, &dxs, &dlast, &g)
    )
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MAX_STATE", bilinear::MAX_STATE)?;
    m.add("PAR_CHUNK", bilinear::PAR_CHUNK)?;
    m.add_function(wrap_pyfunction!(scan_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(tv_scan_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(scan_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(tv_scan_bwd, m)?)?;
    Ok(())
}
