//! `bmojo_core._core.step`: the streaming selective state update (design §2.3).

use bmojo_kernels::{step, SimdElem};
use numpy::{Element, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::args::{
    by_float, disjoint, is_f64, opt_ro, opt_rw, out_or_new, ro, rw, slice, want, Opt,
};
use crate::errors::{PyBmojoErr, Result};
use crate::runtime::level;

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
) -> Result<Option<Bound<'py, PyAny>>> {
    #[allow(clippy::too_many_arguments)]
    fn go<'py, T: SimdElem + Element>(
        py: Python<'py>,
        state: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
        dt: &Bound<'py, PyAny>,
        a: &Bound<'py, PyAny>,
        b: &Bound<'py, PyAny>,
        c: &Bound<'py, PyAny>,
        d: Opt<'_, 'py>,
        z: Opt<'_, 'py>,
        dt_bias: Opt<'_, 'py>,
        softplus: bool,
        slots: Opt<'_, 'py>,
        out: Opt<'_, 'py>,
        snaps: Opt<'_, 'py>,
    ) -> Result<Option<Bound<'py, PyAny>>> {
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
            return Err(PyBmojoErr::value(format!(
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
        let (out_any, new_out) = out_or_new::<T>(py, out, &sx);
        let mut rout = rw::<T>(&out_any, "out")?;
        want("out", rout.shape(), &sx)?;
        let mut rsnaps = opt_rw::<T>(snaps, "intermediate_states")?;
        if let Some(v) = &rsnaps {
            want("intermediate_states", v.shape(), &[batch, ntok, dim, n])?;
        }
        disjoint(
            &[
                ("state", Some(state)),
                ("out", out.as_ref()),
                ("intermediate_states", snaps.as_ref()),
            ],
            &[
                ("x", Some(x)),
                ("dt", Some(dt)),
                ("A", Some(a)),
                ("B", Some(b)),
                ("C", Some(c)),
                ("D", d.as_ref()),
                ("z", z.as_ref()),
                ("dt_bias", dt_bias.as_ref()),
                ("state_batch_indices", slots.as_ref()),
            ],
        )?;
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
        py.detach(|| step::step(lv, &s, st, slots_total, o, sn))?;
        drop(rout);
        Ok(new_out)
    }
    by_float!(
        is_f64(&state, "state")?,
        go(py, &state, &x, &dt, &a, &b, &c, &d, &z, &dt_bias, softplus, &slots, &out, &snaps,)
    )
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(selective_state_update, m)?)?;
    Ok(())
}
